"""Evolutionary correlation search (SnapViT step 2): xNES over block/head score weights.

* :mod:`.fitness`: :class:`Fitness` (what a weight vector is worth) and the search defaults.
* :mod:`.partial`: :class:`~.partial.PartialFitness`, the state of a staged evaluation.
* :mod:`.views`: the master weights and per-budget views the fitness slices.
* :mod:`.loop`: :func:`run_search`, the search without a Trainer.
* :mod:`.callback`: :class:`EvolutionarySearch`, the search as a Lightning callback.
* :mod:`.progress`: what the callback reports per evaluation (progress bar, loggers' metrics).
"""

from .callback import EvolutionarySearch, scored_model
from .fitness import (
    CPU_WIDTH_MULTIPLE,
    DEFAULT_BALANCE,
    DEFAULT_FITNESS_SAMPLES,
    DEFAULT_GUARD,
    DEFAULT_RATIO_PAIRS,
    DEFAULT_SIGMA,
    DEFAULT_SPACE,
    FITNESS_SPACES,
    PAPER_RATIO_PAIRS,
    Fitness,
    check_guard,
    check_space,
    default_initial_weights,
    fitness_subset,
)
from .loop import run_search

__all__ = [
    "CPU_WIDTH_MULTIPLE",
    "DEFAULT_BALANCE",
    "DEFAULT_FITNESS_SAMPLES",
    "DEFAULT_RATIO_PAIRS",
    "PAPER_RATIO_PAIRS",
    "DEFAULT_SIGMA",
    "DEFAULT_GUARD",
    "DEFAULT_SPACE",
    "FITNESS_SPACES",
    "default_initial_weights",
    "fitness_subset",
    "Fitness",
    "EvolutionarySearch",
    "run_search",
    "scored_model",
]
