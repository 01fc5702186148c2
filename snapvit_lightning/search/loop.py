"""The xNES search loop without a Trainer: :func:`run_search` and the helpers it shares
with :class:`~snapvit_lightning.search.EvolutionarySearch`.
"""

from __future__ import annotations

import inspect

import math
from collections.abc import Callable, Iterable, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from ..image_batches import collect_images
from ..scores import ImportanceScores, check_balance
from ..structure import get_blocks
from ..values import real_number
from ..xnes import XNES, _is_staged
from .fitness import (
    DEFAULT_BALANCE,
    DEFAULT_FITNESS_SAMPLES,
    DEFAULT_GUARD,
    DEFAULT_RATIO_PAIRS,
    DEFAULT_SIGMA,
    DEFAULT_SPACE,
    Fitness,
    _BOUNDS,
    _check_images,
    _check_int,
    _check_weights,
    _described,
    _resolve_autocast,
    default_initial_weights,
    fitness_subset,
)

__all__ = [
    "run_search",
]


def _check_sigma(sigma: Any) -> float:
    number = real_number(sigma)
    if number is None or not math.isfinite(number) or number <= 0:
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    return number


def _check_early_stop(early_stop: Any) -> bool:
    if not isinstance(early_stop, bool):
        raise ValueError(f"early_stop must be True or False, got {early_stop!r}")
    return early_stop


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


def _check_start(dim: int, initial_weights: Any, initial_covariance: Any) -> tuple[Tensor | None, Tensor | None]:
    """The start mean and covariance (``None`` where not given) checked against ``dim`` search weights.

    Raises:
        ValueError: ``initial_weights`` not finite ``[dim]``, ``initial_covariance`` not a finite,
            symmetric, positive definite ``[dim, dim]``.
    """
    w0 = None if initial_weights is None else _check_weights(initial_weights, dim, "initial_weights")
    cov = None
    if initial_covariance is not None:
        try:
            cov = torch.as_tensor(initial_covariance, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"initial_covariance must be a [{dim}, {dim}] matrix of numbers, got "
                             f"{_described(initial_covariance)}") from err
        if tuple(cov.shape) != (dim, dim):
            raise ValueError(f"initial_covariance must have shape [{dim}, {dim}], got {list(cov.shape)}")
        try:  # finite, symmetric, positive definite: as xNES takes it, but named as the user gave it
            XNES._factor_cov(cov, dim)
        except ValueError as err:
            raise ValueError(str(err).replace("`cov`", "initial_covariance")) from None
    return w0, cov


def check_start_fits(model: nn.Module, initial_weights: Any, initial_covariance: Any) -> None:
    """Refuse a start that does not fit ``model``'s ``B + B*H`` search weights, before the scoring.

    Raises:
        ValueError: See :func:`_check_start`.
    """
    blocks = get_blocks(model)
    _check_start(len(blocks) * (1 + int(blocks[0].attn.num_heads)), initial_weights, initial_covariance)


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
    w0, cov = _check_start(dim, initial_weights, initial_covariance)
    w0 = (default_initial_weights(num_blocks, num_heads) if w0 is None else w0).clamp(*_BOUNDS)
    xnes = XNES(dim, mean=w0, sigma=sigma, cov=cov, popsize=popsize, bounds=_BOUNDS, seed=seed)
    return xnes, w0


def _search_loop(
    xnes: XNES,
    fitness: Callable[..., float],
    max_evals: int,
    history: list[float],
    on_eval: Callable[[int, float, float], None] | None = None,
    broadcast: Callable[[Tensor], Tensor] | None = None,
    best_so_far: float = math.inf,
    early_stop: bool = False,
) -> None:
    """Run ``xnes`` until ``max_evals`` total evaluations, appending to ``history``.

    With ``early_stop`` a staged ``fitness`` (:class:`Fitness`: ``start``/``advance``/``finish``)
    is evaluated a generation at a time, best first, and a plain callable as
    ``fitness(x, stop_above=cutoff)`` candidate after candidate (:meth:`XNES.optimize`). A
    stopped candidate is recorded in ``history`` and passed to ``on_eval`` as ``nan``: it was
    certainly below the upper half of its generation; ``nan`` entries never count as the best.
    ``history`` and ``on_eval`` follow the candidates' order (a staged generation reports its
    candidates when it is done, ``fitness.last_cosines`` set to each one's before its ``on_eval``).
    """
    best = [min([best_so_far, *(f for f in history if not math.isnan(f))])]

    def record(f: float) -> Tensor:
        history.append(f)
        if f < best[0]:  # never nan
            best[0] = f
        if on_eval is not None:
            on_eval(len(history) - 1, f, best[0])
        return torch.tensor(f, dtype=torch.float64)  # a bare float would pass through float32

    def shared(x: Tensor) -> Tensor:
        return x if broadcast is None else broadcast(x)

    def fn(x: Tensor) -> Tensor:
        return record(float(fitness(shared(x))))

    def fn_cutoff(x: Tensor, cutoff: float) -> Tensor:
        f = float(fitness(shared(x), stop_above=cutoff))
        stopped = f == math.inf and cutoff < math.inf
        record(math.nan if stopped else f)
        return torch.tensor(f, dtype=torch.float64)

    def finish(state: Any) -> Tensor:
        f = float(fitness.finish(state))
        record(f if state.complete else math.nan)
        return torch.tensor(f, dtype=torch.float64)

    if xnes.evals >= max_evals:
        return
    if not early_stop:
        xnes.optimize(fn, max_evals)
    elif _is_staged(fitness):
        staged = SimpleNamespace(start=lambda x: fitness.start(shared(x)), advance=fitness.advance, finish=finish)
        xnes.optimize(staged, max_evals, early_stop=True)
    else:
        xnes.optimize(fn_cutoff, max_evals, early_stop=True)


