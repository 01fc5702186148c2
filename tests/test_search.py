from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from snapvit_lightning.elastic import ElasticViT
from snapvit_lightning.scores import ImportanceScores
from snapvit_lightning.search.loop import _balanced_start, _make_xnes, _search_loop
from snapvit_lightning.search import (
    DEFAULT_BALANCE,
    DEFAULT_FITNESS_SAMPLES,
    DEFAULT_GUARD,
    DEFAULT_RATIO_PAIRS,
    EvolutionarySearch,
    Fitness,
    default_initial_weights,
    fitness_subset,
    run_search,
)
from snapvit_lightning.structure import get_blocks, inspect_vit
from snapvit_lightning.xnes import positive_ranks

from conftest import random_scores, tiny_model

REPO = Path(__file__).resolve().parents[1]
PAIRS = [(0.0, 0.0), (0.15, 0.0), (0.35, 0.2), (0.65, 0.5), (0.9, 0.6)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine they cost a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_vit(seed: int = 0) -> tuple[torch.nn.Module, str, dict]:
    """``test_vit`` (6 blocks, 3 heads) at 48 px: 10 tokens, fast enough for many forwards."""
    torch.manual_seed(seed)
    kwargs = {"img_size": 48}
    model = timm.create_model("test_vit", pretrained=False, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, "test_vit", kwargs


def images_for(model: torch.nn.Module, n: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *model.patch_embed.img_size, generator=g)


def embed(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def finite_min(history: list[float]) -> float:
    """The best fitness of a history: stopped candidates (``nan``, any of them may be) skipped."""
    return min((f for f in history if not math.isnan(f)), default=math.inf)


def same_history(a: list[float], b: list[float]) -> bool:
    """Equal fitness histories, a stopped candidate (``nan``) equal to a stopped one."""
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


def elastic(model, name, kwargs, scores) -> ElasticViT:
    kw = dict(kwargs, num_classes=int(model.num_classes), global_pool=model.global_pool)
    return ElasticViT(model, scores, model_name=name, model_kwargs=kw)


# ------------------------------------------------------------------------------ initial weights


def test_default_initial_weights_layout() -> None:
    w = default_initial_weights(4, 3)
    assert w.shape == (4 + 12,) and w.dtype == torch.float64
    block = torch.linspace(1.2, 0.8, 4, dtype=torch.float64)
    assert torch.equal(w[:4], block)
    assert torch.equal(w[4:].view(4, 3), block[:, None].expand(4, 3))
    scores = ImportanceScores(torch.rand(4, 8), torch.rand(4, 3)).with_weights(w)
    assert torch.equal(scores.block_weights, block) and torch.equal(scores.head_weights[:, 0], block)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_default_initial_weights_errors(bad) -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        default_initial_weights(bad, 2)


# ------------------------------------------------------------------------------ the fast path


NORMS = ("vit_small_patch16_224", dict(depth=2, embed_dim=64, num_heads=2, img_size=32, scale_attn_norm=True, scale_mlp_norm=True, qk_norm=True))


def variant(key: str) -> tuple[torch.nn.Module, str, dict]:
    if key == "test_vit":
        return small_vit()
    if key == "norms":  # scale_norm over heads, MLP norm over neurons, qk_norm
        torch.manual_seed(0)
        model = timm.create_model(NORMS[0], pretrained=False, **NORMS[1]).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        return model, *NORMS
    return tiny_model(key)


@pytest.mark.parametrize("key", ["test_vit", "norms", "siglip", "distilled", "swiglu", "glu", "registers"])
def test_fast_path_equals_elastic_subnet(key: str) -> None:
    model, name, kwargs = variant(key)
    scores = random_scores(model)
    x = images_for(model, n=3)
    fitness = Fitness(model, scores, x, ratio_pairs=PAIRS, pca_components=4, autocast_dtype=None)
    g = torch.Generator().manual_seed(3)
    for trial in range(2):
        w = 2 * torch.rand(scores.num_weights, generator=g, dtype=torch.float64)
        if trial == 1:  # a zero block weight (ties) and a zero head weight: gathered, not prefix
            w[0] = 0.0
            w[scores.num_blocks] = 0.0
        el = elastic(model, name, kwargs, scores.with_weights(w))
        for pair in PAIRS:
            expected = embed(el.slice(el.dims(*pair)), x)  # (0.9, 0.6): the search caps at the blocks' minimum
            got = embed(fitness.apply(w, *pair), x)
            dims = [(b.attn.num_heads, b.mlp.fc2.in_features) for b in get_blocks(fitness.model)]
            assert dims == [(d.num_heads, d.mlp_hidden) for d in el.dims(*pair)]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=f"{key} w#{trial} {pair}")
        fitness.restore()


@pytest.mark.parametrize(
    ("key", "correct"),
    [("test_vit", "none"), ("norms", "none"), ("swiglu", "none"), ("glu", "none"), ("test_vit", "lstsq"), ("glu", "lstsq")],
)
def test_width_multiple_runs_wider_mlps_with_the_same_cosines(key: str, correct: str) -> None:
    """``width_multiple``: padded MLP widths during evaluation, the same cosines as exact widths."""
    model, _, _ = variant(key)
    scores = random_scores(model)
    x = images_for(model, n=12)
    kwargs = dict(ratio_pairs=PAIRS[1:], pca_components=4, autocast_dtype=None, correct=correct)
    exact = Fitness(model, scores, x, width_multiple=1, **kwargs)
    padded = Fitness(model, scores, x, width_multiple=8, **kwargs)
    hidden = inspect_vit(model).blocks[0].mlp_hidden
    mlp_norm = key == "norms"  # a norm over the neurons: exact widths
    widths_run: list[int] = []  # fc2's input width in every block forward of the padded fitness
    g = torch.Generator().manual_seed(3)
    for trial in range(2):
        w = 2 * torch.rand(scores.num_weights, generator=g, dtype=torch.float64)
        if trial == 1:  # ties: the kept set is gathered, not a prefix
            w[0] = 0.0
        hooks = [block.mlp.fc2.register_forward_pre_hook(lambda m, args: widths_run.append(m.in_features))
                 for block in get_blocks(padded.model)]
        want = exact.pair_cosines(w, pca=False)
        got = padded.pair_cosines(w, pca=False)
        assert got == pytest.approx(want, abs=1e-6), f"{key} {correct} w#{trial}"
        for hook in hooks:
            hook.remove()
        counts = [scores.keep_counts(*pair, weights=w)[0].tolist() for pair in PAIRS[1:]]
        kept = [counts[i][b] for i in padded._pair_order for b in range(scores.num_blocks)]
        widths = widths_run[-len(kept):]
        expected = kept if mlp_norm else [min(hidden, -(-k // 8) * 8) for k in kept]
        assert widths == expected
        assert mlp_norm or any(width > k for width, k in zip(widths, kept))
        # apply() always slices exact widths
        assert [blk.mlp.fc2.in_features for blk in get_blocks(padded.apply(w, *PAIRS[-1]))] == counts[-1]
        padded.restore()
    with pytest.raises(ValueError, match="width_multiple must be an int >= 1 or None, got 0"):
        Fitness(model, scores, x, width_multiple=0, **kwargs)


@pytest.mark.parametrize("key", ["test_vit", "siglip", "glu", "registers"])
@pytest.mark.parametrize("correct", ["bias", "lstsq"])
def test_corrected_fast_path_equals_corrected_elastic_subnet(key: str, correct: str) -> None:
    """``correct=``: the working copy is exactly the elastic subnet corrected on the fitness images."""
    model, name, kwargs = variant(key)
    scores = random_scores(model)
    x = images_for(model, n=12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fitness = Fitness(model, scores, x, ratio_pairs=PAIRS, pca_components=4, autocast_dtype=None, correct=correct)
    plain = Fitness(model, scores, x, ratio_pairs=PAIRS, pca_components=4, autocast_dtype=None)
    g = torch.Generator().manual_seed(3)
    for trial in range(2):
        w = 2 * torch.rand(scores.num_weights, generator=g, dtype=torch.float64)
        if trial == 1:  # ties: the kept set is gathered, not a prefix
            w[0] = 0.0
            w[scores.num_blocks] = 0.0
        el = elastic(model, name, kwargs, scores.with_weights(w))
        for pair in PAIRS:
            expected = embed(el.slice(el.dims(*pair), correct=correct, calibration=x), x)  # as subnet() cuts, capped
            got = embed(fitness.apply(w, *pair), x)
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4, msg=f"{key} {correct} w#{trial} {pair}")
            if pair[0] > 0.3:  # the correction really changes the pruned model
                assert (got - embed(plain.apply(w, *pair), x)).abs().max() > 1e-3
        fitness.restore()
    # dense again after every call; the unpruned model still has fitness 0; the model is untouched
    torch.testing.assert_close(embed(fitness.model, x), embed(model, x), atol=2e-5, rtol=1e-4)
    dense = Fitness(model, scores, x, ratio_pairs=[(0.0, 0.0)], pca_components=4, autocast_dtype=None, correct=correct)
    assert abs(dense(default_initial_weights(scores.num_blocks, scores.num_heads))) <= 1e-6
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_corrected_fitness_errors() -> None:
    model, _, _ = small_vit()
    scores, x = random_scores(model), images_for(model, n=4)
    with pytest.raises(ValueError, match="correct"):
        Fitness(model, scores, x, correct="ols")
    with pytest.raises(ValueError, match="damping"):
        Fitness(model, scores, x, correct="lstsq", damping=-1.0)
    norms, _, _ = variant("norms")  # a norm over the cut dimension: stored statistics cannot correct it
    with pytest.raises(ValueError, match=r"correct='lstsq': statistics cannot correct this model: it has a norm over "
                                         r"the cut dimension .* use correct='none'"):
        Fitness(norms, random_scores(norms), images_for(norms, n=4), correct="lstsq")


@pytest.mark.parametrize("space", ["pca", "raw"])
def test_fitness_matches_explicit_computation(space: str) -> None:
    model, name, kwargs = small_vit()
    scores = random_scores(model)
    x = images_for(model, n=8)
    pairs = [(0.35, 0.2), (0.65, 0.5)]
    fitness = Fitness(model, scores, x, ratio_pairs=pairs, pca_components=5, autocast_dtype=None, space=space)
    w = default_initial_weights(scores.num_blocks, scores.num_heads)
    teacher = embed(model, x).double()
    mean = teacher.mean(0)
    basis = torch.linalg.svd(teacher - mean, full_matrices=False).Vh[:5].T
    el = elastic(model, name, kwargs, scores.with_weights(w))
    losses, raw_cos = [], []
    for pair in pairs:
        pruned = embed(el.subnet(*pair), x).double()
        s, t = ((pruned - mean) @ basis, (teacher - mean) @ basis) if space == "pca" else (pruned, teacher)
        losses.append(1 - torch.nn.functional.cosine_similarity(s, t, dim=1).mean())
        raw_cos.append(float(torch.nn.functional.cosine_similarity(pruned, teacher, dim=1).mean()))
    assert fitness.num_components == 5
    assert fitness(w) == pytest.approx(float(torch.stack(losses).mean()), abs=1e-5)
    assert fitness.pair_cosines(w, pca=False) == pytest.approx(raw_cos, abs=1e-5)


def test_guard_penalises_each_pair_below_the_first_call() -> None:
    model, _, _ = small_vit()
    scores, x = random_scores(model), images_for(model, n=6)
    pairs = [(0.15, 0.0), (0.35, 0.2), (0.65, 0.5)]
    plain = Fitness(model, scores, x, ratio_pairs=pairs, pca_components=3, autocast_dtype=None)
    guarded = Fitness(model, scores, x, ratio_pairs=pairs, pca_components=3, autocast_dtype=None, guard=2.5)
    w0 = default_initial_weights(scores.num_blocks, scores.num_heads)
    assert guarded(w0) == plain(w0)  # the first call is the reference: nothing below it
    ref = torch.tensor(plain.pair_cosines(w0, pca=False), dtype=torch.float64)
    torch.testing.assert_close(guarded.reference_cosines, ref)
    g = torch.Generator().manual_seed(5)
    penalised = 0
    for _ in range(6):
        w = (w0 + 0.8 * torch.randn(w0.shape, generator=g, dtype=torch.float64)).clamp(0, 2)
        cos = torch.tensor(plain.pair_cosines(w, pca=False), dtype=torch.float64)
        penalty = 2.5 * float((ref - cos).clamp_min(0).sum())
        penalised += penalty > 0
        assert guarded(w) == pytest.approx(plain(w) + penalty, abs=1e-12)
    assert penalised > 0  # the draws do lose cosine somewhere
    given = Fitness(model, scores, x, ratio_pairs=pairs, pca_components=3, autocast_dtype=None, guard=1.0,
                    reference_cosines=[1.0, 1.0, 1.0])
    assert given(w0) == pytest.approx(plain(w0) + float((1 - ref).sum()), abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"guard": -1.0}, r"guard must be a finite number >= 0, got -1.0"),
        ({"guard": float("nan")}, r"guard must be a finite number >= 0, got nan"),
        ({"guard": True}, r"guard must be a finite number >= 0, got True"),
        ({"guard": 1.0, "reference_cosines": [0.5]}, rf"reference_cosines must be {len(DEFAULT_RATIO_PAIRS)} cosines in \[-1, 1\]"),
        ({"guard": 1.0, "reference_cosines": [5.0] * len(DEFAULT_RATIO_PAIRS)}, "reference_cosines must be .* cosines in"),
    ],
)
def test_guard_errors(kwargs, match) -> None:
    model, _, _ = small_vit()
    with pytest.raises(ValueError, match=match):
        Fitness(model, random_scores(model), images_for(model, n=4), **kwargs)
    if "reference_cosines" not in kwargs:
        with pytest.raises(ValueError, match=match):
            EvolutionarySearch(**kwargs)
        with pytest.raises(ValueError, match=match):
            run_search(model, random_scores(model), images_for(model, n=4), max_evals=1, **kwargs)


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16])
def test_unpruned_fitness_is_zero_deterministic_and_model_unchanged(autocast_dtype) -> None:
    model, _, _ = small_vit()
    heads = inspect_vit(model).blocks[0].num_heads
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = random_scores(model)
    x = images_for(model, n=5)
    w = default_initial_weights(scores.num_blocks, scores.num_heads)
    dense = Fitness(model, scores, x, ratio_pairs=[(0.0, 0.0)], pca_components=64, autocast_dtype=autocast_dtype)
    assert dense.num_components == 4  # min(64, M - 1, D)
    assert abs(dense(w)) <= 1e-6
    assert abs(dense(2 * torch.rand(scores.num_weights, dtype=torch.float64))) <= 1e-6

    fitness = Fitness(model, scores, x, pca_components=4, autocast_dtype=autocast_dtype, batch_size=2)
    masters = [[m.weight.clone() for m in (*mb.mlp_rows, mb.fc2, mb.qkv, mb.proj)] for mb in fitness.masters]
    first = fitness(w)
    other = fitness(torch.full((scores.num_weights,), 0.7, dtype=torch.float64))
    assert first > 1e-4 and other != first
    assert fitness(w) == first  # deterministic
    assert fitness.num_evals == 3 and len(fitness.eval_times) == 3 and fitness.total_time > 0
    for mb, saved in zip(fitness.masters, masters):
        for m, t in zip((*mb.mlp_rows, mb.fc2, mb.qkv, mb.proj), saved):
            assert torch.equal(m.weight, t)
    # the working copy is dense again, and the caller's model was never touched
    if autocast_dtype is None:
        torch.testing.assert_close(embed(fitness.model, x), embed(model, x), atol=2e-5, rtol=1e-4)
    assert all(b.attn.num_heads == heads for b in get_blocks(fitness.model))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert fitness.pair_cosines(w, pca=False)[0] <= 1.0 + 1e-9


