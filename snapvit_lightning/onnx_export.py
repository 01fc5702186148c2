"""ONNX export of (sliced, corrected) timm ViTs, and running them with ONNX Runtime.

Needs the optional extra: ``pip install "snapvit_lightning[onnx]"`` (``onnx``, ``onnxruntime``).

The export uses torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``):
it needs neither ``onnxscript`` nor a network, and traces every supported timm ViT (fused or
explicit attention, sliced or not). The graph takes float images ``[batch, C, H, W]`` named
``images`` with a dynamic batch dimension and a fixed image size (the model's input size), and
returns the model's output (pre-logits features for ``num_classes=0``) named ``output``. Its
``metadata_props`` say how to feed it (``input_size``, ``mean``, ``std``) and, for subnets written by
``snapvit slice`` or the export, what it is (the subnet file's metadata: ``model_name``,
``block_dims``, ``budget``, ...). Exported graphs live in one protobuf, so models over 2 GB (ViT-g and larger) are not supported.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import math
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch
from torch import Tensor, nn

from .checkpoint import uncompiled
from .evaluation import _check_int, _eval_mode, _model_device
from .structure import check_model_images
from .values import all_finite, real_number
from .file_io import make_parent, write_file_atomic

__all__ = [
    "ONNX_OPSET", "INPUT_NAME", "OUTPUT_NAME",
    "onnx_bytes", "checked_onnx", "save_onnx", "OnnxModel", "onnx_max_abs_diff", "graph_metadata",
]

ONNX_OPSET = 17
try:  # the highest opset the TorchScript exporter writes (a private constant of torch.onnx)
    from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as _MAX_OPSET
except ImportError:  # pragma: no cover - another torch layout
    _MAX_OPSET = 20
INPUT_NAME = "images"
OUTPUT_NAME = "output"


def _require(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ImportError(
            f"ONNX export needs the optional dependency {name!r}: pip install \"snapvit_lightning[onnx]\""
        ) from err


def _input_shape(model: nn.Module, batch_size: int) -> tuple[int, ...]:
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is None:
        raise TypeError(f"model must be a timm ViT with patch_embed.img_size, got {type(model).__name__}")
    chans = int(getattr(getattr(patch_embed, "proj", None), "in_channels", 3))
    return (batch_size, chans, int(size[0]), int(size[1]))


def _check_graph_images(model: nn.Module, images: object, name: str) -> Tensor:
    """``images`` the exported graph takes: :func:`check_model_images`, at the graph's fixed input size."""
    images = check_model_images(model, images, name)
    shape = _input_shape(model, 1)[1:]
    if tuple(images.shape[1:]) != shape:
        raise ValueError(f"{name} must be [N, {', '.join(map(str, shape))}] (the exported graph's input), "
                         f"got {list(images.shape)}")
    return images


def _rms_norm(g, x, normalized_shape, weight, eps):  # noqa: ANN001 - a TorchScript-exporter symbolic
    """ONNX for ``aten::rms_norm`` (RmsNorm of AIMv2 and others), which the TorchScript exporter lacks."""
    from torch.onnx import symbolic_helper as sh

    axes = list(range(-len(sh._get_const(normalized_shape, "is", "normalized_shape")), 0))
    eps = torch.finfo(torch.float32).eps if sh._is_none(eps) else sh._get_const(eps, "f", "eps")
    square = g.op("Mul", x, x)
    if g.opset >= 18:  # ReduceMean takes its axes as an input from opset 18
        mean = g.op("ReduceMean", square, g.op("Constant", value_t=torch.tensor(axes)), keepdims_i=1)
    else:
        mean = g.op("ReduceMean", square, axes_i=axes, keepdims_i=1)
    rms = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32))))
    out = g.op("Div", x, rms)
    return out if sh._is_none(weight) else g.op("Mul", out, weight)


