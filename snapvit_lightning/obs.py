"""Correction-aware unit scores: an OBS (optimal brain surgeon) greedy removal order per block.

For a cut layer ``y = W x + b`` (``mlp.fc2`` over neurons, ``attn.proj`` over heads) and the
second moments ``G = E[x̃ x̃ᵀ]`` of its augmented input (:class:`~snapvit_lightning.correction.CorrectionStats`),
removing a set ``S`` of inputs and refitting the rest by least squares (what ``correct="lstsq"``
does) costs ``E‖Δy‖² = tr(W_S [(G⁻¹)_SS]⁻¹ W_Sᵀ)``; with the damping ``λ`` added to ``G``'s
diagonal this is the output error plus ``λ‖W' - W‖²``, the objective of the damped correction.
Removing one unit (neuron, or head: its ``head_dim`` columns) at a time, always the cheapest, and updating ``W`` and ``G⁻¹`` after each
removal (ZipLM, Kurtic et al. 2023) gives a nested order; the cost of each step is the error it
adds to the corrected layer's output. A unit's score is the largest step cost up to its removal
(ties lifted by the least float64 step, so scores increase strictly along a block's order): the
global ranking of these scores keeps, at every budget, the units whose removal would cost the most
in corrected output error, and every budget stays a prefix of each block's order.

Costs are in the units of the block's residual branch output (after LayerScale, when the block
has one). ``scale`` divides each block's costs (e.g. by the energy of the residual stream there).

:func:`corrected_ranking` is the ranking the corrected path uses (docs/correction.md, "The
corrected path's own ranking"): the OBS costs of each block divided by :func:`stream_energy`, the
mean squared norm of the residual stream at that block's output, so an error is weighed against
the signal it is added to. :func:`with_ranking` stores it in the correction statistics.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .correction import (
    CorrectionStats, _batches, _check_batch_size, _check_images, _model_device_dtype, augmented_weight,
    full_fp32_matmuls, stats_damping,
)
from .scores import ImportanceScores
from .structure import get_blocks, inspect_vit
from .values import integer, real_number

__all__ = ["RANKING_CRITERION", "corrected_ranking", "greedy_removal", "obs_scores", "stream_energy", "with_ranking"]

#: The criterion name of :func:`corrected_ranking`'s scores.
RANKING_CRITERION = "obs-stream"


@full_fp32_matmuls()  # float32 updates at full precision even where a run enabled TF32
def greedy_removal(
    weight: Tensor, gram: Tensor, group: int = 1, damping: float = 0.01, chunk: int = 1,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """The OBS greedy removal order of a layer's input groups and the cost of each step.

    Args:
        weight: ``[out, n + 1]`` augmented weight ``[W | b]`` (the bias column is never removed).
        gram: ``[n + 1, n + 1]`` augmented input second moments.
        group: Inputs per unit (``1`` for neurons, ``head_dim`` for heads); ``n % group == 0``.
        damping: Ridge damping of the inputs relative to the mean of the Gram diagonal.
        chunk: Units removed per update (``1``: the exact greedy). A chunk is the ``chunk``
            cheapest units, removed together (one joint update, ``chunk`` times fewer steps); each
            unit's cost is then its own cost at the start of its chunk.
        dtype: What the updates compute in: ``torch.float64`` (exact to rounding) or
            ``torch.float32`` (about 2/3 of the time for 1536 neurons; what :func:`obs_scores`
            uses, measured to keep the same held-out fidelity, docs/defaults.md).

    Returns:
        ``(order [n // group], costs [n // group])``: units in removal order and the output
        error each removal adds (float64, ``>= 0``; with ``chunk=1`` they sum to the refit error
        of every removed prefix).

    Raises:
        ValueError: Shapes that do not fit, ``n`` not a multiple of ``group``, a ``group`` or ``chunk``
            that is not an int >= 1, a ``damping`` that is not a finite number >= 0, or another ``dtype``.
    """
    for name, value in (("group", group), ("chunk", chunk)):  # chunk=0 looped forever, group=0 divided by zero
        if (integer(value) or 0) < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    group, chunk = integer(group), integer(chunk)
    number = real_number(damping)
    if number is None or not 0 <= number < math.inf:  # torch's Cholesky error named no cause
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    damping = number
    n = gram.shape[0] - 1
    if weight.shape[1] != n + 1 or gram.shape != (n + 1, n + 1) or n % group:
        raise ValueError(f"weight {tuple(weight.shape)} / gram {tuple(gram.shape)} do not fit groups of {group}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    w = weight.to(dtype, copy=True)
    g = gram.to(dtype, copy=True)
    diag = torch.diagonal(g)[:n]
    diag += damping * float(diag.mean())
    hinv0 = torch.cholesky_inverse(torch.linalg.cholesky(g))
    # H⁻¹ is updated lazily: a removal of Q subtracts (H⁻¹)_Q:ᵀ [(H⁻¹)_QQ]⁻¹ (H⁻¹)_Q:, kept as its two
    # factors (`picks` by step rows, `solved_t` by step columns). Each step reads them once for the rows
    # of H⁻¹ it needs instead of writing the whole H⁻¹ (2 cores: 1.2x faster for 3072 neurons, about as fast
    # for 1536 but steadier when other work shares the memory bandwidth); the diagonal blocks the costs
    # need are updated as they go. w, hinv0 and the factors hold the inputs of the units
    # in `unit_of` (`group` each), then the bias; removed units are zeroed, and dropped once they are a
    # quarter of them.
    units = n // group
    unit_of = torch.arange(units, device=g.device)  # unit of each unit slot in w / hinv0
    alive = torch.ones(units, dtype=torch.bool, device=g.device)
    offsets = torch.arange(group, device=g.device)
    picks, solved_t = hinv0.new_empty(n, n + 1), hinv0.new_empty(n + 1, n)  # step rows; step columns (row gathers)
    filled = 0
    blocks = torch.diagonal(hinv0[:n, :n].reshape(units, group, units, group), dim1=0, dim2=2).permute(2, 0, 1).clone()
    eye = torch.eye(group, dtype=blocks.dtype, device=g.device)
    order: list[int] = []
    costs: list[float] = []
    while len(order) < units:
        m = unit_of.numel()
        if group == 1:
            cost = w[:, :m].square().sum(0) / blocks[:, 0, 0]
        else:
            ws = w[:, : m * group].reshape(-1, m, group).permute(1, 0, 2)  # [m, out, group]
            safe = torch.where(alive[:, None, None], blocks, eye)
            cost = (ws @ torch.linalg.inv(safe) * ws).sum((1, 2))
        cost = cost.masked_fill(~alive, torch.inf)
        step = torch.argsort(cost, stable=True)[: min(chunk, units - len(order))]
        q = (step[:, None] * group + offsets).flatten()
        picked = torch.addmm(hinv0[q], solved_t[q, :filled], picks[:filled], alpha=-1.0)  # (H⁻¹)_Q: as it is now
        rows = torch.linalg.solve(picked[:, q], picked)  # [(H⁻¹)_QQ]⁻¹ (H⁻¹)_Q:
        w.addmm_(w[:, q], rows, alpha=-1.0)
        picks[filled: filled + len(q)], solved_t[:, filled: filled + len(q)] = picked, rows.T
        filled += len(q)
        width = m * group
        blocks -= torch.einsum("kmi,kmj->mij", picked[:, :width].reshape(-1, m, group), rows[:, :width].reshape(-1, m, group))
        w[:, q] = 0.0
        alive[step] = False
        order += unit_of[step].tolist()
        costs += cost[step].clamp_min(0.0).tolist()
        if 4 * int(alive.sum()) <= 3 * m:
            bias = torch.ones(1, dtype=torch.bool, device=g.device)
            keep = torch.cat([alive.repeat_interleave(group), bias]).nonzero().flatten()
            w, hinv0, blocks = w[:, keep], hinv0[keep[:, None], keep], blocks[alive]
            picks = torch.cat([picks[:filled, keep], picks.new_empty(n - filled, keep.numel())])
            solved_t = solved_t[keep]
            unit_of, alive = unit_of[alive], alive[alive]
    return torch.tensor(order), torch.tensor(costs, dtype=torch.float64)  # on the CPU


def _branch_scale(block: nn.Module, name: str) -> Tensor | None:
    ls = getattr(block, "ls1" if name == "attn" else "ls2", None)
    gamma = getattr(ls, "gamma", None)
    return None if gamma is None else gamma.detach().double()


def _unit_scores(order: Tensor, costs: Tensor, divisor: float = 1.0) -> Tensor:
    """Scores in unit order: the running maximum of the step costs over ``divisor``, strictly increasing along the order.

    A step cheaper than an earlier one would tie with it under the running maximum, and the ranking's
    stable sort would then keep the unit of lower index, not the one removed later: each tie is
    lifted by the least float64 step, so every budget keeps exactly the last units the greedy removed.
    """
    values = (torch.cummax(costs.double(), 0).values / divisor).tolist()
    for i in range(1, len(values)):
        if values[i] <= values[i - 1]:
            values[i] = math.nextafter(values[i - 1], math.inf)
    scores = torch.empty(len(values), dtype=torch.float64)
    scores[order] = torch.tensor(values, dtype=torch.float64)
    return scores


def obs_scores(
    model: nn.Module,
    stats: CorrectionStats,
    *,
    damping: float | None = None,
    scale: Sequence[float] | Tensor | None = None,
    chunks: int = 128,
    min_mlp_keep: float = 0.05,
    min_head_keep: float = 0.2,
    dtype: torch.dtype = torch.float32,
) -> ImportanceScores:
    """:class:`ImportanceScores` of the OBS greedy order of every block (module docstring).

    The greedy runs in ``dtype`` on the model's device (the statistics are moved there a block at a
    time); the scores are float64 on the CPU.

    Args:
        model: The dense ViT the statistics were collected on (its unit order is the scores').
        stats: Its correction statistics.
        damping: Ridge damping relative to the mean Gram diagonal; ``None``:
            :func:`~snapvit_lightning.correction.auto_damping` of ``stats`` (what the correction uses).
        scale: Per-block divisors of the costs (``None``: none).
        chunks: Updates per layer at most (:func:`greedy_removal` ``chunk = units // chunks``):
            the exact greedy for the heads, chunks of 12 for 1536 neurons.
        min_mlp_keep: As :class:`ImportanceScores`.
        min_head_keep: As :class:`ImportanceScores`.
        dtype: As :func:`greedy_removal`; float32 (the default) ranks as float64 does on held-out
            photos in about 2/3 of the time (docs/defaults.md, "The correction's cost: statistics and ranking").

    Raises:
        ValueError: Statistics that do not fit the model.
    """
    structure = inspect_vit(model)
    blocks = get_blocks(model)
    if stats.mlp.shape[0] != len(blocks):
        raise ValueError(f"stats have {stats.mlp.shape[0]} blocks, the model {len(blocks)}")
    damping = stats_damping(damping, stats)
    divisors = torch.ones(len(blocks), dtype=torch.float64) if scale is None else torch.as_tensor(scale, dtype=torch.float64)
    device = next(model.parameters()).device
    mlp, heads = [], []
    for b, block in enumerate(blocks):
        per_branch = []
        for name, layer, gram, group in (
            ("mlp", block.mlp.fc2, stats.mlp[b], 1),
            ("attn", block.attn.proj, stats.attn[b], structure.head_dim),
        ):
            gram = gram.to(device)
            weight = augmented_weight(layer).to(device)
            gamma = _branch_scale(block, name)
            if gamma is not None:
                weight = weight * gamma.to(device)[:, None]
            units = (gram.shape[0] - 1) // group
            order, costs = greedy_removal(weight, gram, group, damping, chunk=max(1, units // chunks), dtype=dtype)
            per_branch.append(_unit_scores(order, costs, float(divisors[b])))
        mlp.append(per_branch[0])
        heads.append(per_branch[1])
    return ImportanceScores(
        torch.stack(mlp), torch.stack(heads), min_mlp_keep=min_mlp_keep, min_head_keep=min_head_keep, criterion="obs"
    )


@torch.no_grad()
def stream_energy(model: nn.Module, images: Tensor, batch_size: int = 32) -> Tensor:
    """The energy of the residual stream after every block: ``E‖x‖²`` over images and tokens.

    Args:
        model: A timm ViT; not changed (its training mode is restored, its parameters untouched).
        images: ``[N, 3, H, W]`` preprocessed images (moved to the model's device and dtype).
        batch_size: Images per forward.

    Returns:
        ``[B]`` float64 (on the CPU): per block, the mean over images and tokens of the squared
        norm of the block's output.

    Raises:
        ValueError: Bad images or batch size.
    """
    images, batch_size = _check_images(images, model), _check_batch_size(batch_size)
    device, dtype = _model_device_dtype(model)
    blocks = get_blocks(model)
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    counts = [0] * len(blocks)

    def hook(index: int):
        def record(module: nn.Module, args: tuple, out: Tensor) -> None:
            energy = out.double().pow(2).sum(-1)  # [batch, tokens]
            sums[index] += float(energy.sum())
            counts[index] += energy.numel()
        return record

    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(blocks)]
    was_training = model.training
    model.eval()
    try:
        for batch in _batches(images, batch_size):
            model.forward_features(batch.to(device, dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return sums / torch.tensor(counts, dtype=torch.float64)


def corrected_ranking(
    model: nn.Module,
    stats: CorrectionStats,
    images: Tensor,
    *,
    damping: float | None = None,
    min_mlp_keep: float,
    min_head_keep: float,
    batch_size: int = 32,
    energy: Tensor | None = None,
) -> ImportanceScores:
    """The corrected path's ranking: :func:`obs_scores` with each block's costs divided by its :func:`stream_energy`.

    Args:
        model: The dense (elastic) ViT the statistics were collected on; not changed.
        stats: Its correction statistics (the unit order of the result is theirs and the model's).
        images: The calibration images ``[N, 3, H, W]`` the statistics were collected on.
        damping: Ridge damping of the OBS updates, relative to the mean Gram diagonal (``None``:
            as :func:`obs_scores`).
        min_mlp_keep: As :class:`ImportanceScores` (use the elastic model's).
        min_head_keep: As :class:`ImportanceScores`.
        batch_size: Images per forward of :func:`stream_energy`.
        energy: :func:`stream_energy` of ``images``, when known already
            (``collect_stats(..., with_energy=True)``); ``None`` computes it.

    Returns:
        Scores with criterion :data:`RANKING_CRITERION` (higher = keep).

    Raises:
        ValueError: Bad images or batch size, or statistics that do not fit the model.
    """
    if energy is None:
        energy = stream_energy(model, images, batch_size)
    scores = obs_scores(
        model, stats, damping=damping, scale=energy,
        min_mlp_keep=min_mlp_keep, min_head_keep=min_head_keep,
    )
    return dataclasses.replace(scores, criterion=RANKING_CRITERION)


def with_ranking(
    model: nn.Module,
    stats: CorrectionStats,
    images: Tensor,
    *,
    min_mlp_keep: float,
    min_head_keep: float,
    damping: float | None = None,
    batch_size: int = 32,
    energy: Tensor | None = None,
) -> CorrectionStats:
    """A copy of ``stats`` carrying :func:`corrected_ranking` (``ranking_mlp``/``ranking_heads``).

    :meth:`~snapvit_lightning.elastic.ElasticViT.subnet` then cuts corrected subnets by that
    ranking; plain cuts keep the elastic model's own order. Arguments as :func:`corrected_ranking`.
    """
    ranking = corrected_ranking(
        model, stats, images, damping=damping, min_mlp_keep=min_mlp_keep, min_head_keep=min_head_keep,
        batch_size=batch_size, energy=energy,
    )
    return dataclasses.replace(stats, ranking_mlp=ranking.mlp, ranking_heads=ranking.heads)
