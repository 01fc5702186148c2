"""Retraining-free weight correction of a sliced subnet: bias compensation and least squares.

Cutting MLP neurons or heads removes inputs of the two layers that consume them, ``mlp.fc2``
and ``attn.proj``. A correction refits what remains of such a layer (``y = W x + b``) so its
output on calibration activations stays close to the dense layer's:

* ``"bias"``: the removed inputs' mean contribution moves into the bias,
  ``b' = b + W[:, removed] E[x_removed]``. In general (see *sequential* below) the bias is set
  so the mean output matches the dense layer's: ``b' = W E[x] + b - W_kept E[x̃]``.
* ``"lstsq"``: the kept columns and the bias are refitted by ridge least squares pulled
  towards the dense weights: ``min E‖t - W' x̃ - b'‖² + λ ‖W' - W_kept‖²``, so
  ``[W' | b'] = (E[t x̃ₐᵀ] + λ [W_kept | 0]) (E[x̃ₐ x̃ₐᵀ] + λ D)⁻¹`` with target ``t = W x + b``,
  ``x̃ₐ = [x̃; 1]``, ``D`` the identity on the kept inputs (never on the bias), damping
  ``λ = damping · mean(diag)`` (or ``· max(diag)`` with ``damping_reference="max"``, for
  models with outlier activations). This is the objective the OBS ranking's costs measure
  (:mod:`~snapvit_lightning.obs`); with few calibration images it keeps far more of the dense
  features on unseen images than a ridge towards zero (docs/defaults.md). ``damping=None``
  (the default) is :func:`auto_damping` of the statistics: more damping for fewer images.
  Solved by a Cholesky factorisation in float64; a matrix that is not positive definite
  raises :class:`SingularGramError` (no silent fallback).

Calibration comes in two forms:

* *one-shot* (default) from :class:`CorrectionStats` — second moments of the dense (elastic)
  model's layer inputs, collected once (:func:`collect_stats`, or from images passed directly)
  and storable beside the elastic checkpoint (``*.stats.safetensors``). One linear solve per
  cut layer, every block fed the dense model's activations. Because the elastic model is
  permuted, the kept inputs of any budget are a prefix, so every budget uses the same
  statistics. Needs blocks without a norm over the cut dimension (``scale_norm`` / MLP
  ``norm``), whose kept activations would change with the cut.
* *sequential* (``sequential=True``, images ``[N, 3, H, W]``) — the dense and the sliced model
  run side by side, block by block, and each cut layer is fitted on the already-corrected
  subnet's activations ``x̃`` against the dense layer's output on the dense activations ``x``.
  About five block forwards per block; works for every supported model. On our real
  DINOv2 ViT-S/14 it ties with one-shot on the corrected path's ranking at several times
  the cost (docs/correction.md).

Only layers whose inputs were cut are changed: with nothing removed the subnet is unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .correction_stats import (  # re-exported: the statistics are part of this module's API
    EXPORT_HINT, SEQUENTIAL_HINT, STATS_FORMAT, STATS_FORMAT_VERSION, STATS_READABLE_VERSIONS, CorrectionStats,
    check_one_shot, has_cut_norm, stats_path_for,
)
from .structure import check_model_images, get_blocks, head_channels, mlp_rows
from .values import real_number

__all__ = [
    "AUTO_DAMPING", "CORRECTIONS", "MIN_DAMPING", "CorrectionStats", "SingularGramError", "auto_damping",
    "stats_damping", "collect_stats", "correct_subnet", "fingerprint", "weights_version",
    "EXPORT_HINT", "SEQUENTIAL_HINT", "augmented_weight", "check_one_shot", "has_cut_norm", "prepare_targets",
    "solve_layer", "stats_path_for",
    "STATS_FORMAT", "STATS_FORMAT_VERSION", "STATS_READABLE_VERSIONS",
]

CORRECTIONS = ("none", "bias", "lstsq")
DAMPING_REFERENCES = ("mean", "max")
_LAYERS = (("attn", "proj"), ("mlp", "fc2"))  # (branch, consuming layer), in forward order
#: :func:`auto_damping`: damping per MLP neuron per effective calibration sample, and its floor.
#: Chosen on held-out photos (docs/defaults.md, "Damping of the correction").
AUTO_DAMPING = 0.016
MIN_DAMPING = 0.01


class SingularGramError(ValueError):
    """The damped input Gram matrix of a layer is not positive definite (cannot be solved)."""


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


def check_correction(
    correct: object, damping: object, damping_reference: object
) -> tuple[str, float | None, str]:
    """Validate the correction options (``damping=None``: :func:`auto_damping`, kept as ``None``).

    Raises:
        ValueError: ``correct`` not in :data:`CORRECTIONS`, ``damping`` neither ``None`` nor a
            finite number >= 0, or ``damping_reference`` not ``"mean"``/``"max"``.
    """
    if correct not in CORRECTIONS:
        raise ValueError(f"correct must be one of {CORRECTIONS}, got {correct!r}")
    number = None if damping is None else real_number(damping)
    if damping is not None and (number is None or not 0.0 <= number < float("inf")):
        raise ValueError(f"damping must be None (automatic) or a finite number >= 0, got {damping!r}")
    if damping_reference not in DAMPING_REFERENCES:
        raise ValueError(f"damping_reference must be one of {DAMPING_REFERENCES}, got {damping_reference!r}")
    return str(correct), number, str(damping_reference)


def auto_damping(mlp_hidden: int, num_images: int, num_tokens: int) -> float:
    """The default damping: ``max(MIN_DAMPING, AUTO_DAMPING · mlp_hidden / √(num_images · num_tokens))``.

    A Gram matrix of ``mlp_hidden`` inputs is noisier (and below ``mlp_hidden`` tokens,
    singular) the fewer samples it is estimated from, so the ridge grows with their ratio. The
    tokens of one image are strongly correlated: the effective count lies between the images
    and the tokens, and their geometric mean measured best on held-out photos at 112 and 224 px
    (docs/defaults.md). DINOv2 ViT-S/14 (1536 neurons) at 112 px (65 tokens per image): 0.254
    for 12 images, 0.062 for 49, 0.031 for 98; at 224 px (257 tokens): 0.128, 0.031, 0.016.

    Args:
        mlp_hidden: MLP neurons per block of the dense model (``mlp.fc2`` inputs).
        num_images: Calibration images the statistics were collected on.
        num_tokens: Tokens they average over (images × tokens per image).

    Raises:
        ValueError: An argument below 1, or fewer tokens than images.
    """
    if min(mlp_hidden, num_images, num_tokens) < 1 or num_tokens < num_images:
        raise ValueError(
            "mlp_hidden, num_images and num_tokens must be >= 1 with num_tokens >= num_images, "
            f"got {mlp_hidden}, {num_images} and {num_tokens}"
        )
    return max(MIN_DAMPING, AUTO_DAMPING * mlp_hidden / math.sqrt(num_images * num_tokens))


def stats_damping(damping: float | None, stats: CorrectionStats) -> float:
    """``damping``, or :func:`auto_damping` of ``stats`` when it is ``None``."""
    return auto_damping(stats.mlp.shape[-1] - 1, stats.num_images, stats.num_tokens) if damping is None else damping


def _check_images(images: object, model: nn.Module) -> Tensor:
    return check_model_images(model, images, "calibration images")


def _check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return batch_size


# ----------------------------------------------------------------------------------------------
# Moments
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def full_fp32_matmuls() -> Iterator[None]:
    """float32 matmuls at full precision inside, whatever the global setting (restored after).

    A run whose precision probe chose TF32 sets ``torch.set_float32_matmul_precision("high")``
    for the whole process; second moments and the OBS updates summed over thousands of rows need
    float32's full mantissa.
    """
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


#: Rows a :class:`_Moments` sums in float32 before folding them into its float64 total.
_FOLD_ROWS = 1 << 15
#: Column blocks of :func:`_add_upper_gram` (``xᵀx`` at ``(P + 1) / 2P`` of the full product's work).
_GRAM_BLOCKS = 4


def _add_upper_gram(out: Tensor, x: Tensor) -> None:
    """Add the upper triangle of ``xᵀx`` to ``out`` (its blocks on and above the diagonal; below stays as is)."""
    d = x.shape[1]
    edges = [d * i // _GRAM_BLOCKS for i in range(_GRAM_BLOCKS + 1)]
    for start, stop in zip(edges[:-1], edges[1:]):
        if stop > start:
            out[start:stop, start:].addmm_(x[:, start:stop].T, x[:, start:])


class _Moments:
    """Running ``E[xₐ yₐᵀ]`` of augmented inputs ``xₐ = [x; 1]``, ``yₐ = [y; 1]`` (float64).

    Products accumulate in float32 for up to :data:`_FOLD_ROWS` rows, then fold into the float64
    total: one conversion per fold instead of one per batch. A second moment (``y`` omitted)
    computes only the upper triangle of ``xᵀx`` (in column blocks) and mirrors it when folding.
    """

    def __init__(self) -> None:
        self.xy: Tensor | None = None
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.count = 0
        self._pending: Tensor | None = None
        self._pending_rows = 0
        self._symmetric = True

    def add(self, x: Tensor, y: Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self._pending_rows and self._symmetric != (y is None):
            self._fold()  # the pending sum holds the other kind of product
        self._symmetric = y is None
        y = x if y is None else y.reshape(-1, y.shape[-1]).float()
        if self._pending is None:
            self._pending = x.new_zeros(x.shape[1], y.shape[1])
        if self._symmetric:
            _add_upper_gram(self._pending, x)
        else:
            self._pending.addmm_(x.T, y)
        sx, sy = x.sum(0).double(), y.sum(0).double()
        if self.x is None:
            self.x, self.y = sx, sy
        else:
            self.x += sx
            self.y += sy
        self.count += x.shape[0]
        self._pending_rows += x.shape[0]
        if self._pending_rows >= _FOLD_ROWS:
            self._fold()

    def _fold(self) -> None:
        if self._pending is None or not self._pending_rows:
            return
        pending = self._pending
        if self._symmetric:
            pending = pending.triu() + pending.triu(1).T
        if self.xy is None:
            self.xy = pending.double()
        else:
            self.xy += pending
        self._pending.zero_()
        self._pending_rows = 0

    def augmented(self, out: Tensor | None = None) -> Tensor:
        """The mean ``[n + 1, k + 1]``, written into ``out`` when given (any float dtype), else float64."""
        self._fold()
        assert self.xy is not None and self.x is not None and self.y is not None
        n, k = self.xy.shape
        out = self.xy.new_empty(n + 1, k + 1) if out is None else out
        out[:n, :k] = self.xy / self.count
        out[:n, k] = self.x / self.count
        out[n, :k] = self.y / self.count
        out[n, k] = 1.0
        return out


def _layer(block: nn.Module, branch: str, name: str) -> nn.Linear:
    return getattr(getattr(block, branch), name)


@torch.no_grad()
def _capture(block: nn.Module, x: Tensor, layers: Sequence[tuple[str, str]]) -> tuple[Tensor, dict[str, Tensor]]:
    """Run ``block`` on ``x``; return its output and the inputs of the named layers."""
    seen: dict[str, Tensor] = {}
    handles = []
    for branch, name in layers:
        def hook(module: nn.Module, args: tuple, key: str = f"{branch}.{name}") -> None:
            seen[key] = args[0]
        handles.append(_layer(block, branch, name).register_forward_pre_hook(hook))
    try:
        out = block(x)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def _batches(images: Tensor, batch_size: int) -> Iterator[Tensor]:
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size]


@torch.no_grad()
def _block_input(model: nn.Module, images: Tensor) -> Tensor:
    """The tokens the first block sees (timm's ``forward_features`` up to the blocks)."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


def weights_version(model: nn.Module) -> tuple:
    """A value that changes whenever a weight of ``model`` is changed in place, replaced, cast or moved.

    For caches built from the weights (a tensor's ``_version`` counts its in-place changes; a tensor
    made under ``torch.inference_mode`` has none, and only its storage, type and device count).
    """
    return tuple((t.data_ptr(), t.dtype, t.device, None if t.is_inference() else t._version)
                 for t in (*model.parameters(), *model.buffers()))


def fingerprint(model: nn.Module, mlp_order: Tensor, head_order: Tensor) -> str:
    """A short hash that ties statistics to one elastic model (unit orders + last block's fc2)."""
    digest = hashlib.sha256()
    for t in (mlp_order, head_order, get_blocks(model)[-1].mlp.fc2.weight):
        digest.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())  # any dtype
    return digest.hexdigest()[:16]