@contextlib.contextmanager
def _symbolics(opset: int) -> Iterator[None]:
    """Symbolics the TorchScript exporter lacks, registered for the export only."""
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::rms_norm", opset)


class _NoHeads(nn.Module):
    """Stands in for an attention left with zero heads: its output is ``proj``'s bias (or zeros).

    timm's reshape to ``[B, N, 3, 0, head_dim]`` becomes an ONNX ``Reshape`` whose 0 means
    "copy this dimension", which ONNX Runtime rejects.
    """

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.out_features = proj.out_features
        self.bias = proj.bias

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        zeros = torch.zeros_like(x[..., :1]).expand(*x.shape[:-1], self.out_features)
        return zeros if self.bias is None else zeros + self.bias


def _check_module(model: object) -> None:
    if not isinstance(model, nn.Module):  # an ElasticViT is no module: its model or a subnet is
        hint = ": export elastic.model or a subnet (elastic.subnet(...))" if hasattr(model, "subnet") else ""
        raise TypeError(f"model must be a timm ViT (an nn.Module), got {type(model).__name__}{hint}")


def _check_fixed_grid(model: nn.Module, opset: int) -> None:
    """Refuse a model that resamples its position embedding at every forward, before tracing it.

    (timm does so when ``dynamic_img_pad`` pads an ``img_size`` that is not a multiple of the patch
    size; the exporter cannot write the antialiased resampling, and on failing it prints the whole
    traced graph from C++, hundreds of lines, before its exception.)
    """
    pe = getattr(model, "patch_embed", None)
    size = tuple(int(v) for v in getattr(pe, "img_size", None) or ())
    patch = tuple(int(v) for v in getattr(pe, "patch_size", None) or ())
    if getattr(pe, "dynamic_img_pad", False) and len(size) == len(patch) == 2 and (size[0] % patch[0] or size[1] % patch[1]):
        raise ValueError(_RESAMPLES.format(opset=opset, cause=f"its {size[0]} x {size[1]} px input padded to "
                                                              f"{patch[0]} x {patch[1]} px patches"))


_RESAMPLES = (
    "this model's forward uses an operator ONNX opset {opset} cannot express ({cause}); a timm ViT resamples its "
    "position embedding at every forward when its input is not its own grid (e.g. dynamic_img_pad=True at an "
    "img_size that is not a multiple of the patch size): build it at a patch-multiple img_size, or keep the subnet "
    "in PyTorch (a .safetensors file)"
)


def _exportable(model: nn.Module) -> nn.Module:
    """``model``, or a copy whose zero-head attentions are replaced by :class:`_NoHeads`."""
    blocks = [b for b in getattr(model, "blocks", ()) if getattr(getattr(b, "attn", None), "num_heads", 1) == 0]
    if not blocks:
        return model
    shared = {id(p): p for p in model.parameters()}  # copy the module tree, share the weights
    model = copy.deepcopy(model, memo=dict(shared))
    for block in model.blocks:
        if getattr(getattr(block, "attn", None), "num_heads", 1) == 0:
            block.attn = _NoHeads(block.attn.proj)
    return model


