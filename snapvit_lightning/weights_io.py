"""Building a timm model (optionally with timm's pretrained weights) and loading local weights into it.

Local weights: safetensors, ``torch.save`` files, Lightning checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import sys
import traceback
import urllib.error
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from .file_io import FORMAT, write_safetensors  # noqa: F401 (write_safetensors lived here: still importable)

__all__ = [
    "create_timm_model",
    "load_weights",
    "write_safetensors",
]


#: timm's order of a local-dir's weights files (``timm.models._hub``'s, as of timm 1.0.31): these names, then
#: the first file by name of each suffix in turn.
_LOCAL_DIR_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth", "open_clip_model.safetensors",
                    "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
_LOCAL_DIR_SUFFIXES = (".safetensors", ".pth", ".pth.tar", ".bin")


def _local_dir_weights(model_name: str) -> Path:
    """The weights file of a ``local-dir:FOLDER``, picked as timm picks it (:data:`_LOCAL_DIR_FILES`).

    It is loaded as ``checkpoint_path`` is (:func:`load_weights`), so a truncated, pickled or foreign
    file is said in one line with what to do, as there (timm's own loader raised a traceback or listed
    every key).

    Raises:
        FileNotFoundError: The folder holds no weights file.
    """
    folder = Path(model_name.split(":", 1)[1])
    for name in _LOCAL_DIR_FILES:
        if (folder / name).is_file():
            return folder / name
    for suffix in _LOCAL_DIR_SUFFIXES:
        found = sorted(p for p in folder.glob(f"*{suffix}") if p.is_file())
        if found:
            return found[0]
    raise FileNotFoundError(f"model {model_name!r}: with pretrained: true the folder '{folder}' must hold its weights "
                            f"(model.safetensors, pytorch_model.bin or another {'/'.join(_LOCAL_DIR_SUFFIXES)} file, "
                            "timm's local-dir layout); it holds none")


def weights_source(
    model_name: str | None, pretrained: bool, checkpoint_path: str | os.PathLike | None, model: nn.Module
) -> dict[str, Any] | None:
    """Where ``model``'s weights came from, as plain values for the export's record (``None``: nothing known).

    ``model`` as given (an ``hf-hub:``/``local-dir:`` name too, which the checkpoint records as its
    architecture), ``pretrained``, the name of the weights ``file`` read (``checkpoint_path``, or the file
    :func:`create_timm_model` loaded: a ``pretrained_cfg_overlay`` file, a ``local-dir:`` folder's, the
    Hugging Face cache's copy of a hub model's) with the first 16 hex digits of its SHA-256, and the
    ``hub_revision`` of a file from the Hugging Face cache (its snapshot folder).
    """
    import hashlib

    file = checkpoint_path or getattr(model, LOADED_FILE, None)
    if model_name is None and file is None:
        return None
    digest, revision = None, None
    if file is not None and Path(file).is_file():
        sha = hashlib.sha256()
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                sha.update(chunk)
        digest = sha.hexdigest()[:16]
        revision = Path(file).parent.name if Path(file).parent.parent.name == "snapshots" else None
    # the file's name, not its path: a checkpoint is shared, the folders of the machine that built it are not
    return {"model": model_name, "pretrained": bool(pretrained), "file": None if file is None else Path(file).name,
            "sha256": digest, "hub_revision": revision}


#: The attribute :func:`create_timm_model` sets on a model to the weights file it loaded (:func:`weights_source`).
LOADED_FILE = "_snapvit_weights_file"


def _check_local_dir(model_name: str) -> None:
    """Refuse a ``local-dir:FOLDER`` timm cannot read (timm says only "Config file not found", or a traceback).

    Raises:
        FileNotFoundError: No such folder (timm does not expand ``~``), a file, or no ``config.json``.
        ValueError: A ``config.json`` that is no JSON or names no ``architecture``.
    """
    given = model_name.split(":", 1)[1]
    folder = Path(given)  # as timm reads it: no ~ expansion
    config = folder / "config.json"
    layout = ('; timm\'s local-dir: reads FOLDER/config.json (e.g. {"architecture": "vit_small_patch14_dinov2", '
              '"num_classes": 0, "pretrained_cfg": {}}) and, with pretrained: true, FOLDER/model.safetensors (or '
              "pytorch_model.bin); or give a timm name and checkpoint_path")
    if not folder.exists():
        tilde = " (timm does not expand ~: give the full path)" if given.startswith("~") else ""
        raise FileNotFoundError(f"model {model_name!r}: the folder '{folder}' does not exist{tilde}{layout}")
    if not folder.is_dir() or not config.is_file():
        where = f"'{folder}' is a file, not a folder" if not folder.is_dir() else f"the folder '{folder}' has no config.json"
        raise FileNotFoundError(f"model {model_name!r}: {where}{layout}")
    try:
        content = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"model {model_name!r}: its config.json is no JSON ({err}){layout}") from None
    if not isinstance(content, dict) or not isinstance(content.get("architecture"), str):
        raise ValueError(f"model {model_name!r}: its config.json names no \"architecture\" (a timm model name){layout}")


def create_timm_model(model_name: str, pretrained: bool = False, model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``timm.create_model(model_name, pretrained=pretrained, **model_kwargs)`` with clear errors.

    ``model_name`` is a registered timm name, optionally with a pretrained tag
    (``vit_small_patch14_dinov2.lvd142m``), or a name timm resolves itself: ``hf-hub:ORG/REPO``
    (a model on the Hugging Face Hub) or ``local-dir:FOLDER`` (a folder with timm's
    ``config.json`` and weights). With ``pretrained=True`` timm loads the weights its pretrained
    config names (downloaded once from the Hub into the Hugging Face cache), or the local file
    given as ``model_kwargs={"pretrained_cfg_overlay": {"file": PATH}}``, which works offline and
    runs timm's own ``checkpoint_filter_fn`` (e.g. resampling position embeddings to ``img_size``).

    Args:
        model_name: See above.
        pretrained: Load timm's pretrained weights.
        model_kwargs: Further ``timm.create_model`` keyword arguments.

    Returns:
        The timm model.

    Raises:
        ValueError: An unknown model name or source prefix; a ``model_kwargs`` key the model does not take; ``checkpoint_path`` in
            ``model_kwargs`` (use the module's ``checkpoint_path``); a ``pretrained_cfg_overlay`` file
            without ``pretrained=True``, or one that does not load strictly; ``pretrained=True`` for a model timm has no weights for,
            or weights that do not load into it.
        FileNotFoundError: If the ``pretrained_cfg_overlay`` file does not exist, or a ``local-dir:``
            folder or its ``config.json``.
    """
    from timm.models import parse_model_name

    try:
        source, _ = parse_model_name(model_name)
    except ValueError as err:
        raise ValueError(f"model {model_name!r} is not a timm model name: {err}") from err
    if source is None and not timm.is_model(model_name):
        raise ValueError(f"model {model_name!r} is not a registered timm model name")
    if source == "local-dir":
        _check_local_dir(model_name)
    kwargs = dict(model_kwargs or {})
    if "checkpoint_path" in kwargs:  # timm would load it, and the elastic checkpoint would re-read it at every load
        raise ValueError(
            f"model_kwargs checkpoint_path={kwargs['checkpoint_path']!r}: pass it as checkpoint_path "
            "(model.checkpoint_path in a config), which loads it strictly once"
        )
    overlay = kwargs.get("pretrained_cfg_overlay")
    file = overlay.get("file") if isinstance(overlay, dict) else None
    if file is not None and not pretrained:
        raise ValueError(
            f"model_kwargs pretrained_cfg_overlay file={str(file)!r} is only read with pretrained=True"
        )
    if file is not None and not Path(file).is_file():
        raise FileNotFoundError(f"model_kwargs pretrained_cfg_overlay file={str(file)!r} does not exist")
    if source == "local-dir" and pretrained and file is None:  # the folder's weights, read as checkpoint_path is
        file = _local_dir_weights(model_name)
    try:
        hub = pretrained and file is None and source != "local-dir"
        if file is not None or hub:
            # timm loads a file with num_classes other than its config's non-strictly, so a file
            # missing whole blocks loaded silently: the same weights, through the strict loader.
            model = timm.create_model(model_name, pretrained=False, **kwargs)
            file = _hub_weights_file(model.pretrained_cfg) if hub else file  # a hub model's file, from the cache
            if file is None:  # weights at a URL (no hub copy): timm's loader
                return config_of_built_size(timm.create_model(model_name, pretrained=True, **kwargs))
            argument = ("the Hugging Face cache's file" if hub else
                        "model_kwargs pretrained_cfg_overlay file" if source != "local-dir" else "the file")
            try:
                load_weights(model, file, classifier=classifier_layers(model), argument=argument)
            except ValueError as err:
                if hub and "is not a readable" in str(err):
                    raise ValueError(_unreadable_hub_file(model_name, err.__cause__ or err)) from err
                where = f"; it comes from {_hub_place(model_name)}" if hub else ""
                raise ValueError(f"pretrained=True: could not load weights for model {model_name!r}: {err}{where}") from err
            setattr(model, LOADED_FILE, str(file))
            return config_of_built_size(model)
        return config_of_built_size(timm.create_model(model_name, pretrained=pretrained, **kwargs))
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        if not pretrained:  # e.g. an unknown pretrained tag
            raise ValueError(f"model {model_name!r}: {detail}") from err
        if len(detail) > _DETAIL_CHARS:  # every missing key and shape of another architecture's file: 24,000 characters
            detail = f"{_load_state_dict_summary(detail)}: weights of another architecture in {_hub_place(model_name)}?"
        raise ValueError(f"pretrained=True: timm could not load weights for model {model_name!r}: {detail}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:  # a damaged config.json in the cache
        raise ValueError(_unreadable_hub_file(model_name, err)) from err
    except urllib.error.URLError as err:  # weights at a URL (no hub copy), offline: urllib's traceback
        raise ValueError(f"pretrained=True: the weights of model {model_name!r} are at a URL that could not be read "
                         f"({err.reason}); give local weights: checkpoint_path, or model_kwargs pretrained_cfg_overlay "
                         "{file: PATH}") from err
    except (AssertionError, ZeroDivisionError, KeyError, IndexError, ValueError) as err:
        # model_kwargs the model class fails on (num_heads not dividing the width, patch_size 0, an unknown act_layer)
        frames = traceback.extract_tb(err.__traceback__)
        if not isinstance(err, AssertionError) and (not frames or f"{os.sep}timm{os.sep}" not in frames[-1].filename):
            raise  # ours (they name what to do), or not timm's
        said = str(err) or "an assertion failed"
        raise ValueError(f"model_kwargs {kwargs}: timm refuses them for {model_name!r}: "
                         f"{said if isinstance(err, AssertionError) else f'{type(err).__name__}: {said}'}") from err
    except TypeError as err:  # a misspelt model_kwargs key: the model class's own message names it
        if "unexpected keyword argument" not in str(err):
            raise
        raise ValueError(f"model_kwargs {sorted(kwargs)}: {model_name!r} does not take one of them: {err}") from err
    except Exception as err:
        if type(err).__name__ == "SafetensorError":  # a truncated or damaged weights file in the cache
            raise ValueError(_unreadable_hub_file(model_name, err)) from err
        if not type(err).__module__.startswith("huggingface_hub"):
            raise
        from huggingface_hub import constants

        detail = " ".join(str(err).split())[:300]
        local = "give local weights: checkpoint_path, or model_kwargs pretrained_cfg_overlay {file: PATH}"
        if constants.HF_HUB_OFFLINE:  # the hub's own text ("check your connection") points the wrong way here
            raise ValueError(
                f"model {model_name!r}: HF_HUB_OFFLINE=1 and {_hub_place(model_name)} holds no complete copy of "
                f"its files ({type(err).__name__}); fill that cache (HF_HOME or HF_HUB_CACHE name it), or {local}"
            ) from err
        raise ValueError(
            f"model {model_name!r}: the Hugging Face Hub could not provide its files (offline?): {detail}; with "
            f"its files in the cache ({_hub_place(model_name)}) set HF_HUB_OFFLINE=1, which reads them without "
            f"network retries; else {local}"
        ) from err


_DETAIL_CHARS = 400

#: timm's safetensors copies of its hub files' torch pickles (``_get_safe_alternatives``).
_SAFE_ALTERNATIVES = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}


