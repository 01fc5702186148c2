from __future__ import annotations

import pytest
import torch

from snapvit_lightning.scores import ImportanceScores


def _scores(blocks: int = 4, hidden: int = 20, heads: int = 5, seed: int = 0) -> ImportanceScores:
    g = torch.Generator().manual_seed(seed)
    return ImportanceScores(torch.rand(blocks, hidden, generator=g), torch.rand(blocks, heads, generator=g))


def _brute_force_keep(scores: torch.Tensor, ratio: float, min_keep: int) -> torch.Tensor:
    """Reference: repeatedly drop the globally lowest unit of a block that still has > min_keep."""
    blocks, units = scores.shape
    alive = [sorted(row.tolist(), reverse=True) for row in scores]
    for _ in range(round(ratio * blocks * units)):
        candidates = [(alive[b][-1], b) for b in range(blocks) if len(alive[b]) > min_keep]
        if not candidates:
            break
        _, b = min(candidates)
        alive[b].pop()
    return torch.tensor([len(a) for a in alive])


@pytest.mark.parametrize("ratios", [(0.0, 0.0), (0.15, 0.0), (0.35, 0.2), (0.55, 0.4), (0.65, 0.5), (0.99, 0.99)])
def test_global_ranking_matches_reference(ratios: tuple[float, float]) -> None:
    s = _scores()
    neurons, heads = s.keep_counts(*ratios)
    assert torch.equal(neurons, _brute_force_keep(s.mlp, ratios[0], s.min_neurons))
    assert torch.equal(heads, _brute_force_keep(s.heads, ratios[1], s.min_heads))
    assert (neurons >= s.min_neurons).all() and (heads >= s.min_heads).all()


def test_pruned_count_and_minimum() -> None:
    s = _scores(blocks=4, hidden=20, heads=5)
    assert (s.min_neurons, s.min_heads) == (1, 1)  # ceil(0.05 * 20), ceil(0.2 * 5)
    neurons, heads = s.keep_counts(0.5, 0.4)
    assert neurons.sum() == 80 - 40 and heads.sum() == 20 - 8
    # A block whose units all score lowest is cut down to its minimum, never below.
    mlp = torch.rand(4, 20) + 1
    mlp[2] = 0.0
    skewed = ImportanceScores(mlp, torch.ones(4, 5), min_mlp_keep=0.25)
    neurons, _ = skewed.keep_counts(0.3, 0.0)
    assert neurons[2] == 5 and neurons.sum() == 80 - 24


def test_weights_rescale_the_ranking() -> None:
    s = _scores()
    w = torch.ones(s.num_weights)
    w[0] = 0.01  # block 0's MLP looks unimportant -> pruned first
    neurons, _ = s.keep_counts(0.3, 0.0, weights=w)  # 24 pruned: all 19 prunable of block 0 first
    assert neurons[0] == s.min_neurons
    weighted = s.with_weights(w, covariance=torch.eye(s.num_weights))
    for bad in (-torch.eye(s.num_weights), torch.eye(s.num_weights) + torch.triu(torch.ones(s.num_weights, s.num_weights), 1)):
        with pytest.raises(ValueError, match="covariance must be symmetric positive semi-definite"):
            s.with_weights(w, covariance=bad)
    assert torch.equal(weighted.keep_counts(0.3, 0.0)[0], neurons)
    assert torch.equal(weighted.weight_vector(), w.double())
    # |w| is used: a negative weight ranks like its absolute value
    assert torch.equal(s.keep_counts(0.3, 0.2, weights=-w)[1], s.keep_counts(0.3, 0.2, weights=w)[1])


def test_block_orders_are_descending() -> None:
    s = _scores()
    mlp_order, head_order = s.block_orders()
    p = s.permuted(mlp_order, head_order)
    assert (p.mlp[:, :-1] >= p.mlp[:, 1:]).all() and (p.heads[:, :-1] >= p.heads[:, 1:]).all()


@pytest.mark.parametrize("balance", [None, 0.4, (0.5, 0.65), "rank"])
def test_state_dict_round_trip(tmp_path, balance) -> None:
    s = _scores().balanced(balance) if balance is not None else _scores()
    s = s.with_weights(torch.linspace(0.5, 1.5, 24), covariance=torch.eye(24))
    torch.save(s.state_dict(), tmp_path / "s.pt")
    back = ImportanceScores.from_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert torch.equal(back.mlp, s.mlp) and torch.equal(back.covariance, s.covariance)
    assert torch.equal(back.keep_counts(0.4, 0.2)[0], s.keep_counts(0.4, 0.2)[0]) and back.balance == balance
    raw = back.raw()  # the raw ranking of the same scores, whatever balance and weights they carry
    assert raw.balance is None and raw.weight_vector() is None and raw.covariance is None
    assert torch.equal(raw.mlp, s.mlp) and raw.criterion == s.criterion and raw.min_head_keep == s.min_head_keep
    assert torch.equal(raw.keep_counts(0.4, 0.2)[0], _scores().keep_counts(0.4, 0.2)[0])


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan"), "0.3", True])
def test_bad_ratio_raises(ratio: object) -> None:
    s = _scores()
    with pytest.raises(ValueError, match="mlp_ratio must be a number in \\[0, 1\\)"):
        s.keep_counts(ratio, 0.0)
    with pytest.raises(ValueError, match="head_ratio must be a number in \\[0, 1\\)"):
        s.keep_counts(0.0, ratio)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(mlp=torch.rand(3), heads=torch.rand(3, 2)), "mlp must be a non-empty 2-D tensor"),
        (dict(mlp=torch.rand(3, 4), heads=torch.rand(2, 2)), "mlp has 3 blocks but heads has 2"),
        (dict(mlp=-torch.rand(3, 4), heads=torch.rand(3, 2)), "finite and non-negative"),
        (dict(mlp=torch.rand(3, 4), heads=torch.rand(3, 2), min_head_keep=1.5), "min_head_keep"),
        (dict(mlp=torch.rand(3, 4), heads=torch.rand(3, 2), block_weights=torch.ones(3)), "given together"),
        (dict(mlp=torch.rand(3, 4), heads=torch.rand(3, 2), block_weights=torch.ones(2),
              head_weights=torch.ones(3, 2)), "block_weights must be a tensor of shape \\[3\\]"),
        (dict(mlp=torch.rand(3, 4), heads=torch.rand(3, 2), balance=1.5), "balance must be None, a ratio in \\(0, 1\\)"),
        (dict(mlp=torch.rand(3, 4), heads=torch.rand(3, 2), balance="ranks"), "balance must be None, a ratio in"),
    ],
)
def test_bad_scores_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ImportanceScores(**kwargs)