def onnx_bytes(
    model: nn.Module, *, batch_size: int = 2, opset: int = ONNX_OPSET, metadata: dict[str, str] | None = None
) -> bytes:
    """The ONNX graph of ``model`` (in eval mode) as bytes, with a dynamic batch dimension.

    The output's other dimensions are declared as they are (the exporter left the feature width a
    named unknown), and the graph's ``metadata_props`` hold ``metadata`` plus the model's
    preprocessing: ``mean`` and ``std`` (JSON lists) and ``input_size`` (see :func:`graph_metadata`).

    Args:
        model: A timm ViT (sliced or not); its train/eval mode is restored afterwards.
        batch_size: Batch of the example input the graph is traced with (any batch runs).
        opset: ONNX opset version (at least 14, for ``scaled_dot_product_attention``; at most what
            this torch's exporter writes).
        metadata: Further string key/values, e.g. a subnet file's
            (:func:`~snapvit_lightning.checkpoint.subnet_metadata`: model name, block dims, budget).

    Raises:
        TypeError: If ``model`` is not a timm ViT.
        ValueError: A bad ``batch_size`` or ``opset``, a model that is not float32, or one whose
            forward uses an operator the opset cannot express.
    """
    _check_module(model)
    batch_size = _check_int("batch_size", batch_size, 1)
    opset = _check_int("opset", opset, 14)
    if metadata is not None and (not isinstance(metadata, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise ValueError(f"metadata must map strings to strings (a dict), got {metadata!r}")
    if opset > _MAX_OPSET:
        raise ValueError(f"opset must be at most {_MAX_OPSET} (this torch's TorchScript exporter), got {opset}")
    param = next(model.parameters(), None)
    if param is not None and param.dtype != torch.float32:
        raise ValueError(f"ONNX export takes a float32 model (its graph and ONNX Runtime's check run float32), "
                         f"got {param.dtype}: export model.float()")
    example = torch.randn(
        _input_shape(model, batch_size),
        device=param.device if param is not None else None,
        dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32,
    )
    _check_fixed_grid(model, opset)
    buffer = io.BytesIO()
    with _eval_mode(model), _symbolics(opset), torch.no_grad(), warnings.catch_warnings():
        out_shape = tuple(model(example).shape)
        # The tracer notes that timm's shape checks become constants: the image size is fixed.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        try:
            torch.onnx.export(
                _exportable(model),
                (example,),
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        except torch.onnx.errors.UnsupportedOperatorError as err:  # another cause than _check_fixed_grid's
            first = (str(err).strip().splitlines() or [""])[0]
            raise ValueError(_RESAMPLES.format(opset=opset, cause=first)) from None
    return _described(buffer.getvalue(), out_shape, {**graph_metadata(model), **(metadata or {})})


def graph_metadata(model: nn.Module) -> dict[str, str]:
    """What a user of the graph needs to feed it: ``input_size`` ``[H, W]``, ``mean`` and ``std`` (JSON)."""
    from .data.crops import resolve_input_config

    size, mean, std = resolve_input_config(model)
    return {"input_size": json.dumps([size, size]), "mean": json.dumps(list(mean)), "std": json.dumps(list(std))}


def _described(graph: bytes, out_shape: tuple[int, ...], metadata: dict[str, str]) -> bytes:
    """``graph`` with its output's non-batch dimensions fixed and ``metadata`` as its ``metadata_props``."""
    onnx = _require("onnx")
    proto = onnx.load_from_string(graph)
    (output,) = proto.graph.output
    for dim, size in zip(list(output.type.tensor_type.shape.dim)[1:], out_shape[1:]):
        dim.Clear()
        dim.dim_value = int(size)
    onnx.helper.set_model_props(proto, metadata)
    return proto.SerializeToString()


def checked_onnx(
    model: nn.Module,
    images: Tensor | None = None,
    *,
    batch_size: int = 2,
    opset: int = ONNX_OPSET,
    max_images: int = 8,
    metadata: dict[str, str] | None = None,
) -> tuple[bytes, float]:
    """The ONNX graph of ``model`` (:func:`onnx_bytes`, with ``metadata``) and ONNX Runtime's max abs
    difference from torch on the first ``max_images`` of ``images`` (two seeded random images without them).

    Raises:
        ImportError: Without ``onnxruntime``.
        ValueError: A bad argument (see :func:`onnx_bytes`, :func:`onnx_max_abs_diff`).
    """
    max_images = _check_int("max_images", max_images, 1)
    if images is None:
        images = torch.randn(2, *_input_shape(model, 1)[1:], generator=torch.Generator().manual_seed(0))
    images = _check_graph_images(model, images, "images")[:max_images]  # before the export, which takes a while
    graph = onnx_bytes(model, batch_size=batch_size, opset=opset, metadata=metadata)
    return graph, onnx_max_abs_diff(model, graph, images)


def save_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    batch_size: int = 2,
    opset: int = ONNX_OPSET,
    check_images: Tensor | None = None,
    atol: float = 1e-4,
    metadata: dict[str, str] | None = None,
) -> float:
    """Write ``model`` as an ONNX file once ONNX Runtime has been checked to match torch.

    The file is written to a temporary name and renamed, so ``path`` is never left half written. A
    ``torch.compile``d model is exported as the model it compiled.

    Args:
        model: A timm ViT (sliced or not).
        path: Output ``.onnx`` file.
        batch_size: Batch of the traced example input.
        opset: ONNX opset version.
        check_images: ``[N, C, H, W]`` images (up to 8 used) on which ONNX Runtime's output must
            be within ``atol`` (max abs) of the torch model's; default two random images.
        atol: Tolerance of the check.
        metadata: Further ``metadata_props`` of the graph (:func:`onnx_bytes`).

    Returns:
        The check's max abs difference.

    Raises:
        ValueError: The check failed (nothing is written), a ``path`` not ending in ``.onnx``, or a bad argument.
        TypeError: ``path`` is not a path (e.g. the arguments swapped).
        ImportError: Without ``onnxruntime``.
    """
    if isinstance(model, (str, os.PathLike)) and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"save_onnx(model, path, ...) takes the model first, got the path {str(model)!r} as model")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path (str or os.PathLike), got {type(path).__name__}")
    model = uncompiled(model)  # torch.compile's wrapper: the export traces the model it compiled
    _check_module(model)
    path = Path(path).expanduser()
    if path.suffix.lower() != ".onnx" and not path.is_dir():
        hint = "; a subnet in PyTorch: save_subnet()" if path.suffix.lower() == ".safetensors" else ""
        raise ValueError(f"path: '{path}' must end in .onnx (this writes an ONNX graph{hint})")
    number = real_number(atol)
    if number is None or not math.isfinite(number) or number < 0:
        raise ValueError(f"atol must be a finite number >= 0, got {atol!r}")
    atol = number
    if check_images is not None:
        _check_graph_images(model, check_images, "check_images")
    if path.is_dir():
        raise IsADirectoryError(f"path '{path}' is a folder; give an .onnx file name")
    data, diff = checked_onnx(model, check_images, batch_size=batch_size, opset=opset, metadata=metadata)
    if not diff <= atol:
        raise ValueError(f"ONNX Runtime's output differs from torch's by {diff:.3g} (max abs) > atol={atol}")
    make_parent(path)  # as the safetensors writer: a file in the way is named
    write_file_atomic(path, data)
    return diff


class OnnxModel(nn.Module):
    """An ONNX graph run by ONNX Runtime behind a module's call: ``images`` in, ``output`` out.

    Takes and returns CPU float tensors, so it can stand in for the torch model in
    :func:`~snapvit_lightning.evaluation.measure_latency` (pass ``img_size``: it has no
    ``patch_embed``).

    Args:
        onnx: The graph (bytes from :func:`onnx_bytes`) or the path of an ``.onnx`` file.
        threads: ONNX Runtime intra-op threads; ``None`` leaves its default (all cores).
        device: ``"cpu"``, or ``"cuda"`` when the installed onnxruntime has the CUDA provider.
        spinning: Let ONNX Runtime's threads busy-wait for the next run (its own default). Off here: the
            latency tools time several sessions (and torch models) in turn, and each one's spinning
            threads took the cores from the others (dense ViT-S/14 at batch 1 on 2 cores: 39–50 ms
            timed beside a subnet with spinning, 20 ms without, as timed alone).

    Raises:
        ImportError: Without ``onnxruntime``.
        ValueError: A bad ``threads`` or an unavailable device.
    """

    def __init__(self, onnx: bytes | str | os.PathLike, *, threads: int | None = None, device: str = "cpu",
                 spinning: bool = False) -> None:
        super().__init__()
        ort = _require("onnxruntime")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = _check_int("threads", threads, 1)
        if not isinstance(spinning, bool):
            raise TypeError(f"spinning must be a bool, got {spinning!r}")
        for pool in ("intra_op", "inter_op"):
            options.add_session_config_entry(f"session.{pool}.allow_spinning", str(int(spinning)))
        provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}.get(str(device))
        if provider is None or provider not in ort.get_available_providers():
            raise ValueError(
                f"device {device!r} is not available to ONNX Runtime (providers: {ort.get_available_providers()})"
            )
        if not isinstance(onnx, (bytes, bytearray)) and not Path(onnx).is_file():
            raise FileNotFoundError(f"no ONNX file at '{onnx}'")
        source = bytes(onnx) if isinstance(onnx, (bytes, bytearray)) else str(onnx)
        try:
            self.session = ort.InferenceSession(source, options, providers=[provider])
        except Exception as err:  # ONNX Runtime's own error types: a truncated file, another format
            where = "the ONNX bytes" if isinstance(onnx, (bytes, bytearray)) else f"'{onnx}'"
            raise ValueError(f"{where} is not an ONNX model ONNX Runtime can load: {' '.join(str(err).split())[:300]}") from err
        self.input_shape = list(self.session.get_inputs()[0].shape)  # e.g. ["batch", 3, 112, 112]

    def forward(self, images: Tensor) -> Tensor:
        """Run the graph on ``images`` ``[B, C, H, W]``; returns the output as a CPU float tensor.

        Raises:
            TypeError: ``images`` that are not a tensor (a numpy array: ``torch.from_numpy`` it).
            ValueError: ``images`` whose shape the graph does not take (named with the one it does), an
                empty batch, or a dtype other than float32 (uint8 pixels would run unnormalised).
        """
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor (torch.from_numpy for an array), got {type(images).__name__}")
        fixed = [(i, n) for i, n in enumerate(self.input_shape) if isinstance(n, int)]
        if images.dim() != len(self.input_shape) or any(images.shape[i] != n for i, n in fixed):
            raise ValueError(f"images must be {['B' if not isinstance(n, int) else n for n in self.input_shape]} "
                             f"for this graph, got {list(images.shape)}")
        if images.dtype != torch.float32 or images.shape[0] == 0:
            raise ValueError(f"images must be a non-empty float32 batch, normalised as the graph's metadata says "
                             f"(mean, std), got {images.dtype} {list(images.shape)}")
        array = images.detach().cpu().contiguous().numpy()
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0])


def onnx_max_abs_diff(
    model: nn.Module,
    onnx: bytes | str | os.PathLike | OnnxModel,
    images: Tensor,
    *,
    batch_size: int = 32,
) -> float:
    """Max abs difference between ``model`` (torch, eval mode, float32) and its ONNX graph on ``images``.

    Raises:
        ValueError: ``images`` not finite float ``[N, C, H, W]`` at the graph's input size, a bad
            ``batch_size``, or outputs of ``model`` that are not finite. Non-finite outputs of the
            graph give ``inf``.
    """
    images = _check_graph_images(model, images, "images")
    batch_size = _check_int("batch_size", batch_size, 1)
    runner = onnx if isinstance(onnx, OnnxModel) else OnnxModel(onnx)
    device = _model_device(model)
    diff = 0.0
    with _eval_mode(model), torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(torch.float32)
            expected = model(x.to(device)).float().cpu()
            if not all_finite(expected):
                raise ValueError("the torch model's outputs are not finite (NaN or infinite weights?): nothing to check against")
            got = runner(x)
            # max() would pass NaN over (max(0.0, nan) is 0.0): a non-finite graph output differs by inf.
            diff = max(diff, float((got - expected).abs().max()) if all_finite(got) else math.inf)
    return diff