def _hub_weights_file(cfg: dict[str, Any]) -> Path | None:
    """The Hugging Face Hub file timm would load for a pretrained config (downloaded, or the cache's copy offline).

    ``None`` when the weights are not on the hub (a URL): timm loads those itself. A safetensors copy
    is preferred, as timm does.

    Raises:
        huggingface_hub's errors: The hub and the cache cannot provide the file.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    hub_id = cfg.get("hf_hub_id")
    if not hub_id or cfg.get("file") or cfg.get("state_dict"):
        return None
    repo, _, revision = hub_id.partition("@")
    name = cfg.get("hf_hub_filename") or "pytorch_model.bin"
    safe = _SAFE_ALTERNATIVES.get(name) or (name[: -len(".bin")] + ".safetensors" if name.endswith(".bin") else None)
    names = [name] if name.endswith(".safetensors") else [safe, name] if safe else [name]
    for i, candidate in enumerate(names):
        try:
            return Path(hf_hub_download(repo, candidate, revision=revision or None))
        except (EntryNotFoundError, LocalEntryNotFoundError):
            if i == len(names) - 1:
                raise
    return None


def _load_state_dict_summary(detail: str) -> str:
    """torch's ``load_state_dict`` error as counts and first examples (it lists every key and shape)."""
    import re

    parts = []
    for kind in ("Missing", "Unexpected"):
        listed = re.search(rf'{kind} key\(s\) in state_dict: ((?:"[^"]*"(?:, )?)+)', detail)
        keys = re.findall(r'"([^"]+)"', listed.group(1)) if listed else []
        if keys:
            parts.append(f"{len(keys)} {kind.lower()} keys ({', '.join(keys[:2])}{', ...' if len(keys) > 2 else ''})")
    shapes = re.findall(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                        r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)", detail)
    if shapes:
        name, file, model = shapes[0]
        parts.append(f"{len(shapes)} tensors of other shapes ({name}: file {file}, model {model}{', ...' if len(shapes) > 1 else ''})")
    if not parts:
        return f"{detail[:_DETAIL_CHARS]} ... ({len(detail):,} characters in all)"
    return f"{detail.split(':', 1)[0]}: {'; '.join(parts)}"


