"""The file formats: safetensors files with string metadata, read and written by the others.

* elastic checkpoints and subnets (``format = "snapvit-elastic"``, ``kind`` ``elastic`` or
  ``subnet``; see :mod:`snapvit_lightning.elastic` for the layout): :func:`save_subnet`,
  :func:`load_subnet`, :func:`read_metadata`;
* any format: :func:`read_format` checks ``format`` / ``format_version`` (the correction
  statistics of :class:`~snapvit_lightning.correction.CorrectionStats` use it), and files are
  written to a temporary name, then renamed.

Loading parses JSON and reads tensors only; the model is rebuilt by its registered timm name
with plain keyword values, so nothing in a file is ever executed. This module imports neither
:mod:`~snapvit_lightning.elastic` nor :mod:`~snapvit_lightning.correction`.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from . import __version__
from .structure import BlockDims, block_dims, get_blocks, inspect_vit, slice_model
from .values import all_finite
from .file_io import FORMAT, write_safetensors
from .weights_io import config_of_built_size

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "save_subnet",
    "subnet_metadata",
    "load_subnet",
    "read_metadata",
    "check_model_kwargs",
    "resolve_rebuild",
    "read_format",
]

FORMAT_VERSION = 1

#: More blocks than any ViT has (ViT-22B: 48): a file's metadata naming more is refused before anything is built.
MAX_BLOCKS = 1024


def uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper compiled (its ``_orig_mod``), or ``model`` itself."""
    compiled = getattr(model, "_orig_mod", None)
    return compiled if isinstance(compiled, nn.Module) else model


def save_subnet(
    model: nn.Module, path: str | os.PathLike, *, model_name: str, model_kwargs: dict[str, Any],
    budget: dict[str, Any] | None = None,
) -> None:
    """Write a (sliced) timm ViT with its per-block dims so :func:`load_subnet` rebuilds it.

    ``budget``: plain JSON values saying how it was cut or changed (e.g. ``{"finetuned": "distilled
    2 epochs"}``), stored in the metadata ``budget`` (:func:`read_metadata` returns it; ``snapvit info``
    prints it) beside the ratios and correction of a subnet :meth:`ElasticViT.subnet` gave. A model
    compiled with ``torch.compile`` is saved as the model it compiled.

    Raises:
        TypeError: ``model`` is a path (the arguments swapped: ``ElasticViT.save_subnet`` takes the path first).
        ValueError: If ``model_name``/``model_kwargs`` do not rebuild this architecture, or
            ``budget`` holds values that are not JSON.
    """
    if isinstance(model, (str, os.PathLike)):
        raise TypeError(f"save_subnet(model, path, ...) takes the model first, got the path {str(model)!r} as model "
                        "(ElasticViT.save_subnet(path, subnet) is the method that takes the path first)")
    model = uncompiled(model)  # a torch.compile wrapper's state_dict keys start with _orig_mod.
    inspect_vit(model)
    check_model_kwargs(model_kwargs)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta = subnet_metadata(model, model_name, model_kwargs, budget)
    check_rebuilds(path, meta, tensors)
    _write(path, tensors, meta)


