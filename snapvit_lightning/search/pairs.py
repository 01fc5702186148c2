"""The fitness's ratio pairs: their checks, and their cap at every block's minimum keep."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..scores import ImportanceScores, check_ratio
from ..structure import inspect_vit

__all__ = ["check_pairs_apart"]


def _check_ratio_pairs(ratio_pairs: Any) -> tuple[tuple[float, float], ...]:
    try:
        pairs = tuple(tuple(p) for p in ratio_pairs)
    except TypeError:
        raise ValueError(f"ratio_pairs must be a sequence of (mlp_ratio, head_ratio) pairs, got {ratio_pairs!r}") from None
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(f"ratio_pairs must be a non-empty sequence of (mlp_ratio, head_ratio) pairs, got {ratio_pairs!r}")
    try:
        checked = tuple((check_ratio(m, "mlp_ratio"), check_ratio(h, "head_ratio")) for m, h in pairs)
    except ValueError as err:
        raise ValueError(f"ratio_pairs={ratio_pairs!r}: {err}") from None
    labels = [f"({m:g}, {h:g})" for m, h in checked]  # as logged (search/cos_mlp{m:g}_head{h:g})
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ValueError(f"ratio_pairs holds {', '.join(twice)} more than once (a pair counts once); got {ratio_pairs!r}")
    return checked


def check_pairs_apart(model: nn.Module, ratio_pairs: Any, min_mlp_keep: float, min_head_keep: float) -> None:
    """Refuse ratio pairs that cut alike once capped at every block's minimum keep: before the scoring, not at the search.

    Raises:
        ValueError: As :class:`Fitness` would (the cap depends on the model's sizes and the keeps only).
    """
    dims = inspect_vit(model).blocks[0]
    floor = ImportanceScores(torch.zeros(1, dims.mlp_hidden), torch.zeros(1, dims.num_heads),
                             min_mlp_keep=min_mlp_keep, min_head_keep=min_head_keep)
    _reachable_pairs(floor, _check_ratio_pairs(ratio_pairs), warn=False)


def _reachable_pairs(
    scores: ImportanceScores, pairs: tuple[tuple[float, float], ...], warn: bool = True
) -> tuple[tuple[float, float], ...]:
    """``pairs`` capped at ``scores.max_ratios`` (the same cuts), with a warning naming those it capped.

    Raises:
        ValueError: Two pairs that cut alike once capped (a pair counts once).
    """
    reach = tuple(scores.reachable(*p) for p in pairs)
    capped = [f"({m:g}, {h:g}) as ({rm:g}, {rh:g})" for (m, h), (rm, rh) in zip(pairs, reach) if (m, h) != (rm, rh)]
    if not capped:
        return pairs
    limit = f"every block at its minimum keep cuts at most ({scores.max_ratios[0]:.4g}, {scores.max_ratios[1]:.4g})"
    labels = [f"({m:.4g}, {h:.4g})" for m, h in reach]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ValueError(f"ratio_pairs={[list(p) for p in pairs]!r}: {limit}, so several pairs cut as {', '.join(twice)} "
                         "(a pair counts once); give pairs within it")
    if warn:
        warnings.warn(f"ratio_pairs: {limit}, so the fitness cuts {', '.join(capped)} (searched and logged as the cut)",
                      UserWarning, stacklevel=3)
    return reach