def test_bad_weight_vector_raises() -> None:
    with pytest.raises(ValueError, match="weights must have shape \\[24\\]"):
        _scores().with_weights(torch.ones(5))


@pytest.mark.parametrize("quantile", [0.25, 0.5, 0.7])
def test_balanced_scores_split_uniformly(quantile: float) -> None:
    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(-4, 4, 6)[:, None]  # raw scores of very different scales per block
    scores = ImportanceScores(torch.rand(6, 40, generator=g) * scale, torch.rand(6, 10, generator=g) * scale)
    neurons, heads = scores.keep_counts(quantile, quantile)
    assert neurons.max() - neurons.min() > 20  # the raw global ranking is far from uniform
    balanced = scores.balanced(quantile)
    neurons, heads = balanced.keep_counts(quantile, quantile)
    assert neurons.max() - neurons.min() <= 1 and heads.max() - heads.min() <= 1
    assert torch.equal(balanced.block_orders()[0], scores.block_orders()[0])  # same order inside blocks
    assert balanced.block_weights is None and balanced.balance == quantile
    # The ranking divides each block by its quantile; the stored scores stay the raw ones.
    mlp, heads = balanced.weighted()
    torch.testing.assert_close(mlp, scores.mlp / scores.mlp.quantile(quantile, dim=1, keepdim=True))
    torch.testing.assert_close(heads, scores.heads / scores.heads.quantile(quantile, dim=1, keepdim=True))
    assert torch.equal(balanced.mlp, scores.mlp)
    with pytest.raises(ValueError, match=r"quantile must be a number in \(0, 1\), an \(mlp, heads\) pair of them or .rank., got 1"):
        scores.balanced(1)


def test_balanced_scores_take_separate_head_quantile() -> None:
    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(-4, 4, 6)[:, None]
    scores = ImportanceScores(torch.rand(6, 40, generator=g) * scale, torch.rand(6, 10, generator=g) * scale)
    pair = scores.balanced((0.3, 0.7))
    assert torch.equal(pair.mlp, scores.mlp) and torch.equal(pair.heads, scores.heads)  # the raw scores stay
    assert torch.equal(pair.weighted()[0], scores.balanced(0.3).weighted()[0])
    assert torch.equal(pair.weighted()[1], scores.balanced(0.7).weighted()[1])
    neurons, _ = pair.keep_counts(0.3, 0.0)
    _, heads = pair.keep_counts(0.0, 0.7)
    assert neurons.max() - neurons.min() <= 1 and heads.max() - heads.min() <= 1
    for bad in ((0.3,), (0.3, 0.0), (0.3, True), "0.5"):
        with pytest.raises(ValueError, match="quantile must be a number in"):
            scores.balanced(bad)


def test_rank_balanced_scores_split_uniformly_at_every_ratio() -> None:
    g = torch.Generator().manual_seed(0)
    scale = torch.logspace(-4, 4, 6)[:, None]
    scores = ImportanceScores(torch.rand(6, 40, generator=g) * scale, torch.rand(6, 10, generator=g) * scale)
    ranked = scores.balanced("rank")
    assert torch.equal(ranked.block_orders()[0], scores.block_orders()[0])
    assert torch.equal(ranked.block_orders()[1], scores.block_orders()[1])
    assert torch.equal(ranked.weighted()[0].sort(dim=1).values[0], torch.arange(1, 41, dtype=ranked.mlp.dtype) / 40)
    for ratio in (0.1, 0.35, 0.5, 0.65, 0.9):
        neurons, heads = ranked.keep_counts(ratio, ratio)
        assert neurons.max() - neurons.min() <= 1 and heads.max() - heads.min() <= 1, ratio
        assert int(neurons.sum()) == 240 - round(ratio * 240)
    # a larger block weight keeps more of that block
    w = torch.ones(ranked.num_weights, dtype=torch.float64)
    w[2] = 1.5
    neurons, _ = ranked.keep_counts(0.5, 0.5, weights=w)
    assert neurons[2] > neurons[[0, 1, 3, 4, 5]].max()
