"""Retraining-free weight correction of a sliced subnet: bias compensation and least squares.

Cutting MLP neurons or heads removes inputs of the two layers that consume them, ``mlp.fc2``
and ``attn.proj``. A correction refits what remains of such a layer (``y = W x + b``) so its
output on calibration activations stays close to the dense layer's:

* ``"bias"``: the removed inputs' mean contribution moves into the bias,
  ``b' = b + W[:, removed] E[x_removed]``. In general (see *sequential* below) the bias is set
  so the mean output matches the dense layer's: ``b' = W E[x] + b - W_kept E[x̃]``.
* ``"lstsq"``: the kept columns and the bias are refitted by least squares,
  ``[W' | b'] = E[t x̃ₐᵀ] (E[x̃ₐ x̃ₐᵀ] + λ D)⁻¹`` with target ``t = W x + b``, ``x̃ₐ = [x̃; 1]``,
  ``D`` the identity on the kept inputs (never on the bias), damping
  ``λ = damping · mean(diag)`` (or ``· max(diag)`` with ``damping_reference="max"``, for
  models with outlier activations). Solved by a Cholesky factorisation in float64; a matrix
  that is not positive definite raises :class:`SingularGramError` (no silent fallback).

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
  DINOv2 ViT-S/14 it kept *less* of the dense features than one-shot (README, "Weight
  correction"): with inputs that already drifted, the least-squares fit shrinks the layer.

Only layers whose inputs were cut are changed: with nothing removed the subnet is unchanged.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from . import __version__
from .checkpoint import _write, read_format
from .structure import get_blocks

__all__ = [
    "CORRECTIONS", "CorrectionStats", "SingularGramError", "collect_stats", "correct_subnet", "fingerprint",
    "augmented_weight", "has_cut_norm", "prepare_targets", "solve_layer", "stats_path_for",
    "STATS_FORMAT", "STATS_FORMAT_VERSION", "STATS_READABLE_VERSIONS",
]

CORRECTIONS = ("none", "bias", "lstsq")
DAMPING_REFERENCES = ("mean", "max")
STATS_FORMAT = "snapvit-correction-stats"
#: 1: full matrices; 2: upper triangles only (lossless); 3: as 2, plus the optional ranking of the corrected path.
STATS_FORMAT_VERSION = 3
STATS_READABLE_VERSIONS = (1, 2, 3)
_LAYERS = (("attn", "proj"), ("mlp", "fc2"))  # (branch, consuming layer), in forward order


class SingularGramError(ValueError):
    """The damped input Gram matrix of a layer is not positive definite (cannot be solved)."""


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------


def check_correction(correct: object, damping: object, damping_reference: object) -> tuple[str, float, str]:
    """Validate the correction options.

    Raises:
        ValueError: ``correct`` not in :data:`CORRECTIONS`, ``damping`` not a finite number
            >= 0, or ``damping_reference`` not ``"mean"``/``"max"``.
    """
    if correct not in CORRECTIONS:
        raise ValueError(f"correct must be one of {CORRECTIONS}, got {correct!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0.0 <= float(damping) < float("inf"):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    if damping_reference not in DAMPING_REFERENCES:
        raise ValueError(f"damping_reference must be one of {DAMPING_REFERENCES}, got {damping_reference!r}")
    return str(correct), float(damping), str(damping_reference)


def _check_images(images: object) -> Tensor:
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point() or images.shape[0] < 1:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"calibration images must be a non-empty floating-point tensor [N, 3, H, W], got {shape}")
    return images


def _check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return batch_size


# ----------------------------------------------------------------------------------------------
# Moments
# ----------------------------------------------------------------------------------------------


class _Moments:
    """Running ``E[xₐ yₐᵀ]`` of augmented inputs ``xₐ = [x; 1]``, ``yₐ = [y; 1]`` (float64)."""

    def __init__(self) -> None:
        self.xy: Tensor | None = None
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.count = 0

    def add(self, x: Tensor, y: Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        y = x if y is None else y.reshape(-1, y.shape[-1]).float()
        xy, sx, sy = (x.T @ y).double(), x.sum(0).double(), y.sum(0).double()
        if self.xy is None:
            self.xy, self.x, self.y = xy, sx, sy
        else:
            self.xy += xy
            self.x += sx
            self.y += sy
        self.count += x.shape[0]

    def augmented(self) -> Tensor:
        assert self.xy is not None and self.x is not None and self.y is not None
        n, k = self.xy.shape
        out = self.xy.new_empty(n + 1, k + 1)
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


def has_cut_norm(block: nn.Module) -> bool:
    """Whether ``block`` has a norm over a cut dimension (``scale_norm`` / MLP norm): stored statistics cannot correct it."""
    return not isinstance(block.attn.norm, nn.Identity) or not isinstance(block.mlp.norm, nn.Identity)


def _triu(matrices: Tensor) -> Tensor:
    """The upper triangles (diagonal included) of ``[B, n, n]`` as ``[B, n(n+1)/2]``, row by row."""
    n = matrices.shape[-1]
    rows, cols = torch.triu_indices(n, n)
    return matrices[:, rows, cols]


def _from_triu(packed: Tensor, n: int) -> Tensor:
    """The symmetric ``[B, n, n]`` whose upper triangles are ``packed`` (the inverse of :func:`_triu`)."""
    rows, cols = torch.triu_indices(n, n)
    out = packed.new_empty(packed.shape[0], n, n)
    out[:, rows, cols] = packed
    out[:, cols, rows] = packed
    return out


def _triangle_side(length: int) -> int:
    """``n`` with ``n(n+1)/2 == length``, or -1."""
    n = int((math.isqrt(8 * length + 1) - 1) // 2)
    return n if n * (n + 1) // 2 == length else -1


def stats_path_for(elastic_path: str | os.PathLike) -> Path:
    """Where statistics of ``<name>.elastic.safetensors`` live: ``<name>.stats.safetensors`` beside it."""
    path = Path(elastic_path)
    suffix = ".elastic.safetensors"
    stem = path.name[: -len(suffix)] if path.name.endswith(suffix) else path.stem
    return path.with_name(f"{stem}.stats.safetensors")


def fingerprint(model: nn.Module, mlp_order: Tensor, head_order: Tensor) -> str:
    """A short hash that ties statistics to one elastic model (unit orders + last block's fc2)."""
    digest = hashlib.sha256()
    for t in (mlp_order, head_order, get_blocks(model)[-1].mlp.fc2.weight):
        digest.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())  # any dtype
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Stored statistics
# ----------------------------------------------------------------------------------------------