# ------------------------------------------------------------------------------ run_search


@pytest.mark.parametrize("balance", [None, DEFAULT_BALANCE])
def test_run_search_lowers_fitness(balance) -> None:
    model, _, _ = small_vit()
    raw = random_scores(model)
    x = images_for(model, n=8)
    kw = dict(ratio_pairs=[(0.35, 0.2), (0.65, 0.5)], pca_components=6, autocast=False, balance=balance)
    # None: the paper's start on the raw scores; the default: w = 1 on the balanced scores.
    scores = raw if balance is None else raw.balanced(balance)
    w0 = default_initial_weights(scores.num_blocks, scores.num_heads) if balance is None else torch.ones(scores.num_weights)
    start = Fitness(model, scores, x, kw["ratio_pairs"], 6, autocast_dtype=None)(w0)
    seen = []
    best_w, cov, history = run_search(
        model, raw, x, max_evals=16, popsize=8, sigma=0.3, seed=0, on_eval=lambda i, f, b: seen.append((i, f, b)), **kw
    )
    assert len(history) == 16 and [s[0] for s in seen] == list(range(16))
    assert [s[2] for s in seen] == [finite_min(history[: i + 1]) for i in range(16)]
    assert finite_min(history) < start
    # the search's default guard: measured against the start point, evaluated first
    check = Fitness(model, scores, x, kw["ratio_pairs"], 6, autocast_dtype=None, guard=DEFAULT_GUARD)
    assert check(w0) == pytest.approx(start, abs=1e-12)
    assert check(best_w) == pytest.approx(finite_min(history), abs=1e-9)
    assert cov.shape == (scores.num_weights, scores.num_weights) and torch.allclose(cov, cov.T)
    assert ((best_w >= 0) & (best_w <= 2)).all()
    # same seed, same result
    again = run_search(model, raw, x, max_evals=16, popsize=8, sigma=0.3, seed=0, **kw)
    assert torch.equal(again[0], best_w) and same_history(again[2], history)