def check_rebuilds(path: str | os.PathLike, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    """Refuse to write a file whose metadata would not rebuild its ``model.*`` weights (as a load would).

    Raises:
        ValueError: Naming the first weights whose shapes differ (e.g. after timm's ``set_input_size``
            with a ``patch_size``, which a file's ``model_kwargs`` do not record).
    """
    try:
        _rebuild(path, {**meta, "model_kwargs": json.loads(meta["model_kwargs"]), "block_dims": json.loads(meta["block_dims"])},
                 tensors, check_only=True)
    except ValueError as err:
        raise ValueError(f"{err}; a file rebuilds the model from model_name and model_kwargs (the input size is "
                         "recorded as the model has it, nothing else changed after the build): give other changed "
                         "settings, e.g. patch_size, in model_kwargs") from None


def load_subnet(path: str | os.PathLike) -> nn.Module:
    """Read a subnet written by :func:`save_subnet` (or the full model of an elastic file).

    The budget a subnet file records (how it was cut) is kept on the model as ``snapvit_cut``, as
    :meth:`ElasticViT.subnet` leaves it, so saving the model again without ``budget=`` records it again.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: A corrupt file, another format or version, or mismatching contents.
    """
    tensors, meta = _read(path)
    model = _rebuild(path, meta, tensors)
    if meta["kind"] == "subnet" and meta.get("budget") is not None:
        model.snapvit_cut = meta["budget"]
    return model


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed metadata of an elastic or subnet file, without reading its tensors.

    An ``.onnx`` subnet (``snapvit slice -o F.onnx``, the export's ``onnx=True``) has the same metadata in
    its graph's ``metadata_props`` (reading them needs the ``onnx`` package).
    """
    if isinstance(path, (str, os.PathLike)) and Path(path).suffix.lower() == ".onnx" and Path(path).is_file():
        return _parse_meta(path, _onnx_props(path))
    return _read(path, tensors=False)[1]


def _onnx_props(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of the ONNX graph at ``path``, checked to be a snapvit subnet's."""
    try:
        import onnx
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"reading {path}'s metadata needs the onnx package: pip install onnx") from None
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # onnx's DecodeError and others: not a graph
        raise ValueError(f"{path} is not a readable ONNX graph (corrupt or truncated?): {' '.join(str(err).split())}") from err
    raw = {p.key: p.value for p in proto.metadata_props}
    if not proto.graph.node:  # onnx reads an empty file (and some other bytes) as an empty model
        raise ValueError(f"{path} is not an ONNX graph (empty, or no nodes)")
    if raw.get("format") != FORMAT:
        raise ValueError(f"{path} is an ONNX graph without snapvit's subnet metadata (save_onnx without "
                         "metadata=subnet_metadata(...)?); `snapvit info` reads the subnets `snapvit slice` writes")
    if raw.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(f"{path} has format_version {raw.get('format_version')!r}; this snapvit_lightning "
                         f"{__version__} reads version {FORMAT_VERSION}")
    return raw


def architecture(path: str | os.PathLike, meta: dict[str, Any]) -> nn.Module:
    """The model a file's metadata describes, on the ``meta`` device (no weights): its shapes, for counts."""
    return _rebuild(path, meta, {}, shapes_only=True)


def check_model_kwargs(model_kwargs: Any) -> dict[str, Any]:
    """Validate ``timm.create_model`` keyword arguments that a file can store; returns a copy.

    Raises:
        TypeError: If ``model_kwargs`` is not a dict.
        ValueError: If it holds values that are not JSON (names, numbers, lists, dicts).
    """
    if not isinstance(model_kwargs, dict):
        raise TypeError(f"model_kwargs must be a dict, got {type(model_kwargs).__name__}")
    try:
        json.dumps(model_kwargs)
    except TypeError as err:
        raise ValueError(
            f"model_kwargs must hold JSON values only (names, numbers, lists), as a file stores them: {err}; "
            "an option given as a class or function (e.g. block_fn, mlp_layer) needs a timm model name that "
            "sets it (timm.models.register_model), importable wherever the file is loaded"
        ) from err
    return dict(model_kwargs)


# Modules that compute the identity in eval mode, however they are configured (drop rates differ freely).
_EVAL_IDENTITY = frozenset({"Dropout", "DropPath", "PatchDropout", "Identity"})
# Attributes that choose a kernel or a training mode, not what the model computes.
_RUNTIME_SETTINGS = frozenset({"training", "fused_attn", "grad_checkpointing"})
_PLAIN = (bool, int, float, str, type(None))


def _settings(module: nn.Module) -> tuple[tuple[str, Any], ...]:
    """A module's own plain settings (numbers, names, flags and tuples of them), e.g. ``eps``, ``global_pool``."""
    items = []
    for key, value in vars(module).items():
        if key.startswith("_") or key in _RUNTIME_SETTINGS:
            continue
        if isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)):
            items.append((key, value))
    return tuple(sorted(items))


def _architecture(model: nn.Module) -> dict[str, tuple[str, tuple[tuple[str, Any], ...]]]:
    """What a model computes besides its weights: every module's class and settings, by module name."""
    return {name or "<model>": (type(m).__name__, _settings(m))
            for name, m in model.named_modules() if type(m).__name__ not in _EVAL_IDENTITY}


#: The ``pretrained_cfg`` entries that say how to preprocess the model's images (timm's ``resolve_data_config``).
DATA_CONFIG_KEYS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")