@torch.no_grad()
@full_fp32_matmuls()  # second moments summed in float32 at full precision, whatever the run set
def _accumulate(
    model: nn.Module, blocks: Sequence[nn.Module], images: Tensor, batch_size: int,
    moments: dict[tuple[int, str], _Moments], energy: Tensor | None, energy_count: list[int],
) -> None:
    """One forward pass over ``images``: the cut layers' inputs into ``moments``, the stream's energy into ``energy``."""
    device, dtype = _model_device_dtype(model)
    for batch in _batches(images, batch_size):
        x = _block_input(model, batch.to(device, dtype))
        for i, block in enumerate(blocks):
            x, seen = _capture(block, x, _LAYERS)
            for branch, name in _LAYERS:
                moments[i, branch].add(seen[f"{branch}.{name}"])
            if energy is not None:  # as stream_energy sums it, batch by batch
                squared = x.double().pow(2).sum(-1)
                energy[i] += float(squared.sum())
                energy_count[i] += squared.numel()


@torch.no_grad()
def collect_stats(
    model: nn.Module, images: Tensor, *, batch_size: int = 32, fingerprint: str = "", with_energy: bool = False
) -> CorrectionStats | tuple[CorrectionStats, Tensor]:
    """Second moments of every block's ``attn.proj`` and ``mlp.fc2`` inputs on ``images``.

    Args:
        model: The dense (elastic, permuted) timm ViT; not changed.
        images: ``[N, 3, H, W]`` preprocessed calibration images (moved to the model's device).
        batch_size: Images per forward.
        fingerprint: Stored with the statistics to check they are used with the right model.
        with_energy: Also return :func:`~snapvit_lightning.obs.stream_energy` of the same
            forward passes (``[B]`` float64), which the corrected path's ranking needs: one pass
            over the calibration inputs instead of two.

    Raises:
        ValueError: Bad images or batch size; a model with a norm over a cut dimension
            (:func:`check_one_shot`: the statistics could not correct it).
    """
    images, batch_size = _check_images(images, model), _check_batch_size(batch_size)
    check_one_shot(model, "collect_stats")
    blocks = get_blocks(model)
    moments = {(i, b): _Moments() for i in range(len(blocks)) for b, _ in _LAYERS}
    energy, energy_count = torch.zeros(len(blocks), dtype=torch.float64), [0] * len(blocks)
    was_training = model.training
    model.eval()
    try:
        _accumulate(model, blocks, images, batch_size, moments, energy if with_energy else None, energy_count)
    finally:
        model.train(was_training)
    stack = {}
    for b, _ in _LAYERS:  # exactly symmetric (the moments mirror one triangle): a file stores one triangle
        first = moments[0, b].augmented()
        stack[b] = torch.empty((len(blocks), *first.shape), dtype=torch.float32)
        stack[b][0] = first
        for i in range(1, len(blocks)):
            moments[i, b].augmented(out=stack[b][i])
    tokens = moments[0, "mlp"].count
    stats = CorrectionStats(stack["attn"], stack["mlp"], len(images), int(tokens), fingerprint, image_size=tuple(images.shape[-2:]))
    return (stats, energy / torch.tensor(energy_count, dtype=torch.float64)) if with_energy else stats