def test_run_search_takes_a_loader_as_evolutionary_search_does() -> None:
    model, _, _ = small_vit()
    raw, x = random_scores(model), images_for(model, n=6)
    kw = dict(max_evals=2, popsize=2, ratio_pairs=[(0.35, 0.2)], pca_components=4, autocast=False)
    tensor = run_search(model, raw, x, **kw)
    loader = run_search(model, raw, DataLoader(TensorDataset(x, torch.zeros(6)), batch_size=4), **kw)
    assert torch.equal(tensor[0], loader[0]) and same_history(tensor[2], loader[2])


@pytest.mark.parametrize(
    "images, match",
    [
        (lambda x: list(x), r"images: batches must be \[B, 3, H, W\] tensors .* got a \[3, \d+, \d+\] tensor \(single images: torch.stack"),
        (lambda x: "photos/", "images must be a float tensor .* or an iterable of such batches .* got str"),
        (lambda x: 3, "images must be a float tensor .* got int"),
        (lambda x: [], "images: the iterable yielded no batches"),
        (lambda x: [(x[:2].numpy(), 0)], "images: batches must be .* got ndarray"),
        (lambda x: [x[:2], x[2:, :, :16, :16]], r"images: batches of \[3, \d+, \d+\] and \[3, 16, 16\] images: give images of one size"),
        (lambda x: (x * 255).to(torch.uint8), r"images must be a float tensor \[M, 3, S, S\], got \[4, 3, \d+, \d+\] torch.uint8"),
    ],
)
def test_run_search_names_bad_images(images, match) -> None:
    model, _, _ = small_vit()
    with pytest.raises(ValueError, match=match):
        run_search(model, random_scores(model), images(images_for(model, n=4)), max_evals=1)


# ------------------------------------------------------------------------------ early stop


def _guarded_fitness_pair() -> tuple[Fitness, Fitness, torch.Tensor, torch.Tensor]:
    """Two equal guarded fitnesses (pairs evaluated sparsest first: 1, 2, 0), the start and a perturbed ``w``."""
    model, _, _ = small_vit()
    scores, x = random_scores(model), images_for(model, n=6)
    pairs = [(0.15, 0.0), (0.65, 0.5), (0.35, 0.2)]
    kw = dict(ratio_pairs=pairs, pca_components=3, autocast_dtype=None, guard=2.0)
    w0 = default_initial_weights(scores.num_blocks, scores.num_heads)
    w = (w0 + 0.6 * torch.randn(w0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)).clamp(0, 2)
    return Fitness(model, scores, x, **kw), Fitness(model, scores, x, **kw), w0, w


def test_fitness_stop_above_returns_the_exact_value_or_inf() -> None:
    fitness, plain, w0, w = _guarded_fitness_pair()
    assert fitness(w0, stop_above=-1.0) == plain(w0)  # the start point sets the guard's reference: never stopped
    assert fitness.num_stopped == 0 and torch.equal(fitness.reference_cosines, plain.reference_cosines)
    exact = plain(w)
    cos, ref = plain.last_cosines, plain.reference_cosines.tolist()
    assert fitness(w, stop_above=exact) == exact and fitness.last_cosines == cos  # not certainly above: exact
    assert fitness(w, stop_above=math.inf) == exact and fitness(w) == exact
    assert fitness.num_stopped == 0 and fitness.num_skipped_pairs == 0

    def term(i: int) -> float:
        return (1 - cos[i]) / 3 + 2.0 * max(0.0, ref[i] - cos[i])

    assert term(1) > 1e-3
    assert fitness(w, stop_above=term(1) - 1e-3) == math.inf  # the sparsest pair alone is enough
    assert (fitness.num_stopped, fitness.num_skipped_pairs) == (1, 2)
    assert fitness.last_cosines[1] == cos[1] and math.isnan(fitness.last_cosines[0]) and math.isnan(fitness.last_cosines[2])
    if term(2) > 1e-3:
        assert fitness(w, stop_above=term(1) + term(2) - 1e-3) == math.inf  # after two pairs
        assert (fitness.num_stopped, fitness.num_skipped_pairs) == (2, 3)
    # the bound must exceed by the rounding margin; a bound at the value itself never stops
    assert fitness(w, stop_above=exact - 1e-7) == exact
    assert fitness.num_evals == len(fitness.eval_times) == 6 + (term(2) > 1e-3)
    for bad in (math.nan, "1.0", True):
        with pytest.raises(ValueError, match=r"stop_above must be None or a number \(inf: never stop; not nan\), got"):
            fitness(w, stop_above=bad)


