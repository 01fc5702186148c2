"""OBS greedy removal: its step costs are the refit errors, its order is nested, its scores fit the model."""

import pytest
import torch

from snapvit_lightning.correction import augmented_weight, collect_stats
from snapvit_lightning.obs import greedy_removal, obs_scores


def _refit_error(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damping: float) -> float:
    """E||W x~ - W' x~_kept||^2 for the least-squares W' of the damped problem (bias column always kept)."""
    n = gram.shape[0] - 1
    g = gram.clone()
    diag = torch.diagonal(g)[:n]
    diag += damping * float(diag.mean())
    cols = torch.cat([kept, torch.tensor([n])])
    # Minimise tr((W - W'P) G (W - W'P)^T) over W' on the kept columns P (damped G throughout).
    solution = torch.linalg.solve(g[cols][:, cols], (weight @ g[:, cols]).T).T
    full = torch.zeros_like(weight)
    full[:, cols] = solution
    delta = weight - full
    return float(torch.trace(delta @ g @ delta.T))


@pytest.mark.parametrize("group", [1, 4])
def test_step_costs_add_up_to_the_refit_error_of_each_prefix(group: int) -> None:
    torch.manual_seed(0)
    n, out, tokens = 24, 7, 200
    x = torch.cat([torch.randn(tokens, n, dtype=torch.float64) @ torch.randn(n, n, dtype=torch.float64),
                   torch.ones(tokens, 1, dtype=torch.float64)], 1)
    gram = x.T @ x / tokens
    weight = torch.randn(out, n + 1, dtype=torch.float64)
    order, costs = greedy_removal(weight, gram, group, damping=0.01)
    assert sorted(order.tolist()) == list(range(n // group))
    assert bool((costs >= 0).all())
    for k in range(1, n // group):
        removed = order[:k]
        kept_units = torch.tensor(sorted(set(range(n // group)) - set(removed.tolist())))
        kept = (kept_units[:, None] * group + torch.arange(group)).flatten()
        assert float(costs[:k].sum()) == pytest.approx(_refit_error(weight, gram, kept, 0.01), rel=1e-6, abs=1e-9)


def _random_layer(seed: int, n: int, tokens: int, outputs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An augmented ``[outputs, n+1]`` weight and the augmented Gram of ``tokens`` random inputs."""
    torch.manual_seed(seed)
    x = torch.cat([torch.randn(tokens, n, dtype=torch.float64), torch.ones(tokens, 1, dtype=torch.float64)], 1)
    return torch.randn(outputs, n + 1, dtype=torch.float64), x.T @ x / tokens


def test_each_step_removes_the_cheapest_unit() -> None:
    n = 10
    weight, gram = _random_layer(1, n, 100, 3)
    order, costs = greedy_removal(weight, gram, 1, damping=0.01)
    first = min(range(n), key=lambda q: _refit_error(weight, gram, torch.tensor([i for i in range(n) if i != q]), 0.01))
    assert int(order[0]) == first


@pytest.mark.parametrize("key", ["test_vit", "test_vit2"])  # test_vit2: LayerScale
def test_obs_scores_rank_a_model_with_its_own_statistics(key: str) -> None:
    from snapvit_lightning.correction import stats_damping
    from snapvit_lightning.scores import _descending

    model, _, stats = _tiny_with_stats(key)
    scores = obs_scores(model, stats, chunks=4)
    blocks = len(model.blocks)
    assert scores.mlp.shape == (blocks, model.blocks[0].mlp.fc2.in_features)
    assert scores.heads.shape == (blocks, model.blocks[0].attn.num_heads)
    assert scores.criterion == "obs"
    # Every block's ranking is the greedy's whole order, run as obs_scores runs it (its automatic
    # damping, chunks, float32, the LayerScale gamma on the residual branch): the last removed first.
    damping = stats_damping(None, stats)
    for b, block in enumerate(model.blocks):
        for layer, gram, group, ranked, ls in ((block.mlp.fc2, stats.mlp[b], 1, scores.mlp[b], "ls2"),
                                               (block.attn.proj, stats.attn[b], block.attn.head_dim, scores.heads[b], "ls1")):
            weight = augmented_weight(layer)
            gamma = getattr(getattr(block, ls, None), "gamma", None)
            assert (gamma is not None) == (key == "test_vit2")
            if gamma is not None:
                weight = weight * gamma.double()[:, None]
            units = (gram.shape[0] - 1) // group
            order, _ = greedy_removal(weight, gram, group, damping, chunk=max(1, units // 4), dtype=torch.float32)
            assert torch.equal(_descending(ranked[None])[0], order.flip(0))


def test_a_step_cheaper_than_an_earlier_one_still_keeps_the_later_removed_unit() -> None:
    # The running maximum tied such steps, and the ranking's stable sort then kept the unit of lower
    # index: at some widths the kept set was not the greedy's last removed units.
    from snapvit_lightning.obs import _unit_scores
    from snapvit_lightning.scores import ImportanceScores

    order = torch.tensor([2, 0, 1, 4, 3, 5])
    costs = torch.tensor([1.0, 3.0, 2.0, 2.5, 4.0, 0.0], dtype=torch.float64)
    scores = _unit_scores(order, costs, divisor=2.0)
    along = scores[order]
    assert bool((along[1:] > along[:-1]).all())
    assert float(along[1]) == 1.5 and float(along[2]) == pytest.approx(1.5, rel=1e-15)  # lifted, not moved
    ranked = ImportanceScores(scores[None], torch.ones(1, 2), min_mlp_keep=0.0, min_head_keep=0.5)
    for kept in range(1, 7):
        assert set(ranked.block_orders()[0][0, :kept].tolist()) == set(order[-kept:].tolist())


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        greedy_removal(torch.zeros(2, 5), torch.eye(6), 1)
    with pytest.raises(ValueError, match="do not fit"):
        greedy_removal(torch.zeros(2, 6), torch.eye(6), 2)


def test_chunks_remove_the_cheapest_units_together_and_still_order_every_unit() -> None:
    n = 32
    weight, gram = _random_layer(2, n, 150, 5)
    order, costs = greedy_removal(weight, gram, 1, damping=0.01, chunk=8)
    exact, exact_costs = greedy_removal(weight, gram, 1, damping=0.01)
    assert sorted(order.tolist()) == list(range(n))
    assert int(order[0]) == int(exact[0]) and float(costs[0]) == pytest.approx(float(exact_costs[0]))
    assert costs[:8].tolist() == sorted(costs[:8].tolist())  # a chunk is listed cheapest first


def _tiny_with_stats(key: str = "test_vit2"):
    from conftest import model_input, tiny_model

    model, _, _ = tiny_model(key)
    images = model_input(model, batch=5, seed=4)
    return model, images, collect_stats(model, images)


def test_stream_energy_is_the_mean_squared_norm_after_each_block() -> None:
    from snapvit_lightning.correction import _block_input
    from snapvit_lightning.obs import stream_energy

    model, images, _ = _tiny_with_stats()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    energy = stream_energy(model, images, batch_size=2)  # batches of 2, 2, 1: the mean is over all tokens
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert energy.dtype == torch.float64 and energy.shape == (len(model.blocks),)
    model.eval()
    with torch.no_grad():
        x = _block_input(model, images)
        expected = []
        for block in model.blocks:
            x = block(x)
            expected.append(x.double().pow(2).sum(-1).mean())
    torch.testing.assert_close(energy, torch.stack(expected), rtol=1e-6, atol=0.0)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        stream_energy(model, images, batch_size=0)


def test_corrected_ranking_divides_each_block_by_its_stream_energy() -> None:
    from snapvit_lightning.obs import RANKING_CRITERION, corrected_ranking, stream_energy, with_ranking

    model, images, stats = _tiny_with_stats()
    ranking = corrected_ranking(model, stats, images, min_mlp_keep=0.1, min_head_keep=0.5)
    plain = obs_scores(model, stats)
    energy = stream_energy(model, images)
    assert ranking.criterion == RANKING_CRITERION == "obs-stream"
    assert (ranking.min_mlp_keep, ranking.min_head_keep) == (0.1, 0.5)
    torch.testing.assert_close(ranking.mlp, plain.mlp / energy[:, None], rtol=1e-12, atol=0.0)
    torch.testing.assert_close(ranking.heads, plain.heads / energy[:, None], rtol=1e-12, atol=0.0)
    # Within a block the order is the OBS order; across blocks the scale moves the global ranking.
    assert torch.equal(ranking.mlp.argsort(1), plain.mlp.argsort(1))
    stored = with_ranking(model, stats, images, min_mlp_keep=0.1, min_head_keep=0.5)
    assert stored.has_ranking and not stats.has_ranking  # a copy; the statistics given are unchanged
    assert torch.equal(stored.ranking_mlp, ranking.mlp) and torch.equal(stored.ranking_heads, ranking.heads)
    assert stored.mlp is stats.mlp and stored.fingerprint == stats.fingerprint


def test_the_statistics_pass_gives_the_stream_energy_of_the_same_inputs() -> None:
    """collect_stats(with_energy=True) saves the ranking its second forward pass: the same numbers, bit for bit."""
    from snapvit_lightning.correction import collect_stats
    from snapvit_lightning.obs import stream_energy, with_ranking

    model, images, _ = _tiny_with_stats()
    stats, energy = collect_stats(model, images, batch_size=2, with_energy=True)
    assert torch.equal(energy, stream_energy(model, images, batch_size=2))
    alone = collect_stats(model, images, batch_size=2)
    assert all(torch.equal(a, b) for a, b in zip((stats.attn, stats.mlp), (alone.attn, alone.mlp)))
    ranked = with_ranking(model, stats, images, min_mlp_keep=0.1, min_head_keep=0.5, energy=energy)
    again = with_ranking(model, stats, images, min_mlp_keep=0.1, min_head_keep=0.5, batch_size=2)
    assert torch.equal(ranked.ranking_mlp, again.ranking_mlp) and torch.equal(ranked.ranking_heads, again.ranking_heads)


@pytest.mark.parametrize("group", [1, 4])
def test_float32_greedy_follows_the_float64_one(group: int) -> None:
    weight, gram = _random_layer(3, 48, 400, 6)
    order, costs = greedy_removal(weight, gram, group, damping=0.01, chunk=2, dtype=torch.float32)
    exact, exact_costs = greedy_removal(weight, gram, group, damping=0.01, chunk=2)
    assert costs.dtype == torch.float64
    assert order.tolist() == exact.tolist()
    torch.testing.assert_close(costs, exact_costs, rtol=1e-4, atol=1e-7)


def test_greedy_refuses_other_dtypes() -> None:
    weight, gram = _random_layer(0, 4, 20, 2)
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float64, got torch.float16"):
        greedy_removal(weight, gram, 1, dtype=torch.float16)
    for kwargs in ({"chunk": 0}, {"chunk": -1}, {"chunk": 2.5}, {"group": 0}):  # chunk=0 looped forever
        name, value = next(iter(kwargs.items()))
        with pytest.raises(ValueError, match=rf"{name} must be an int >= 1, got {value}"):
            greedy_removal(weight, gram, **kwargs)
    for damping in (-1.0, float("nan"), float("inf")):  # torch's Cholesky or solve error before
        with pytest.raises(ValueError, match=rf"damping must be a finite number >= 0, got {damping}"):
            greedy_removal(weight, gram, damping=damping)
    import numpy as np

    order, _ = greedy_removal(weight, gram, np.int64(1), chunk=torch.tensor(2))  # integers of numpy and torch count
    assert sorted(order.tolist()) == list(range(4))


def test_greedy_runs_at_full_float32_precision_where_a_run_enabled_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    cholesky = torch.linalg.cholesky
    monkeypatch.setattr(torch.linalg, "cholesky", lambda g: seen.append(torch.get_float32_matmul_precision()) or cholesky(g))
    weight, gram = _random_layer(0, 8, 40, 2)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        greedy_removal(weight, gram, 1, dtype=torch.float32)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert seen == ["highest"]