def _best(xnes: XNES, w0: Tensor, initial_fitness: float) -> tuple[Tensor, float]:
    """The best evaluated weights; the start point wins ties and when nothing beat it."""
    if xnes.best_x is None or not xnes.best_f < initial_fitness:
        return w0.clone(), initial_fitness
    return xnes.best_x, xnes.best_f


def run_search(
    model: nn.Module,
    scores: ImportanceScores,
    images: Tensor | Iterable[Any],
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
    on_start: Callable[[float], None] | None = None,
    balance: float | tuple[float, float] | str | None = DEFAULT_BALANCE,
    correct: str = "none",
    damping: float | None = None,
    damping_reference: str = "mean",
    space: str = DEFAULT_SPACE,
    guard: float = DEFAULT_GUARD,
    early_stop: bool = True,
    fitness_samples: int | None = DEFAULT_FITNESS_SAMPLES,
) -> tuple[Tensor, Tensor, list[float]]:
    """Search the block/head weights without a Trainer (see :class:`EvolutionarySearch`).

    The start point ``initial_weights`` (default ``w = 1`` on balanced scores, the default
    ``balance``; :func:`default_initial_weights` with ``balance=None``) is evaluated too (not
    counted in ``max_evals``) and returned when no candidate beats it.

    Args:
        model: The dense timm ViT (left unchanged).
        scores: Its importance scores.
        images: Fitness images ``[M, 3, S, S]``, or an iterable of such batches (e.g. a
            ``DataLoader``; ``(images, ...)`` tuples too).
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
        on_start: Called with the start point's fitness, before the first candidate.
        balance: Balancing quantile(s) of the scores the weights apply to (``None``: the raw
            scores and the paper's start); see :class:`EvolutionarySearch`.
        correct: Weight correction inside the fitness (see :class:`Fitness`).
        damping: ``lstsq`` damping of that correction (``None``: automatic).
        damping_reference: ``"mean"`` or ``"max"``.
        space: Where the fitness takes the cosine, ``"raw"`` or ``"pca"`` (see :class:`Fitness`).
        guard: Penalty per unit of cosine a ratio pair loses against the start point (see
            :class:`Fitness` and :class:`EvolutionarySearch`; ``0``: the paper's plain mean;
            default :data:`DEFAULT_GUARD`).
        early_stop: Stop a candidate's evaluation once it is certainly worse than the candidates
            that decide the xNES update (:meth:`XNES.optimize`, :class:`Fitness`); the result
            (best weights, covariance, the other fitness values) is the same, only faster.
        fitness_samples: Embed only this many of ``images``, drawn once with ``seed``
            (:func:`~snapvit_lightning.search.fitness.fitness_subset`); default
            :data:`~snapvit_lightning.search.fitness.DEFAULT_FITNESS_SAMPLES`; ``None``: all of them.

    Returns:
        ``(best_w [B + B*H], covariance [d, d], history)`` where ``history`` holds the fitness of
        each candidate in evaluation order; a stopped candidate is recorded as ``nan``: it was
        certainly in the lower half of its generation (any candidate may be, the first one
        too: the best fitness is ``min(f for f in history if not math.isnan(f))``).

    Raises:
        ValueError: An argument out of range (see :class:`Fitness` and :class:`EvolutionarySearch`).
    """
    images = _check_images(collect_images(images))
    max_evals = _check_int("max_evals", max_evals, 1)
    early_stop = _check_early_stop(early_stop)
    sigma = _check_sigma(sigma)
    popsize = _check_popsize(popsize)
    for name, hook, args in (("on_eval", on_eval, (0, 0.0, 0.0)), ("on_start", on_start, (0.0,))):
        try:  # else they fail after the first evaluation
            if hook is not None:
                inspect.signature(hook).bind(*args)
        except TypeError:
            raise TypeError(f"{name} must be None or a callable taking {len(args)} positional argument"
                            f"{'s' * (len(args) > 1)}, got {hook!r}") from None
        except ValueError:  # a builtin without a signature: called as given
            pass
    if not isinstance(scores, ImportanceScores):
        raise TypeError(f"scores must be ImportanceScores, got {type(scores).__name__}")
    _check_start(scores.num_weights, initial_weights, initial_covariance)  # before the fitness embeds its images
    scores, initial_weights = _balanced_start(scores, check_balance(balance), initial_weights)
    fitness = Fitness(
        model, scores, fitness_subset(images, fitness_samples, seed), ratio_pairs, pca_components, batch_size, _resolve_autocast(autocast),
        correct=correct, damping=damping, damping_reference=damping_reference, space=space, guard=guard,
    )
    xnes, w0 = _make_xnes(
        scores.num_weights, scores.num_blocks, scores.num_heads, sigma, popsize, seed, initial_weights, initial_covariance
    )
    initial_fitness = fitness(w0)
    if on_start is not None:
        on_start(initial_fitness)
    history: list[float] = []
    _search_loop(xnes, fitness, max_evals, history, on_eval, early_stop=early_stop)
    best_w, _ = _best(xnes, w0, initial_fitness)
    return best_w, xnes.covariance, history