# ----------------------------------------------------------------------------------------------
# Solving one layer
# ----------------------------------------------------------------------------------------------


def _solve(
    dense: nn.Linear,
    sub: nn.Linear,
    cross: Tensor,
    gram: Tensor,
    method: str,
    damping: float,
    reference: str,
    where: str,
    target: Tensor | None = None,
) -> None:
    """Refit ``sub`` (kept inputs of ``dense``) in place.

    ``cross = E[xₐ x̃ₐᵀ]`` ``[n+1, k+1]`` (dense inputs × subnet inputs) and
    ``gram = E[x̃ₐ x̃ₐᵀ]`` ``[k+1, k+1]``, both augmented with a constant 1 as last entry.
    ``target``, when given, is ``[W | b] · cross`` already (see :func:`prepare_targets`).
    """
    kept = sub.weight.detach().double().to(gram.device)
    k = kept.shape[1]
    if target is None:
        w_aug = augmented_weight(dense).to(cross.device)
        target = w_aug @ (cross if method == "lstsq" else cross[:, k:])  # bias: only the mean column
    new_weight, new_bias = solve_layer(target, kept, gram, sub.bias is not None, method, damping, reference, where)
    _assign(sub, new_weight, new_bias)


def prepare_targets(dense: nn.Module, stats: CorrectionStats) -> list[dict[str, Tensor]]:
    """Per block and branch (``"attn"``, ``"mlp"``) the float64 ``[W | b] · E[xₐ xₐᵀ]`` ``[out, n+1]``.

    What a one-shot correction from ``stats`` needs of the dense layers, for every budget: a
    budget's least-squares target is its kept columns (a prefix and the last). Computing it once
    (``correct_subnet(..., prepared=...)``; :class:`~snapvit_lightning.elastic.ElasticViT` keeps
    it with attached statistics) halves the work of each further corrected subnet.

    Raises:
        ValueError: Statistics whose shapes do not fit ``dense``.
    """
    blocks = get_blocks(dense)
    stored = {"attn": stats.attn, "mlp": stats.mlp}
    out: list[dict[str, Tensor]] = []
    for i, block in enumerate(blocks):
        row = {}
        for branch, name in _LAYERS:
            layer = _layer(block, branch, name)
            _check_stats_shape(stored[branch], branch, len(blocks), layer.in_features)
            row[branch] = augmented_weight(layer) @ stored[branch][i].double()
        out.append(row)
    return out