@dataclass
class CorrectionStats:
    """Second moments of the dense model's ``attn.proj`` and ``mlp.fc2`` inputs, per block.

    In the elastic model's (permuted) unit order, so a budget's kept inputs are a prefix. The
    matrices are symmetric (:func:`collect_stats` makes them exactly so), and a file stores only
    their upper triangles: lossless, half the bytes (format version 3; version 1 files, which
    hold the full matrices, and version 2 files, without a ranking, are still read).

    They may carry the corrected path's own ranking (:func:`~snapvit_lightning.obs.with_ranking`):
    :meth:`~snapvit_lightning.elastic.ElasticViT.subnet` then keeps, for corrected subnets, the
    units it ranks highest instead of the elastic model's prefix; plain cuts never use it.

    Attributes:
        attn: ``[B, C + 1, C + 1]`` float32 ``E[xₐ xₐᵀ]`` of the ``attn.proj`` inputs
            ``x`` (``C = heads · head_dim``), augmented with a constant 1 (last row/column holds
            the means).
        mlp: ``[B, hidden + 1, hidden + 1]`` the same for the ``mlp.fc2`` inputs.
        num_images: Calibration images they were collected on.
        num_tokens: Tokens per layer they average over (images × tokens per image).
        fingerprint: :func:`fingerprint` of the elastic model they belong to.
        ranking_mlp: ``[B, hidden]`` float64 scores of the MLP neurons for corrected subnets, in
            the elastic model's unit order (higher = keep), or ``None``.
        ranking_heads: ``[B, H]`` the same for the heads; given together with ``ranking_mlp``.

    Raises:
        ValueError: A ranking without the other half, of the wrong shape, or with values that are
            not finite and non-negative.
    """

    attn: Tensor
    mlp: Tensor
    num_images: int
    num_tokens: int
    fingerprint: str
    ranking_mlp: Tensor | None = None
    ranking_heads: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.ranking_mlp is None) != (self.ranking_heads is None):
            raise ValueError("ranking_mlp and ranking_heads must be given together (or neither)")
        if self.ranking_mlp is None:
            return
        blocks, hidden, channels = self.mlp.shape[0], self.mlp.shape[-1] - 1, self.attn.shape[-1] - 1
        for name, value in (("ranking_mlp", self.ranking_mlp), ("ranking_heads", self.ranking_heads)):
            if not isinstance(value, Tensor) or value.ndim != 2 or value.shape[0] != blocks or value.shape[1] < 1:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{name} must be a [{blocks}, units] tensor (one row per block), got {shape}")
            if not value.is_floating_point() or not torch.isfinite(value).all() or (value < 0).any():
                raise ValueError(f"{name} must hold finite, non-negative floating-point scores")
        if self.ranking_mlp.shape[1] != hidden:
            raise ValueError(f"ranking_mlp must be [{blocks}, {hidden}] (the MLP's neurons), got {tuple(self.ranking_mlp.shape)}")
        heads = self.ranking_heads.shape[1]
        if channels % heads:
            raise ValueError(
                f"ranking_heads has {heads} heads per block, which do not divide the {channels} attn.proj inputs"
            )
        self.ranking_mlp = self.ranking_mlp.detach().to("cpu", torch.float64)
        self.ranking_heads = self.ranking_heads.detach().to("cpu", torch.float64)

    @property
    def has_ranking(self) -> bool:
        """Whether they carry the corrected path's own ranking (``ranking_mlp``/``ranking_heads``)."""
        return self.ranking_mlp is not None

    def _rankings(self) -> tuple[Tensor, ...]:
        return () if self.ranking_mlp is None else (self.ranking_mlp, self.ranking_heads)

    @property
    def nbytes(self) -> int:
        """Bytes in memory: the (full, float32) matrices and the ranking (float64), if any."""
        return sum(t.numel() * t.element_size() for t in (self.attn, self.mlp, *self._rankings()))

    @property
    def stored_bytes(self) -> int:
        """Bytes of the tensors :meth:`save` writes: the float32 upper triangles, ``4·B·n(n+1)/2`` per
        layer, and the float64 ranking, ``8·B·(hidden + H)``, when there is one."""
        triangles = sum(4 * t.shape[0] * t.shape[1] * (t.shape[1] + 1) // 2 for t in (self.attn, self.mlp))
        return triangles + sum(8 * t.numel() for t in self._rankings())

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file of the upper triangles (to a temporary file, then renamed).

        Raises:
            ValueError: A matrix that is not symmetric (the lower triangle would be lost).
        """
        for name, t in (("attn", self.attn), ("mlp", self.mlp)):
            if not torch.equal(t, t.transpose(1, 2)):
                raise ValueError(f"correction statistics '{name}' are not symmetric; collect them with collect_stats()")
        meta = {
            "format": STATS_FORMAT,
            "format_version": str(STATS_FORMAT_VERSION),
            "num_images": str(self.num_images),
            "num_tokens": str(self.num_tokens),
            "fingerprint": self.fingerprint,
            "snapvit_version": __version__,
        }
        tensors = {"attn_triu": _triu(self.attn.float()), "mlp_triu": _triu(self.mlp.float())}
        if self.has_ranking:
            tensors.update(ranking_mlp=self.ranking_mlp, ranking_heads=self.ranking_heads)
        _write(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CorrectionStats":
        """Read statistics written by :meth:`save` (tensors and plain values only).

        Reads format version 3 (upper triangles and, when stored, the ranking ``ranking_mlp``
        ``[B, hidden]`` / ``ranking_heads`` ``[B, H]``), version 2 (upper triangles, no ranking)
        and version 1 (full matrices, no ranking).

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: Not a statistics file of a readable format/version, or inconsistent contents
                (a ranking of the wrong shape included).
        """
        tensors, meta = read_format(path, STATS_FORMAT, STATS_READABLE_VERSIONS, "correction statistics")
        try:
            if meta["format_version"] == "1":
                attn, mlp = tensors["attn"], tensors["mlp"]
            else:
                attn, mlp = (_unpack(path, name, tensors[f"{name}_triu"]) for name in ("attn", "mlp"))
            values = (int(meta["num_images"]), int(meta["num_tokens"]), str(meta["fingerprint"]))
        except (KeyError, ValueError) as err:
            raise ValueError(f"{path}: incomplete correction statistics: {err!r}") from err
        for name, t in (("attn", attn), ("mlp", mlp)):
            if t.ndim != 3 or t.shape[1] != t.shape[2]:
                raise ValueError(f"{path}: '{name}' must be [B, n, n], got {tuple(t.shape)}")
        if attn.shape[0] != mlp.shape[0]:
            raise ValueError(f"{path}: 'attn' and 'mlp' have different block counts")
        ranking = {}
        if meta["format_version"] not in ("1", "2"):  # older files carry no ranking
            ranking = {k: tensors[k] for k in ("ranking_mlp", "ranking_heads") if k in tensors}
        try:
            return cls(attn, mlp, *values, **ranking)
        except ValueError as err:
            raise ValueError(f"{path}: invalid ranking in the correction statistics: {err}") from err


def _unpack(path: str | os.PathLike, name: str, packed: Tensor) -> Tensor:
    n = _triangle_side(packed.shape[-1]) if packed.ndim == 2 else -1
    if n < 1:
        raise ValueError(f"{path}: '{name}_triu' must be [B, n(n+1)/2] upper triangles, got {tuple(packed.shape)}")
    return _from_triu(packed, n)


@torch.no_grad()
def collect_stats(
    model: nn.Module, images: Tensor, *, batch_size: int = 32, fingerprint: str = ""
) -> CorrectionStats:
    """Second moments of every block's ``attn.proj`` and ``mlp.fc2`` inputs on ``images``.

    Args:
        model: The dense (elastic, permuted) timm ViT; not changed.
        images: ``[N, 3, H, W]`` preprocessed calibration images (moved to the model's device).
        batch_size: Images per forward.
        fingerprint: Stored with the statistics to check they are used with the right model.

    Raises:
        ValueError: Bad images or batch size.
    """
    images, batch_size = _check_images(images), _check_batch_size(batch_size)
    device, dtype = _model_device_dtype(model)
    blocks = get_blocks(model)
    moments = {(i, b): _Moments() for i in range(len(blocks)) for b, _ in _LAYERS}
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(images, batch_size):
            x = _block_input(model, batch.to(device, dtype))
            for i, block in enumerate(blocks):
                x, seen = _capture(block, x, _LAYERS)
                for branch, name in _LAYERS:
                    moments[i, branch].add(seen[f"{branch}.{name}"])
    finally:
        model.train(was_training)
    stack = {}
    for b, _ in _LAYERS:
        m = torch.stack([moments[i, b].augmented() for i in range(len(blocks))])
        stack[b] = (0.5 * (m + m.transpose(1, 2))).float().cpu()  # exactly symmetric: a file stores one triangle
    tokens = moments[0, "mlp"].count
    return CorrectionStats(stack["attn"], stack["mlp"], int(images.shape[0]), int(tokens), fingerprint)


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
        kept_weight: The kept columns of the dense weight ``[out, k]`` (``bias`` only).
        gram: ``E[x̃ₐ x̃ₐᵀ]`` ``[k+1, k+1]`` of the kept inputs, augmented.
        has_bias: Whether the layer has a bias (``lstsq`` fits one only then).
        method: ``"bias"`` or ``"lstsq"``.
        damping: Ridge damping relative to the Gram diagonal (``lstsq``).
        reference: ``"mean"`` or ``"max"`` of the Gram diagonal.
        where: Names the layer in errors.

    Returns:
        ``(weight [out, k] or None when unchanged, bias [out] or None)``.

    Raises:
        ValueError: ``bias`` for a layer without a bias.
        SingularGramError: The damped Gram matrix is not positive definite.
    """
    k = kept_weight.shape[1]
    if method == "bias":
        if not has_bias:
            raise ValueError(f"{where} has no bias to compensate into; use correct='lstsq'")
        # Mean dense output W E[x] + b minus the kept columns' mean output.
        return None, target[:, -1] - kept_weight @ gram[:k, k]
    size = k + 1 if has_bias else k  # the bias is fitted as the constant input's weight
    g = gram[:size, :size].clone()
    if k:
        diag = torch.diagonal(g)[:k]
        lam = damping * float(diag.mean() if reference == "mean" else diag.max())
        diag += lam  # a view: damps the kept inputs, never the bias
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:
        raise SingularGramError(
            f"{where}: the input Gram matrix ({size}x{size}, damping={damping}, "
            f"damping_reference={reference!r}) is not positive definite (leading minor {int(info)} fails); "
            "use a larger damping, more calibration images, or correct='bias'"
        )
    solution = torch.cholesky_solve(target[:, :size].T.contiguous(), chol).T  # [out, size]
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
    damping: float = 0.01,
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
        damping: Ridge damping relative to the Gram diagonal (``lstsq`` only).
        damping_reference: ``"mean"`` or ``"max"`` of the Gram diagonal.
        sequential: Fit each cut layer on the already-corrected subnet's activations (images
            only; see the module docstring). Default: one-shot from the dense statistics,
            which kept more of the dense features on our real model (README, "Weight correction").
        batch_size: Images per forward (images only).
        expected_fingerprint: If given, stored statistics must carry this fingerprint.
        prepared: :func:`prepare_targets` of ``dense`` and these stored statistics (speed only;
            ignored for images).

    Raises:
        ValueError: A bad option, statistics of another model or shape, statistics for a
            model with a norm over the cut dimension, ``sequential`` with statistics, or a
            block that grew.
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
    if method == "none" or not any(cut):
        return subnet
    def solve(d: nn.Linear, s: nn.Linear, cross: Tensor, gram: Tensor, where: str, target: Tensor | None = None) -> None:
        _solve(d, s, cross, gram, method, damping, damping_reference, where, target)

    if sequential:
        _correct_sequential(dense, subnet, _check_images(calibration), _check_batch_size(batch_size), solve)
        return subnet
    if not isinstance(calibration, CorrectionStats):
        calibration = collect_stats(dense, calibration, batch_size=batch_size)
        expected_fingerprint, prepared = None, None
    _correct_from_stats(dense_blocks, sub_blocks, calibration, expected_fingerprint, solve, prepared)
    return subnet


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
            "stored statistics cannot correct a model with a norm over the cut dimension (scale_norm or "
            "an MLP norm): its kept activations change with the cut; pass calibration images with sequential=True"
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