def _data_config(model: nn.Module) -> dict[str, Any]:
    """The model's :data:`DATA_CONFIG_KEYS` entries of its ``pretrained_cfg`` (tuples as lists, as JSON stores them)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {k: list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k] for k in DATA_CONFIG_KEYS if cfg.get(k) is not None}


@functools.lru_cache(maxsize=16)
def _rebuilt(
    model_name: str, model_kwargs_json: str
) -> tuple[dict[str, tuple[int, ...]], dict[str, Any], dict[str, Any]] | str:
    """Parameter shapes, :func:`_architecture` and :func:`_data_config` of ``timm.create_model(model_name, **kwargs)`` (or timm's error).

    Built on the meta device; cached: even there timm's weight initialisation takes ~0.5 s for a
    ViT-S, and every ElasticViT (e.g. each ``ranked_view``) checks its rebuild.
    """
    try:
        with torch.device("meta"):
            rebuilt = timm.create_model(model_name, pretrained=False, **json.loads(model_kwargs_json))
    except (AssertionError, TypeError, ValueError, RuntimeError) as err:
        return f"timm.create_model failed: {err}"
    return {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}, _architecture(rebuilt), _data_config(rebuilt)


def _natural(name: str) -> tuple[Any, ...]:
    """Sort key putting ``blocks.2`` before ``blocks.10``."""
    return tuple(int(part) if part.isdigit() else part for part in name.split("."))


def _differences(got: dict[str, Any], expected: dict[str, Any], architecture: bool, limit: int = 4) -> list[str]:
    """The first ``limit`` entries that differ, as ``name: rebuilt X, this model Y``.

    ``architecture``: the entries are :func:`_architecture`'s ``(class, settings)``, shown as the class,
    or as the settings that differ when the class is the same; else weight shapes, shown whole.
    """
    out = []
    for name in sorted(set(got) | set(expected), key=lambda n: (n not in expected, _natural(n))):
        a, b = got.get(name, "nothing"), expected.get(name, "nothing")
        if a == b:
            continue
        if architecture and isinstance(a, tuple) and isinstance(b, tuple):
            if a[0] == b[0]:  # the same class: name the settings that differ
                ours, theirs = dict(a[1]), dict(b[1])
                keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
                a, b = ({k: d.get(k) for k in keys} for d in (ours, theirs))
            else:
                a, b = a[0], b[0]
        out.append(f"{name}: rebuilt {a}, this model {b}")
    return out[:limit]


def resolve_rebuild(
    model: nn.Module, model_name: str | None = None, model_kwargs: dict[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """The timm name and keyword arguments a file records to rebuild ``model``, checked to rebuild it.

    Args:
        model: A timm ViT.
        model_name: Registered timm name; default the model's ``pretrained_cfg["architecture"]``.
        model_kwargs: ``timm.create_model`` keyword arguments (JSON values). The ``num_classes``,
            ``img_size``, ``global_pool`` and ``dynamic_img_size`` read from the model are added
            where they are not given (so only what else differs from the name's defaults, e.g.
            ``depth``, needs to be given).

    Returns:
        ``(model_name, model_kwargs)``.

    Raises:
        ValueError: No name, an unregistered name, kwargs that are not JSON, or a rebuild (on the
            meta device) that differs from ``model`` in a weight's name or shape, or in a module's class
            or settings (e.g. an activation, ``pool_include_prefix``): such a file would load as another
            model. Modules that are the identity in eval mode (dropout, drop-path) may differ.
    """
    if model_name is None:
        model_name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        if not model_name:
            raise ValueError("model_name is required: the model has no pretrained_cfg['architecture']")
    if not isinstance(model_name, str) or not timm.is_model(model_name):
        raise ValueError(f"model_name {model_name!r} is not a registered timm model")
    read = {
        "num_classes": int(model.num_classes),
        "img_size": [int(s) for s in model.patch_embed.img_size],
        "global_pool": model.global_pool,
    }
    if hasattr(model, "dynamic_img_size"):  # either way: a model's timm default may be the other
        read["dynamic_img_size"] = bool(model.dynamic_img_size)
    model_kwargs = {**read, **check_model_kwargs({} if model_kwargs is None else model_kwargs)}
    rebuilt = _rebuilt(model_name, json.dumps(model_kwargs, sort_keys=True))
    if isinstance(rebuilt, str):
        diff = [rebuilt]
    else:
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        diff = _differences(rebuilt[0], shapes, False) or _differences(rebuilt[1], _architecture(model), True)
    if diff and all(d.startswith("head") for d in diff) and any("nothing" in d for d in diff):  # another head module:
        raise ValueError(
            f"timm.create_model({model_name!r}, **{model_kwargs}) does not rebuild this model's classifier head "
            f"(first differences: {'; '.join(diff)}): a head replaced after timm built the ViT is rebuilt by no "
            "model_kwargs; keep the ViT headless (num_classes=0) with your head beside it in your module, or "
            "point model_attr (model_getter) at a headless ViT"
        )  # (a head of another size is rebuilt by num_classes: timm's reset_classifier(N) keeps it in step)
    if diff:
        raise ValueError(
            f"timm.create_model({model_name!r}, **{model_kwargs}) does not rebuild this model, so a file would "
            f"load as another model (first differences: {'; '.join(diff)}); pass model_name and model_kwargs "
            "that rebuild it (JSON values: an option given as a class, e.g. block_fn or mlp_layer, needs a timm "
            "model name that sets it, timm.models.register_model)"
        )
    return model_name, _with_data_config(model, model_kwargs, rebuilt[2])


def _with_data_config(model: nn.Module, model_kwargs: dict[str, Any], rebuilt: dict[str, Any]) -> dict[str, Any]:
    """``model_kwargs`` with a ``pretrained_cfg_overlay`` of the preprocessing the rebuild would not have (no ``file``).

    A model from an ``hf-hub:`` or ``local-dir:`` config (CLIP's mean and std, another interpolation)
    was rebuilt with its architecture's defaults, so its subnets, ONNX files and ``resolve_data_config``
    normalised images differently from the calibration.
    """
    differ = {k: v for k, v in _data_config(model).items() if rebuilt.get(k) != v}
    overlay = model_kwargs.get("pretrained_cfg_overlay")
    # the weights file an overlay named is not kept: a rebuild never reads it, and its path is the building machine's
    kept = {k: v for k, v in overlay.items() if k != "file"} if isinstance(overlay, dict) else {}
    if kept == overlay and not differ:
        return model_kwargs
    rest = {k: v for k, v in model_kwargs.items() if k != "pretrained_cfg_overlay"}
    return {**rest, "pretrained_cfg_overlay": {**kept, **differ}} if kept or differ else rest


def subnet_metadata(
    model: nn.Module, model_name: str, model_kwargs: dict[str, Any], budget: dict[str, Any] | None = None
) -> dict[str, str]:
    """The string metadata of a subnet file (:func:`save_subnet`; an ONNX subnet's ``metadata_props`` too).

    The budget recorded is how :meth:`ElasticViT.subnet` (or :func:`load_subnet`'s file) cut ``model``
    (``model.snapvit_cut``: its ratios and correction), if it did, with ``budget``'s keys added (they
    replace the cut's keys of the same name).

    Raises:
        TypeError: ``budget`` is not a dict (or ``None``).
        ValueError: ``budget`` holds values that are not JSON.
    """
    if budget is not None and not isinstance(budget, dict):
        raise TypeError(f"budget must be a dict of plain JSON values or None, got {budget!r}")
    cut = getattr(model, "snapvit_cut", None)
    if isinstance(cut, dict):  # a budget of the user's (e.g. {"finetuned": ...}) adds to the cut, not replaces it
        budget = {**cut, **(budget or {})}
    meta = _metadata("subnet", model, model_name, model_kwargs)
    if budget is not None:
        try:
            meta["budget"] = json.dumps(budget, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"budget must hold plain JSON values, got {budget!r}: {err}") from None
    return meta


def _as_it_is_now(model: nn.Module, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``model_kwargs`` with the input size the model has now (timm's ``set_input_size`` changes it after the build)."""
    size = [int(s) for s in model.patch_embed.img_size]
    if "img_size" not in model_kwargs or model_kwargs["img_size"] in (size, size[0] if size[0] == size[1] else None):
        return model_kwargs
    return {**model_kwargs, "img_size": size}


def _metadata(kind: str, model: nn.Module, model_name: str, model_kwargs: dict[str, Any]) -> dict[str, str]:
    dims = [[d.num_heads, d.mlp_hidden] for d in map(block_dims, get_blocks(model))]
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "kind": kind,
        "model_name": model_name,
        "model_kwargs": json.dumps(_as_it_is_now(model, model_kwargs)),
        "input_size": json.dumps([int(s) for s in model.patch_embed.img_size]),
        "block_dims": json.dumps(dims),
        "snapvit_version": __version__,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
    }


def _write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write a safetensors file atomically (:func:`~snapvit_lightning.file_io.write_safetensors`)."""
    write_safetensors(path, tensors, meta)


#: What the files of each format of this package hold (for errors on a file of the wrong kind).
_KNOWN_FORMATS = {FORMAT: "an elastic checkpoint or a subnet", "snapvit-correction-stats": "correction statistics"}

_REQUIRED_META = ("format", "format_version", "kind", "model_name", "model_kwargs", "block_dims", "input_size")


def read_format(
    path: str | os.PathLike, fmt: str, version: int | tuple[int, ...], what: str, tensors: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and raw metadata of a safetensors file of format ``fmt`` and ``version``.

    ``version`` may be a tuple of the versions this reader understands (the file's is then in
    ``meta["format_version"]``).

    Raises:
        TypeError: ``path`` is not a path.
        FileNotFoundError: ``path`` does not exist (the message names ``what``).
        ValueError: An unreadable file (a ``torch.save`` file is named as one), another format or version.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path (str or os.PathLike), got {type(path).__name__}")
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the {what} file")
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    if path.suffix.lower() == ".onnx":  # else "not a readable safetensors file (corrupt or truncated?)"
        raise ValueError(f"{path} is an ONNX graph; this reads {what} files (safetensors); run the graph with "
                         "ONNX Runtime (snapvit_lightning.onnx_export.OnnxModel)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            data = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        with open(path, "rb") as f:
            head = f.read(4)
        if head.lstrip()[:1] in (b"{", b"["):  # e.g. an export's report.json given for its checkpoint
            raise ValueError(f"{path} is a JSON file (a report?), not safetensors; this reads {what} files") from err
        if head == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save's zip, or a bare pickle
            raise ValueError(f"{path} is a zip or pickle file (torch.save's formats), not safetensors; this reads "
                             f"{what} files and never unpickles (a full model's weights in it: model.checkpoint_path; a "
                             "fine-tuned subnet's state_dict: load_subnet(its subnet file).load_state_dict(...))") from err
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {err}") from err
    if raw.get("format") != fmt:
        kind = _KNOWN_FORMATS.get(raw.get("format"))
        if kind is None:  # e.g. torch's save_file writes format 'pt': weights without snapvit's metadata
            raise ValueError(f"{path} is a safetensors file without snapvit's metadata (model weights?); this reads "
                             f"{what} files; `snapvit fit` (model.checkpoint_path: these weights) makes an elastic checkpoint")
        raise ValueError(f"{path} holds {kind}; this reads {what} files")
    versions = (version,) if isinstance(version, int) else tuple(version)
    if raw.get("format_version") not in {str(v) for v in versions}:
        readable = f"version {versions[0]}" if len(versions) == 1 else f"versions {', '.join(map(str, versions))}"
        raise ValueError(
            f"{path} has format_version {raw.get('format_version')!r}; this snapvit_lightning "
            f"{__version__} reads {readable}"
        )
    return data, raw


def _read(path: str | os.PathLike, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    data, raw = read_format(path, FORMAT, FORMAT_VERSION, "elastic checkpoint or subnet", tensors)
    return data, _parse_meta(path, raw)


def _parse_meta(path: str | os.PathLike, raw: dict[str, str]) -> dict[str, Any]:
    """A file's string metadata, checked, with its JSON values parsed."""
    missing = [k for k in _REQUIRED_META if k not in raw]
    if missing:
        raise ValueError(f"{path} lacks metadata {missing}")
    meta: dict[str, Any] = dict(raw)
    try:
        for key in ("model_kwargs", "block_dims", "input_size", "budget"):
            if key in raw:  # budget: subnets written by `snapvit slice`
                meta[key] = json.loads(raw[key])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid metadata JSON: {err}") from err
    if not isinstance(meta.get("budget", {}), dict):
        raise ValueError(f"{path}: metadata 'budget' must be a JSON object, got {raw['budget'][:80]!r}")
    if meta["kind"] not in ("elastic", "subnet"):
        raise ValueError(f"{path}: unknown kind {meta['kind']!r}")
    return meta


def _check_weights(path: str | os.PathLike, state: dict[str, torch.Tensor], kwargs: dict, dims: list) -> None:
    """Refuse weights no model should run (before the model is built: a forged ``depth`` would build for minutes).

    One floating dtype (``load_state_dict(assign=True)`` keeps each tensor's own, and a mixed model
    fails in its first matmul), finite values, and ``depth``/``embed_dim`` that agree with the file.
    """
    if "depth" in kwargs and kwargs["depth"] != len(dims):
        raise ValueError(f"{path}: model_kwargs depth={kwargs['depth']!r} but block_dims lists {len(dims)} blocks")
    if len(dims) > MAX_BLOCKS:  # an ONNX file's metadata has no weights to count them against
        raise ValueError(f"{path}: block_dims lists {len(dims)} blocks, more than any ViT has (at most {MAX_BLOCKS})")
    held = {k.split(".")[1] for k in state if k.startswith("blocks.")}
    if state and held != {str(i) for i in range(len(dims))}:  # before building them: a forged depth built for minutes
        raise ValueError(f"{path}: block_dims lists {len(dims)} blocks, but the file's weights hold {len(held)}")
    width = state.get("patch_embed.proj.weight")
    if "embed_dim" in kwargs and width is not None and kwargs["embed_dim"] != width.shape[0]:
        raise ValueError(f"{path}: model_kwargs embed_dim={kwargs['embed_dim']!r} but the patch embedding has {width.shape[0]}")
    dtypes = {str(v.dtype).replace("torch.", "") for v in state.values()}
    if state and (len(dtypes) != 1 or not next(iter(state.values())).is_floating_point()):
        raise ValueError(f"{path}: the model's tensors must share one floating dtype, got {sorted(dtypes)}")
    bad = next((k for k, v in state.items() if not all_finite(v)), None)
    if bad is not None:
        raise ValueError(f"{path}: model tensor {bad!r} holds NaN or infinite values")


def _rebuild(
    path: str | os.PathLike, meta: dict[str, Any], tensors: dict[str, torch.Tensor], check_only: bool = False,
    shapes_only: bool = False,
) -> nn.Module:
    name, kwargs = meta["model_name"], meta["model_kwargs"]
    if not isinstance(name, str) or not timm.is_model(name):
        raise ValueError(f"{path}: model_name {name!r} is not a registered timm model (one your own code registers "
                         "with timm's @register_model: load the file from Python after importing that code)")
    if not isinstance(kwargs, dict):
        raise ValueError(f"{path}: model_kwargs must be a JSON object, got {kwargs!r}")
    if "checkpoint_path" in kwargs:  # timm.create_model would read that file: no file we write holds it
        raise ValueError(f"{path}: model_kwargs holds checkpoint_path={kwargs['checkpoint_path']!r} (a forged file?)")
    try:
        dims = [BlockDims(int(h), int(n)) for h, n in meta["block_dims"]]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: invalid block_dims {meta['block_dims']!r}") from err
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    _check_weights(path, state, kwargs, dims)
    try:
        with torch.device("meta"):
            model = config_of_built_size(timm.create_model(name, pretrained=False, **kwargs))
        slice_model(model, dims)
        if shapes_only:
            return model.eval()
        if check_only:
            expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            given = {k: tuple(v.shape) for k, v in state.items()}
            if expected != given:
                differ = [f"{k}: {list(given.get(k, ())) or 'missing'}, rebuilt {list(expected.get(k, ())) or 'none'}"
                          for k in sorted(set(expected) | set(given)) if expected.get(k) != given.get(k)]
                head = [k for k in differ if k.startswith("head.")]
                hint = ("; the model is headless: pass model_kwargs with num_classes=0" if head and all(
                    k.split(":")[0] not in given for k in head) else "")
                raise ValueError(f"state dict shapes differ from the rebuilt model ({'; '.join(differ[:3])}"
                                 f"{'; ...' if len(differ) > 3 else ''}){hint}")
            return model
        model.load_state_dict(state, strict=True, assign=True)
    except (AssertionError, RuntimeError, ValueError, TypeError, KeyError) as err:  # timm asserts on bad kwargs
        raise ValueError(f"{path}: the weights do not fit {name} with {kwargs} and block_dims {meta['block_dims']}: {err}") from err
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ValueError(f"{path}: the file does not hold {leftover[:3]} of {name}")
    size = [int(s) for s in model.patch_embed.img_size]
    if meta["input_size"] != size:  # `snapvit info` and the tools read it as the model's
        raise ValueError(f"{path}: input_size {meta['input_size']!r} is not the model's {size}")
    return model.eval()