def _kept(t: Tensor, k: int, dim: int) -> Tensor:
    """``t`` along ``dim`` at the kept inputs of a prefix cut: indices ``0..k-1`` and the last (the constant 1)."""
    return torch.cat([t.narrow(dim, 0, k), t.narrow(dim, t.shape[dim] - 1, 1)], dim=dim)


def _kept_gram(moment: Tensor, k: int) -> Tensor:
    """``moment`` ``[n+1, n+1]`` at the kept inputs of a prefix cut (rows and columns), float64, one copy."""
    gram = moment.new_empty(k + 1, k + 1, dtype=torch.float64)
    gram[:k, :k] = moment[:k, :k]
    gram[:k, k] = moment[:k, -1]
    gram[k, :k] = moment[-1, :k]
    gram[k, k] = moment[-1, -1]
    return gram


def _check_stats_shape(stored: Tensor, branch: str, num_blocks: int, n: int) -> None:
    if stored.shape[0] != num_blocks or stored.shape[1] != n + 1:
        raise ValueError(
            f"correction statistics '{branch}' have shape {tuple(stored.shape)}, "
            f"the model needs [{num_blocks}, {n + 1}, {n + 1}]"
        )


def augmented_weight(layer: nn.Linear) -> Tensor:
    """``[W | b]`` of ``layer`` in float64 (``b = 0`` without a bias): ``[out, in + 1]``."""
    weight = layer.weight.detach().double()
    bias = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device) if layer.bias is None else layer.bias.detach().double()
    return torch.cat([weight, bias[:, None]], dim=1)