def _hub_place(model_name: str) -> str:
    """Where the Hugging Face cache keeps ``model_name``'s files, for errors: ``the Hugging Face cache DIR (REPO)``."""
    from huggingface_hub import constants
    from timm.models import get_pretrained_cfg, parse_model_name

    repo = None
    with contextlib.suppress(Exception):  # only a name for a message: none when timm knows none
        source, ident = parse_model_name(model_name)
        repo = ident.split("@")[0] if source == "hf-hub" else getattr(get_pretrained_cfg(model_name), "hf_hub_id", None)
    folder = f"{constants.HF_HUB_CACHE}/models--{repo.replace('/', '--')}" if repo else constants.HF_HUB_CACHE
    return f"the Hugging Face cache {folder}" + (f" ({repo})" if repo else "")


def _unreadable_hub_file(model_name: str, err: BaseException) -> str:
    detail = " ".join(str(err).split())[:300]
    return (f"pretrained=True: a file read for model {model_name!r} is damaged or truncated ({type(err).__name__}: "
            f"{detail}); it comes from {_hub_place(model_name)}: delete that folder and download the model again, or "
            "give local weights: checkpoint_path")


def config_of_built_size(model: nn.Module) -> nn.Module:
    """Set ``model.pretrained_cfg["input_size"]`` to the size the model was built for; returns ``model``.

    ``create_model(..., img_size=112)`` builds a model for 112 px but keeps the pretrained config's
    size (518 px for DINOv2), so ``timm.data.resolve_data_config({}, model=model)`` and the
    transforms made from it fed the model images it refuses.
    """
    cfg = getattr(model, "pretrained_cfg", None)
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(cfg, dict) and isinstance(built, tuple) and len(built) == 2 and len(cfg.get("input_size") or ()) == 3:
        cfg["input_size"] = (cfg["input_size"][0], *built)  # the same dict as model.default_cfg
    return model