@pytest.mark.parametrize("correct", ["bias", "lstsq"])
def test_corrected_fitness_does_not_depend_on_the_pair_order(correct: str) -> None:
    """Sparsest first: a layer a later, lighter budget leaves uncut must not keep a corrected bias."""
    model, _, _ = small_vit()
    scores, x = random_scores(model), images_for(model, n=8)
    pairs = [(0.15, 0.0), (0.35, 0.2), (0.65, 0.5)]
    kw = dict(pca_components=3, autocast_dtype=None, correct=correct)
    w = default_initial_weights(scores.num_blocks, scores.num_heads)
    got = Fitness(model, scores, x, ratio_pairs=pairs, **kw).pair_cosines(w, pca=False)
    for pair, cos in zip(pairs, got):
        assert Fitness(model, scores, x, ratio_pairs=[pair], **kw).pair_cosines(w, pca=False) == [cos], pair


def test_fitness_staged_evaluation_equals_a_call() -> None:
    fitness, plain, w0, w = _guarded_fitness_pair()
    first = fitness.start(w0)  # no guard reference yet: every pair, its cosines become the reference
    assert first.complete and fitness.finish(first) == plain(w0)
    assert torch.equal(fitness.reference_cosines, plain.reference_cosines)
    exact = plain(w)
    state = fitness.start(w)
    assert state.pairs_done == 1 and not state.complete and state.value is None
    assert torch.equal(fitness._embed(fitness.images).double().cpu(), fitness.teacher)  # dense between stages
    bounds = [state.lower_bound]
    while not state.complete:
        assert fitness.advance(state) is state
        bounds.append(state.lower_bound)
    assert bounds == sorted(bounds) and all(b <= exact for b in bounds) and bounds[-1] == exact == state.value
    assert bounds[0] > 0  # the sparsest pair alone bounds it
    fitness.advance(state)  # nothing left
    assert state.pairs_done == 3 and fitness.finish(state) == exact and fitness.last_cosines == plain.last_cosines
    stopped = fitness.start(w)
    assert fitness.finish(stopped) == math.inf and (fitness.num_stopped, fitness.num_skipped_pairs) == (1, 2)
    assert fitness.last_cosines[1] == plain.last_cosines[1] and math.isnan(fitness.last_cosines[0])
    assert fitness.num_evals == len(fitness.eval_times) == 3 and all(t > 0 for t in fitness.eval_times)
    with pytest.raises(ValueError, match="this evaluation was finished already"):
        fitness.finish(state)
    with pytest.raises(ValueError, match=r"w must be a finite tensor of shape \[18\]"):
        fitness.start(w[:-1])


def _stops_of_both_schemes(model, raw, x, max_evals: int) -> dict[str, tuple]:
    """``_search_loop`` as ``run_search`` runs it, with a staged Fitness and with a plain callable."""
    scores, w0 = _balanced_start(raw, DEFAULT_BALANCE, None)
    runs = {}
    for name in ("staged", "per_candidate"):
        fitness = Fitness(model, scores, x, DEFAULT_RATIO_PAIRS, 6, autocast_dtype=None, guard=DEFAULT_GUARD)
        xnes, start = _make_xnes(scores.num_weights, scores.num_blocks, scores.num_heads, 0.3, 8, 0, w0, None)
        fitness(start)
        objective = fitness if name == "staged" else (lambda w, stop_above, f=fitness: f(w, stop_above=stop_above))
        history: list[float] = []
        _search_loop(xnes, objective, max_evals, history, early_stop=True)
        runs[name] = (fitness, xnes, history)
    return runs


def test_run_search_early_stop_gives_the_same_result() -> None:
    model, _, _ = small_vit()
    raw, x = random_scores(model), images_for(model, n=8)
    kw = dict(max_evals=22, popsize=8, sigma=0.3, seed=0, autocast=False, pca_components=6)  # a truncated last generation
    seen = []
    best_w, cov, history = run_search(model, raw, x, early_stop=True, on_eval=lambda i, f, b: seen.append((i, f, b)), **kw)
    full_w, full_cov, full = run_search(model, raw, x, early_stop=False, **kw)
    assert torch.equal(best_w, full_w) and torch.equal(cov, full_cov)
    stopped = [i for i, f in enumerate(history) if math.isnan(f)]
    assert stopped and len(history) == len(full) == 22  # the test can fail
    assert all(a == b for a, b in zip(history, full) if not math.isnan(a))
    for i in stopped:  # certainly below the m best of its generation
        start = i // 8 * 8
        m = positive_ranks(min(8, 22 - start))
        done = sorted(f for f in history[start : start + 8] if not math.isnan(f))
        assert len(done) >= m and full[i] > done[m - 1]
    # reported as nan, in candidate order, and the best so far ignores it
    assert [i for i, _, _ in seen] == list(range(22))
    assert [(i, f) for i, f, _ in seen if math.isnan(f)] == [(i, history[i]) for i in stopped]
    assert [b for _, _, b in seen] == [finite_min(history[: i + 1]) for i in range(22)]
    # the generation-wise (staged) schedule stops more than candidate after candidate, same update
    runs = _stops_of_both_schemes(model, raw, x, 22)
    (staged, staged_xnes, staged_history), (each, each_xnes, each_history) = runs["staged"], runs["per_candidate"]
    assert same_history(staged_history, history) and torch.equal(staged_xnes.covariance, cov)
    assert torch.equal(each_xnes.covariance, cov) and torch.equal(each_xnes.mean, staged_xnes.mean)
    assert staged.num_stopped == len(stopped) > each.num_stopped == sum(math.isnan(f) for f in each_history)
    assert staged.num_skipped_pairs > each.num_skipped_pairs
    assert staged.num_evals == each.num_evals == len(staged.eval_times) == 23  # the start point and 22


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_evals": 0}, "max_evals"),
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"popsize": 1}, "popsize"),
        ({"pca_components": 0}, "pca_components"),
        ({"ratio_pairs": [(1.0, 0.0)]}, "mlp_ratio"),
        ({"ratio_pairs": [(0.1, -0.1)]}, "head_ratio"),
        ({"ratio_pairs": []}, "ratio_pairs"),
        ({"ratio_pairs": [(0.1,)]}, "ratio_pairs"),
        ({"batch_size": 0}, "batch_size"),
        ({"initial_weights": torch.ones(3)}, "initial_weights"),
        ({"initial_covariance": torch.eye(3)}, "initial_covariance"),
        ({"autocast": "yes"}, "autocast"),
        ({"balance": 1.0}, "balance must be None, a ratio in"),
        ({"balance": "ranks"}, "balance must be None, a ratio in"),
        ({"balance": (0.5, 1.0)}, r"balance must be None, a ratio in \(0, 1\), an \(mlp, heads\) pair of ratios or 'rank', got \(0.5, 1.0\)"),
        ({"correct": "ols"}, "correct must be one of"),
        ({"space": "cosine"}, r"space must be one of \('raw', 'pca'\), got 'cosine'"),
        ({"early_stop": 1}, r"early_stop must be True or False, got 1"),
        ({"autocast": torch.int32}, r"autocast must be a bool, None or one of torch.bfloat16, torch.float16, torch.float32"),
        ({"ratio_pairs": [(0.3, 0.2), (0.30000001, 0.2)]}, r"ratio_pairs holds \(0.3, 0.2\) more than once"),
        ({"seed": 2**70}, r"`seed` must be in \[-2\*\*63, 2\*\*64\)"),
    ],
)
def test_run_search_errors(kwargs, match) -> None:
    model, _, _ = small_vit()
    with pytest.raises(ValueError, match=match):
        run_search(model, random_scores(model), images_for(model), **{"max_evals": 1, **kwargs})