def solve_layer(
    target: Tensor,
    kept_weight: Tensor,
    gram: Tensor,
    has_bias: bool,
    method: str,
    damping: float,
    reference: str,
    where: str,
) -> tuple[Tensor | None, Tensor | None]:
    """The corrected weight and bias of one cut layer (float64), without changing any layer.

    Args:
        target: ``E[t x̃ₐᵀ]`` ``[out, k+1]``: the dense layer's augmented weight times the
            (dense × kept, augmented) input moments; ``t = W x + b`` is the dense output
            (``bias`` reads only the last column, so ``[out, 1]`` is enough there).
        kept_weight: The kept columns of the dense weight ``[out, k]``: ``bias`` keeps them,
            ``lstsq`` pulls its solution towards them.
        gram: ``E[x̃ₐ x̃ₐᵀ]`` ``[k+1, k+1]`` of the kept inputs, augmented.
        has_bias: Whether the layer has a bias (``lstsq`` fits one only then).
        method: ``"bias"`` or ``"lstsq"``.
        damping: Ridge damping relative to the Gram diagonal (``lstsq``), already resolved.
        reference: ``"mean"`` or ``"max"`` of the Gram diagonal.
        where: Names the layer in errors.

    Returns:
        ``(weight [out, k] or None when unchanged, bias [out] or None)``.

    Raises:
        ValueError: ``bias`` for a layer without a bias; a ``method``, ``reference`` or ``damping``
            outside the allowed, or shapes that do not fit together.
        SingularGramError: The damped Gram matrix is not positive definite.
    """
    if method not in ("bias", "lstsq") or reference not in ("mean", "max"):
        raise ValueError(f"{where}: method must be 'bias' or 'lstsq' and reference 'mean' or 'max', got "
                         f"method={method!r}, reference={reference!r}")
    if not (isinstance(damping, (int, float)) and not isinstance(damping, bool) and math.isfinite(damping) and damping >= 0):
        raise ValueError(f"{where}: damping must be a finite number >= 0, got {damping!r}")
    k = kept_weight.shape[1] if kept_weight.dim() == 2 else -1
    if k < 0 or tuple(gram.shape) != (k + 1, k + 1) or target.dim() != 2 or target.shape[0] != kept_weight.shape[0] \
            or target.shape[1] not in (1, k + 1) or (method == "lstsq" and target.shape[1] != k + 1):
        raise ValueError(f"{where}: shapes do not fit together: target {list(target.shape)} ([out, k+1]), kept_weight "
                         f"{list(kept_weight.shape)} ([out, k]), gram {list(gram.shape)} ([k+1, k+1])")
    if method == "bias":
        if not has_bias:
            raise ValueError(f"{where} has no bias to compensate into; use correct='lstsq'")
        # Mean dense output W E[x] + b minus the kept columns' mean output.
        return None, target[:, -1] - kept_weight @ gram[:k, k]
    size = k + 1 if has_bias else k  # the bias is fitted as the constant input's weight
    g = gram[:size, :size].clone()
    rhs = target[:, :size].clone()
    if k:
        diag = torch.diagonal(g)[:k]
        lam = damping * float(diag.mean() if reference == "mean" else diag.max())
        diag += lam  # a view: damps the kept inputs, never the bias
        rhs[:, :k] += lam * kept_weight.to(rhs)  # the ridge pulls towards the dense weights, not zero
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:
        raise SingularGramError(
            f"{where}: the input Gram matrix ({size}x{size}, damping={damping}, "
            f"damping_reference={reference!r}) is not positive definite (leading minor {int(info)} fails); "
            "use a larger damping, more calibration images, or correct='bias'"
        )
    solution = torch.cholesky_solve(rhs.T.contiguous(), chol).T  # [out, size]
    return solution[:, :k], solution[:, k] if has_bias else None


