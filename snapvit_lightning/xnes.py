"""Exponential natural evolution strategy (xNES) with a full covariance matrix.

Reference: T. Glasmachers, T. Schaul, Y. Sun, D. Wierstra, J. Schmidhuber,
"Exponential Natural Evolution Strategies", GECCO 2010.

The search distribution is ``N(mean, sigma^2 B B^T)`` with ``det(B) = 1``. One generation
draws ``z_k ~ N(0, I)``, evaluates ``x_k = mean + sigma * B z_k`` (clipped into ``bounds``),
ranks the candidates (minimisation) and applies the natural-gradient update

.. code-block:: text

    G_delta = sum_k u_k z_k
    G_M     = sum_k u_k (z_k z_k^T - I)
    G_sigma = tr(G_M) / d
    G_B     = G_M - G_sigma I
    mean   <- mean + eta_mu * sigma * B G_delta
    sigma  <- sigma * exp(eta_sigma / 2 * G_sigma)
    B      <- B expm(eta_B / 2 * G_B)

with rank-based utilities ``u_k`` that sum to zero. Everything runs in float64 on the CPU and
is driven by one seeded :class:`torch.Generator`, so a run is reproducible bit for bit and can
be checkpointed and resumed exactly (:meth:`XNES.state_dict` / :meth:`XNES.load_state_dict`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .values import real_number

__all__ = ["XNES", "default_popsize", "default_learning_rates", "positive_ranks", "rank_utilities"]

_DTYPE = torch.float64


def default_popsize(dim: int) -> int:
    """Population size recommended by the xNES paper: ``4 + floor(3 ln d)``.

    Args:
        dim: Search-space dimension ``d``.

    Returns:
        The population size.

    Raises:
        ValueError: If ``dim < 1``.
    """
    if dim < 1:
        raise ValueError(f"`dim` must be >= 1, got {dim!r}")
    return 4 + int(math.floor(3.0 * math.log(dim)))


def default_learning_rates(dim: int) -> tuple[float, float, float]:
    """Learning rates recommended by the xNES paper.

    ``eta_mu = 1`` and ``eta_sigma = eta_B = (9 + 3 ln d) / (5 d sqrt(d))``.

    Args:
        dim: Search-space dimension ``d``.

    Returns:
        ``(eta_mu, eta_sigma, eta_B)``.

    Raises:
        ValueError: If ``dim < 1``.
    """
    if dim < 1:
        raise ValueError(f"`dim` must be >= 1, got {dim!r}")
    eta = (9.0 + 3.0 * math.log(dim)) / (5.0 * dim * math.sqrt(dim))
    return 1.0, eta, eta


def _raw_utilities(n: int) -> Tensor:
    """``max(0, ln(n/2 + 1) - ln k)`` for ``k = 1..n`` (float64), as :func:`rank_utilities` uses them."""
    ranks = torch.arange(1, n + 1, dtype=_DTYPE)
    return (math.log(n / 2.0 + 1.0) - torch.log(ranks)).clamp_min(0.0)


def positive_ranks(n: int) -> int:
    """Number ``m`` of ranks with a positive raw utility among ``n`` candidates.

    In :func:`rank_utilities` the ``m`` best candidates get distinct utilities and every
    candidate ranked below them gets the same ``-1/n`` (for ``n = 17``, ``m = 9``; for
    ``n = 16``, ``m = 8``). Hence a candidate whose fitness is certainly worse than the ``m``-th
    best of its generation does not need its exact value (see :meth:`XNES.optimize`'s
    ``early_stop``). Computed with the same float64 expression as :func:`rank_utilities`.

    Args:
        n: Number of candidates (``>= 1``).

    Returns:
        ``m`` in ``[1, n]``.

    Raises:
        TypeError: If ``n`` is not an int.
        ValueError: If ``n < 1``.
    """
    if not _is_int(n):
        raise TypeError(f"`n` must be an int, got {n!r} of type {type(n).__name__}")
    if n < 1:
        raise ValueError(f"`n` must be >= 1, got {n!r}")
    return int((_raw_utilities(n) > 0).sum())


def rank_utilities(fitnesses: Tensor) -> Tensor:
    """Rank-based fitness shaping for minimisation (utilities sum to zero).

    The k-th best of ``n`` candidates (k = 1..n) gets
    ``max(0, ln(n/2 + 1) - ln k) / sum_j max(0, ln(n/2 + 1) - ln j) - 1/n``.
    Tied fitness values share the mean utility of their ranks, so the result does not
    depend on the order of equal values (e.g. several candidates clipped onto the same
    boundary point, or several ``inf``).

    Args:
        fitnesses: 1-D tensor of ``n >= 1`` fitness values, lower is better. ``NaN`` must
            have been replaced beforehand (see :meth:`XNES.tell`).

    Returns:
        1-D float64 tensor of utilities, aligned with ``fitnesses``.
    """
    f = fitnesses.to(_DTYPE)
    n = f.numel()
    raw = _raw_utilities(n)
    sorted_u = raw / raw.sum() - 1.0 / n
    sorted_f, order = torch.sort(f, stable=True)
    # Average the utilities over runs of equal fitness.
    _, inverse, counts = torch.unique_consecutive(sorted_f, return_inverse=True, return_counts=True)
    group_mean = torch.zeros(counts.numel(), dtype=_DTYPE).index_add_(0, inverse, sorted_u) / counts
    sorted_u = group_mean[inverse]
    utilities = torch.empty(n, dtype=_DTYPE)
    utilities[order] = sorted_u
    return utilities


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _scalar(value: Any, what: str) -> Tensor:
    v = torch.as_tensor(value, dtype=_DTYPE).detach().to(device="cpu", dtype=_DTYPE)
    if v.numel() != 1:
        raise ValueError(f"{what} must return a scalar, got a tensor of shape {tuple(v.shape)}")
    return v.reshape(())


def _is_staged(fn: Any) -> bool:
    """Whether ``fn`` is a staged objective (``start``, ``advance`` and ``finish``; see :meth:`XNES.optimize`)."""
    return all(callable(getattr(fn, name, None)) for name in ("start", "advance", "finish"))


def _positive_float(name: str, value: Any) -> float:
    if real_number(value) is None:
        raise TypeError(f"`{name}` must be a float, got {value!r} of type {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}")
    return value


class XNES:
    """Exponential natural evolution strategy with full covariance, seeded and resumable.

    The search distribution is ``N(mean, sigma^2 B B^T)`` with ``det(B) = 1``; see the module
    docstring for the update. Fitness is **minimised**.

    Use it through the ask/tell interface::

        es = XNES(dim, mean=w0, sigma=0.1, bounds=(0.0, 2.0), seed=0)
        while es.evals < budget:
            x = es.ask()                       # [popsize, dim], clipped into bounds
            es.tell(torch.stack([f(xi) for xi in x]))
        es.best_x, es.best_f, es.correlation

    or with :meth:`optimize`. :attr:`covariance` (``sigma^2 B B^T``) and :attr:`correlation`
    are the learned estimate of how the coordinates interact.

    Bounds: candidates are clipped into ``bounds`` for evaluation (what :meth:`ask` returns
    and what :attr:`best_x` records), while the update uses the *unclipped* standard-normal
    samples ``z`` — the standard choice. Hence the distribution's :attr:`mean` may leave the
    box; everything that is evaluated lies inside it.

    Note on the official SnapViT code: it uses pypop7's xNES in a way that ignores the step
    size — noise of std 1 on block/head weights that start near 1, 17 samples per generation,
    i.e. only 2 distribution updates in its 50 evaluations, so it behaves close to random
    search. Here the step size is an explicit argument (documented default 0.1; the value and
    the population size used by the search are to be chosen by measurement).

    Args:
        dim: Search-space dimension ``d``.
        mean: Initial mean, shape ``[dim]``. Defaults to zeros.
        sigma: Initial step size; the initial search covariance is ``sigma^2 * cov``.
        cov: Initial *shape* of the covariance, a symmetric positive-definite ``[dim, dim]``
            matrix (identity by default). It is factored as ``cov = A A^T`` (Cholesky) and
            normalised to ``B = A / det(A)^(1/d)`` with ``sigma`` scaled by ``det(A)^(1/d)``,
            so :attr:`covariance` equals ``sigma^2 * cov`` right after construction. To
            continue from an earlier run pass ``cov=prev.covariance, sigma=1.0``, or
            ``cov=prev.correlation`` with a fresh ``sigma``.
        popsize: Samples per generation; defaults to ``4 + floor(3 ln d)``.
        bounds: ``(lo, hi)`` box applied to every coordinate of the evaluated candidates, or
            ``None`` for an unbounded search.
        seed: Seed of the private :class:`torch.Generator`, in ``[-2**63, 2**64)``.
        eta_mu: Learning rate of the mean; defaults to 1.
        eta_sigma: Learning rate of the step size; defaults to ``(9 + 3 ln d) / (5 d sqrt d)``.
        eta_B: Learning rate of the shape matrix ``B``; same default as ``eta_sigma``.

    Raises:
        TypeError: If an argument has the wrong type (``dim``, ``popsize``, ``seed`` must be
            ints; ``sigma``, learning rates and bounds real numbers; ``mean``/``cov`` tensors).
        ValueError: If ``dim < 1``, ``sigma <= 0`` or not finite, ``popsize < 2``, ``mean`` is
            not of shape ``[dim]`` or not finite, ``cov`` is not ``[dim, dim]``, not symmetric or
            not positive definite, ``bounds`` is not ``(lo, hi)`` with finite ``lo < hi``, or a
            learning rate is not a finite number > 0.
    """

    def __init__(
        self,
        dim: int,
        mean: Tensor | None = None,
        sigma: float = 0.1,
        cov: Tensor | None = None,
        popsize: int | None = None,
        bounds: tuple[float, float] | None = (0.0, 2.0),
        seed: int = 0,
        eta_mu: float | None = None,
        eta_sigma: float | None = None,
        eta_B: float | None = None,
    ) -> None:
        if not _is_int(dim):
            raise TypeError(f"`dim` must be an int, got {dim!r} of type {type(dim).__name__}")
        if dim < 1:
            raise ValueError(f"`dim` must be >= 1, got {dim!r}")
        self.dim = dim
        sigma = _positive_float("sigma", sigma)
        if popsize is None:
            popsize = default_popsize(dim)
        if not _is_int(popsize):
            raise TypeError(f"`popsize` must be an int or None, got {popsize!r} of type {type(popsize).__name__}")
        if popsize < 2:
            raise ValueError(f"`popsize` must be >= 2, got {popsize!r}")
        self.popsize = popsize

        if not _is_int(seed):
            raise TypeError(f"`seed` must be an int, got {seed!r} of type {type(seed).__name__}")
        if not -(2**63) <= seed < 2**64:  # what torch.Generator.manual_seed takes
            raise ValueError(f"`seed` must be in [-2**63, 2**64), got {seed!r}")
        self.seed = seed

        self.bounds = self._check_bounds(bounds)

        d_eta_mu, d_eta_sigma, d_eta_b = default_learning_rates(dim)
        self.eta_mu = d_eta_mu if eta_mu is None else _positive_float("eta_mu", eta_mu)
        self.eta_sigma = d_eta_sigma if eta_sigma is None else _positive_float("eta_sigma", eta_sigma)
        self.eta_B = d_eta_b if eta_B is None else _positive_float("eta_B", eta_B)

        if mean is None:
            mean_t = torch.zeros(dim, dtype=_DTYPE)
        else:
            if not isinstance(mean, Tensor):
                raise TypeError(f"`mean` must be a torch.Tensor or None, got {type(mean).__name__}")
            if tuple(mean.shape) != (dim,):
                raise ValueError(f"`mean` must have shape ({dim},), got {tuple(mean.shape)}")
            mean_t = mean.detach().to(device="cpu", dtype=_DTYPE).clone()
            if not torch.isfinite(mean_t).all():
                raise ValueError(f"`mean` must be finite, got {mean_t.tolist()}")

        if cov is None:
            b = torch.eye(dim, dtype=_DTYPE)
        else:
            b, scale = self._factor_cov(cov, dim)
            sigma = sigma * scale

        self._mean = mean_t
        self._sigma = float(sigma)
        self._B = b
        self._generation = 0
        self._evals = 0
        self._best_x: Tensor | None = None
        self._best_f = math.inf
        self._pending_z: Tensor | None = None
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)

    # ------------------------------------------------------------------ validation helpers

    @staticmethod
    def _check_bounds(bounds: Any) -> tuple[float, float] | None:
        if bounds is None:
            return None
        if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
            raise TypeError(f"`bounds` must be a (lo, hi) tuple or None, got {bounds!r}")
        lo, hi = bounds
        if real_number(lo) is None or real_number(hi) is None:
            raise TypeError(f"`bounds` must hold two real numbers, got {bounds!r}")
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)) or not lo < hi:
            raise ValueError(f"`bounds` must be (lo, hi) with finite lo < hi, got {bounds!r}")
        return (lo, hi)

    @staticmethod
    def _factor_cov(cov: Any, dim: int) -> tuple[Tensor, float]:
        if not isinstance(cov, Tensor):
            raise TypeError(f"`cov` must be a torch.Tensor or None, got {type(cov).__name__}")
        if tuple(cov.shape) != (dim, dim):
            raise ValueError(f"`cov` must have shape ({dim}, {dim}), got {tuple(cov.shape)}")
        c = cov.detach().to(device="cpu", dtype=_DTYPE)
        if not torch.isfinite(c).all():
            raise ValueError("`cov` must be finite, got non-finite entries")
        if not torch.allclose(c, c.T, rtol=1e-6, atol=1e-10 * float(c.abs().max().clamp_min(1e-300))):
            raise ValueError("`cov` must be symmetric, got a non-symmetric matrix")
        c = 0.5 * (c + c.T)
        a, info = torch.linalg.cholesky_ex(c)
        if int(info) != 0:
            raise ValueError("`cov` must be positive definite, got a matrix whose Cholesky factorisation failed")
        log_scale = float(torch.log(torch.diagonal(a)).sum()) / dim  # log det(A)^(1/d)
        scale = math.exp(log_scale)
        return a / scale, scale

    # ------------------------------------------------------------------ properties

    @property
    def mean(self) -> Tensor:
        """Current mean of the search distribution (float64 copy, may lie outside ``bounds``)."""
        return self._mean.clone()

    @property
    def sigma(self) -> float:
        """Current global step size."""
        return self._sigma

    @property
    def B(self) -> Tensor:  # noqa: N802 - name from the paper
        """Current shape matrix ``B`` (``det(B) = 1`` up to round-off), float64 copy."""
        return self._B.clone()

    @property
    def covariance(self) -> Tensor:
        """Covariance ``sigma^2 B B^T`` of the search distribution, ``[dim, dim]`` float64."""
        a = self._sigma * self._B
        return a @ a.T

    @property
    def correlation(self) -> Tensor:
        """:attr:`covariance` normalised to unit diagonal, ``[dim, dim]`` float64."""
        c = self.covariance
        inv_std = torch.diagonal(c).rsqrt()
        corr = c * inv_std[:, None] * inv_std[None, :]
        corr = 0.5 * (corr + corr.T)
        corr.fill_diagonal_(1.0)
        return corr

    @property
    def generation(self) -> int:
        """Number of distribution updates done so far."""
        return self._generation

    @property
    def evals(self) -> int:
        """Number of fitness values received so far."""
        return self._evals

    @property
    def best_x(self) -> Tensor | None:
        """Best evaluated (clipped) candidate so far, or ``None`` before any finite fitness."""
        return None if self._best_x is None else self._best_x.clone()

    @property
    def best_f(self) -> float:
        """Best (lowest) fitness seen so far; ``inf`` before any finite fitness."""
        return self._best_f

    @property
    def pending(self) -> bool:
        """Whether candidates were asked for and not yet told."""
        return self._pending_z is not None

    # ------------------------------------------------------------------ ask / tell

    def _candidates(self, z: Tensor) -> Tensor:
        x = self._mean + self._sigma * (z @ self._B.T)
        if self.bounds is not None:
            x = x.clamp(self.bounds[0], self.bounds[1])
        return x

    def ask(self) -> Tensor:
        """Sample a generation of candidates.

        Calling :meth:`ask` again before :meth:`tell` returns the same pending candidates
        without drawing new random numbers (useful after restoring a checkpoint taken between
        ask and tell).

        Returns:
            ``[popsize, dim]`` float64 tensor of candidates, clipped into ``bounds``.
        """
        if self._pending_z is None:
            self._pending_z = torch.randn(self.popsize, self.dim, generator=self._generator, dtype=_DTYPE)
        return self._candidates(self._pending_z)

    def _prepare_fitness(self, fitnesses: Tensor | Sequence[float], expected: int) -> Tensor:
        try:
            f = torch.as_tensor(fitnesses, dtype=_DTYPE).detach().to(device="cpu", dtype=_DTYPE)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"`fitnesses` must be a tensor or a sequence of floats, got {fitnesses!r}") from err
        if tuple(f.shape) != (expected,):
            raise ValueError(f"`fitnesses` must have shape ({expected},), got {tuple(f.shape)}")
        if bool((f == -math.inf).any()):
            raise ValueError(f"`fitnesses` must not contain -inf, got {f.tolist()}")
        # NaN (a failed evaluation) ranks as the worst possible value.
        return torch.nan_to_num(f, nan=math.inf)

    def _record(self, x: Tensor, f: Tensor) -> None:
        self._evals += int(f.numel())
        if f.numel() == 0:
            return
        i = int(torch.argmin(f))  # first minimum: deterministic
        fi = float(f[i])
        if fi < self._best_f:
            self._best_f = fi
            self._best_x = x[i].clone()

    def _update(self, z: Tensor, f: Tensor) -> None:
        d = self.dim
        u = rank_utilities(f)
        g_delta = u @ z
        g_m = (z.T * u) @ z - u.sum() * torch.eye(d, dtype=_DTYPE)
        g_sigma = float(torch.trace(g_m)) / d
        g_b = g_m - g_sigma * torch.eye(d, dtype=_DTYPE)
        g_b = 0.5 * (g_b + g_b.T)
        self._mean = self._mean + self.eta_mu * self._sigma * (self._B @ g_delta)
        self._sigma = self._sigma * math.exp(0.5 * self.eta_sigma * g_sigma)
        self._B = self._B @ torch.linalg.matrix_exp(0.5 * self.eta_B * g_b)
        self._generation += 1

    def tell(self, fitnesses: Tensor | Sequence[float]) -> None:
        """Update the distribution with the fitness of the candidates from :meth:`ask`.

        ``NaN`` fitness values (e.g. a failed evaluation) are treated as ``+inf``, i.e. ranked
        worst; ties share their utility. ``-inf`` is rejected.

        Args:
            fitnesses: ``[popsize]`` fitness values (lower is better), aligned with the rows
                returned by :meth:`ask`.

        Raises:
            RuntimeError: If there are no pending candidates (no :meth:`ask` since the last
                :meth:`tell`).
            TypeError: If ``fitnesses`` cannot be converted to a tensor.
            ValueError: If ``fitnesses`` does not have shape ``[popsize]`` or contains ``-inf``.
        """
        if self._pending_z is None:
            raise RuntimeError("`tell` called without pending candidates; call `ask` first")
        f = self._prepare_fitness(fitnesses, self.popsize)
        z = self._pending_z
        self._record(self._candidates(z), f)
        self._update(z, f)
        self._pending_z = None

    def optimize(
        self, fn: Callable[..., float | Tensor], max_evals: int, early_stop: bool = False
    ) -> tuple[Tensor | None, float]:
        """Minimise ``fn`` with ask/tell until :attr:`evals` reaches ``max_evals``.

        ``max_evals`` is a *total* budget counted by :attr:`evals`, so calling this again on a
        restored optimizer with the same budget finishes the original run. If the last
        generation does not fit, only its first ``k = max_evals - evals`` candidates are
        evaluated; they count towards :attr:`best_x`/:attr:`best_f`/:attr:`evals`, and if
        ``k >= 2`` the distribution is updated from those ``k`` samples with utilities for a
        population of ``k`` (for ``k = 1`` no update is made). Either way the generation's
        remaining candidates are discarded. Consequently ``optimize(fn, a)`` followed by
        ``optimize(fn, b)`` equals ``optimize(fn, b)`` only when ``a`` is a multiple of
        :attr:`popsize` (or the run was restored from a state saved on a generation boundary).

        Early stop: every candidate ranked below the ``m = positive_ranks(k)`` best of its
        generation gets the same utility ``-1/k`` (:func:`rank_utilities`), so its exact
        fitness is not needed once it is certainly worse than the ``m``-th best. With
        ``early_stop=True`` ``fn`` is used in one of two ways:

        * a *staged* objective (with ``start``, ``advance`` and ``finish`` methods, e.g.
          :class:`~snapvit_lightning.search.Fitness`) is evaluated a generation at a time,
          best first: ``state = fn.start(x_i)`` does the first stage of every candidate, in
          order; ``state.complete`` tells whether it is finished and ``state.lower_bound`` is a
          certain lower bound of its value, non-decreasing over the stages and equal to the
          value once complete. Then, with ``cutoff`` the ``m``-th smallest value of the
          generation's complete candidates (``math.inf`` while fewer than ``m`` are), the
          incomplete candidate of the smallest bound not above ``cutoff`` (the first of equal
          ones) is advanced one stage, ``fn.advance(state)``, until every candidate is complete
          or bounded above ``cutoff`` (*stopped*): only stages whose bound is at most the
          generation's final ``cutoff`` are evaluated, once the ``m`` best are found. At last
          ``fn.finish(state)`` returns each candidate's value, in order (``math.inf`` for a
          stopped one).
        * a plain callable is called as ``fn(x_i, cutoff)``, candidate after candidate, where
          ``cutoff`` is the ``m``-th smallest fitness among the candidates of this generation
          evaluated completely so far (``math.inf`` while fewer than ``m`` are), and may return
          ``math.inf`` to mean "stopped: certainly greater than ``cutoff``" instead of its
          exact value (any ``+inf`` returned under a finite ``cutoff`` counts as stopped). The
          first ``m`` candidates of a generation always run to completion.

        Either way the update, :attr:`best_x` and :attr:`best_f` are bitwise those of
        ``early_stop=False`` with the exact values (stopped candidates are ranked below every
        completed one, each on a rank of its own; only ties between a stopped candidate's
        unknown value and another value below the ``m`` best, which would share a mean
        utility, could differ by rounding).

        Args:
            fn: Objective; called with one ``[dim]`` float64 candidate (clipped into
                ``bounds``), plus the ``cutoff`` float when ``early_stop``; returns a float or a
                scalar tensor. With ``early_stop``, a staged objective (see above) instead.
            max_evals: Total number of evaluations.
            early_stop: Stop candidates certainly worse than the ``m`` best of their
                generation (see above).

        Returns:
            ``(best_x, best_f)``. ``best_x`` is ``None`` only if no finite fitness was seen.

        Raises:
            TypeError: If ``max_evals`` is not an int, ``early_stop`` not a bool or ``fn`` is
                not callable (nor staged, with ``early_stop``).
            ValueError: If ``max_evals < 1``, or ``fn`` returns a non-scalar or ``-inf``.
        """
        staged = early_stop is True and _is_staged(fn)
        if not callable(fn) and not staged:
            raise TypeError(f"`fn` must be callable, got {fn!r}")
        if not _is_int(max_evals):
            raise TypeError(f"`max_evals` must be an int, got {max_evals!r} of type {type(max_evals).__name__}")
        if max_evals < 1:
            raise ValueError(f"`max_evals` must be >= 1, got {max_evals!r}")
        if not isinstance(early_stop, bool):
            raise TypeError(f"`early_stop` must be a bool, got {early_stop!r} of type {type(early_stop).__name__}")
        while self._evals < max_evals:
            x = self.ask()
            k = min(self.popsize, max_evals - self._evals)
            if staged:
                f, f_rank = self._evaluate_staged(fn, x, k)
            elif early_stop:
                f, f_rank = self._evaluate_early_stop(fn, x, k)
            else:
                f = self._prepare_fitness(torch.stack([_scalar(fn(x[i]), "`fn`") for i in range(k)]), k)
                f_rank = f
            z = self._pending_z
            if z is None:  # pragma: no cover - ask() always sets it
                raise RuntimeError("internal error: no pending samples after `ask`")
            self._record(x[:k], f)
            if k >= 2:
                self._update(z[:k], f_rank)
            self._pending_z = None
        return self.best_x, self.best_f

    def _evaluate_early_stop(self, fn: Callable[..., float | Tensor], x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Evaluate ``x[:k]`` with cutoffs; returns (fitness, inf when stopped; fitness to rank by)."""
        m = positive_ranks(k)
        done: list[float] = []  # exact values of this generation (NaN as inf, as ranked)
        values: list[float] = []
        stopped: list[bool] = []
        for i in range(k):
            cutoff = sorted(done)[m - 1] if len(done) >= m else math.inf
            value = float(_scalar(fn(x[i], cutoff), "`fn`"))
            if value == -math.inf:
                raise ValueError(f"`fn` must not return -inf, got it for candidate {i} of generation {self._generation}")
            is_stopped = value == math.inf and cutoff < math.inf
            values.append(value)
            stopped.append(is_stopped)
            if not is_stopped:
                done.append(math.inf if math.isnan(value) else value)
        return self._rank_stopped(values, stopped, done, k)

    def _evaluate_staged(self, fn: Any, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Evaluate ``x[:k]`` with a staged ``fn``, best first (see :meth:`optimize`); as :meth:`_evaluate_early_stop`."""
        m = positive_ranks(k)
        states = [fn.start(x[i]) for i in range(k)]

        def bound(i: int) -> float:
            b = float(states[i].lower_bound)
            return -math.inf if math.isnan(b) else b  # no bound: evaluate

        while True:
            done = sorted(math.inf if math.isnan(b) else b for b in (float(s.lower_bound) for s in states if s.complete))
            cutoff = done[m - 1] if len(done) >= m else math.inf
            open_ = [i for i in range(k) if not states[i].complete and not bound(i) > cutoff]
            if not open_:
                break
            fn.advance(states[min(open_, key=lambda i: (bound(i), i))])
        stopped = [not s.complete for s in states]
        values = [float(_scalar(fn.finish(s), "`fn.finish`")) for s in states]  # once each, in order
        values = [math.inf if s else v for v, s in zip(values, stopped)]
        if -math.inf in values:
            i = values.index(-math.inf)
            raise ValueError(f"`fn` must not return -inf, got it for candidate {i} of generation {self._generation}")
        done = [math.inf if math.isnan(v) else v for v, s in zip(values, stopped) if not s]
        return self._rank_stopped(values, stopped, done, k)

    def _rank_stopped(self, values: list[float], stopped: list[bool], done: list[float], k: int) -> tuple[Tensor, Tensor]:
        """(fitness, inf when stopped; fitness to rank by), ``done``: the complete values (NaN as inf).

        Stopped candidates are ranked with distinct finite values above every completed finite
        one, so each gets the tail utility ``-1/k`` on its own, exactly as it would with its
        (distinct) exact value; ``+inf`` ties would share a mean that can differ by rounding.
        """
        f = self._prepare_fitness(torch.tensor(values, dtype=_DTYPE), k)
        if not any(stopped):
            return f, f
        finite = [v for v in done if v < math.inf]
        level = max(finite) if finite else 0.0
        f_rank = f.clone()
        for i in range(k):
            if stopped[i]:
                level = math.nextafter(level, math.inf)
                f_rank[i] = level
        return f, f_rank

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Complete optimizer state as tensors and plain Python values.

        Safe for ``torch.save`` / ``torch.load(weights_only=True)``. Includes the generator
        state and any pending (asked, not told) samples, so a restored optimizer continues
        exactly like an uninterrupted one.

        Returns:
            The state dictionary.
        """
        return {
            "dim": self.dim,
            "popsize": self.popsize,
            "seed": self.seed,
            "bounds": self.bounds,
            "eta_mu": self.eta_mu,
            "eta_sigma": self.eta_sigma,
            "eta_B": self.eta_B,
            "mean": self._mean.clone(),
            "sigma": self._sigma,
            "B": self._B.clone(),
            "generation": self._generation,
            "evals": self._evals,
            "best_x": None if self._best_x is None else self._best_x.clone(),
            "best_f": self._best_f,
            "rng_state": self._generator.get_state(),
            "pending_z": None if self._pending_z is None else self._pending_z.clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`.

        The whole run state is restored, including ``popsize``, ``bounds``, ``seed`` and the
        learning rates; only ``dim`` must match this instance.

        Args:
            state_dict: The state to restore.

        Raises:
            KeyError: If a key is missing.
            ValueError: If ``dim`` differs from this instance's, or a tensor has the wrong shape.
        """
        dim = state_dict["dim"]
        if dim != self.dim:
            raise ValueError(f"state_dict `dim` is {dim!r}, but this XNES has dim={self.dim}")
        popsize = int(state_dict["popsize"])
        mean = torch.as_tensor(state_dict["mean"], dtype=_DTYPE).clone()
        b = torch.as_tensor(state_dict["B"], dtype=_DTYPE).clone()
        if tuple(mean.shape) != (dim,):
            raise ValueError(f"state_dict `mean` must have shape ({dim},), got {tuple(mean.shape)}")
        if tuple(b.shape) != (dim, dim):
            raise ValueError(f"state_dict `B` must have shape ({dim}, {dim}), got {tuple(b.shape)}")
        pending = state_dict["pending_z"]
        if pending is not None:
            pending = torch.as_tensor(pending, dtype=_DTYPE).clone()
            if tuple(pending.shape) != (popsize, dim):
                raise ValueError(
                    f"state_dict `pending_z` must have shape ({popsize}, {dim}), got {tuple(pending.shape)}"
                )
        best_x = state_dict["best_x"]
        bounds = state_dict["bounds"]
        self.popsize = popsize
        self.seed = int(state_dict["seed"])
        self.bounds = None if bounds is None else (float(bounds[0]), float(bounds[1]))
        self.eta_mu = float(state_dict["eta_mu"])
        self.eta_sigma = float(state_dict["eta_sigma"])
        self.eta_B = float(state_dict["eta_B"])
        self._mean = mean
        self._sigma = float(state_dict["sigma"])
        self._B = b
        self._generation = int(state_dict["generation"])
        self._evals = int(state_dict["evals"])
        self._best_x = None if best_x is None else torch.as_tensor(best_x, dtype=_DTYPE).clone()
        self._best_f = float(state_dict["best_f"])
        self._pending_z = pending
        self._generator.set_state(torch.as_tensor(state_dict["rng_state"], dtype=torch.uint8).clone())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dim={self.dim}, popsize={self.popsize}, sigma={self._sigma:.4g}, "
            f"bounds={self.bounds}, generation={self._generation}, evals={self._evals}, best_f={self._best_f:.4g})"
        )