@pytest.mark.parametrize("hook, bad, said", [("on_eval", 5, "3 positional arguments, got 5"),
                                             ("on_eval", lambda i: None, "3 positional arguments, got <function"),
                                             ("on_start", lambda a, b: None, "1 positional argument, got <function")])
def test_run_search_refuses_hooks_that_cannot_be_called_before_it_evaluates(hook, bad, said, monkeypatch) -> None:
    import snapvit_lightning.search.loop as loop

    model, _, _ = small_vit()
    monkeypatch.setattr(loop, "Fitness", None)  # nothing may be evaluated before the refusal
    with pytest.raises(TypeError, match=f"{hook} must be None or a callable taking {said}"):
        run_search(model, random_scores(model), images_for(model), max_evals=1, **{hook: bad})


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.zeros(4, 32, 32), r"\[M, 3, S, S\]"),
        (torch.zeros(4, 1, 32, 32), r"\[M, 3, S, S\]"),
        (torch.zeros(4, 3, 32, 32, dtype=torch.uint8), r"\[M, 3, S, S\]"),
        (torch.zeros(1, 3, 32, 32), "at least 2"),
    ],
)
def test_fitness_image_errors(images, match) -> None:
    model, _, _ = small_vit()
    with pytest.raises(ValueError, match=match):
        Fitness(model, random_scores(model), images)
    with pytest.raises(ValueError, match=match):
        EvolutionarySearch(images=images)


def test_fitness_images_the_model_does_not_take() -> None:
    """Checked against the model: not timm's assertion or an SVD of NaNs."""
    model, _, _ = small_vit()
    x = images_for(model)
    with pytest.raises(ValueError, match="images hold non-finite values"):
        run_search(model, random_scores(model), torch.full_like(x, float("nan")), max_evals=1)
    fixed = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=2, img_size=32).eval()  # a fixed size
    with pytest.raises(ValueError, match=r"images must be a non-empty float tensor \[N, 3, 32, 32\] for this model, got \[4, 3, 48, 48\]"):
        Fitness(fixed, random_scores(fixed), torch.randn(4, 3, 48, 48))


def test_pairs_beyond_every_blocks_minimum_keep_are_searched_as_the_cut() -> None:
    """A ratio beyond max_ratios cuts no more: the fitness takes it as the cut (warned), two alike are refused."""
    model, _, _ = small_vit()
    scores, x = random_scores(model), images_for(model, n=4)
    top_mlp = scores.max_ratios[0]
    kw = {"pca_components": 3, "autocast_dtype": None}
    with pytest.warns(UserWarning, match=rf"cuts \(0.99, 0.2\) as \({top_mlp:g}, 0.2\)") as record:  # as logged
        beyond = Fitness(model, scores, x, ratio_pairs=[(0.99, 0.2), (0.3, 0.1)], **kw)
    assert len(record) == 1
    assert beyond.ratio_pairs == ((top_mlp, 0.2), (0.3, 0.1))
    within = Fitness(model, scores, x, ratio_pairs=[(top_mlp, 0.2), (0.3, 0.1)], **kw)
    w = torch.ones(scores.num_blocks * (1 + scores.num_heads), dtype=torch.float64)
    assert beyond(w) == within(w)  # the same cuts, the same fitness
    with pytest.raises(ValueError, match=r"several pairs cut as \(" + f"{top_mlp:.4g}" + r", 0\) \(a pair counts once\)"):
        Fitness(model, scores, x, ratio_pairs=[(0.99, 0.0), (0.98, 0.0)], **kw)


def test_pairs_that_cut_alike_are_refused_before_the_scoring(tmp_path) -> None:
    # Only the fitness refused them, after the scoring epoch; the cap is known from the model and the keeps.
    from conftest import cpu_trainer, multicrop_loader

    from snapvit_lightning.module import SnapViTModule

    module = SnapViTModule("test_vit", model_kwargs={"img_size": 32}, min_head_keep=1.0)
    search = EvolutionarySearch(max_evals=2, images=torch.randn(4, 3, 32, 32), ratio_pairs=[(0.3, 0.1), (0.3, 0.2)])
    with pytest.raises(ValueError, match=r"several pairs cut as \(0.3, 0\) \(a pair counts once\)"):
        cpu_trainer(tmp_path, [search]).fit(module, train_dataloaders=multicrop_loader())
    assert module.scores is None


def test_fitness_other_errors() -> None:
    model, _, _ = small_vit()
    scores = random_scores(model)
    x = images_for(model)
    with pytest.raises(ValueError, match="do not match"):
        Fitness(model, ImportanceScores(torch.rand(2, 5), torch.rand(2, 3)), x)
    with pytest.raises(ValueError, match="reduce_fn"):
        Fitness(model, scores, x, world_size=2, rank=0)
    with pytest.raises(ValueError, match="rank"):
        Fitness(model, scores, x, world_size=2, rank=2, reduce_fn=lambda t: t)
    fitness = Fitness(model, scores, x, pca_components=2, autocast_dtype=None)
    with pytest.raises(ValueError, match=r"w must be a finite tensor of shape \[%d\]" % scores.num_weights):
        fitness(torch.ones(3))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_evals": 0}, "max_evals must be an int >= 1, got 0"),
        ({"sigma": -0.1}, "sigma must be a finite number > 0, got -0.1"),
        ({"ratio_pairs": [(0.2, 1.5)]}, "head_ratio"),
        ({"pca_components": 0}, "pca_components must be an int >= 1, got 0"),
        ({"popsize": 1}, "popsize"),
        ({"log_every_n_evals": -1}, "log_every_n_evals"),
        ({"images": 3}, "images"),
        ({"seed": 1.5}, "seed"),
        ({"balance": 0.0}, "balance must be None, a ratio in"),
        ({"balance": [0.5, 0.6, 0.7]}, "balance must be None, a ratio in"),
        ({"space": None}, r"space must be one of \('raw', 'pca'\), got None"),
        ({"early_stop": "yes"}, r"early_stop must be True or False, got 'yes'"),
    ],
)
def test_callback_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        EvolutionarySearch(**kwargs)


# ------------------------------------------------------------------------------ the callback


class Scoring(pl.LightningModule):
    """Duck-typed stand-in for SnapViTModule: ``student`` and, after the epoch, ``scores``."""

    def __init__(self, model: torch.nn.Module, scores: ImportanceScores) -> None:
        super().__init__()
        self.student = model
        self._final_scores = scores
        self.scores: ImportanceScores | None = None
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        return None

    def on_train_epoch_end(self) -> None:
        self.scores = self._final_scores

    def configure_optimizers(self):
        return None

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=1)


def fit_with(callback: EvolutionarySearch, model, scores, tmp_path: Path, logger=False) -> Scoring:
    module = Scoring(model, scores)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, callbacks=[callback], logger=logger,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module)
    return module


SEARCH_KW = dict(popsize=4, sigma=0.3, ratio_pairs=[(0.35, 0.2), (0.65, 0.5)], pca_components=4, autocast=False, log_every_n_evals=4)