def _assign(layer: nn.Linear, weight: Tensor | None, bias: Tensor | None) -> None:
    # Copy into the existing parameters: works in and out of inference mode, keeps dtype/device.
    with torch.no_grad():
        if weight is not None:
            layer.weight.copy_(weight.to(layer.weight.device, layer.weight.dtype))
        if bias is not None:
            layer.bias.copy_(bias.to(layer.bias.device, layer.bias.dtype))


# ----------------------------------------------------------------------------------------------
# Correcting a subnet
# ----------------------------------------------------------------------------------------------


def correct_subnet(
    dense: nn.Module,
    subnet: nn.Module,
    calibration: CorrectionStats | Tensor,
    *,
    method: str = "lstsq",
    damping: float | None = None,
    damping_reference: str = "mean",
    sequential: bool = False,
    batch_size: int = 32,
    expected_fingerprint: str | None = None,
    prepared: list[dict[str, Tensor]] | None = None,
) -> nn.Module:
    """Correct ``subnet`` (a prefix slice of ``dense``) in place and return it.

    Args:
        dense: The dense elastic (permuted) model the subnet was cut from; not changed.
        subnet: The sliced model; only ``attn.proj``/``mlp.fc2`` of cut blocks change.
        calibration: Stored :class:`CorrectionStats`, or images ``[N, 3, H, W]`` (their
            statistics are collected first, or, with ``sequential``, used block by block).
        method: ``"bias"`` or ``"lstsq"`` (``"none"`` returns the subnet unchanged).
        damping: Ridge damping relative to the Gram diagonal (``lstsq`` only); ``None``:
            :func:`auto_damping` of the calibration images and tokens.
        damping_reference: ``"mean"`` or ``"max"`` of the Gram diagonal.
        sequential: Fit each cut layer on the already-corrected subnet's activations (images
            only; see the module docstring). Default: one-shot from the dense statistics,
            as good on our real model's corrected path and several times faster (docs/correction.md).
        batch_size: Images per forward (images only).
        expected_fingerprint: If given, stored statistics must carry this fingerprint.
        prepared: :func:`prepare_targets` of ``dense`` and these stored statistics (speed only;
            ignored for images).

    Raises:
        ValueError: A bad option, statistics of another model or shape, statistics for a
            model with a norm over the cut dimension, ``sequential`` with statistics, a
            block that grew, or a subnet that is not a prefix cut of ``dense``.
        SingularGramError: A damped Gram matrix that is not positive definite.
    """
    method, damping, damping_reference = check_correction(method, damping, damping_reference)
    if not isinstance(sequential, bool):
        raise ValueError(f"sequential must be a bool, got {sequential!r}")
    if sequential and isinstance(calibration, CorrectionStats):
        raise ValueError("sequential=True needs calibration images, got stored CorrectionStats")
    dense_blocks, sub_blocks = get_blocks(dense), get_blocks(subnet)
    if len(dense_blocks) != len(sub_blocks):
        raise ValueError(f"subnet has {len(sub_blocks)} blocks, the dense model {len(dense_blocks)}")
    cut = []
    for i, (d, s) in enumerate(zip(dense_blocks, sub_blocks)):
        for branch, name in _LAYERS:
            n, k = _layer(d, branch, name).in_features, _layer(s, branch, name).in_features
            if k > n:
                raise ValueError(f"block {i} {branch}.{name} of the subnet has {k} inputs, the dense model {n}")
            cut.append(k < n)
    _check_prefix_cut(dense_blocks, sub_blocks)
    if method == "none" or not any(cut):
        return subnet
    mlp_hidden = dense_blocks[0].mlp.fc2.in_features

    def solve(d: nn.Linear, s: nn.Linear, cross: Tensor, gram: Tensor, where: str, target: Tensor | None = None) -> None:
        _solve(d, s, cross, gram, method, resolved, damping_reference, where, target)

    if sequential:
        images = _check_images(calibration, dense)
        resolved = damping if damping is not None else auto_damping(mlp_hidden, len(images), _num_tokens(dense, images))
        _correct_sequential(dense, subnet, images, _check_batch_size(batch_size), solve)
        return subnet
    if not isinstance(calibration, CorrectionStats):
        calibration = collect_stats(dense, calibration, batch_size=batch_size)
        expected_fingerprint, prepared = None, None
    resolved = stats_damping(damping, calibration)
    _correct_from_stats(dense_blocks, sub_blocks, calibration, expected_fingerprint, solve, prepared)
    return subnet