def rebuild_spec(model_name: str, model_kwargs: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """The registered timm name and keyword arguments that rebuild a model created as ``model_name``.

    A plain (possibly tagged) name is returned as it is; ``hf-hub:`` and ``local-dir:`` names
    resolve to their ``config.json``'s architecture and model arguments (what timm used), so an
    elastic checkpoint of such a model reloads without the hub or the folder.
    """
    from timm.models import _hub, parse_model_name

    source, ident = parse_model_name(model_name)
    kwargs = dict(model_kwargs or {})
    if source is None:
        return model_name, kwargs
    loader = _hub.load_model_config_from_hf if source == "hf-hub" else _hub.load_model_config_from_path
    _, architecture, model_args = loader(ident)
    return architecture, {**(model_args or {}), **kwargs}


def _refuse_a_subnet_file(path: Path, argument: str) -> None:
    """A subnet file of this package (a cut model, narrower than the full one) given as the full model's weights."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") == FORMAT and meta.get("kind") == "subnet":
        raise ValueError(
            f"{argument} {str(path)!r} is a subnet file (a model cut to a budget, narrower than the full model), not "
            "the full model's weights: load it with snapvit_lightning.load_subnet(path); to fine-tune it, train that "
            "model and save it with ElasticViT.save_subnet (docs/usage.md)"
        )


def load_weights(
    model: nn.Module, path: str | os.PathLike[str], *, classifier: tuple[str, ...] = (), argument: str = "checkpoint_path"
) -> None:
    """Load local weights into ``model`` (strictly).

    Reads a safetensors file (known by its content, whatever its suffix) with safetensors,
    anything else with ``torch.load(weights_only=True)``. A Lightning checkpoint (a dict with
    ``state_dict``) or a training script's ``{"model": ...}`` is accepted; a common
    ``student.``/``model.``/``module.`` key prefix is stripped, and a file whose model sits under one
    attribute (a LightningModule's ``net.``, beside a loss's or other tensors) gives that model's
    tensors (two such models, e.g. ``net.`` and ``ema.net.``, are refused). If the keys
    do not match as they are, the timm model family's ``checkpoint_filter_fn`` is applied (as
    timm does for pretrained weights: original key layouts, position embeddings resampled to
    the model's ``img_size``) and the strict load is tried once more; a patch embedding that the
    filter resampled to another patch size is warned about (the weights were trained for another).
    A patch embedding of another number of input channels is adapted to the model's ``in_chans`` as
    timm adapts its pretrained weights (``adapt_input_conv``).

    ``classifier`` names head layers (timm's ``pretrained_cfg["classifier"]``) whose weights are
    dropped where the model's head differs (another ``num_classes``), as timm does: that head
    keeps its fresh weights, every other tensor must load. ``argument`` names ``path`` in errors.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file holds no state dict or its keys/shapes do not match the model.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        where = "" if path.is_absolute() else f" (read from {os.getcwd()})"
        offline = ("; this DINOv2 ViT-S/14 offline: `snapvit weights dinov2-vits14 PATH`" if
                   (getattr(model, "pretrained_cfg", None) or {}).get("architecture") == "vit_small_patch14_dinov2" else "")
        raise FileNotFoundError(
            f"{argument} {str(path)!r}{where} {'is a folder' if path.is_dir() else 'does not exist'}; give local weights "
            "(safetensors or a torch state dict), e.g. the model's timm hub file (model.safetensors of hf-hub:timm/NAME), "
            f"downloaded where there is internet{offline}"
        )
    if _is_safetensors(path):  # by content: a .bin or .SAFETENSORS file of safetensors too
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{argument} {str(path)!r} is not a readable safetensors file ({err}): a damaged or "
                             "truncated file? save model.state_dict() with safetensors or torch.save") from err
        _refuse_a_subnet_file(path, argument)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch's own advice (weights_only=False) is not ours to give: it would run the file
            objects = isinstance(err, pickle.UnpicklingError) and (  # a zip archive, or torch's weights-only refusal
                zipfile.is_zipfile(path) or "Unsupported global" in str(err))
            held = ("objects besides tensors (e.g. a whole model saved with torch.save(model)), which are never "
                    "unpickled here" if objects
                    else "no state dict torch.load(weights_only=True) can read (a damaged file, or not a checkpoint)")
            raise ValueError(f"{argument} {str(path)!r} is not a safetensors file and holds {held}; save "
                             "model.state_dict() with torch.save or safetensors") from err
    for key in ("state_dict", "model"):  # Lightning's and DeiT/timm training scripts' layouts (not an EMA copy)
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        found = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{argument} {str(path)!r} does not hold a state dict of tensors (found {found}); "
                         "save model.state_dict() with torch.save or safetensors")
    for prefix in ("student.", "model.", "module."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
            break
    model_keys = set(model.state_dict())
    if sum(k in model_keys for k in state) < len(model_keys) // 2:  # e.g. a LightningModule's checkpoint: its ViT under `net.`
        vits = sorted(k[: -len(_PATCH_KEY)] for k in state if k == _PATCH_KEY or k.endswith("." + _PATCH_KEY))
        if len(vits) > 1:  # a teacher and a student, an EMA copy: which one is meant is the user's to say
            where = ", ".join(repr(p) if p else "the top level" for p in vits)
            named = next(p for p in vits if p).rstrip(".")
            raise ValueError(f"{argument} {str(path)!r} holds {len(vits)} ViTs (patch embeddings under {where}): save "
                             f"the one to prune, e.g. module.{named}.state_dict()")
        if vits and vits[0]:  # the module's other tensors (a loss's weights, ...) are not the ViT's
            state = {k[len(vits[0]):]: v for k, v in state.items() if k.startswith(vits[0])}
    patch, own = state.get(_PATCH_KEY), model.state_dict().get(_PATCH_KEY)
    if patch is not None and own is not None and patch.ndim == 4 and patch.shape[1] != own.shape[1] \
            and patch.shape[0] == own.shape[0]:  # another in_chans: adapted as timm's pretrained loading adapts it
        from timm.models import adapt_input_conv

        state = {**state, _PATCH_KEY: adapt_input_conv(own.shape[1], patch)}
    try:
        _fresh_head_warning(_load_strict(model, state, classifier), path, argument, state, model)
        _dropped_head_warning(state, model, classifier, path, argument)
        return
    except RuntimeError as err:
        error = err
    # Like timm's pretrained loading: the model family's checkpoint_filter_fn converts original
    # key layouts and resamples position embeddings to the model's img_size.
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            filtered = filter_fn(dict(state), model)
        except Exception:  # a state the filter cannot read: report the unfiltered mismatch below
            filtered = None
        fresh = None
        if filtered is not None:
            try:
                fresh = _load_strict(model, filtered, classifier)
            except RuntimeError as err:  # what is left once the layouts and positions are converted: the real cause
                error = err
        if fresh is not None:
            _fresh_head_warning(fresh, path, argument, filtered, model)
            _dropped_head_warning(state, model, classifier, path, argument)
            patch = state.get("patch_embed.proj.weight")
            own = model.patch_embed.proj.weight if hasattr(model, "patch_embed") else None
            if patch is not None and own is not None and patch.shape[-2:] != own.shape[-2:]:
                (h, w), (mh, mw) = patch.shape[-2:], own.shape[-2:]
                warnings.warn(f"{argument} {str(path)!r}: its {h}x{w} patch embedding was resampled to the model's "
                              f"{mh}x{mw}: these weights were trained with another patch size", stacklevel=2)
            return
    hint = _prefix_hint(state, model)
    raise ValueError(f"{argument} {str(path)!r} does not match the model{hint}: "
                     f"{_shape_summary(state, model, error) or _short_error(error)}{'' if hint else _layout_hint(state, model)}") from error


def _layout_hint(state: dict[str, Tensor], model: nn.Module) -> str:
    """What a file of another ViT shows first: another depth, or tokens (class, register) the other lacks."""
    own = model.state_dict()

    def depth(keys: Iterable[str]) -> int:
        return len({k.split(".")[1] for k in keys if k.startswith("blocks.") and k.count(".") > 1})

    notes = []
    if depth(state) != depth(own):
        notes.append(f"the file has {depth(state)} blocks, the model {depth(own)}")
    for token, what in (("reg_token", "register tokens"), ("cls_token", "a class token"), ("dist_token", "a distillation token")):
        if (token in own) != (token in state):
            notes.append(f"the {'model' if token in own else 'file'} has {what} ({token}), the "
                         f"{'file' if token in own else 'model'} none")
    return f" ({'; '.join(notes)}: weights of another architecture?)" if notes else ""


def _shape_summary(state: dict[str, Tensor], model: nn.Module, error: BaseException) -> str | None:
    """The file's own shapes against the model's (timm's filter would show them resampled), ``None`` if all agree."""
    own = model.state_dict()

    def resampled(key: str, a: tuple[int, ...], b: tuple[int, ...]) -> bool:  # what timm's filter adapts: not a cause
        return (key == "pos_embed" and a[-1:] == b[-1:]) or (key == "patch_embed.proj.weight" and a[:2] == b[:2])

    differ = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)
              and not resampled(k, tuple(v.shape), tuple(own[k].shape))]
    if not differ or "size mismatch" not in str(error):
        return None
    shown = "; ".join(f"{k}: file {list(state[k].shape)}, model {list(own[k].shape)}" for k in differ[:3])
    width = state.get("patch_embed.proj.weight")
    widths = (f"; the file's ViT is {width.shape[0]} wide, the model {own['patch_embed.proj.weight'].shape[0]}: "
              "is model.model (or model_kwargs) the architecture these weights were trained as?"
              if width is not None and "patch_embed.proj.weight" in own
              and width.shape[0] != own["patch_embed.proj.weight"].shape[0] else "")
    return f"{len(differ)} of its {len(state)} tensors have other shapes ({shown}{'; ...' if len(differ) > 3 else ''}){widths}"