def test_callback_says_what_its_fitness_measures_and_when_the_search_cannot_learn(tmp_path: Path, caplog) -> None:
    model, _, _ = small_vit()
    scores, x = random_scores(model), images_for(model, n=6)
    kw = {**SEARCH_KW, "log_every_n_evals": 0}
    with caplog.at_level("INFO"), pytest.warns(UserWarning, match=r"max_evals=3 ends before one xNES generation "
                                               r"\(popsize 4\) completes, .* only samples 3 candidates"):
        fit_with(EvolutionarySearch(max_evals=3, images=x, **kw), model, scores, tmp_path)
    assert "cosine of the raw embeddings; start fitness" in caplog.text and "PCA" not in caplog.text
    caplog.clear()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ends before one xNES generation")
        search = EvolutionarySearch(max_evals=4, images=x, space="pca", **kw)
        with caplog.at_level("INFO"):
            fit_with(search, model, scores, tmp_path)
    assert "cosine of the PCA projections (4 components)" in caplog.text
    assert ("no candidate beat the start" in caplog.text) == (search.best_fitness >= search.initial_fitness)


def test_callback_search_logs_and_sets_scores(tmp_path: Path) -> None:
    model, _, _ = small_vit()
    scores = random_scores(model)
    x = images_for(model, n=6)
    callback = EvolutionarySearch(max_evals=8, images=DataLoader(TensorDataset(x, torch.zeros(6)), batch_size=4), **SEARCH_KW)
    module = fit_with(callback, model, scores, tmp_path, logger=CSVLogger(tmp_path, name="log"))
    out = module.scores
    assert out.block_weights is not None and out.covariance is not None
    assert out.covariance.shape == (scores.num_weights,) * 2
    assert torch.equal(out.weight_vector(), callback.best_weights)
    # the default searches the balanced ranking and keeps it (the raw scores stay)
    assert out.balance == DEFAULT_BALANCE and torch.equal(out.mlp, scores.mlp) and torch.equal(out.heads, scores.heads)
    assert len(callback.history) == 8
    assert callback.best_fitness == min([callback.initial_fitness, *callback.history])
    # same as the Trainer-free function
    best_w, cov, history = run_search(model, scores, x, max_evals=8, **{k: v for k, v in SEARCH_KW.items() if k != "log_every_n_evals"})
    assert same_history(history, callback.history) and torch.equal(best_w, callback.best_weights)
    torch.testing.assert_close(cov, callback.covariance)
    # logged per evaluation
    metrics = (next(tmp_path.glob("log/*/metrics.csv"))).read_text().splitlines()
    header = metrics[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in metrics[1:]]
    logged = [(int(r["step"]), float(r["search/fitness"]), float(r["search/best"])) for r in rows if r.get("search/fitness")]
    assert [s for s, _, _ in logged] == list(range(8))
    assert [f for _, f, _ in logged] == pytest.approx(callback.history, nan_ok=True)  # stopped: nan
    assert logged[-1][2] == pytest.approx(finite_min(callback.history))


def test_callback_early_stop_gives_the_same_result(tmp_path: Path) -> None:
    model, _, _ = small_vit()
    scores, x = random_scores(model), images_for(model, n=6)
    runs = {}
    for early_stop in (True, False):
        kw = {**SEARCH_KW, "ratio_pairs": DEFAULT_RATIO_PAIRS}  # five pairs: the sparsest alone can stop
        callback = EvolutionarySearch(max_evals=12, images=x, early_stop=early_stop, **kw)
        runs[early_stop] = (callback, fit_with(callback, model, scores, tmp_path).scores)
    (early, early_scores), (full, full_scores) = runs[True], runs[False]
    assert torch.equal(early.best_weights, full.best_weights) and torch.equal(early.covariance, full.covariance)
    assert torch.equal(early_scores.weight_vector(), full_scores.weight_vector())
    assert early.best_fitness == full.best_fitness
    stopped = sum(math.isnan(f) for f in early.history)
    assert stopped > 0 and not any(math.isnan(f) for f in full.history)  # the test can fail
    assert all(a == b for a, b in zip(early.history, full.history) if not math.isnan(a))
    assert early_scores.build_info["search_stopped"] == early.fitness.num_stopped == stopped
    assert full_scores.build_info["search_stopped"] == 0
    assert early_scores.build_info["search_evaluations"] == full_scores.build_info["search_evaluations"] == 12


def test_a_sigterm_stops_the_search_within_a_staged_generation(tmp_path: Path, monkeypatch) -> None:
    # a staged generation reports its candidates when it ends: the SIGTERM check came after a whole generation
    # (94 s for a 224 px ViT-S on a 2-core CPU); it now comes after each ratio pair (3 s)
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    model, _, _ = small_vit()
    scores, x = random_scores(model), images_for(model, n=6)
    callback = EvolutionarySearch(max_evals=8, images=x, **{**SEARCH_KW, "ratio_pairs": DEFAULT_RATIO_PAIRS})
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    steps, real_step = [], Fitness._step

    def step(self, state, *selections):  # noqa: ANN001, ANN202
        real_step(self, state, *selections)
        steps.append(state.pairs_done)
        if len(steps) == 8:  # the start's five pairs, then three of the first generation's
            trainer._signal_connector.received_sigterm = True  # as Lightning's SIGTERM handler notes it

    monkeypatch.setattr(Fitness, "_step", step)
    with pytest.raises(SIGTERMException):
        trainer.fit(Scoring(model, scores))
    assert len(steps) == 8 and callback.history == []  # no further pair; no candidate of the generation completed
    assert callback.fitness.step_hook is None


@pytest.mark.parametrize("balance, correct", [(0.5, "none"), ((0.4, 0.7), "none"), ("rank", "lstsq")])
def test_callback_balance_searches_around_a_uniform_split(tmp_path: Path, balance, correct) -> None:
    model, _, _ = small_vit()
    raw = random_scores(model)
    scale = torch.logspace(-3, 3, raw.num_blocks)[:, None]  # blocks on very different scales
    scores = ImportanceScores(raw.mlp * scale, raw.heads * scale)
    x = images_for(model, n=6)
    kw = {k: v for k, v in SEARCH_KW.items() if k != "log_every_n_evals"}
    callback = EvolutionarySearch(max_evals=4, images=x, balance=balance, correct=correct, **SEARCH_KW)
    module = fit_with(callback, model, scores, tmp_path)
    balanced = scores.balanced(balance)
    assert module.scores.balance == balance and torch.equal(module.scores.mlp, scores.mlp)
    # The start point is w = 1 on the balanced scores, the same as the Trainer-free function.
    start = Fitness(model, balanced, x, kw["ratio_pairs"], kw["pca_components"], autocast_dtype=None, correct=correct)
    assert callback.initial_fitness == pytest.approx(start(torch.ones(scores.num_weights, dtype=torch.float64)))
    best_w, _, history = run_search(model, scores, x, max_evals=4, balance=balance, correct=correct, **kw)
    assert same_history(history, callback.history) and torch.equal(best_w, callback.best_weights)


def test_callback_uses_datamodule_fitness_images(tmp_path: Path) -> None:
    model, _, _ = small_vit()
    scores = random_scores(model)
    x = images_for(model, n=5)

    class DM(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=1)

        def fitness_images(self):
            return x

    callback = EvolutionarySearch(max_evals=2, **SEARCH_KW)
    module = Scoring(model, scores)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=[callback], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=DM())
    assert callback.fitness.images.shape[0] == 5 and module.scores.covariance is not None