def _check_prefix_cut(dense_blocks: Sequence[nn.Module], sub_blocks: Sequence[nn.Module]) -> None:
    """Refuse a subnet whose kept neurons and heads are not the first of ``dense``'s (another model, or unpermuted).

    Compares the rows the cut keeps unchanged (``fc1``, ``qkv``) to within 1 % (a subnet cast to
    half precision passes): a correction fitted to other units than the subnet's would give it
    wrong weights without a word.
    """
    for i, (d, s) in enumerate(zip(dense_blocks, sub_blocks)):
        k, h = s.mlp.fc2.in_features, s.attn.num_heads
        channels = head_channels(torch.arange(h), d.attn.head_dim)
        qkv_rows = torch.cat([part * d.attn.num_heads * d.attn.head_dim + channels for part in range(3)])
        pairs = [(layer.weight[rows], got.weight) for (layer, rows), (got, _) in
                 zip(mlp_rows(d.mlp, torch.arange(k)), mlp_rows(s.mlp, torch.arange(k)))]
        pairs.append((d.attn.qkv.weight[qkv_rows.to(d.attn.qkv.weight.device)], s.attn.qkv.weight))
        for want, got in pairs:
            want = want.detach().float()
            if got.shape != want.shape or float((got.detach().float().to(want.device) - want).norm()) > 0.01 * float(want.norm()):
                raise ValueError(
                    f"block {i}: the subnet's kept neurons and heads are not the first ones of `dense`: pass the "
                    "elastic (permuted) model it was cut from as `dense` (ElasticViT.model; with statistics that "
                    "carry a ranking, ElasticViT.ranked_view().model), not the original model"
                )


