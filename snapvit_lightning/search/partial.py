"""A staged evaluation of :class:`~.fitness.Fitness`: its state, ratio pair by ratio pair."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..values import real_number

__all__ = ["PartialFitness"]

#: How far a partial fitness must exceed ``stop_above`` before a call stops: covers cosines a
#: rounding error above 1 (a term ``1 - cos`` slightly below 0) and summation order.
_STOP_MARGIN = 1e-6


@dataclass(eq=False)
class PartialFitness:
    """A staged evaluation of :class:`~.fitness.Fitness`, ratio pair by ratio pair (:meth:`~.fitness.Fitness.start`).

    Holds a few numbers per ratio pair, never embeddings.

    Attributes:
        w: The weights evaluated.
        pairs_done: Ratio pairs evaluated so far (sparsest first).
        value: The fitness once complete, else ``None``.
        seconds: Time spent evaluating it.
    """

    w: Tensor
    project: bool
    tracked: bool  # per-pair sums over all processes and the partial fitness are kept
    local: Tensor  # [P, 2] this process's (sum of cosines, count) per pair
    reduced: Tensor  # [P, 2] over all processes: per pair if tracked, all at completion
    pairs_done: int = 0
    partial: float = 0.0
    value: float | None = None
    seconds: float = 0.0
    finished: bool = False

    @property
    def complete(self) -> bool:
        """Whether every ratio pair is evaluated."""
        return self.pairs_done == self.local.shape[0]

    @property
    def lower_bound(self) -> float:
        """Certainly at most the fitness: the value once complete, else the evaluated pairs' terms less a margin."""
        if self.value is not None:
            return self.value
        if not self.tracked or math.isnan(self.partial):
            return -math.inf
        return self.partial - _STOP_MARGIN


def _check_stop_above(stop_above: Any) -> float | None:
    if stop_above is None:
        return None
    if isinstance(stop_above, Tensor) and stop_above.numel() == 1:
        stop_above = stop_above.reshape(())
    number = real_number(stop_above)
    if number is None or math.isnan(number):
        raise ValueError(f"stop_above must be None or a number (inf: never stop; not nan), got {stop_above!r}")
    return number
