"""The search's fitness: what a weight vector ``w`` is worth, and the search defaults.

A weight vector ``w`` of ``B + B*H`` entries (``B`` block weights, then ``B*H`` head weights
row-major, the layout of :meth:`ImportanceScores.with_weights`) rescales each block's MLP
scores and each head's score. Its :class:`Fitness` is the mean, over several
``(mlp_ratio, head_ratio)`` budgets, of ``1 - mean cosine similarity`` between the pruned
model's embeddings and the dense model's: the embeddings themselves (``space="raw"``, the
default: what fidelity measures) or, as in the paper, both projected on a PCA basis fitted
once on the dense embeddings of the fitness images (``space="pca"``).

Speed: :class:`Fitness` never copies the model per evaluation; it slices stored *master*
weights (see :mod:`.views`). The dense (teacher) embeddings are computed through the same path
with every unit kept, so the unpruned model has fitness exactly 0.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from ..correction import augmented_weight, check_correction, check_one_shot, collect_stats, solve_layer, stats_damping
from ..forward import embed
from ..scores import ImportanceScores
from ..structure import check_model_images, get_blocks, head_channels, inspect_vit
from ..values import real_number
from .pairs import _check_ratio_pairs, _reachable_pairs, check_pairs_apart  # noqa: F401 (re-exported)
from .partial import PartialFitness, _check_stop_above
from .views import _build_master, _descending, _frozen, _set_block_view

__all__ = [
    "DEFAULT_BALANCE",
    "DEFAULT_RATIO_PAIRS",
    "PAPER_RATIO_PAIRS",
    "DEFAULT_SIGMA",
    "DEFAULT_GUARD",
    "DEFAULT_SPACE",
    "CPU_WIDTH_MULTIPLE",
    "FITNESS_SPACES",
    "check_pairs_apart",
    "default_initial_weights",
    "Fitness",
    "PartialFitness",
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


#: The fitness's MLP width multiple on a CPU (see :class:`Fitness`; measured in docs/benchmarks.md).
CPU_WIDTH_MULTIPLE = 32


#: How many of the fitness images the search embeds per evaluation (a fixed, seeded subset; see
#: :func:`fitness_subset` and :class:`EvolutionarySearch`). ``None`` is the paper's: all of them.
DEFAULT_FITNESS_SAMPLES: int | None = 64


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


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if allow_none else ''}, got {value!r}")
    return value


def _check_images(images: Any) -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        shape = f"{list(images.shape)} {images.dtype}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [M, 3, S, S], got {shape}")
    if images.shape[0] < 2:
        raise ValueError(f"images must hold at least 2 images (the PCA needs M >= 2), got {images.shape[0]}")
    return images


def fitness_subset(images: Tensor, samples: int | None, seed: int) -> Tensor:
    """``samples`` of the fitness ``images`` drawn without replacement, in their order (seeded).

    The search's ``fitness_samples``: its fitness then embeds only these, ``samples / M`` of
    the work per evaluation. Every process of a data-parallel run draws the same subset.

    Args:
        images: ``[M, 3, S, S]`` fitness images.
        samples: How many to keep (``>= 2``); ``None`` or ``>= M``: all of them, unchanged.
        seed: Seeds the draw.

    Raises:
        ValueError: If ``samples`` is not ``None`` nor an int ``>= 2``.
    """
    samples = _check_int("fitness_samples", samples, 2, allow_none=True)
    if samples is None or samples >= images.shape[0]:
        return images
    keep = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:samples].sort().values
    return images[keep.to(images.device)]


def _described(value: Any) -> str:
    """A value in a message: short ones as they are, else their type (and length)."""
    text = repr(value)
    return text if len(text) <= 60 and "\n" not in text else f"a {type(value).__name__}" + (
        f" of {len(value)} items" if hasattr(value, "__len__") else "")


def _check_weights(value: Any, dim: int, name: str) -> Tensor:
    try:
        t = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be a finite tensor of shape [{dim}] (B + B*H), got {_described(value)}") from err
    if tuple(t.shape) != (dim,) or not torch.isfinite(t).all():
        got = f"shape {list(t.shape)}" if tuple(t.shape) != (dim,) else "non-finite values"
        raise ValueError(f"{name} must be a finite tensor of shape [{dim}] (B + B*H), got {got}")
    return t


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
        ratio_pairs: ``(mlp_ratio, head_ratio)`` budgets, each ratio in ``[0, 1)``. A ratio beyond
            every block's minimum keep cuts as :attr:`ImportanceScores.max_ratios` and is searched
            (and logged) as that reachable ratio, with a warning.
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
        damping: Ridge damping of ``lstsq`` relative to the Gram diagonal (``None``: automatic).
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
        explicit_attention: Attention kernel of the forwards: ``True`` explicit matmuls,
            ``False`` the model's fused setting, ``None`` (default) as
            :func:`~snapvit_lightning.forward.embed` prefers (explicit under bf16 on CPU).
        width_multiple: The evaluation runs each MLP cut to ``k`` neurons on the next multiple
            of this many (at most all of them), the extra neurons silenced by zero ``fc2``
            columns: the same subnet up to the summation order of its matmuls, with far fewer
            distinct matrix shapes. ``None`` (default): :data:`CPU_WIDTH_MULTIPLE` on a CPU, where
            oneDNN builds and caches a kernel for every new shape (measured: faster evaluations and
            a fraction of the memory; docs/benchmarks.md), ``1`` (exact widths) elsewhere. Blocks
            with a norm over the MLP neurons always run exact widths. :meth:`apply` always
            slices exact widths.

    Early stop: every term of the fitness is ``>= 0`` (up to rounding, ``cos <= 1``), so after
    some ratio pairs the partial sum is a lower bound of the value. The pairs are evaluated
    sparsest first (``mlp_ratio + head_ratio`` descending, ties in the given order: the largest
    terms first). A call given ``stop_above`` stops as soon as that bound exceeds it by more
    than a rounding margin (``1e-6``) and returns ``math.inf``: the value is then certainly
    greater than ``stop_above``; a call that does not stop returns exactly what it would
    without it. The staged evaluation :meth:`start` (the sparsest pair), :meth:`advance` (the
    next pair) and :meth:`finish` (the value, ``math.inf`` if incomplete; counted as one call)
    lets :meth:`~snapvit_lightning.xnes.XNES.optimize` with ``early_stop=True`` evaluate a whole
    generation best first: every candidate on the sparsest pair, then always the candidate of
    the lowest bound (:attr:`PartialFitness.lower_bound`), so the generation's cutoff is tight
    early and a candidate is stopped as soon as its bound exceeds it. A complete staged
    evaluation has exactly the value of a call. Under data parallel every pair is all-reduced
    for the bound (every process takes the same decisions).

    Attributes:
        num_evals: Calls (and finished staged evaluations) so far, stopped ones included.
        num_stopped: Of those, the ones stopped early (``inf``).
        num_skipped_pairs: Ratio pairs those did not evaluate.
        eval_times: Wall time of each (its stages summed), in seconds, stopped ones included.
        last_cosines: The last call's mean cosine per ratio pair, in the fitness's ``space``,
            in ``ratio_pairs`` order; ``nan`` for the pairs a stopped call did not evaluate
            (``None`` before the first call).
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
        damping: float | None = None,
        damping_reference: str = "mean",
        space: str = DEFAULT_SPACE,
        guard: float = 0.0,
        reference_cosines: Sequence[float] | Tensor | None = None,
        explicit_attention: bool | None = None,
        width_multiple: int | None = None,
    ) -> None:
        if explicit_attention is not None and not isinstance(explicit_attention, bool):
            raise ValueError(f"explicit_attention must be None, True or False, got {explicit_attention!r}")
        self.explicit_attention = explicit_attention
        self.ratio_pairs = _check_ratio_pairs(ratio_pairs)
        self.space = check_space(space)
        self.guard = check_guard(guard)
        self.reference_cosines = (
            None if reference_cosines is None else _check_reference(reference_cosines, len(self.ratio_pairs))
        )
        self.correct, self.damping, self.damping_reference = check_correction(correct, damping, damping_reference)
        self.pca_components = _check_int("pca_components", pca_components, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        images = check_model_images(model, _check_images(images), "images")  # the size and finite values the model takes
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

        self.ratio_pairs = _reachable_pairs(scores, self.ratio_pairs)
        self.scores = scores
        self.rank, self.world_size = rank, world_size
        width_multiple = _check_int("width_multiple", width_multiple, 1, allow_none=True)
        self._reduce_fn, self._broadcast_fn = reduce_fn, broadcast_fn
        self.autocast_dtype = autocast_dtype
        param = next(model.parameters())
        self.device = param.device
        if width_multiple is None:
            width_multiple = CPU_WIDTH_MULTIPLE if self.device.type == "cpu" else 1
        self.width_multiple = width_multiple
        self.num_evals = 0
        self.num_stopped = 0
        self.num_skipped_pairs = 0
        self.eval_times: list[float] = []
        #: Called after each ratio pair is evaluated (a staged generation reports its candidates only when it
        #: ends: the search's SIGTERM check, which every process reaches at the same pair under data parallel).
        self.step_hook: Callable[[], None] | None = None
        # Sparsest pair first (the largest expected loss): an early stop comes as soon as it can.
        self._pair_order = sorted(range(len(self.ratio_pairs)), key=lambda i: -sum(self.ratio_pairs[i]))
        self.last_cosines: list[float] | None = None

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
                outs.append(embed(self.model, x, self.explicit_attention).float())
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
        check_one_shot(model, f"correct={self.correct!r}", "the fitness corrects from statistics: use correct='none'")
        stats = collect_stats(model, images, batch_size=self.batch_size)
        self.damping, terms = stats_damping(self.damping, stats), []
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
        if new_w is not None:  # a widened view's extra columns stay zero
            new_w = torch.nn.functional.pad(new_w, (0, layer.weight.shape[1] - new_w.shape[1]))
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

    def _apply_counts(
        self, mlp_pos: Tensor, head_order: Tensor, neurons: Tensor, heads: Tensor, multiple: int = 1
    ) -> None:
        for b, (block, master) in enumerate(zip(self.blocks, self.masters)):
            k, h = int(neurons[b]), int(heads[b])
            if self._corrections is not None:  # a layer left uncut must not keep an earlier budget's bias
                block.attn.proj.bias, block.mlp.fc2.bias = self._dense_bias[b]
            pos = mlp_pos[b, :k]
            if k == 0 or int(pos.max()) == k - 1:
                mlp_sel: int | Tensor = k  # the kept set is the master's prefix
            else:  # rescaling tied/reordered scores: gather the kept set (ascending positions)
                mlp_sel = pos.sort().values.to(self.device)
            head_sel = None if h == master.num_heads else head_order[b, :h].sort().values.to(self.device)
            _set_block_view(block, master, mlp_sel, head_sel, multiple)
            if self._corrections is None:
                continue
            if k < master.hidden:
                order = self._mlp_order_device[b]
                self._correct(b, "mlp", block.mlp.fc2, order[:k] if isinstance(mlp_sel, int) else order[mlp_sel])
            if head_sel is not None:
                self._correct(b, "attn", block.attn.proj, head_channels(head_sel, master.head_dim))

    def _pair_loss(self, i: int, cos: float) -> float:
        """Pair ``i``'s term of the fitness (``>= 0`` up to rounding)."""
        loss = (1.0 - cos) / len(self.ratio_pairs)
        if self.guard > 0 and self.reference_cosines is not None:
            loss += self.guard * max(0.0, float(self.reference_cosines[i]) - cos)
        return loss

    def _reduce(self, t: Tensor) -> Tensor:
        return self._reduce_fn(t.to(self.device)).double().cpu() if self.world_size > 1 else t

    def _new_state(self, w: Tensor, project: bool, tracked: bool) -> PartialFitness:
        nan = torch.full((len(self.ratio_pairs), 2), math.nan, dtype=torch.float64)
        return PartialFitness(w, project, tracked, nan, nan.clone())

    def _step(self, state: PartialFitness, mlp_pos: Tensor, head_order: Tensor) -> None:
        """Evaluate ``state``'s next ratio pair (sparsest first; ``_selections(state.w)`` given); the caller restores."""
        i = self._pair_order[state.pairs_done]
        counts = self.scores.keep_counts(*self.ratio_pairs[i], weights=state.w)
        self._apply_counts(mlp_pos, head_order, *counts, multiple=self.width_multiple)
        emb = self._embed(self.images).double().cpu()
        target = self.teacher_projected if state.project else self.teacher
        if state.project:
            emb = self._project(emb)
        cos = (emb * target).sum(1) / (emb.norm(dim=1) * target.norm(dim=1)).clamp_min(1e-12)
        state.local[i, 0], state.local[i, 1] = cos.sum(), cos.numel()
        state.pairs_done += 1
        if state.tracked:  # data parallel: this pair's sums over all processes, for the bound
            state.reduced[i] = self._reduce(state.local[i])
            state.partial += self._pair_loss(i, float(state.reduced[i, 0] / state.reduced[i, 1].clamp_min(1)))
        if state.complete:  # all pairs reduced at once, as an untracked evaluation
            state.reduced = self._reduce(state.local)

    def _run(self, state: PartialFitness, pairs: int) -> None:
        """Evaluate up to ``pairs`` more ratio pairs of ``state``; its value once complete."""
        if state.complete:
            return
        start = time.perf_counter()
        selections = self._selections(state.w)
        try:
            for _ in range(min(pairs, len(self.ratio_pairs) - state.pairs_done)):
                self._step(state, *selections)
                if self.step_hook is not None:
                    self.step_hook()
        finally:
            self._restore()  # dense between stages
        if state.complete:
            cos = state.reduced[:, 0] / state.reduced[:, 1].clamp_min(1)
            loss = float((1.0 - cos).mean())
            if self.guard > 0:
                if self.reference_cosines is None:
                    self.reference_cosines = cos.clone()  # the first evaluation is the start point
                loss += self.guard * float((self.reference_cosines - cos).clamp_min(0).sum())
            state.value = loss
        state.seconds += time.perf_counter() - start

    def pair_cosines(self, w: Tensor, pca: bool = True) -> list[float]:
        """Mean cosine similarity to the dense embeddings per ratio pair (not counted as a call).

        Args:
            w: ``[B + B*H]`` weights.
            pca: Compare PCA projections (what the fitness compares when ``space="pca"``) or the
                raw embeddings (``space="raw"``).
        """
        state = self._new_state(_check_weights(w, self.num_weights, "w"), pca, tracked=False)
        selections = self._selections(state.w)
        try:
            while not state.complete:
                self._step(state, *selections)
        finally:
            self._restore()
        return (state.reduced[:, 0] / state.reduced[:, 1].clamp_min(1)).tolist()

    def start(self, w: Tensor) -> PartialFitness:
        """Begin a staged evaluation of ``w``: its sparsest ratio pair (see the class docstring).

        With ``guard > 0`` and no ``reference_cosines`` yet, every pair is evaluated (the
        evaluation is complete and its cosines become the reference).

        Raises:
            ValueError: If ``w`` does not have shape ``[B + B*H]`` or is not finite.
        """
        state = self._new_state(_check_weights(w, self.num_weights, "w").clone(), self.space == "pca", tracked=True)
        needs_all = self.guard > 0 and self.reference_cosines is None
        self._run(state, len(self.ratio_pairs) if needs_all else 1)
        return state

    def advance(self, state: PartialFitness) -> PartialFitness:
        """Evaluate the next ratio pair of a staged evaluation (nothing if it is complete)."""
        self._run(state, 1)
        return state

    def finish(self, state: PartialFitness) -> float:
        """End a staged evaluation: counted as one call; its fitness, ``math.inf`` if incomplete (stopped).

        Raises:
            ValueError: If ``state`` was finished already.
        """
        if state.finished:
            raise ValueError("this evaluation was finished already")
        state.finished = True
        self.last_cosines = (state.reduced[:, 0] / state.reduced[:, 1].clamp_min(1)).tolist()
        if not state.complete:
            self.num_stopped += 1
            self.num_skipped_pairs += len(self.ratio_pairs) - state.pairs_done
        self.eval_times.append(state.seconds)
        self.num_evals += 1
        return math.inf if state.value is None else state.value

    def __call__(self, w: Tensor, stop_above: float | None = None) -> float:
        """The fitness of ``w`` (lower is better; 0 for the dense model).

        With ``guard > 0`` and no ``reference_cosines`` yet, this call's cosines become them (and
        it never stops early).

        Args:
            w: ``[B + B*H]`` weights.
            stop_above: Stop as soon as the fitness is certainly greater than this and return
                ``math.inf`` (see the class docstring); ``None`` or ``math.inf``: never stop. A
                call that does not stop returns the exact value.

        Returns:
            The fitness, or ``math.inf`` for a stopped call.

        Raises:
            ValueError: If ``w`` does not have shape ``[B + B*H]`` or is not finite, or
                ``stop_above`` is neither ``None`` nor a number (``nan`` is not allowed).
        """
        w = _check_weights(w, self.num_weights, "w")
        stop_above = _check_stop_above(stop_above)
        if stop_above == math.inf or (self.guard > 0 and self.reference_cosines is None):
            stop_above = None  # never stops (no per-pair reduce); the start point's cosines are needed in full
        state = self._new_state(w, self.space == "pca", tracked=stop_above is not None)
        self._run(state, len(self.ratio_pairs) if stop_above is None else 1)
        while not state.complete and not state.lower_bound > stop_above:
            self._run(state, 1)
        return self.finish(state)


def check_guard(guard: Any) -> float:
    """Validate a fitness guard (a finite float ``>= 0``)."""
    number = real_number(guard)
    if number is None or not math.isfinite(number) or number < 0:
        raise ValueError(f"guard must be a finite number >= 0, got {guard!r}")
    return number


def _check_reference(reference: Sequence[float] | Tensor, num_pairs: int) -> Tensor:
    ref = torch.as_tensor(reference, dtype=torch.float64).flatten()
    if ref.numel() != num_pairs or not bool(torch.isfinite(ref).all()) or bool((ref.abs() > 1).any()):
        raise ValueError(f"reference_cosines must be {num_pairs} cosines in [-1, 1] (one per ratio pair), got {reference!r}")
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
    if autocast in (torch.bfloat16, torch.float16, torch.float32):
        return autocast
    raise ValueError(f"autocast must be a bool, None or one of torch.bfloat16, torch.float16, torch.float32, got {autocast!r}")