def test_callback_needs_images_and_scores(tmp_path: Path) -> None:
    model, _, _ = small_vit()
    with pytest.raises(RuntimeError, match="fitness images"):
        fit_with(EvolutionarySearch(max_evals=1, **SEARCH_KW), model, random_scores(model), tmp_path)

    class NoScores(Scoring):
        def on_train_epoch_end(self) -> None:
            pass

    module = NoScores(model, random_scores(model))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[EvolutionarySearch(max_evals=1, images=images_for(model), **SEARCH_KW)])
    with pytest.raises(RuntimeError, match="pl_module.scores"):
        trainer.fit(module)


def test_callback_warns_when_no_candidate_differs_from_the_start(tmp_path: Path) -> None:
    model, _, _ = small_vit()
    scores = random_scores(model)
    flat = ImportanceScores(torch.zeros_like(scores.mlp), torch.zeros_like(scores.heads))  # nothing to rank by
    with pytest.warns(UserWarning, match=r"all 4 candidates had the start's fitness .*: nothing told them apart"):
        fit_with(EvolutionarySearch(max_evals=4, images=images_for(model), **SEARCH_KW), model, flat, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # real scores: no such warning
        warnings.filterwarnings("ignore", message="(?!all )")  # other (Lightning) warnings pass
        fit_with(EvolutionarySearch(max_evals=4, images=images_for(model), **SEARCH_KW), model, scores, tmp_path)


def test_callback_refuses_too_few_fitness_images_before_the_scoring_epoch(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from snapvit_lightning.data import CalibrationDataModule
    from snapvit_lightning.module import SnapViTModule

    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    dm = CalibrationDataModule(tmp_path, holdout=1, batch_size=2, num_local_crops=2)
    module = SnapViTModule("test_vit", model_kwargs={"img_size": 32})
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[EvolutionarySearch(max_evals=2, **SEARCH_KW)])
    with pytest.raises(ValueError, match=f"needs at least 2 fitness images, the datamodule gives 1 from data_dir '{tmp_path}': its `holdout`"):
        trainer.fit(module, datamodule=dm)
    assert module.scores is None  # refused before the scoring epoch, not after it


@pytest.mark.parametrize("start, match", [
    ({"initial_weights": torch.rand(3)}, r"initial_weights must be a finite tensor of shape \[18\] \(B \+ B\*H\)"),
    ({"initial_covariance": torch.eye(5)}, r"initial_covariance must have shape \[18, 18\], got \[5, 5\]"),
    ({"initial_weights": torch.full((18,), float("nan"))}, r"initial_weights must be .* got non-finite values"),
    ({"initial_covariance": -torch.eye(18)}, r"initial_covariance must be positive definite"),  # was "`cov`", after the scoring
])
def test_callback_refuses_a_start_that_does_not_fit_the_model_before_the_scoring_epoch(tmp_path: Path, start, match) -> None:
    from conftest import multicrop_loader

    from snapvit_lightning.module import SnapViTModule

    module = SnapViTModule("test_vit", model_kwargs={"img_size": 32})
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[EvolutionarySearch(max_evals=2, images=torch.randn(4, 3, 32, 32), **SEARCH_KW, **start)])
    with pytest.raises(ValueError, match=match):
        trainer.fit(module, train_dataloaders=multicrop_loader())
    assert module.scores is None  # refused before the scoring epoch, not after it


@pytest.mark.parametrize("guard", [0.0, 10.0])
def test_callback_state_dict_round_trip_and_resume(tmp_path: Path, guard: float) -> None:
    model, _, _ = small_vit()
    scores = random_scores(model)
    x = images_for(model, n=6)
    kw = {**SEARCH_KW, "guard": guard}
    full = EvolutionarySearch(max_evals=8, images=x, **kw)
    fit_with(full, model, scores, tmp_path)

    first = EvolutionarySearch(max_evals=4, images=x, **kw)  # one generation, then "interrupted"
    fit_with(first, model, scores, tmp_path)
    torch.save(first.state_dict(), tmp_path / "search.pt")
    state = torch.load(tmp_path / "search.pt", weights_only=True)
    assert same_history(state["history"], first.history) and len(state["history"]) == 4

    resumed = EvolutionarySearch(max_evals=8, images=x, **kw)
    resumed.load_state_dict(state)
    module = fit_with(resumed, model, scores, tmp_path)
    assert same_history(resumed.history, full.history)
    assert resumed.initial_fitness == full.initial_fitness
    assert torch.equal(resumed.best_weights, full.best_weights)
    torch.testing.assert_close(resumed.covariance, full.covariance)
    assert torch.equal(module.scores.weight_vector(), full.best_weights)
    assert resumed.reference_cosines == full.reference_cosines and (full.reference_cosines is None) == (guard == 0)
    # a state saved by another fitness cannot be resumed: its values are not comparable
    changes = ({"guard": guard + 1.0}, {"ratio_pairs": [(0.35, 0.2)]}, {"space": "pca"}, {"balance": None}, {"fitness_samples": 3})
    changes += ({"seed": 1},)  # with fitness_samples (default 64) the seed draws the fitness images' subset
    for change in changes:
        other = EvolutionarySearch(max_evals=8, images=x, **{**kw, **change})
        key = {"seed": "fitness_seed"}.get(next(iter(change)), next(iter(change)))
        with pytest.raises(ValueError, match=f"other fitness settings \\({key}: saved"):
            other.load_state_dict(state)
    # a state saved without the guard's reference and the settings (an older file): the reference is
    # recomputed from the start point, the settings are assumed, with a warning
    old = {k: v for k, v in state.items() if k not in ("reference_cosines", "fitness_settings")}
    again = EvolutionarySearch(max_evals=8, images=x, **kw)
    with pytest.warns(UserWarning, match="does not record its fitness settings"):
        again.load_state_dict(old)
    fit_with(again, model, scores, tmp_path)
    assert same_history(again.history, full.history)
    if guard:
        assert again.reference_cosines == pytest.approx(full.reference_cosines, abs=1e-12)
    # a finished search round-trips and evaluates only its start again (the state must be this run's)
    done = EvolutionarySearch(max_evals=8, images=x, **kw)
    done.load_state_dict(resumed.state_dict())
    fit_with(done, model, scores, tmp_path)
    assert done.fitness.num_evals == 1 and same_history(done.history, full.history)
    # a state restored into a run with other scores (or another model, other images) is refused
    for other_scores, other_x in ((random_scores(model, seed=7), x), (scores, images_for(model, n=6, seed=9))):
        stray = EvolutionarySearch(max_evals=8, images=other_x, **kw)
        stray.load_state_dict(state)
        with pytest.raises(ValueError, match=r"the restored search state started at fitness .*, this run's start is .*: "
                                             r"the state belongs to another model, other scores or other fitness images"):
            fit_with(stray, model, other_scores, tmp_path)
    # the same callback in a second fit, without load_state_dict: a new search, not the first's continuation
    fit_with(done, model, random_scores(model, seed=5), tmp_path)
    fresh = EvolutionarySearch(max_evals=8, images=x, **kw)
    fit_with(fresh, model, random_scores(model, seed=5), tmp_path)
    assert same_history(done.history, fresh.history) and done.initial_fitness == fresh.initial_fitness


# ------------------------------------------------------------------------------ DDP

