"""Tests for snapvit_lightning.xnes (the xNES optimizer)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from snapvit_lightning.xnes import XNES, default_learning_rates, default_popsize, positive_ranks, rank_utilities

F64 = torch.float64


def sphere(x: torch.Tensor) -> torch.Tensor:
    return (x**2).sum()


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2).sum()


def _rotated_ellipsoid(d: int, condition: float, seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return q @ torch.diag(torch.logspace(0, math.log10(condition), d, dtype=F64)) @ q.T


def _step(es: XNES, fn) -> torch.Tensor:
    x = es.ask()
    es.tell(torch.stack([fn(xi) for xi in x]))
    return x


# ---------------------------------------------------------------------- defaults


def test_defaults_follow_the_paper() -> None:
    for d in (1, 2, 10, 156):
        assert default_popsize(d) == 4 + math.floor(3 * math.log(d))
        eta_mu, eta_sigma, eta_b = default_learning_rates(d)
        assert eta_mu == 1.0
        assert eta_sigma == eta_b == pytest.approx((9 + 3 * math.log(d)) / (5 * d * math.sqrt(d)))
    es = XNES(10, mean=torch.ones(10))
    assert es.popsize == default_popsize(10) == 10
    assert es.sigma == 0.1
    assert es.bounds == (0.0, 2.0)
    assert (es.eta_mu, es.eta_sigma, es.eta_B) == default_learning_rates(10)
    assert torch.equal(es.B, torch.eye(10, dtype=F64))
    assert es.generation == es.evals == 0 and es.best_x is None and es.best_f == math.inf


def test_rank_utilities() -> None:
    f = torch.tensor([3.0, 1.0, 2.0, 5.0, 4.0, 0.0], dtype=F64)
    u = rank_utilities(f)
    assert u.sum().abs() < 1e-12
    order = torch.argsort(f)
    assert torch.all(u[order][:-1] >= u[order][1:])  # better fitness -> larger utility
    assert u[5] > u[1] > 0 > u[2]  # of six, only the best two get positive utility
    # Ties share the mean of their ranks' utilities and do not depend on order.
    tied = rank_utilities(torch.tensor([1.0, 0.0, 1.0, math.inf, math.inf], dtype=F64))
    assert tied[0] == tied[2] and tied[3] == tied[4]
    assert tied.sum().abs() < 1e-12


# ---------------------------------------------------------------------- convergence


@pytest.mark.parametrize(
    ("name", "fn", "dim", "mean", "sigma", "budget", "x_opt"),
    [
        ("sphere", sphere, 10, 3.0, 1.0, 8000, 0.0),
        ("rosenbrock-2", rosenbrock, 2, 0.0, 0.5, 2000, 1.0),
        ("rosenbrock-5", rosenbrock, 5, 0.0, 0.5, 6000, 1.0),
    ],
)
def test_unbounded_convergence(name, fn, dim, mean, sigma, budget, x_opt) -> None:
    es = XNES(dim, mean=torch.full((dim,), mean), sigma=sigma, bounds=None, seed=0)
    best_x, best_f = es.optimize(fn, budget)
    assert es.evals == budget
    assert best_f < 1e-6, name
    assert torch.allclose(best_x, torch.full((dim,), x_opt, dtype=F64), atol=1e-3), name


def test_rotated_ellipsoid_convergence() -> None:
    h = _rotated_ellipsoid(5, 1e3)
    es = XNES(5, mean=torch.full((5,), 2.0), sigma=1.0, bounds=None, seed=0)
    best_x, best_f = es.optimize(lambda x: 0.5 * x @ h @ x, 3000)
    assert best_f < 1e-6
    assert best_x.abs().max() < 1e-3
    # The learned covariance has adapted to the ill-conditioning (condition >> 1).
    eig = torch.linalg.eigvalsh(es.covariance)
    assert eig[-1] / eig[0] > 100


def test_bounded_sphere_interior_optimum() -> None:
    target = torch.full((10,), 1.3, dtype=F64)
    es = XNES(10, mean=torch.ones(10), sigma=0.1, bounds=(0.0, 2.0), seed=0)
    best_x, best_f = es.optimize(lambda x: ((x - target) ** 2).sum(), 6000)
    assert best_f < 1e-6
    assert torch.allclose(best_x, target, atol=1e-3)


def test_bounded_candidates_are_clipped_and_boundary_optimum_found() -> None:
    target = torch.tensor([2.5, 1.0, -0.7], dtype=F64)  # outside [0, 2] in two coordinates
    es = XNES(3, mean=torch.ones(3), sigma=1.0, bounds=(0.0, 2.0), seed=0)
    for _ in range(20):
        x = _step(es, lambda x: ((x - target) ** 2).sum())
        assert x.min() >= 0.0 and x.max() <= 2.0
    best_x, _ = es.optimize(lambda x: ((x - target) ** 2).sum(), 1500)
    assert torch.allclose(best_x, torch.tensor([2.0, 1.0, 0.0], dtype=F64), atol=1e-3)


def test_learned_covariance_aligns_with_inverse_hessian() -> None:
    hessian = 10.0 * torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=F64)
    es = XNES(2, mean=torch.tensor([1.0, -0.5]), sigma=0.5, bounds=None, seed=0)
    es.optimize(lambda x: 0.5 * x @ hessian @ x, 600)
    _, v_cov = torch.linalg.eigh(es.covariance)
    _, v_inv_h = torch.linalg.eigh(torch.linalg.inv(hessian))
    assert abs(float(v_cov[:, -1] @ v_inv_h[:, -1])) > 0.95  # same principal direction
    corr = es.correlation
    assert torch.allclose(torch.diagonal(corr), torch.ones(2, dtype=F64))
    assert corr[0, 1] < -0.8  # inverse Hessian's correlation is -0.9


# ---------------------------------------------------------------------- determinism / checkpointing


def _trajectory(seed: int, generations: int = 15) -> list[torch.Tensor]:
    es = XNES(4, mean=torch.ones(4), sigma=0.3, seed=seed)
    return [_step(es, rosenbrock) for _ in range(generations)] + [es.mean, es.B]


def test_same_seed_same_trajectory_different_seed_differs() -> None:
    a, b, c = _trajectory(0), _trajectory(0), _trajectory(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_ask_is_idempotent_until_tell_and_tell_needs_ask() -> None:
    es = XNES(3, mean=torch.ones(3), seed=0)
    with pytest.raises(RuntimeError, match="call `ask` first"):
        es.tell(torch.zeros(es.popsize))
    x1 = es.ask()
    assert es.pending
    assert torch.equal(x1, es.ask())
    es.tell(torch.arange(es.popsize, dtype=F64))
    assert not es.pending and es.generation == 1 and es.evals == es.popsize
    assert not torch.equal(x1, es.ask())


@pytest.mark.parametrize("between_ask_and_tell", [False, True])
def test_save_restore_continues_exactly(tmp_path: Path, between_ask_and_tell: bool) -> None:
    fn = rosenbrock
    reference = XNES(5, mean=torch.ones(5), sigma=0.2, seed=7)
    ref_x = [_step(reference, fn) for _ in range(20)]

    es = XNES(5, mean=torch.ones(5), sigma=0.2, seed=7)
    for _ in range(8):
        _step(es, fn)
    if between_ask_and_tell:
        es.ask()
    path = tmp_path / "xnes.pt"
    torch.save(es.state_dict(), path)
    del es

    restored = XNES(5, mean=torch.zeros(5), sigma=1.0, seed=123, popsize=3)  # overwritten by the state
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.pending == between_ask_and_tell
    cont_x = [_step(restored, fn) for _ in range(12)]

    for x, y in zip(ref_x[8:], cont_x):
        assert torch.equal(x, y)
    assert torch.equal(reference.mean, restored.mean)
    assert torch.equal(reference.B, restored.B)
    assert reference.sigma == restored.sigma
    assert torch.equal(reference.best_x, restored.best_x)
    assert reference.best_f == restored.best_f
    assert (reference.generation, reference.evals) == (restored.generation, restored.evals)


def test_fresh_state_roundtrips_with_weights_only(tmp_path: Path) -> None:
    es = XNES(3, bounds=None)
    torch.save(es.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    assert state["best_x"] is None and state["pending_z"] is None and state["bounds"] is None
    other = XNES(3)
    other.load_state_dict(state)
    assert other.bounds is None
    assert torch.equal(other.ask(), es.ask())


def test_load_state_dict_rejects_other_dim() -> None:
    with pytest.raises(ValueError, match="dim"):
        XNES(4).load_state_dict(XNES(3).state_dict())


def test_optimize_resume_and_partial_generation() -> None:
    es = XNES(4, mean=torch.ones(4), sigma=0.3, seed=0)  # popsize 8
    assert es.popsize == 8
    es.optimize(sphere, 40)
    assert (es.evals, es.generation) == (40, 5)
    resumed = XNES(4)
    resumed.load_state_dict(es.state_dict())
    resumed.optimize(sphere, 80)
    straight = XNES(4, mean=torch.ones(4), sigma=0.3, seed=0)
    straight.optimize(sphere, 80)
    assert torch.equal(resumed.mean, straight.mean) and resumed.best_f == straight.best_f

    # A partial last generation: 3 of 8 evaluated, updated with a population of 3.
    straight.optimize(sphere, 83)
    assert (straight.evals, straight.generation, straight.pending) == (83, 11, False)
    # A single leftover evaluation is recorded without an update.
    straight.optimize(sphere, 84)
    assert (straight.evals, straight.generation, straight.pending) == (84, 11, False)


# ---------------------------------------------------------------------- initial covariance


def test_given_covariance_is_respected() -> None:
    cov = torch.tensor([[4.0, 1.2, 0.0], [1.2, 1.0, -0.3], [0.0, -0.3, 0.5]], dtype=F64)
    es = XNES(3, mean=torch.zeros(3), sigma=0.5, cov=cov, bounds=None)
    assert torch.allclose(es.covariance, 0.25 * cov, atol=1e-12)
    assert torch.linalg.det(es.B) == pytest.approx(1.0, abs=1e-12)
    assert es.sigma == pytest.approx(0.5 * torch.linalg.det(cov).item() ** (1 / 6))
    # A continuation from an earlier run's covariance: cov=prev.covariance, sigma=1.
    again = XNES(3, sigma=1.0, cov=es.covariance, bounds=None)
    assert torch.allclose(again.covariance, es.covariance, atol=1e-12)
    # The samples really follow N(mean, sigma^2 cov).
    big = XNES(3, mean=torch.zeros(3), sigma=1.0, cov=cov, popsize=20000, bounds=None, seed=0)
    x = big.ask()
    assert torch.allclose(torch.cov(x.T), cov, atol=0.1)


def test_correlation_property_normalises_covariance() -> None:
    cov = torch.tensor([[4.0, 1.0], [1.0, 1.0]], dtype=F64)
    corr = XNES(2, sigma=3.0, cov=cov).correlation
    assert torch.allclose(corr, torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=F64))


# ---------------------------------------------------------------------- fitness handling


def test_nan_is_ranked_worst_and_neg_inf_rejected() -> None:
    es = XNES(2, mean=torch.ones(2), bounds=None, seed=0, popsize=4)
    x = es.ask()
    es.tell(torch.tensor([math.nan, 1.0, math.inf, 2.0]))
    assert es.best_f == 1.0 and torch.equal(es.best_x, x[1])
    assert math.isfinite(es.sigma) and torch.isfinite(es.mean).all()
    es.ask()
    with pytest.raises(ValueError, match="-inf"):
        es.tell(torch.tensor([-math.inf, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"`fitnesses` must have shape \(4,\), got \(3,\)"):
        es.tell(torch.zeros(3))
    with pytest.raises(ValueError, match=r"shape \(4,\), got \(4, 1\)"):
        es.tell(torch.zeros(4, 1))
    with pytest.raises(TypeError, match="`fitnesses` must be a tensor or a sequence of floats, got 'bad'"):
        es.tell("bad")  # type: ignore[arg-type]
    assert es.pending  # failed tells leave the generation pending
    es.tell([3.0, 2.0, 1.0, 0.5])  # a plain sequence works too
    assert es.best_f == 0.5


def test_all_nan_generation_keeps_distribution() -> None:
    es = XNES(2, mean=torch.ones(2), bounds=None, seed=0, popsize=4)
    es.ask()
    es.tell(torch.full((4,), math.nan))
    assert torch.equal(es.mean, torch.ones(2, dtype=F64)) and es.sigma == 0.1
    assert es.best_x is None and es.best_f == math.inf


# ---------------------------------------------------------------------- argument validation


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dim": 0}, ValueError, r"`dim` must be >= 1, got 0"),
        ({"dim": 2.0}, TypeError, r"`dim` must be an int, got 2.0"),
        ({"dim": 2, "sigma": 0.0}, ValueError, r"`sigma` must be a finite number > 0, got 0.0"),
        ({"dim": 2, "sigma": -1}, ValueError, r"`sigma` must be a finite number > 0, got -1"),
        ({"dim": 2, "sigma": math.inf}, ValueError, r"`sigma` must be a finite number > 0, got inf"),
        ({"dim": 2, "sigma": "big"}, TypeError, r"`sigma` must be a float, got 'big'"),
        ({"dim": 2, "popsize": 1}, ValueError, r"`popsize` must be >= 2, got 1"),
        ({"dim": 2, "popsize": 4.0}, TypeError, r"`popsize` must be an int or None, got 4.0"),
        ({"dim": 2, "mean": torch.zeros(3)}, ValueError, r"`mean` must have shape \(2,\), got \(3,\)"),
        ({"dim": 2, "mean": [0.0, 0.0]}, TypeError, r"`mean` must be a torch.Tensor"),
        ({"dim": 2, "mean": torch.tensor([0.0, math.nan])}, ValueError, r"`mean` must be finite"),
        ({"dim": 2, "cov": torch.eye(3)}, ValueError, r"`cov` must have shape \(2, 2\), got \(3, 3\)"),
        ({"dim": 2, "cov": torch.tensor([[1.0, 2.0], [2.0, 1.0]])}, ValueError, r"`cov` must be positive definite"),
        ({"dim": 2, "cov": torch.tensor([[1.0, 0.5], [0.0, 1.0]])}, ValueError, r"`cov` must be symmetric"),
        ({"dim": 2, "bounds": (2.0, 0.0)}, ValueError, r"`bounds` must be \(lo, hi\) with finite lo < hi"),
        ({"dim": 2, "bounds": (0.0, math.inf)}, ValueError, r"`bounds` must be \(lo, hi\) with finite lo < hi"),
        ({"dim": 2, "bounds": (0.0,)}, TypeError, r"`bounds` must be a \(lo, hi\) tuple or None"),
        ({"dim": 2, "seed": 0.5}, TypeError, r"`seed` must be an int, got 0.5"),
        ({"dim": 2, "eta_sigma": 0.0}, ValueError, r"`eta_sigma` must be a finite number > 0, got 0.0"),
    ],
)
def test_invalid_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        XNES(**kwargs)


@pytest.mark.parametrize(
    ("max_evals", "error", "match"),
    [(0, ValueError, r"`max_evals` must be >= 1, got 0"), (10.0, TypeError, r"`max_evals` must be an int")],
)
def test_optimize_invalid_budget(max_evals, error, match) -> None:
    with pytest.raises(error, match=match):
        XNES(2).optimize(sphere, max_evals)


def test_optimize_rejects_non_scalar_and_non_callable() -> None:
    with pytest.raises(ValueError, match="`fn` must return a scalar"):
        XNES(2).optimize(lambda x: x, 10)
    with pytest.raises(TypeError, match="`fn` must be callable"):
        XNES(2).optimize("sphere", 10)  # type: ignore[arg-type]


# ---------------------------------------------------------------------- exact early stop


def test_positive_ranks_is_where_rank_utilities_become_flat() -> None:
    assert [positive_ranks(n) for n in (1, 2, 3, 16, 17)] == [1, 1, 2, 8, 9]
    for n in range(1, 70):
        m = positive_ranks(n)
        u = rank_utilities(torch.arange(n, dtype=F64))  # distinct, already sorted: u[k-1] is rank k
        assert 1 <= m <= n
        assert torch.all(u[m:] == -1.0 / n), n  # below the m best: all the same utility, exactly
        if m < n:
            assert u[m - 1] > u[m], n  # the m-th best still gets more
    with pytest.raises(ValueError, match=r"`n` must be >= 1, got 0"):
        positive_ranks(0)
    with pytest.raises(TypeError, match=r"`n` must be an int, got 2.0"):
        positive_ranks(2.0)  # type: ignore[arg-type]


def _terms(x: torch.Tensor) -> torch.Tensor:
    """Non-negative terms of a separable objective, the largest weights first."""
    return ((x - torch.linspace(0.2, 1.8, x.numel(), dtype=F64)) ** 2 * torch.arange(1, x.numel() + 1, dtype=F64)).flip(0)


def _rounded(total: float, quantum: float | None) -> float:
    """``total`` rounded down to a multiple of ``quantum`` (ties become frequent); monotone."""
    return total if quantum is None else math.floor(total / quantum) * quantum


def _separable(quantum: float | None):
    """A separable objective of non-negative terms, and an ``fn(x, cutoff)`` that stops on partial sums.

    ``quantum``: round the value down to a multiple of it, which makes ties frequent.
    """

    def full(x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(_rounded(float(_terms(x).flip(0).sum()), quantum), dtype=F64)

    calls = {"cutoffs": [], "stopped": 0, "values": [], "stages": 0}

    def partial(x: torch.Tensor, cutoff: float) -> torch.Tensor:
        calls["cutoffs"].append(cutoff)
        t = _terms(x)
        total = 0.0
        for j in range(t.numel()):
            total += float(t[j])
            calls["stages"] += 1
            if _rounded(total, quantum) > cutoff and j < t.numel() - 1:
                calls["stopped"] += 1
                calls["values"].append(math.inf)
                return torch.tensor(math.inf, dtype=F64)
        value = full(x)
        calls["values"].append(float(value))
        return value

    return full, partial, calls


class _Stage:
    """A staged evaluation of :func:`_separable`'s objective: one term per stage."""

    def __init__(self, x: torch.Tensor, quantum: float | None, full) -> None:
        self.x, self.t, self.quantum, self.full = x.clone(), _terms(x), quantum, full
        self.j, self.total = 1, float(self.t[0])

    @property
    def complete(self) -> bool:
        return self.j == self.t.numel()

    @property
    def lower_bound(self) -> float:
        return float(self.full(self.x)) if self.complete else _rounded(self.total, self.quantum)


