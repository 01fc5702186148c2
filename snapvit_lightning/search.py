"""Evolutionary correlation search (SnapViT step 2): xNES over block/head score weights.

A weight vector ``w`` of ``B + B*H`` entries (``B`` block weights, then ``B*H`` head weights
row-major, the layout of :meth:`ImportanceScores.with_weights`) rescales each block's MLP
scores and each head's score. Its :class:`Fitness` is the mean, over several
``(mlp_ratio, head_ratio)`` budgets, of ``1 - mean cosine similarity`` between the pruned
model's embeddings and the dense model's: the embeddings themselves (``space="raw"``, the
default: what fidelity measures) or, as in the paper, both projected on a PCA basis fitted
once on the dense embeddings of the fitness images (``space="pca"``). :class:`EvolutionarySearch` (a Lightning callback)
and :func:`run_search` (no Trainer) minimise it with :class:`~snapvit_lightning.xnes.XNES`;
the learned covariance is the cross-structure correlation estimate and is kept with the
scores.

Speed: :class:`Fitness` never copies the model per evaluation. It keeps one working copy
whose blocks' Linear weights are replaced, per budget, by slices of stored *master* weights:

* MLP neurons are permuted once by descending raw score. A block's MLP weight is one scalar,
  so the within-block order never changes with ``w`` and every budget is a prefix slice
  (``fc1`` rows ``[:k]`` and ``fc2`` columns ``[:, :k]`` are views, no copy: a strided
  ``fc2`` view measured as fast as a contiguous copy, bf16 on CPU). Only when rescaling creates ties (e.g. a block weight of exactly 0) the kept set is
  gathered by index instead, so the result always equals the elastic model's.
* Heads are kept in their original order; the kept heads (top-``h`` by weighted score,
  taken in ascending index order) are gathered from the master ``qkv`` rows / ``proj``
  columns. All heads kept uses the master tensors themselves.
* Under autocast the master Linear weights are stored in the autocast dtype once, which is
  bit-for-bit what autocast would produce, without re-casting on every forward.

The dense (teacher) embeddings are computed through the same path with every unit kept, so
the unpruned model has fitness exactly 0.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from .correction import augmented_weight, check_correction, collect_stats, has_cut_norm, solve_layer
from .forward import embed
from .scores import ImportanceScores, check_balance, check_ratio
from .structure import get_blocks, head_channels, inspect_vit, mlp_kind
from .xnes import XNES

__all__ = [
    "DEFAULT_BALANCE",
    "DEFAULT_RATIO_PAIRS",
    "PAPER_RATIO_PAIRS",
    "DEFAULT_SIGMA",
    "DEFAULT_GUARD",
    "DEFAULT_SPACE",
    "FITNESS_SPACES",
    "default_initial_weights",
    "Fitness",
    "EvolutionarySearch",
    "run_search",
    "scored_model",
]

#: The ``(mlp_ratio, head_ratio)`` budgets of the paper's (and the official code's) fitness.
PAPER_RATIO_PAIRS: tuple[tuple[float, float], ...] = ((0.15, 0.0), (0.35, 0.2), (0.55, 0.4), (0.65, 0.5))
#: Our default fitness budgets: the paper's plus ``(0.45, 0.3)``, so that no budget between
#: (0.35, 0.2) and (0.65, 0.5) is left for the search to trade away (see :class:`EvolutionarySearch`).
DEFAULT_RATIO_PAIRS: tuple[tuple[float, float], ...] = ((0.15, 0.0), (0.35, 0.2), (0.45, 0.3), (0.55, 0.4), (0.65, 0.5))
#: Default initial xNES step size (see :class:`EvolutionarySearch`).
DEFAULT_SIGMA = 0.15
#: Default balancing quantiles ``(mlp, heads)`` of the search's scores (see :class:`EvolutionarySearch`).
DEFAULT_BALANCE: tuple[float, float] = (0.5, 0.65)
#: Where the fitness compares pruned and dense embeddings (see :class:`Fitness`).
FITNESS_SPACES = ("raw", "pca")
#: The default of :data:`FITNESS_SPACES` (see :class:`EvolutionarySearch`).
DEFAULT_SPACE = "raw"
#: The search's default penalty per unit of cosine a ratio pair loses against the start point
#: (see :class:`Fitness` and :class:`EvolutionarySearch`; :class:`Fitness` alone defaults to 0).
DEFAULT_GUARD = 10.0
_BOUNDS = (0.0, 2.0)


def default_initial_weights(num_blocks: int, num_heads: int) -> Tensor:
    """The reference's starting point: ``linspace(1.2 -> 0.8)`` over depth.

    Block ``b``'s MLP weight and all its head weights get the same value.

    Args:
        num_blocks: Number of blocks ``B``.
        num_heads: Heads per block ``H``.

    Returns:
        ``[B + B*H]`` float64: ``B`` block weights, then ``B*H`` head weights row-major.

    Raises:
        ValueError: If ``num_blocks < 1`` or ``num_heads < 1``.
    """
    for name, value in (("num_blocks", num_blocks), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    block = torch.linspace(1.2, 0.8, num_blocks, dtype=torch.float64)
    return torch.cat([block, block[:, None].expand(num_blocks, num_heads).flatten()])


# ----------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------


def _check_ratio_pairs(ratio_pairs: Any) -> tuple[tuple[float, float], ...]:
    try:
        pairs = tuple(tuple(p) for p in ratio_pairs)
    except TypeError:
        raise ValueError(f"ratio_pairs must be a sequence of (mlp_ratio, head_ratio) pairs, got {ratio_pairs!r}") from None
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(f"ratio_pairs must be a non-empty sequence of (mlp_ratio, head_ratio) pairs, got {ratio_pairs!r}")
    try:
        return tuple((check_ratio(m, "mlp_ratio"), check_ratio(h, "head_ratio")) for m, h in pairs)
    except ValueError as err:
        raise ValueError(f"ratio_pairs={ratio_pairs!r}: {err}") from None


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if allow_none else ''}, got {value!r}")
    return value


def _check_images(images: Any) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        shape = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [M, 3, S, S], got {shape}")
    if images.shape[0] < 2:
        raise ValueError(f"images must hold at least 2 images (the PCA needs M >= 2), got {images.shape[0]}")
    return images


def _check_weights(value: Any, dim: int, name: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    if tuple(t.shape) != (dim,) or not torch.isfinite(t).all():
        raise ValueError(f"{name} must be a finite tensor of shape [{dim}] (B + B*H), got shape {list(t.shape)}")
    return t


def _descending(scores: Tensor) -> Tensor:
    # Same ordering as ImportanceScores.block_orders / ElasticViT.
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


# ----------------------------------------------------------------------------------------------
# Block views
# ----------------------------------------------------------------------------------------------


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


@dataclass
class _LinearMaster:
    """The full weights of one Linear layer (rows or columns are the cut units)."""

    layer: nn.Linear
    weight: Tensor
    bias: Tensor | None


@dataclass
class _NormMaster:
    norm: nn.Module
    weight: Tensor | None
    bias: Tensor | None


@dataclass
class _BlockMaster:
    """Master weights of one block: MLP permuted by descending raw score, heads as is."""

    mlp_rows: list[_LinearMaster]  # fc1 (+ fc1_g / fc1_x); for GLU: fc1 whose halves are cut together
    glu: bool
    fc2: _LinearMaster
    mlp_norm: _NormMaster | None
    qkv: _LinearMaster
    gate: _LinearMaster | None
    attn_norm: _NormMaster | None
    proj: _LinearMaster
    hidden: int
    num_heads: int
    head_dim: int


def _norm_master(norm: nn.Module, index: Tensor | None) -> _NormMaster | None:
    if isinstance(norm, nn.Identity):
        return None

    def take(p: Tensor | None) -> Tensor | None:
        if p is None:
            return None
        p = p.detach()
        return (p if index is None else p.index_select(0, index.to(p.device))).clone()

    return _NormMaster(norm, take(getattr(norm, "weight", None)), take(getattr(norm, "bias", None)))


def _build_master(block: nn.Module, mlp_order: Tensor, dtype: torch.dtype | None) -> _BlockMaster:
    """Detach (and copy) the block's cut weights into a master, MLP permuted by ``mlp_order``."""

    def cast(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        t = t.detach()
        return (t if dtype is None else t.to(dtype)).contiguous().clone()

    def rows(layer: nn.Linear, index: Tensor | None) -> _LinearMaster:
        w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
        if index is not None:
            index = index.to(w.device)
            w = w.index_select(0, index)
            b = None if b is None else b.index_select(0, index)
        return _LinearMaster(layer, cast(w), cast(b))

    mlp, attn = block.mlp, block.attn
    kind = mlp_kind(mlp)
    hidden = int(mlp.fc2.in_features)
    if kind == "mlp":
        mlp_rows, glu = [rows(mlp.fc1, mlp_order)], False
    elif kind == "swiglu":
        mlp_rows, glu = [rows(mlp.fc1_g, mlp_order), rows(mlp.fc1_x, mlp_order)], False
    else:  # GluMlp / SwiGLUPacked: neuron j is rows j and j + hidden
        mlp_rows, glu = [rows(mlp.fc1, torch.cat([mlp_order, mlp_order + hidden]))], True
    fc2_w = mlp.fc2.weight.detach().index_select(1, mlp_order.to(mlp.fc2.weight.device))
    fc2 = _LinearMaster(mlp.fc2, cast(fc2_w), None)
    gate = getattr(attn, "gate", None)
    return _BlockMaster(
        mlp_rows=mlp_rows,
        glu=glu,
        fc2=fc2,
        mlp_norm=_norm_master(mlp.norm, mlp_order),
        qkv=rows(attn.qkv, None),
        gate=None if gate is None else rows(gate, None),
        attn_norm=_norm_master(attn.norm, None),
        proj=_LinearMaster(attn.proj, cast(attn.proj.weight), None),
        hidden=hidden,
        num_heads=int(attn.num_heads),
        head_dim=int(attn.head_dim),
    )


def _take(t: Tensor | None, sel: int | Tensor, dim: int, contiguous: bool = False) -> Tensor | None:
    """Units ``sel`` (a prefix length or an index tensor) of ``t`` along ``dim``."""
    if t is None:
        return None
    if isinstance(sel, int):
        if sel == t.shape[dim]:
            return t
        out = t.narrow(dim, 0, sel)
        return out.contiguous() if contiguous else out
    return t.index_select(dim, sel)


def _set_rows(m: _LinearMaster, sel: int | Tensor, glu_hidden: int | None = None) -> None:
    layer = m.layer
    if glu_hidden is not None:  # GLU: neuron j is rows j and j + hidden of one fc1
        if isinstance(sel, int) and sel == glu_hidden:
            sel = 2 * glu_hidden
        else:
            idx = torch.arange(sel, device=m.weight.device) if isinstance(sel, int) else sel
            sel = torch.cat([idx, idx + glu_hidden])
    layer.weight = _frozen(_take(m.weight, sel, 0))
    if m.bias is not None:
        layer.bias = _frozen(_take(m.bias, sel, 0))
    layer.out_features = int(layer.weight.shape[0])


def _set_cols(m: _LinearMaster, sel: int | Tensor) -> None:
    m.layer.weight = _frozen(_take(m.weight, sel, 1))  # strided prefix view: measured as fast as a copy
    m.layer.in_features = int(m.layer.weight.shape[1])


def _set_norm(m: _NormMaster | None, sel: int | Tensor) -> None:
    if m is None:
        return
    for name in ("weight", "bias"):
        value = getattr(m, name)
        if value is not None:
            setattr(m.norm, name, _frozen(_take(value, sel, 0)))
    if hasattr(m.norm, "normalized_shape"):
        m.norm.normalized_shape = (sel if isinstance(sel, int) else int(sel.numel()),)


def _set_block_view(block: nn.Module, master: _BlockMaster, mlp_sel: int | Tensor, heads: Tensor | None) -> None:
    """Point ``block``'s cut layers at slices of ``master`` (no copy for prefixes / all heads).

    Args:
        mlp_sel: Kept neurons in the master's (permuted) order: a prefix length or an index tensor.
        heads: Kept heads (ascending original indices) on the master's device, or ``None`` for all.
    """
    for m in master.mlp_rows:
        _set_rows(m, mlp_sel, master.hidden if master.glu else None)
    _set_norm(master.mlp_norm, mlp_sel)
    _set_cols(master.fc2, mlp_sel)
    attn = block.attn
    hd = master.head_dim
    if heads is None:
        sel: int | Tensor = master.num_heads * hd
        qkv_sel: int | Tensor = 3 * master.num_heads * hd
        n = master.num_heads
    else:
        channels = head_channels(heads, hd)
        attn_dim = master.num_heads * hd
        sel = channels
        qkv_sel = torch.cat([channels, channels + attn_dim, channels + 2 * attn_dim])
        n = int(heads.numel())
    _set_rows(master.qkv, qkv_sel)
    if master.gate is not None:
        _set_rows(master.gate, sel)
    _set_norm(master.attn_norm, sel)
    _set_cols(master.proj, sel)
    attn.num_heads = n
    attn.attn_dim = n * hd


# ----------------------------------------------------------------------------------------------
# Fitness
# ----------------------------------------------------------------------------------------------


class Fitness:
    """Fitness of search weights ``w``: mean over budgets of ``1 - cos`` to the dense model.

    Built once from a model, its scores and fitness images: the dense (teacher) embeddings
    ``forward_head(forward_features(x), pre_logits=True)`` are computed once and a PCA basis is
    fitted on them (``min(pca_components, M - 1, D)`` components of the centered embeddings, by
    SVD in float64). Calling the object with ``w`` prunes a working copy of the model for each
    ratio pair by the global ranking of the ``w``-rescaled scores (exactly what
    ``ElasticViT(model, scores.with_weights(w)).subnet(mlp_ratio, head_ratio)`` builds), embeds
    the images under ``torch.inference_mode`` (and autocast) and returns
    ``mean_pairs(1 - mean_images(cos(pruned, teacher)))``, the cosine taken on the embeddings
    themselves (``space="raw"``) or on their PCA projections, centered with the teacher mean
    (``space="pca"``). See the module docstring for how the working copy is re-sliced without
    copying the model.

    The model itself is never modified (one working copy is made at construction).

    Data parallel use: with ``world_size > 1`` this process embeds only its shard
    ``images[rank::world_size]`` of the pruned models; per ratio pair the sum of cosines and
    the count are combined with ``reduce_fn`` (an all-reduce sum), so every process gets the
    same value. The PCA is fitted by every process on the teacher embeddings of *all* images,
    and ``broadcast_fn`` (if given) makes the basis bitwise identical to process 0's.

    Args:
        model: A supported timm ViT (uniform blocks). Left unchanged.
        scores: Importance scores matching the model.
        images: Fitness images, float ``[M, 3, S, S]`` with ``M >= 2`` (moved to the model's device).
        ratio_pairs: ``(mlp_ratio, head_ratio)`` budgets, each ratio in ``[0, 1)``.
        pca_components: Requested number of PCA components (``>= 1``).
        batch_size: Images per forward pass.
        autocast_dtype: Autocast dtype for the forward passes (bfloat16 by default, on CPU and
            GPU); ``None`` runs in the model's dtype.
        rank: This process's index (data parallel).
        world_size: Number of processes (data parallel).
        reduce_fn: Sums a tensor over processes (required when ``world_size > 1``).
        broadcast_fn: Broadcasts a tensor from process 0 (optional).
        correct: Weight correction applied to every pruned model before it is embedded:
            ``"none"`` (default, the paper's fitness), ``"bias"`` or ``"lstsq"``
            (:mod:`~snapvit_lightning.correction`, one-shot). The search then optimises what the
            corrected subnets keep, which is what a corrected export delivers. Statistics are
            collected once on all fitness images (in-sample); each candidate's kept rows and
            columns of them are solved per cut layer (float64 Cholesky), exactly as
            :meth:`ElasticViT.subnet` with ``correct=`` and these statistics would.
        damping: Ridge damping of ``lstsq`` relative to the Gram diagonal.
        damping_reference: ``"mean"`` or ``"max"`` of the Gram diagonal.
        space: Where the cosine is taken: ``"raw"`` (default), the embeddings themselves, which
            is the fidelity the elastic model is judged by; ``"pca"``, the paper's, their
            projections on the ``num_components`` principal directions of the dense embeddings,
            centered on the dense mean. Uncorrected subnets from about (0.45, 0.3) on keep
            almost none of the centered, image-specific part, so the PCA cosine is about 0 for
            every ``w`` there and those budgets add only noise to a ``"pca"`` fitness; the raw
            cosine still tells splits apart (see :class:`EvolutionarySearch`). The PCA is fitted
            in both cases (``pair_cosines(w, pca=True)`` reads it).
        guard: Penalty per unit of cosine that a ratio pair loses against
            ``reference_cosines`` (``0``, the default here: none, the paper's fitness;
            :func:`run_search` and :class:`EvolutionarySearch` default to
            :data:`DEFAULT_GUARD`). The fitness becomes
            ``mean_p(1 - cos_p) + guard * sum_p max(0, ref_p - cos_p)``: with a large ``guard``
            the search cannot trade one budget for the others, which a plain mean does (a
            search that gains .1 at the sparse budgets may give up .02 at (0.35, 0.2) and fall
            below the gradient scores there). It costs nothing: the terms are computed anyway.
        reference_cosines: Per ratio pair, the cosines the guard protects (those of the start
            point). ``None``: the first call's (:func:`run_search` and
            :class:`EvolutionarySearch` evaluate the start point first).

    Attributes:
        num_evals: Calls so far.
        eval_times: Wall time of each call, in seconds.
        num_components: The number of PCA components used.

    Raises:
        ValueError: Bad images, ratio pairs, ``pca_components``, ``batch_size``, rank/world
            size, scores that do not match the model, blocks of different sizes, a bad
            correction option, a correction for a model with a norm over a cut dimension, a
            negative or non-finite ``guard``, or ``reference_cosines`` not one finite number per
            ratio pair.
        SingularGramError: (during a call) a damped Gram matrix that is not positive definite.
        UnsupportedModelError: For a model the cut would get wrong.
    """

    def __init__(
        self,
        model: nn.Module,
        scores: ImportanceScores,
        images: Tensor,
        ratio_pairs: Sequence[tuple[float, float]] = DEFAULT_RATIO_PAIRS,
        pca_components: int = 64,
        batch_size: int = 64,
        autocast_dtype: torch.dtype | None = torch.bfloat16,
        *,
        rank: int = 0,
        world_size: int = 1,
        reduce_fn: Callable[[Tensor], Tensor] | None = None,
        broadcast_fn: Callable[[Tensor], Tensor] | None = None,
        correct: str = "none",
        damping: float = 0.01,
        damping_reference: str = "mean",
        space: str = DEFAULT_SPACE,
        guard: float = 0.0,
        reference_cosines: Sequence[float] | Tensor | None = None,
    ) -> None:
        self.ratio_pairs = _check_ratio_pairs(ratio_pairs)
        self.space = check_space(space)
        self.guard = check_guard(guard)
        self.reference_cosines = (
            None if reference_cosines is None else _check_reference(reference_cosines, len(self.ratio_pairs))
        )
        self.correct, self.damping, self.damping_reference = check_correction(correct, damping, damping_reference)
        self.pca_components = _check_int("pca_components", pca_components, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        images = _check_images(images)
        world_size = _check_int("world_size", world_size, 1)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        if world_size > 1 and reduce_fn is None:
            raise ValueError(f"reduce_fn is required when world_size={world_size} > 1")
        if autocast_dtype is not None and not isinstance(autocast_dtype, torch.dtype):
            raise ValueError(f"autocast_dtype must be a torch.dtype or None, got {autocast_dtype!r}")
        if not isinstance(scores, ImportanceScores):
            raise ValueError(f"scores must be ImportanceScores, got {type(scores).__name__}")
        structure = inspect_vit(model)
        if not structure.is_uniform:
            raise ValueError("model has blocks of different sizes; the fitness needs the dense model")
        dims = structure.blocks[0]
        expected = (structure.num_blocks, dims.mlp_hidden, dims.num_heads)
        got = (scores.num_blocks, scores.mlp_hidden, scores.num_heads)
        if got != expected:
            raise ValueError(f"scores (blocks, neurons, heads) = {got} do not match the model's {expected}")

        self.scores = scores
        self.rank, self.world_size = rank, world_size
        self._reduce_fn, self._broadcast_fn = reduce_fn, broadcast_fn
        self.autocast_dtype = autocast_dtype
        param = next(model.parameters())
        self.device = param.device
        self.num_evals = 0
        self.eval_times: list[float] = []

        # One working copy; its blocks' cut layers are re-pointed at master slices per budget.
        work = copy.deepcopy(model).eval().requires_grad_(False)
        for p in work.parameters():
            p.grad = None
        self.model = work
        self.blocks = get_blocks(work)
        self._mlp_raw_order = _descending(scores.mlp)  # [B, hidden], CPU
        self._mlp_inv = torch.argsort(self._mlp_raw_order, dim=1)  # original index -> permuted position
        linear_dtype = autocast_dtype if autocast_dtype is not None and param.is_floating_point() else None
        self.masters = [
            _build_master(block, order, linear_dtype) for block, order in zip(self.blocks, self._mlp_raw_order)
        ]
        images = images.to(self.device, param.dtype if param.is_floating_point() else images.dtype)
        self._corrections = self._correction_terms(model, images) if self.correct != "none" else None
        self._mlp_order_device = self._mlp_raw_order.to(self.device)  # original index of each master position
        self._dense_bias = [(b.attn.proj.bias, b.mlp.fc2.bias) for b in self.blocks]
        self._restore()

        # Teacher embeddings (same path, every unit kept) and the PCA.
        self.images = images[rank::world_size] if world_size > 1 else images
        teacher_all = self._embed(images).double().cpu()
        self.num_components = min(self.pca_components, images.shape[0] - 1, teacher_all.shape[1])
        mean = teacher_all.mean(0)
        _, _, vh = torch.linalg.svd(teacher_all - mean, full_matrices=False)
        basis = vh[: self.num_components].T.contiguous()  # [D, k]
        if self._broadcast_fn is not None and world_size > 1:
            mean = self._broadcast_fn(mean.to(self.device)).double().cpu()
            basis = self._broadcast_fn(basis.to(self.device)).double().cpu()
        self.pca_mean, self.pca_basis = mean, basis
        teacher = self._embed(self.images).double().cpu() if world_size > 1 else teacher_all
        self.teacher = teacher  # this process's images, raw
        self.teacher_projected = self._project(teacher)

    # ------------------------------------------------------------------------------------------

    @property
    def num_weights(self) -> int:
        """Length ``B + B*H`` of ``w``."""
        return self.scores.num_weights

    @property
    def total_time(self) -> float:
        """Seconds spent in calls so far."""
        return float(sum(self.eval_times))

    @property
    def mean_eval_time(self) -> float:
        """Mean seconds per call (``nan`` before the first)."""
        return self.total_time / len(self.eval_times) if self.eval_times else math.nan

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _embed(self, images: Tensor) -> Tensor:
        outs = []
        with torch.inference_mode(), self._autocast():
            for i in range(0, images.shape[0], self.batch_size):
                x = images[i : i + self.batch_size]
                outs.append(embed(self.model, x).float())
        if not outs:
            return torch.zeros(0, int(self.model.num_features), device=self.device)
        return torch.cat(outs)

    def _project(self, emb: Tensor) -> Tensor:
        return (emb - self.pca_mean) @ self.pca_basis

    def _restore(self) -> None:
        for block, master, (proj_bias, fc2_bias) in zip(self.blocks, self.masters, self._dense_bias):
            _set_block_view(block, master, master.hidden, None)
            block.attn.proj.bias, block.mlp.fc2.bias = proj_bias, fc2_bias

    def _correction_terms(self, model: nn.Module, images: Tensor) -> list[dict[str, tuple[Tensor, Tensor, Tensor]]]:
        """Per block and cut layer: (dense weight, ``[W | b] E[xₐ xₐᵀ]``, ``E[xₐ xₐᵀ]``), original order."""
        blocks = get_blocks(model)
        if any(has_cut_norm(b) for b in blocks):
            raise ValueError(
                f"correct={self.correct!r}: the fitness corrects from statistics, which cannot correct a model "
                "with a norm over a cut dimension (scale_norm or an MLP norm); use correct='none'"
            )
        stats = collect_stats(model, images, batch_size=self.batch_size)
        terms = []
        for i, block in enumerate(blocks):
            entry = {}
            for name, layer, moments in (("attn", block.attn.proj, stats.attn), ("mlp", block.mlp.fc2, stats.mlp)):
                w_aug = augmented_weight(layer)
                gram = moments[i].to(self.device)  # float32 as stored; solved in float64
                entry[name] = (w_aug[:, :-1], w_aug @ gram.double(), gram)
            terms.append(entry)
        return terms

    def _correct(self, b: int, name: str, layer: nn.Linear, kept: Tensor) -> None:
        """Replace a cut ``layer``'s weight/bias by the corrected ones (``kept``: original input indices)."""
        assert self._corrections is not None
        weight, target, gram = self._corrections[b][name]
        n = weight.shape[1]
        cols = torch.cat([kept, torch.tensor([n], device=kept.device)])
        new_w, new_b = solve_layer(
            target[:, cols], weight[:, kept], gram[cols][:, cols].double(), layer.bias is not None,
            self.correct, self.damping, self.damping_reference, f"block {b} {name}",
        )
        if new_w is not None:
            layer.weight = _frozen(new_w.to(layer.weight.dtype))
        if new_b is not None:
            layer.bias = _frozen(new_b.to(layer.bias.dtype))

    def _selections(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Per-block unit orders under ``w``: MLP as positions in the master, heads as indices."""
        mlp_w, heads_w = self.scores.weighted(w)
        mlp_pos = self._mlp_inv.gather(1, _descending(mlp_w))  # weighted order, in master positions
        return mlp_pos, _descending(heads_w)

    def apply(self, w: Tensor, mlp_ratio: float, head_ratio: float) -> nn.Module:
        """Slice the working copy to budget ``(mlp_ratio, head_ratio)`` under weights ``w``.

        Returns the working model (valid until the next call; :meth:`restore` makes it dense).
        """
        w = _check_weights(w, self.num_weights, "w")
        mlp_pos, head_order = self._selections(w)
        self._apply_counts(mlp_pos, head_order, *self.scores.keep_counts(mlp_ratio, head_ratio, weights=w))
        return self.model

    def restore(self) -> None:
        """Make the working copy dense again."""
        self._restore()

    def _apply_counts(self, mlp_pos: Tensor, head_order: Tensor, neurons: Tensor, heads: Tensor) -> None:
        for b, (block, master) in enumerate(zip(self.blocks, self.masters)):
            k, h = int(neurons[b]), int(heads[b])
            pos = mlp_pos[b, :k]
            if k == 0 or int(pos.max()) == k - 1:
                mlp_sel: int | Tensor = k  # the kept set is the master's prefix
            else:  # rescaling tied/reordered scores: gather the kept set (ascending positions)
                mlp_sel = pos.sort().values.to(self.device)
            head_sel = None if h == master.num_heads else head_order[b, :h].sort().values.to(self.device)
            _set_block_view(block, master, mlp_sel, head_sel)
            if self._corrections is None:
                continue
            if k < master.hidden:
                order = self._mlp_order_device[b]
                self._correct(b, "mlp", block.mlp.fc2, order[:k] if isinstance(mlp_sel, int) else order[mlp_sel])
            if head_sel is not None:
                self._correct(b, "attn", block.attn.proj, head_channels(head_sel, master.head_dim))

    def _pair_sums(self, w: Tensor, project: bool) -> Tensor:
        """``[P, 2]`` float64: per ratio pair, (sum of cosines, number of images), all processes."""
        mlp_pos, head_order = self._selections(w)
        target = self.teacher_projected if project else self.teacher
        sums = torch.zeros(len(self.ratio_pairs), 2, dtype=torch.float64)
        try:
            for i, (m, h) in enumerate(self.ratio_pairs):
                neurons, heads = self.scores.keep_counts(m, h, weights=w)
                self._apply_counts(mlp_pos, head_order, neurons, heads)
                emb = self._embed(self.images).double().cpu()
                if project:
                    emb = self._project(emb)
                cos = (emb * target).sum(1) / (emb.norm(dim=1) * target.norm(dim=1)).clamp_min(1e-12)
                sums[i, 0], sums[i, 1] = cos.sum(), cos.numel()
        finally:
            self._restore()
        if self.world_size > 1:
            sums = self._reduce_fn(sums.to(self.device)).double().cpu()
        return sums

    def pair_cosines(self, w: Tensor, pca: bool = True) -> list[float]:
        """Mean cosine similarity to the dense embeddings per ratio pair (not counted as a call).

        Args:
            w: ``[B + B*H]`` weights.
            pca: Compare PCA projections (what the fitness compares when ``space="pca"``) or the
                raw embeddings (``space="raw"``).
        """
        w = _check_weights(w, self.num_weights, "w")
        sums = self._pair_sums(w, project=pca)
        return (sums[:, 0] / sums[:, 1].clamp_min(1)).tolist()

    def __call__(self, w: Tensor) -> float:
        """The fitness of ``w`` (lower is better; 0 for the dense model).

        With ``guard > 0`` and no ``reference_cosines`` yet, this call's cosines become them.

        Raises:
            ValueError: If ``w`` does not have shape ``[B + B*H]`` or is not finite.
        """
        w = _check_weights(w, self.num_weights, "w")
        start = time.perf_counter()
        sums = self._pair_sums(w, project=self.space == "pca")
        cos = sums[:, 0] / sums[:, 1].clamp_min(1)
        loss = float((1.0 - cos).mean())
        if self.guard > 0:
            if self.reference_cosines is None:
                self.reference_cosines = cos.clone()  # the first call is the start point
            loss += self.guard * float((self.reference_cosines - cos).clamp_min(0).sum())
        self.eval_times.append(time.perf_counter() - start)
        self.num_evals += 1
        return loss


# ----------------------------------------------------------------------------------------------
# The search loop (shared by run_search and the callback)
# ----------------------------------------------------------------------------------------------


def check_guard(guard: Any) -> float:
    """Validate a fitness guard (a finite float ``>= 0``)."""
    if isinstance(guard, bool) or not isinstance(guard, (int, float)) or not math.isfinite(guard) or guard < 0:
        raise ValueError(f"guard must be a finite number >= 0, got {guard!r}")
    return float(guard)


def _check_reference(reference: Sequence[float] | Tensor, num_pairs: int) -> Tensor:
    ref = torch.as_tensor(reference, dtype=torch.float64).flatten()
    if ref.numel() != num_pairs or not bool(torch.isfinite(ref).all()):
        raise ValueError(f"reference_cosines must be {num_pairs} finite numbers (one per ratio pair), got {reference!r}")
    return ref


def check_space(space: Any) -> str:
    """Validate a fitness comparison space (:data:`FITNESS_SPACES`)."""
    if space not in FITNESS_SPACES:
        raise ValueError(f"space must be one of {FITNESS_SPACES}, got {space!r}")
    return space


def _resolve_autocast(autocast: bool | torch.dtype | None) -> torch.dtype | None:
    if autocast is None or autocast is False:
        return None
    if autocast is True:
        return torch.bfloat16
    if isinstance(autocast, torch.dtype):
        return autocast
    raise ValueError(f"autocast must be a bool, a torch.dtype or None, got {autocast!r}")


def _check_sigma(sigma: Any) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    return float(sigma)


def _check_popsize(popsize: Any) -> int | None:
    return _check_int("popsize", popsize, 2, allow_none=True)


def _balanced_start(
    scores: ImportanceScores, balance: float | tuple[float, float] | str | None, initial_weights: Tensor | None
) -> tuple[ImportanceScores, Tensor | None]:
    """The scores the weights apply to, and the start point (``w = 1`` for balanced scores)."""
    if balance is None:
        return scores, initial_weights
    if initial_weights is None:
        initial_weights = torch.ones(scores.num_weights, dtype=torch.float64)
    return scores.balanced(balance), initial_weights


def _make_xnes(
    dim: int,
    num_blocks: int,
    num_heads: int,
    sigma: float,
    popsize: int | None,
    seed: int,
    initial_weights: Tensor | None,
    initial_covariance: Tensor | None,
) -> tuple[XNES, Tensor]:
    w0 = default_initial_weights(num_blocks, num_heads) if initial_weights is None else _check_weights(
        initial_weights, dim, "initial_weights"
    )
    w0 = w0.clamp(*_BOUNDS)
    cov = None
    if initial_covariance is not None:
        cov = torch.as_tensor(initial_covariance, dtype=torch.float64)
        if tuple(cov.shape) != (dim, dim):
            raise ValueError(f"initial_covariance must have shape [{dim}, {dim}], got {list(cov.shape)}")
    xnes = XNES(dim, mean=w0, sigma=sigma, cov=cov, popsize=popsize, bounds=_BOUNDS, seed=seed)
    return xnes, w0


def _search_loop(
    xnes: XNES,
    fitness: Callable[[Tensor], float],
    max_evals: int,
    history: list[float],
    on_eval: Callable[[int, float, float], None] | None = None,
    broadcast: Callable[[Tensor], Tensor] | None = None,
    best_so_far: float = math.inf,
) -> None:
    """Run ``xnes`` until ``max_evals`` total evaluations, appending to ``history``."""
    best = [min([best_so_far, *history])]

    def fn(x: Tensor) -> Tensor:
        if broadcast is not None:
            x = broadcast(x)
        f = float(fitness(x))
        history.append(f)
        best[0] = min(best[0], f)
        if on_eval is not None:
            on_eval(len(history) - 1, f, best[0])
        return torch.tensor(f, dtype=torch.float64)  # a bare float would pass through float32

    if xnes.evals < max_evals:
        xnes.optimize(fn, max_evals)


def _best(xnes: XNES, w0: Tensor, initial_fitness: float) -> tuple[Tensor, float]:
    """The best evaluated weights; the start point wins ties and when nothing beat it."""
    if xnes.best_x is None or not xnes.best_f < initial_fitness:
        return w0.clone(), initial_fitness
    return xnes.best_x, xnes.best_f


def run_search(
    model: nn.Module,
    scores: ImportanceScores,
    images: Tensor,
    *,
    max_evals: int = 50,
    popsize: int | None = None,
    sigma: float = DEFAULT_SIGMA,
    ratio_pairs: Sequence[tuple[float, float]] = DEFAULT_RATIO_PAIRS,
    pca_components: int = 64,
    seed: int = 0,
    autocast: bool | torch.dtype | None = True,
    batch_size: int = 64,
    initial_weights: Tensor | None = None,
    initial_covariance: Tensor | None = None,
    on_eval: Callable[[int, float, float], None] | None = None,
    balance: float | tuple[float, float] | str | None = DEFAULT_BALANCE,
    correct: str = "none",
    damping: float = 0.01,
    damping_reference: str = "mean",
    space: str = DEFAULT_SPACE,
    guard: float = DEFAULT_GUARD,
) -> tuple[Tensor, Tensor, list[float]]:
    """Search the block/head weights without a Trainer (see :class:`EvolutionarySearch`).

    The start point ``initial_weights`` (default :func:`default_initial_weights`) is evaluated
    too (not counted in ``max_evals``) and returned when no candidate beats it.

    Args:
        model: The dense timm ViT (left unchanged).
        scores: Its importance scores.
        images: Fitness images ``[M, 3, S, S]``.
        max_evals: Candidate evaluations.
        popsize: xNES population (``None``: ``4 + floor(3 ln d)``).
        sigma: Initial xNES step size.
        ratio_pairs: Budgets of the fitness.
        pca_components: PCA components of the fitness.
        seed: xNES seed.
        autocast: ``True`` (bfloat16), a dtype, or ``False``/``None`` (model dtype).
        batch_size: Images per forward pass.
        initial_weights: Start mean ``[B + B*H]`` (clipped into ``[0, 2]``).
        initial_covariance: Initial covariance shape (identity by default), scaled by ``sigma**2``.
        on_eval: Called as ``on_eval(eval_idx, fitness, best_so_far)`` after each evaluation.
        balance: Balancing quantile(s) of the scores the weights apply to (``None``: the raw
            scores and the paper's start); see :class:`EvolutionarySearch`.
        correct: Weight correction inside the fitness (see :class:`Fitness`).
        damping: ``lstsq`` damping of that correction.
        damping_reference: ``"mean"`` or ``"max"``.
        space: Where the fitness takes the cosine, ``"raw"`` or ``"pca"`` (see :class:`Fitness`).
        guard: Penalty per unit of cosine a ratio pair loses against the start point (see
            :class:`Fitness` and :class:`EvolutionarySearch`; ``0``: the paper's plain mean;
            default :data:`DEFAULT_GUARD`).

    Returns:
        ``(best_w [B + B*H], covariance [d, d], history)`` where ``history`` holds the fitness of
        each candidate in evaluation order.

    Raises:
        ValueError: An argument out of range (see :class:`Fitness` and :class:`EvolutionarySearch`).
    """
    max_evals = _check_int("max_evals", max_evals, 1)
    sigma = _check_sigma(sigma)
    popsize = _check_popsize(popsize)
    scores, initial_weights = _balanced_start(scores, check_balance(balance), initial_weights)
    fitness = Fitness(
        model, scores, images, ratio_pairs, pca_components, batch_size, _resolve_autocast(autocast),
        correct=correct, damping=damping, damping_reference=damping_reference, space=space, guard=guard,
    )
    xnes, w0 = _make_xnes(
        scores.num_weights, scores.num_blocks, scores.num_heads, sigma, popsize, seed, initial_weights, initial_covariance
    )
    initial_fitness = fitness(w0)
    history: list[float] = []
    _search_loop(xnes, fitness, max_evals, history, on_eval)
    best_w, _ = _best(xnes, w0, initial_fitness)
    return best_w, xnes.covariance, history


# ----------------------------------------------------------------------------------------------
# The callback
# ----------------------------------------------------------------------------------------------


def _collect_images(source: Any) -> Tensor:
    if isinstance(source, Tensor):
        return source
    batches = []
    for batch in source:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, Tensor):
            raise ValueError(f"images: batches must be tensors or (images, ...) tuples, got {type(x).__name__}")
        batches.append(x.detach().cpu())
    if not batches:
        raise ValueError("images: the iterable yielded no batches")
    return torch.cat(batches)


def scored_model(pl_module: pl.LightningModule, caller: str) -> tuple[nn.Module, ImportanceScores]:
    """The ``(student, scores)`` of a scoring module (e.g. SnapViTModule) after its fit.

    Raises:
        RuntimeError: If ``pl_module`` has no ``student`` module or no ``ImportanceScores``.
    """
    scores = getattr(pl_module, "scores", None)
    student = getattr(pl_module, "student", None)
    if not isinstance(scores, ImportanceScores) or not isinstance(student, nn.Module):
        raise RuntimeError(
            f"{caller} needs `pl_module.student` (the timm model) and `pl_module.scores` "
            f"(ImportanceScores) at the end of training, got scores={type(scores).__name__}"
        )
    return student, scores


class EvolutionarySearch(Callback):
    """Search the block/head score weights with xNES after the scores are computed.

    Runs in ``on_train_end`` (the model is still on its device): reads the fitness images
    (``images`` if given, else ``trainer.datamodule.fitness_images()``), builds a
    :class:`Fitness` from ``pl_module.student`` and the scores (by default balanced per block,
    see ``balance``), evaluates the start point, then minimises the fitness with
    :class:`~snapvit_lightning.xnes.XNES` (bounds ``[0, 2]``, start mean ``initial_weights``,
    else ``w = 1`` on balanced scores or :func:`default_initial_weights` on raw ones, initial
    covariance ``sigma**2 * initial_covariance`` or ``sigma**2 * I``). Each evaluation is
    logged to every logger as ``search/fitness`` and ``search/best`` at ``step=eval_idx``.
    At the end ``pl_module.scores`` becomes ``scores.with_weights(best_weights,
    covariance=xnes.covariance)`` (``scores`` balanced, as searched); the start point is kept
    when no candidate beats it.
    Its ``build_info`` records the wall times ``scoring_s`` (``on_train_start`` to this hook:
    the calibration epoch and the scores), ``search_s`` (this hook), ``search_evaluations``
    (candidates of this run) and the ``machine``; a resumed run times only its own part.

    Step size: the default ``sigma=0.15`` perturbs weights that start at 1 (0.8-1.2 for the
    paper's start) by about 15 %. That is enough to move a meaningful number of units across
    the global pruning threshold between blocks (which is what changes the fitness), while
    keeping samples inside the ``[0, 2]`` box and near the start. The official code
    effectively used std 1, which clips many weights to 0 or 2 and behaves like random search;
    with about 50 evaluations xNES only makes a few updates, so a local trust region around a
    good start is what can pay off. ``sigma=0.08`` was measured too (held out, 5 runs) and was
    not more reliable. Use a larger ``sigma`` and more evaluations for a broader search.

    Data parallel (DDP): every process evaluates the same candidates (broadcast from rank 0)
    on its shard ``images[rank::world_size]``; the per-budget sums of cosines and counts are
    all-reduced (``trainer.strategy.reduce(..., reduce_op="sum")``), so every process sees the
    same fitness values and its xNES evolves identically. Every process computes the teacher
    embeddings of *all* images and fits the PCA on them (cheap: one dense forward), and the
    basis is broadcast from rank 0 so it is identical everywhere. The final weights and
    covariance are broadcast from rank 0 too.

    Args:
        max_evals: Candidate evaluations (``>= 1``), the start point not counted.
        popsize: xNES population size (``None``: ``4 + floor(3 ln d)``, 17 for ViT-S/B).
        sigma: Initial xNES step size (``> 0``).
        ratio_pairs: ``(mlp_ratio, head_ratio)`` budgets of the fitness, ratios in ``[0, 1)``
            (default :data:`DEFAULT_RATIO_PAIRS`; the paper's: :data:`PAPER_RATIO_PAIRS`).
        pca_components: PCA components of the fitness (``>= 1``; at most ``M - 1`` and ``D`` used).
        seed: xNES seed.
        autocast: bfloat16 autocast for the fitness forwards (``True``), a dtype, or ``False``.
        batch_size: Images per forward pass.
        images: Fitness images: a float tensor ``[M, 3, S, S]`` or an iterable (e.g. a
            DataLoader) of such batches or ``(images, ...)`` tuples. ``None``: the datamodule's.
        initial_weights: Start mean ``[B + B*H]``.
        initial_covariance: Initial covariance shape ``[d, d]`` (e.g. a previous run's).
        log_every_n_evals: Print progress every this many evaluations (``0``: never).
        balance: Which scores the weights rescale, hence where the search starts.
            ``(0.5, 0.65)`` (default, :data:`DEFAULT_BALANCE`): every block's MLP scores are
            divided by their median and its head scores by their 0.65-quantile
            (:meth:`ImportanceScores.balanced`; these are the scores the module ends with) and
            the search starts at ``w = 1``: about the same share of every block is pruned near
            those ratios, so no block is emptied at high sparsity (the raw DINO scores prune
            most of the first and last blocks), while the order inside each block stays the
            gradient's. One ratio ``q`` balances both at ``q``. ``None``: the paper's: the
            scores as given (raw, unless already balanced), start ``initial_weights`` or
            :func:`default_initial_weights`. ``"rank"``:
            every score becomes its rank inside its block (``w = 1`` is the uniform split at
            every ratio). Measured on the real DINOv2 ViT-S/14 (photos8, 112 px, 50
            evaluations; search on the 98 even-position photos, fidelity on the 98 odd ones at
            (0.35,0.2) (0.45,0.3) (0.55,0.4) (0.65,0.5), ``python -m
            snapvit_lightning.bench_balance --holdout``, with the fitness of the time: PCA cosine,
            paper's pairs, no guard): the default start searched .617 .366 .264
            .189 (seed 0), .585 .368 .257 .166 (seed 1), .584 .336 .224 .142 (seed 2), against
            raw gradient scores .557 .310 .143 .071 and random scores .293 .234 .181 .134 (the
            paper's start lost to random scores from (0.55,0.4) on). With the halves swapped one
            seed of three beats both everywhere and two fall below random scores at (0.65,0.5):
            50 evaluations on 98 photos can overfit them. See the README.
        correct: Weight correction inside the fitness: ``"none"`` (default, the paper),
            ``"bias"`` or ``"lstsq"`` (see :class:`Fitness`). Use the correction the elastic
            model will be sliced with, so the search optimises what the corrected subnets keep.
            About 1.4x the time per evaluation on ViT-S/14 (the per-layer solves). Measured
            with the fitness defaults of the time (``space="pca"``, :data:`PAPER_RATIO_PAIRS`,
            ``guard=0``; same protocol, seed 0, ``lstsq`` cross-fitted): the paper's start
            (``balance=None``) searched with an ``lstsq`` fitness keeps .921 .877 .848 .807
            after correction vs .925 .846 .801 .759 with the plain fitness; ``balance=0.5`` .925 .882 .855 .773 (uncorrected .528 .353
            .246 .160, above random at every budget; mean of seeds 0-2 .926 .891 .862 .815, the
            best configuration measured for corrected exports); ``balance="rank"`` .924 .833 .811
            .783 (it lost at (0.45,0.3), which no fitness pair covers). See the README.
        damping: ``lstsq`` damping of that correction (relative to the Gram diagonal).
        damping_reference: ``"mean"`` or ``"max"`` of the Gram diagonal.
        space: Where the fitness takes the cosine (see :class:`Fitness`): ``"raw"`` (default),
            the embeddings themselves, the fidelity the elastic model is judged by; ``"pca"``,
            the paper's PCA projections, centered on the dense mean. Uncorrected subnets from
            about (0.45, 0.3) on keep almost nothing of the centered features, so the PCA
            cosine is about 0 there for every ``w`` and the sparse budgets add only noise.
            Measured on the real DINOv2 ViT-S/14 (photos8, 112 px, balanced default, 50
            evaluations, fidelity at (0.35,0.2) (0.45,0.3) (0.55,0.4) (0.65,0.5)): searched
            and measured on the same 196 photos, seeds 0-2 kept .589 .330 .314 .212, .626 .381
            .300 .200 and .552 .373 .300 .200 with ``"raw"`` against .576 .285 .173 .141, .555
            .329 .230 .170 and .603 .335 .218 .157 with ``"pca"`` (gradient-only .556 .304 .135
            .064, random .297 .223 .218 .144, magnitude .304 .264 .226 .121); held out (search
            on one half, measured on the other, 6 runs) ``"raw"`` beat every reference at every
            budget in 5 of 6 runs, ``"pca"`` in 3 of 6. See the README.
        guard: Penalty per unit of cosine a fitness pair loses against the start point
            (:class:`Fitness`; default :data:`DEFAULT_GUARD` ``= 10``; ``0``: the paper's plain
            mean, which lets the search give up a little at one budget for more at others).
            Default together with :data:`DEFAULT_RATIO_PAIRS`, which adds (0.45, 0.3) to the
            paper's four pairs (:data:`PAPER_RATIO_PAIRS`) so no measured budget is left
            unprotected. Measured on the real DINOv2 ViT-S/14 (photos8, 112 px, 50 evaluations,
            seeds 0-2, fidelity at (0.35,0.2) (0.45,0.3) (0.55,0.4) (0.65,0.5), ``python -m
            snapvit_lightning.bench_balance``): held out (search on one half of the photos,
            measured on the other), mean over seeds .592 .401 .288 .163 (even -> odd) and .602
            .411 .256 .144 (odd -> even) against .570 .346 .294 .194 and .588 .354 .275 .175 with
            ``guard=0`` and the paper's pairs: more kept at the two lighter budgets, up to .03
            less at the sparsest. What made it the default: all 15 runs (seeds 0-4: 10 held
            out, 5 searched and measured on all 196 photos) kept more than gradient-only,
            random, uniform, magnitude and LAMP scores at every budget; ``guard=0`` with the paper's
            pairs did in 5 of 6 held-out runs and 3 of 5 in-sample ones, ``guard=10`` with the
            paper's pairs in 5 of 6 and 2 of 3 (the in-sample miss at (0.45,0.3), which no pair
            covered). The fifth pair made each evaluation 1.12x as long (main job, 3.73 s against 3.32 s on
            2 CPU cores). See the README.

    Attributes:
        best_weights: Best weights found (``None`` before the search).
        best_fitness: Their fitness.
        initial_fitness: Fitness of the start point.
        reference_cosines: Per ratio pair, the start point's cosines that ``guard`` protects.
        history: Fitness of each candidate in evaluation order.
        covariance: Final xNES covariance.
        fitness: The :class:`Fitness` of the last run (eval times in ``fitness.eval_times``).

    Raises:
        ValueError: ``max_evals < 1``, ``sigma <= 0``, bad ratio pairs, ``pca_components < 1``,
            ``popsize < 2``, ``batch_size < 1``, an image tensor that is not ``[M, 3, S, S]``,
            or initial weights / covariance of the wrong shape (at search time).
    """

    def __init__(
        self,
        max_evals: int = 50,
        popsize: int | None = None,
        sigma: float = DEFAULT_SIGMA,
        ratio_pairs: Sequence[tuple[float, float]] = DEFAULT_RATIO_PAIRS,
        pca_components: int = 64,
        seed: int = 0,
        autocast: bool = True,
        batch_size: int = 64,
        images: Tensor | Iterable[Any] | None = None,
        initial_weights: Tensor | None = None,
        initial_covariance: Tensor | None = None,
        log_every_n_evals: int = 10,
        balance: float | tuple[float, float] | str | None = DEFAULT_BALANCE,
        correct: str = "none",
        damping: float = 0.01,
        damping_reference: str = "mean",
        space: str = DEFAULT_SPACE,
        guard: float = DEFAULT_GUARD,
    ) -> None:
        super().__init__()
        self.balance = check_balance(balance)
        self.space = check_space(space)
        self.guard = check_guard(guard)
        self.correct, self.damping, self.damping_reference = check_correction(correct, damping, damping_reference)
        self.max_evals = _check_int("max_evals", max_evals, 1)
        self.popsize = _check_popsize(popsize)
        self.sigma = _check_sigma(sigma)
        self.ratio_pairs = _check_ratio_pairs(ratio_pairs)
        self.pca_components = _check_int("pca_components", pca_components, 1)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.autocast_dtype = _resolve_autocast(autocast)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        if isinstance(images, Tensor):
            _check_images(images)
        elif images is not None and not isinstance(images, Iterable):
            raise ValueError(f"images must be a tensor [M, 3, S, S], an iterable of batches or None, got {type(images).__name__}")
        self.images = images
        self.initial_weights = None if initial_weights is None else torch.as_tensor(initial_weights, dtype=torch.float64)
        if self.initial_weights is not None and self.initial_weights.dim() != 1:
            raise ValueError(f"initial_weights must be a 1-D tensor [B + B*H], got shape {list(self.initial_weights.shape)}")
        self.initial_covariance = (
            None if initial_covariance is None else torch.as_tensor(initial_covariance, dtype=torch.float64)
        )
        self.log_every_n_evals = _check_int("log_every_n_evals", log_every_n_evals, 0)

        self.best_weights: Tensor | None = None
        self.best_fitness: float | None = None
        self.initial_fitness: float | None = None
        self.reference_cosines: list[float] | None = None
        self.history: list[float] = []
        self.covariance: Tensor | None = None
        self.fitness: Fitness | None = None
        self._xnes_state: dict[str, Any] | None = None
        self._final_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------

    def _fitness_images(self, trainer: pl.Trainer) -> Tensor:
        if self.images is not None:
            return _check_images(_collect_images(self.images))
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "fitness_images"):
            raise RuntimeError(
                "EvolutionarySearch needs fitness images: pass `images=` or use a datamodule with "
                "`fitness_images()` (e.g. CalibrationDataModule)"
            )
        return _check_images(dm.fitness_images())

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Note when the scoring epoch starts (the scoring time is recorded with the scores)."""
        self._train_start = time.perf_counter()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        search_start = time.perf_counter()
        evals_before = len(self.history)
        student, scores = scored_model(pl_module, "EvolutionarySearch")
        scores, initial_weights = _balanced_start(scores, self.balance, self.initial_weights)
        strategy = trainer.strategy
        world = int(trainer.world_size)
        device = next(student.parameters()).device

        def reduce(t: Tensor) -> Tensor:
            return strategy.reduce(t.to(device), reduce_op="sum")

        def broadcast(t: Tensor) -> Tensor:
            return strategy.broadcast(t, src=0) if world > 1 else t

        images = self._fitness_images(trainer)
        self.fitness = fitness = Fitness(
            student,
            scores,
            images,
            self.ratio_pairs,
            self.pca_components,
            self.batch_size,
            self.autocast_dtype,
            rank=int(trainer.global_rank) if world > 1 else 0,
            world_size=world,
            reduce_fn=reduce if world > 1 else None,
            broadcast_fn=broadcast if world > 1 else None,
            correct=self.correct,
            damping=self.damping,
            damping_reference=self.damping_reference,
            space=self.space,
            guard=self.guard,
            reference_cosines=self.reference_cosines,  # restored with the start's fitness, else set by its call
        )
        xnes, w0 = _make_xnes(
            scores.num_weights,
            scores.num_blocks,
            scores.num_heads,
            self.sigma,
            self.popsize,
            self.seed,
            initial_weights,
            self.initial_covariance,
        )
        if self._xnes_state is not None:
            xnes.load_state_dict(self._xnes_state)
            self._xnes_state = None
        if self.initial_fitness is None:
            self.initial_fitness = fitness(broadcast(w0))
        elif self.guard > 0 and fitness.reference_cosines is None:  # resumed from a state saved without them
            start_cosines = fitness.pair_cosines(broadcast(w0), pca=self.space == "pca")
            fitness.reference_cosines = torch.tensor(start_cosines, dtype=torch.float64)
        if fitness.reference_cosines is not None:
            self.reference_cosines = fitness.reference_cosines.tolist()
        rank_zero_info(
            f"EvolutionarySearch: {scores.num_weights} weights, popsize {xnes.popsize}, sigma {self.sigma}, "
            f"{fitness.images.shape[0]} images/rank, {fitness.num_components} PCA components; "
            f"start fitness {self.initial_fitness:.6f}"
        )
        start = time.perf_counter()

        def on_eval(idx: int, f: float, best: float) -> None:
            for logger in trainer.loggers:
                logger.log_metrics({"search/fitness": f, "search/best": best}, step=idx)
            n = self.log_every_n_evals
            if n and ((idx + 1) % n == 0 or idx + 1 == self.max_evals):
                rank_zero_info(
                    f"EvolutionarySearch: eval {idx + 1}/{self.max_evals} fitness {f:.6f} best {best:.6f} "
                    f"({time.perf_counter() - start:.1f} s)"
                )

        _search_loop(xnes, fitness, self.max_evals, self.history, on_eval, broadcast, self.initial_fitness)
        best_w, best_f = _best(xnes, w0, self.initial_fitness)
        covariance = xnes.covariance
        if world > 1:
            best_w = broadcast(best_w).double().cpu()
            covariance = broadcast(covariance).double().cpu()
        self.best_weights, self.best_fitness, self.covariance = best_w, float(best_f), covariance
        self._final_state = xnes.state_dict()
        from .bench import build_machine

        start_at = getattr(self, "_train_start", None)
        pl_module.scores = replace(scores.with_weights(best_w, covariance=covariance), build_info={
            **(scores.build_info or {}),
            "scoring_s": None if start_at is None else search_start - start_at,  # train start -> here
            "search_s": time.perf_counter() - search_start,  # this hook: fitness set-up, start point, xNES
            "search_evaluations": len(self.history) - evals_before,  # candidates, start point not counted
            "machine": {**build_machine(device), "world_size": world},
        })
        for logger in trainer.loggers:
            logger.save()
        rank_zero_info(
            f"EvolutionarySearch: best fitness {self.best_fitness:.6f} (start {self.initial_fitness:.6f}) "
            f"after {len(self.history)} evaluations, {fitness.mean_eval_time:.2f} s/eval"
        )

    # ------------------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        """xNES state, history and results (tensors and plain values, ``weights_only``-loadable)."""
        xnes = self._final_state if self._final_state is not None else self._xnes_state
        return {
            "xnes": None if xnes is None else dict(xnes),
            "history": list(self.history),
            "initial_fitness": self.initial_fitness,
            "reference_cosines": None if self.reference_cosines is None else list(self.reference_cosines),
            "fitness_settings": self._fitness_settings(),
            "best_fitness": self.best_fitness,
            "best_weights": None if self.best_weights is None else self.best_weights.clone(),
            "covariance": None if self.covariance is None else self.covariance.clone(),
        }

    def _fitness_settings(self) -> dict[str, Any]:
        """What defines the fitness values of a state: a resumed search must use the same."""
        balance = self.balance if self.balance is None or isinstance(self.balance, str) else list(self.balance)
        return {
            "ratio_pairs": [list(p) for p in self.ratio_pairs],
            "guard": self.guard,
            "space": self.space,
            "correct": self.correct,
            "pca_components": self.pca_components,
            "balance": balance,
        }

    def _check_saved_settings(self, saved: dict[str, Any] | None) -> None:
        ours = self._fitness_settings()
        if saved is None:
            rank_zero_warn(
                "EvolutionarySearch.load_state_dict: the state does not record its fitness settings "
                f"(saved by an older version); resuming assumes they equal this callback's {ours}"
            )
            return
        differ = [f"{k}: saved {saved.get(k)!r}, here {v!r}" for k, v in ours.items() if saved.get(k) != v]
        if differ:
            raise ValueError(
                f"state_dict was saved by a search with other fitness settings ({', '.join(differ)}); "
                "resume with the same settings, or start a new search"
            )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next search continues up to ``max_evals`` in total.

        Raises:
            ValueError: If the state was saved with other fitness settings (``ratio_pairs``,
                ``guard``, ``space``, ``correct``, ``pca_components``, ``balance``) than this
                callback's: its fitness values would not be comparable. A state saved before
                these settings were recorded (no ``fitness_settings``) is restored as it is, with
                a warning.
        """
        if state_dict.get("history"):  # an empty search has no fitness values to compare
            self._check_saved_settings(state_dict.get("fitness_settings"))
        self._xnes_state = None if state_dict.get("xnes") is None else dict(state_dict["xnes"])
        self._final_state = None
        self.history = [float(f) for f in state_dict.get("history", [])]
        self.initial_fitness = state_dict.get("initial_fitness")
        ref = state_dict.get("reference_cosines")
        self.reference_cosines = None if ref is None else [float(c) for c in ref]
        self.best_fitness = state_dict.get("best_fitness")
        bw, cov = state_dict.get("best_weights"), state_dict.get("covariance")
        self.best_weights = None if bw is None else torch.as_tensor(bw, dtype=torch.float64)
        self.covariance = None if cov is None else torch.as_tensor(cov, dtype=torch.float64)