_DDP_SCRIPT = """
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from snapvit_lightning.search import EvolutionarySearch
from snapvit_lightning.scores import ImportanceScores

torch.set_num_threads(1)
out = Path(sys.argv[1])
data = torch.load(out / "data.pt", weights_only=True)
model = torch.load(out / "model.pt", weights_only=False)


class Scoring(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.student = model
        self.scores = None
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        return None

    def on_train_epoch_end(self):
        self.scores = ImportanceScores.from_state_dict(data["scores"])

    def configure_optimizers(self):
        return None

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=1)


callback = EvolutionarySearch(images=data["images"], **data["kwargs"])
module = Scoring()
trainer = pl.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
)
trainer.fit(module)
torch.save(
    {"w": module.scores.weight_vector(), "cov": module.scores.covariance, "history": callback.history,
     "images": callback.fitness.images.shape[0], "world_size": trainer.world_size},
    out / f"rank{trainer.global_rank}.pt",
)
"""


# Two launches cover both spaces, the guard, the corrected fitness and early stops (each launch costs
# ~30 s of the CI budget; an uncorrected PCA run and a guarded run without stops add no other path).
@pytest.mark.parametrize("correct, space, guard, evals", [("lstsq", "pca", 0.0, 8), ("none", "raw", 10.0, 12)])
def test_ddp_two_processes_match_single_process(tmp_path: Path, correct: str, space: str, guard: float, evals: int) -> None:
    model, _, _ = small_vit()
    scores = random_scores(model)
    x = images_for(model, n=7)
    kwargs = {k: v for k, v in SEARCH_KW.items() if k != "log_every_n_evals"}
    kwargs["max_evals"] = evals
    if evals == 12:  # five pairs, 12 evaluations: early stops happen, decided alike on every rank
        kwargs["ratio_pairs"] = DEFAULT_RATIO_PAIRS
    kwargs["correct"] = correct  # corrected fitness: every rank collects the statistics on all images
    kwargs["space"] = space
    kwargs["guard"] = guard
    torch.save({"images": x, "scores": scores.state_dict(), "kwargs": kwargs}, tmp_path / "data.pt")
    torch.save(model, tmp_path / "model.pt")
    script = tmp_path / "ddp_search.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT))
    dist_vars = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["images"] for r in ranks] == [4, 3]  # images[rank::2]
    assert torch.equal(ranks[0]["w"], ranks[1]["w"]) and torch.equal(ranks[0]["cov"], ranks[1]["cov"])
    assert same_history(ranks[0]["history"], ranks[1]["history"])
    best_w, cov, history = run_search(model, scores, x, **kwargs)
    assert ranks[0]["history"] == pytest.approx(history, abs=1e-6, nan_ok=True)
    if evals == 12:
        assert any(math.isnan(f) for f in history)  # the stopped path ran
    torch.testing.assert_close(ranks[0]["w"], best_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(ranks[0]["cov"], cov, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------ fitness subset


def test_fitness_subset_draws_without_replacement_in_order_and_is_seeded() -> None:
    x = torch.arange(10, dtype=torch.float32)[:, None, None, None].expand(10, 3, 2, 2)
    sub = fitness_subset(x, 4, seed=3)
    kept = sub[:, 0, 0, 0].long().tolist()
    assert len(set(kept)) == 4 and kept == sorted(kept) and torch.equal(sub, x[kept])
    assert torch.equal(fitness_subset(x, 4, seed=3), sub) and not torch.equal(fitness_subset(x, 4, seed=4), sub)
    assert fitness_subset(x, None, 0) is x and fitness_subset(x, 10, 0) is x and fitness_subset(x, 99, 0) is x
    for bad in (1, 2.0, True):
        with pytest.raises(ValueError, match=r"fitness_samples must be an int >= 2 or None, got"):
            fitness_subset(x, bad, 0)


def test_run_search_on_a_fitness_subset_equals_a_search_on_those_images() -> None:
    model, _, _ = small_vit()
    raw, x = random_scores(model), images_for(model, n=8)
    kw = dict(max_evals=10, popsize=5, sigma=0.3, seed=2, autocast=False, pca_components=3)
    subset = run_search(model, raw, x, fitness_samples=5, **kw)
    direct = run_search(model, raw, fitness_subset(x, 5, 2), **kw)
    assert torch.equal(subset[0], direct[0]) and same_history(subset[2], direct[2])
    assert not same_history(run_search(model, raw, x, **kw)[2], subset[2])  # the subset changes the values


def test_run_search_reports_its_start_fitness_before_any_candidate() -> None:
    model, _, _ = small_vit()
    raw, x = random_scores(model), images_for(model, n=8)
    events: list[tuple[str, float]] = []
    run_search(model, raw, x, max_evals=6, popsize=3, sigma=0.3, seed=0, autocast=False, pca_components=6,
               on_start=lambda f: events.append(("start", f)), on_eval=lambda i, f, best: events.append(("eval", best)))
    assert [kind for kind, _ in events] == ["start"] + ["eval"] * 6
    scores, w0 = _balanced_start(raw, DEFAULT_BALANCE, None)
    fitness = Fitness(model, scores, x, DEFAULT_RATIO_PAIRS, 6, autocast_dtype=None, guard=DEFAULT_GUARD)
    assert events[0][1] == pytest.approx(fitness(w0), rel=1e-12)


def test_run_search_embeds_64_fitness_images_by_default() -> None:
    model, _, _ = small_vit()
    raw, x = random_scores(model), images_for(model, n=DEFAULT_FITNESS_SAMPLES + 6)
    kw = dict(max_evals=4, popsize=4, sigma=0.3, seed=1, autocast=False, pca_components=3)
    default = run_search(model, raw, x, **kw)
    assert same_history(default[2], run_search(model, raw, fitness_subset(x, 64, 1), fitness_samples=None, **kw)[2])
    assert not same_history(default[2], run_search(model, raw, x, fitness_samples=None, **kw)[2])


def test_callback_fitness_samples_is_a_fitness_setting() -> None:
    search = EvolutionarySearch(fitness_samples=6)
    assert search._fitness_settings()["fitness_samples"] == 6
    assert EvolutionarySearch()._fitness_settings()["fitness_samples"] == DEFAULT_FITNESS_SAMPLES == 64
    assert EvolutionarySearch(fitness_samples=None)._fitness_settings()["fitness_samples"] is None
    with pytest.raises(ValueError, match=r"fitness_samples must be an int >= 2 or None, got 1"):
        EvolutionarySearch(fitness_samples=1)


@pytest.mark.parametrize("start, match", [
    ({"initial_covariance": "abc"}, r"initial_covariance must be a \[18, 18\] matrix of numbers, got 'abc'"),
    ({"initial_weights": [1.0, None]}, r"initial_weights must be a finite tensor of shape \[18\] .*got \[1.0, None\]"),
    ({"initial_covariance": -torch.eye(18)}, "initial_covariance must be positive definite"),
])
def test_run_search_checks_its_start_before_the_fitness_embeds_images(monkeypatch, start, match) -> None:
    # torch's TypeErrors before; the checks came after the fitness images were embedded
    import snapvit_lightning.search.loop as loop

    model = timm.create_model("test_vit", pretrained=False, img_size=32).eval()
    monkeypatch.setattr(loop, "Fitness", lambda *a, **k: pytest.fail("the fitness was built before the start was checked"))
    with pytest.raises(ValueError, match=match):
        run_search(model, random_scores(model), torch.randn(4, 3, 32, 32), max_evals=2, **start)