class _StagedSeparable:
    """:func:`_separable`'s objective as a staged one (``start``/``advance``/``finish``), logging its calls."""

    def __init__(self, quantum: float | None) -> None:
        self.quantum = quantum
        self.full, _, _ = _separable(quantum)
        self.starts, self.advances, self.values, self.stages = 0, [], [], 0

    def start(self, x: torch.Tensor) -> _Stage:
        self.starts += 1
        self.stages += 1
        return _Stage(x, self.quantum, self.full)

    def advance(self, state: _Stage) -> None:
        assert not state.complete
        self.advances.append((self.starts, state.lower_bound))  # (candidates started so far, bound before)
        state.total += float(state.t[state.j])
        state.j += 1
        self.stages += 1

    def finish(self, state: _Stage) -> torch.Tensor:
        value = float(self.full(state.x)) if state.complete else math.inf
        self.values.append(value)
        return torch.tensor(value, dtype=F64)


@pytest.mark.parametrize("quantum", [None, 0.05])
@pytest.mark.parametrize("max_evals", [80, 85, 81])  # whole generations; a truncated last one; one left over
def test_optimize_early_stop_is_bitwise_exact(quantum, max_evals) -> None:
    full, partial, calls = _separable(quantum)
    kw = dict(mean=torch.ones(6, dtype=F64), sigma=0.4, popsize=10, bounds=(0.0, 2.0), seed=0)
    plain, early = XNES(6, **kw), XNES(6, **kw)
    plain_values = []
    best_plain = plain.optimize(lambda x: plain_values.append(float(full(x))) or full(x), max_evals)
    best_early = early.optimize(partial, max_evals, early_stop=True)
    assert calls["stopped"] > 0  # the test can fail
    # (with seed 0 some generation stops 3 of 10: ranked as 3 tied +inf, their shared mean utility
    # would differ from -1/10 by rounding and the update would not be bitwise the same)
    assert torch.equal(best_plain[0], best_early[0]) and best_plain[1] == best_early[1]
    for name in ("mean", "B", "covariance"):
        assert torch.equal(getattr(plain, name), getattr(early, name)), name
    assert (plain.sigma, plain.generation, plain.evals) == (early.sigma, early.generation, early.evals)
    # every stopped candidate was certainly worse than the m-th best completed of its generation,
    # and the cutoffs were exactly those
    start = 0
    while start < max_evals:
        k = min(10, max_evals - start)
        m = positive_ranks(k)
        done = []
        for i in range(start, start + k):
            assert calls["cutoffs"][i] == (sorted(done)[m - 1] if len(done) >= m else math.inf)
            if calls["values"][i] == math.inf:
                assert plain_values[i] > calls["cutoffs"][i]
            else:
                assert calls["values"][i] == plain_values[i]
                done.append(plain_values[i])
        start += k
    if quantum is not None:
        assert len(set(plain_values)) < len(plain_values)  # ties did occur