def _is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts like a safetensors file: an 8-byte header length, then ``{``."""
    with path.open("rb") as f:
        head = f.read(9)
    return path.suffix.lower() == ".safetensors" or (len(head) == 9 and head[8:9] == b"{"
                                                     and 0 < int.from_bytes(head[:8], "little") < 100_000_000)


#: The key of a timm ViT's patch embedding: where a file holds one ViT, whatever its other tensors.
_PATCH_KEY = "patch_embed.proj.weight"


def _model_prefixes(state: dict[str, Tensor], own: set[str]) -> list[str]:
    """The key prefixes (``'net.'``) under which ``state`` holds at least half of the model's keys ``own``."""
    found = {key[: -len(name)] for key in state for name in own if key.endswith("." + name)}
    return sorted(p for p in found if sum(k.startswith(p) and k[len(p):] in own for k in state) >= len(own) // 2)


def _prefix_hint(state: dict[str, Tensor], model: nn.Module) -> str:
    """`` (its keys start with 'backbone.')`` when the keys match the model's once a shared prefix is removed."""
    prefixes = _model_prefixes(state, set(model.state_dict()))
    return (f" (its keys start with {prefixes[0]!r}: save the ViT's own state_dict(), e.g. "
            f"module.{prefixes[0].rstrip('.')}.state_dict())") if prefixes else ""


def _short_error(error: BaseException) -> str:
    """A load_state_dict error in at most 600 characters (it lists every key)."""
    text = " ".join(str(error).split())
    return text if len(text) <= 600 else text[:600] + " ..."


def classifier_layers(model: nn.Module) -> tuple[str, ...]:
    """The model's head layers as timm names them (``pretrained_cfg["classifier"]``), ``()`` when unknown."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def _load_strict(model: nn.Module, state: dict[str, Tensor], classifier: tuple[str, ...]) -> list[str]:
    """``load_state_dict(strict=True)``, except that the ``classifier`` layers may differ from the model's head.

    Returns:
        The model's classifier weights the state did not fill (they keep their fresh values).
    """
    own = model.state_dict()
    optional = {f"{name}.{p}" for name in classifier for p in ("weight", "bias")}
    state = {k: v for k, v in state.items() if k not in optional or (k in own and own[k].shape == v.shape)}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in optional]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                           f"unexpected keys {result.unexpected_keys[:5]}{' ...' if len(result.unexpected_keys) > 5 else ''}")
    return [k for k in result.missing_keys if k in optional]


def _dropped_head_warning(
    state: dict[str, Tensor], model: nn.Module, classifier: tuple[str, ...], path: Path, argument: str
) -> None:
    """Warn when a headless model drops a file's classifier that is not its hub's (a fine-tuned one, likely).

    A hub file's head for ``num_classes: 0`` (DeiT's 1000 classes) is dropped as timm drops it, silently;
    a head of another size (a user's 8 classes under a config that says ``num_classes: 0``) was too.
    """
    weight = next((state[f"{name}.weight"] for name in classifier if f"{name}.weight" in state), None)
    hub_classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    if weight is None or getattr(model, "num_classes", None) != 0 or weight.ndim != 2 or weight.shape[0] == hub_classes:
        return
    warnings.warn(f"{argument} {str(path)!r} holds a classifier of {weight.shape[0]} classes, which this model "
                  f"(num_classes=0) drops; give model_kwargs num_classes: {weight.shape[0]} to keep it (the exported "
                  "subnets then ship it)", stacklevel=3)


def _fresh_head_warning(fresh: list[str], path: Path, argument: str, state: dict[str, Tensor], model: nn.Module) -> None:
    if not fresh:
        return
    own = model.state_dict()
    other = [k for k in fresh if k in state]  # in the file with another shape: another num_classes
    if other:
        classes = int(state[other[0]].shape[0])
        held = (f"holds a classifier of another shape ({', '.join(f'{k} {list(state[k].shape)}' for k in other)}, this "
                f"model's {', '.join(str(list(own[k].shape)) for k in other)}): give model_kwargs num_classes: {classes} "
                "to load it")
    else:
        held = f"holds no weights of this model's classifier ({', '.join(fresh)})"
    warnings.warn(f"{argument} {str(path)!r} {held}; the head keeps its fresh values, and the exported subnets ship "
                  "it (the label-free criteria do not use it; criterion='cross_entropy' needs a trained one)", stacklevel=3)