@torch.no_grad()
def _num_tokens(model: nn.Module, images: Tensor) -> int:
    """Tokens per block input over all ``images`` (one image through the embedding gives the count)."""
    device, dtype = _model_device_dtype(model)
    return int(images.shape[0]) * int(_block_input(model, images[:1].to(device, dtype)).shape[1])


def _correct_from_stats(
    dense_blocks: list[nn.Module],
    sub_blocks: list[nn.Module],
    stats: CorrectionStats,
    expected_fingerprint: str | None,
    solve: Callable[..., None],
    prepared: list[dict[str, Tensor]] | None = None,
) -> None:
    if expected_fingerprint is not None and stats.fingerprint != expected_fingerprint:
        raise ValueError(
            f"the correction statistics belong to another elastic model (fingerprint {stats.fingerprint!r}, "
            f"this model {expected_fingerprint!r}); collect them again for this checkpoint"
        )
    if any(has_cut_norm(b) for b in dense_blocks):
        raise ValueError(
            "a one-shot correction (from statistics, stored or collected from the images) cannot correct a model with "
            "a norm over the cut dimension (timm's scale_attn_norm / scale_mlp_norm): its kept activations change with "
            "the cut; pass calibration images with sequential=True (snapvit slice: --sequential --calibration DIR)"
        )
    stored = {"attn": stats.attn, "mlp": stats.mlp}
    for i, (d, s) in enumerate(zip(dense_blocks, sub_blocks)):
        for branch, name in _LAYERS:
            dl, sl = _layer(d, branch, name), _layer(s, branch, name)
            n, k = dl.in_features, sl.in_features
            _check_stats_shape(stored[branch], branch, len(dense_blocks), n)
            if k == n:
                continue
            moment = stored[branch][i]
            gram = _kept_gram(moment, k)
            if prepared is None:
                solve(dl, sl, _kept(moment, k, 1).double(), gram, f"block {i} {branch}.{name}")
            else:
                solve(dl, sl, None, gram, f"block {i} {branch}.{name}", _kept(prepared[i][branch], k, 1))


@torch.no_grad()
@full_fp32_matmuls()  # second moments summed in float32 at full precision, whatever the run set
def _correct_sequential(
    dense: nn.Module, subnet: nn.Module, images: Tensor, batch_size: int, solve: Callable[..., None]
) -> None:
    device, dtype = _model_device_dtype(dense)
    modes = dense.training, subnet.training
    dense.eval()
    subnet.eval()
    try:
        xd = [_block_input(dense, b.to(device, dtype)) for b in _batches(images, batch_size)]
        xs = [x.clone() for x in xd]  # cuts stay inside the blocks: the embeddings are the same
        for i, (d, s) in enumerate(zip(get_blocks(dense), get_blocks(subnet))):
            for branch, name in _LAYERS:
                dl, sl = _layer(d, branch, name), _layer(s, branch, name)
                if sl.in_features == dl.in_features:
                    continue
                cross, gram = _Moments(), _Moments()
                for a, b in zip(xd, xs):
                    seen_d = _capture(d, a, [(branch, name)])[1][f"{branch}.{name}"]
                    seen_s = _capture(s, b, [(branch, name)])[1][f"{branch}.{name}"]
                    cross.add(seen_d, seen_s)
                    gram.add(seen_s)
                solve(dl, sl, cross.augmented(), gram.augmented(), f"block {i} {branch}.{name}")
            xd = [d(a) for a in xd]
            xs = [s(b) for b in xs]
    finally:
        dense.train(modes[0])
        subnet.train(modes[1])