def test_optimize_early_stop_errors() -> None:
    with pytest.raises(TypeError, match=r"`early_stop` must be a bool, got 1"):
        XNES(2).optimize(lambda x, c: sphere(x), 10, early_stop=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`fn` must not return -inf, got it for candidate 0"):
        XNES(2).optimize(lambda x, c: -math.inf, 10, early_stop=True)
    with pytest.raises(ValueError, match="`fn` must return a scalar"):
        XNES(2).optimize(lambda x, c: x, 10, early_stop=True)


@pytest.mark.parametrize("quantum", [None, 0.05])
@pytest.mark.parametrize("max_evals", [80, 85, 81])  # whole generations; a truncated last one; one left over
def test_optimize_staged_early_stop_is_bitwise_exact_and_stops_more(quantum, max_evals) -> None:
    full, partial, calls = _separable(quantum)
    staged = _StagedSeparable(quantum)
    kw = dict(mean=torch.ones(6, dtype=F64), sigma=0.4, popsize=10, bounds=(0.0, 2.0), seed=0)
    plain, each, early = XNES(6, **kw), XNES(6, **kw), XNES(6, **kw)
    plain_values = []
    best_plain = plain.optimize(lambda x: plain_values.append(float(full(x))) or full(x), max_evals)
    each.optimize(partial, max_evals, early_stop=True)
    best_early = early.optimize(staged, max_evals, early_stop=True)
    assert torch.equal(best_plain[0], best_early[0]) and best_plain[1] == best_early[1]
    for name in ("mean", "B", "covariance"):
        assert torch.equal(getattr(plain, name), getattr(early, name)), name
    assert (plain.sigma, plain.generation, plain.evals) == (early.sigma, early.generation, early.evals)
    # more stopped, fewer stages than candidate after candidate (the test can fail)
    stopped = sum(v == math.inf for v in staged.values)
    assert stopped > calls["stopped"] > 0 and staged.stages < calls["stages"]
    assert staged.starts == len(staged.values) == max_evals  # finished once each
    # per generation: the final cutoff is the m-th best; stopped ones are certainly above it, the
    # others exact; and best first never advanced a candidate whose bound was above it
    start = 0
    while start < max_evals:
        k = min(10, max_evals - start)
        cutoff = sorted(plain_values[start : start + k])[positive_ranks(k) - 1]
        for i in range(start, start + k):
            if staged.values[i] == math.inf:
                assert plain_values[i] > cutoff
            else:
                assert staged.values[i] == plain_values[i]
        advances = [b for started, b in staged.advances if start < started <= start + k]
        assert all(b <= cutoff for b in advances)
        start += k
    if quantum is not None:
        assert len(set(plain_values)) < len(plain_values)  # ties did occur


def test_optimize_staged_protocol() -> None:
    staged = _StagedSeparable(None)
    assert not callable(staged)
    XNES(6, popsize=4, seed=1).optimize(staged, 8, early_stop=True)  # staged objects need not be callable
    with pytest.raises(TypeError, match="`fn` must be callable"):
        XNES(6).optimize(staged, 8)  # without early stop they must
    early = XNES(6, popsize=4, seed=1)
    early.optimize(staged, 1, early_stop=True)  # one candidate: evaluated completely
    assert staged.values[-1] < math.inf and early.evals == 1

    class Bad(_StagedSeparable):
        def finish(self, state):
            return torch.zeros(2, dtype=F64)

    with pytest.raises(ValueError, match=r"`fn.finish` must return a scalar, got a tensor of shape \(2,\)"):
        XNES(6).optimize(Bad(None), 8, early_stop=True)

    class Minus(_StagedSeparable):
        def finish(self, state):
            return -math.inf

    with pytest.raises(ValueError, match=r"`fn` must not return -inf, got it for candidate \d+ of generation 0"):
        XNES(6).optimize(Minus(None), 8, early_stop=True)
