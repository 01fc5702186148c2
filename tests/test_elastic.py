from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from snapvit_lightning.elastic import DEFAULT_HEAD_RATIO_SCALE, ElasticViT, load_subnet, read_metadata, save_subnet
from snapvit_lightning.scores import HEAD_SHARE_KNEE, ImportanceScores, budget_line
from snapvit_lightning.structure import (
    UnsupportedModelError,
    block_dims,
    count_flops,
    count_params,
    get_blocks,
    measure_flops,
)

from conftest import TINY_MODELS, assert_close_fp32, load_real_model, model_input, random_scores, tiny_model

BUDGETS = [(0.0, 0.0), (0.15, 0.0), (0.35, 0.2), (0.65, 0.5), (0.9, 0.5)]  # the last: most blocks at their minimum keep


def _elastic(key: str) -> tuple[ElasticViT, torch.nn.Module]:
    model, name, kwargs = tiny_model(key)
    return ElasticViT(model, random_scores(model), model_name=name, model_kwargs=kwargs or None), model


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _masked_reference(model: torch.nn.Module, scores: ImportanceScores, mlp_ratio: float, head_ratio: float):
    """The dense model with the units the global ranking drops zeroed in fc2 / proj."""
    import copy

    masked = copy.deepcopy(model)
    neurons, heads = scores.keep_counts(mlp_ratio, head_ratio)
    mlp_order, head_order = scores.block_orders()
    with torch.no_grad():
        for b, block in enumerate(get_blocks(masked)):
            block.mlp.fc2.weight[:, mlp_order[b, neurons[b]:]] = 0
            hd = block.attn.head_dim
            for h in head_order[b, heads[b]:].tolist():
                block.attn.proj.weight[:, h * hd:(h + 1) * hd] = 0
    return masked


@pytest.mark.parametrize("key", list(TINY_MODELS))
def test_subnets_equal_masked_dense_model(key: str) -> None:
    elastic, dense = _elastic(key)
    x = model_input(dense)
    reference = _forward(dense, x)
    torch.testing.assert_close(_forward(elastic.model, x), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_forward(elastic.subnet(0.0, 0.0), x), reference, atol=1e-5, rtol=1e-5)
    for ratios in BUDGETS[1:]:
        sub = elastic.subnet(*ratios)
        masked = _masked_reference(dense, random_scores(dense), *ratios)
        torch.testing.assert_close(_forward(sub, x), _forward(masked, x), atol=1e-5, rtol=1e-5)
        # physically smaller, and FLOPs/params predicted without slicing match measurement
        cost = elastic.cost([block_dims(b) for b in get_blocks(sub)])
        assert cost["params"] == sum(p.numel() for p in sub.parameters())
        assert cost["flops"] == measure_flops(sub, x[:1])
    # the elastic model stays whole whatever was cut from it
    torch.testing.assert_close(_forward(elastic.model, x), reference, atol=1e-5, rtol=1e-5)


def test_subnet_is_a_copy_in_any_order() -> None:
    elastic, dense = _elastic("test_vit2")
    x = model_input(dense)
    small = _forward(elastic.subnet(0.65, 0.5), x)
    large = _forward(elastic.subnet(0.15, 0.0), x)
    torch.testing.assert_close(_forward(elastic.subnet(0.65, 0.5), x), small)
    torch.testing.assert_close(_forward(elastic.subnet(0.15, 0.0), x), large)
    assert not torch.allclose(small, large)


@pytest.mark.parametrize("key", ["test_vit3", "swiglu", "glu", "distilled", "registers"])
def test_save_load_round_trip(key: str, tmp_path) -> None:
    elastic, dense = _elastic(key)
    path = tmp_path / "m.elastic.safetensors"
    elastic.save(path)
    loaded = ElasticViT.load(path)
    x = model_input(dense)
    for ratios in BUDGETS:
        torch.testing.assert_close(_forward(loaded.subnet(*ratios), x), _forward(elastic.subnet(*ratios), x), atol=0, rtol=0)
    assert torch.equal(loaded.mlp_order, elastic.mlp_order)
    meta = read_metadata(path)
    assert meta["kind"] == "elastic" and meta["format_version"] == "1"
    assert meta["model_name"] == elastic.model_name and meta["input_size"] == list(elastic.input_size)
    assert {"snapvit_version", "timm_version"} <= set(meta)


@pytest.mark.parametrize("balance", [None, (0.5, 0.65), "rank"])
def test_search_weights_and_covariance_are_saved(tmp_path, balance) -> None:
    model, name, _ = tiny_model("test_vit")
    scores = random_scores(model)
    scale = torch.logspace(-2, 2, scores.num_blocks)[:, None]  # balancing changes the split across blocks
    scores = ImportanceScores(scores.mlp * scale, scores.heads * scale)
    if balance is not None:
        scores = scores.balanced(balance)
    w = torch.linspace(0.2, 1.8, scores.num_weights)
    scores = scores.with_weights(w, covariance=torch.diag(w))
    elastic = ElasticViT(model, scores)
    elastic.save(tmp_path / "w.elastic.safetensors")
    loaded = ElasticViT.load(tmp_path / "w.elastic.safetensors")
    assert torch.equal(loaded.scores.covariance, scores.covariance)
    assert torch.equal(loaded.scores.block_weights, scores.block_weights)
    assert [d for d in loaded.dims(0.5, 0.3)] == elastic.dims(0.5, 0.3)
    assert loaded.scores.balance == balance
    # ranking follows the weighted (balanced) scores, before and after the permutation and the file
    for ratios in ((0.5, 0.3), (0.65, 0.5)):
        expected = torch.stack(scores.keep_counts(*ratios))
        assert torch.equal(torch.stack(elastic.scores.keep_counts(*ratios)), expected)
        assert torch.equal(torch.stack(loaded.scores.keep_counts(*ratios)), expected)
    if balance is not None:
        raw = ImportanceScores(scores.mlp, scores.heads).with_weights(w)
        assert not torch.equal(torch.stack(raw.keep_counts(0.65, 0.5)), torch.stack(scores.keep_counts(0.65, 0.5)))


def test_subnet_file_round_trip(tmp_path) -> None:
    elastic, dense = _elastic("siglip")
    sub = elastic.subnet(0.55, 0.4)
    elastic.save_subnet(tmp_path / "sub.safetensors", sub)
    back = load_subnet(tmp_path / "sub.safetensors")
    x = model_input(dense)
    torch.testing.assert_close(_forward(back, x), _forward(sub, x), atol=0, rtol=0)
    assert [block_dims(b) for b in get_blocks(back)] == [block_dims(b) for b in get_blocks(sub)]
    assert read_metadata(tmp_path / "sub.safetensors")["kind"] == "subnet"
    with pytest.raises(ValueError, match=r"not an elastic model: load_subnet\(\) reads it"):
        ElasticViT.load(tmp_path / "sub.safetensors")


@pytest.mark.parametrize("kind", ["flops", "params"])
@pytest.mark.parametrize("fraction", [1.0, 0.8, 0.5])
def test_fraction_budgets(kind: str, fraction: float) -> None:
    elastic, dense = _elastic("test_vit4")
    s = DEFAULT_HEAD_RATIO_SCALE  # without statistics subnets are plain cuts: both alike by default
    for scale, ratios in ((1.0, elastic.resolve_budget(**{kind: fraction})), (s, elastic.resolve_budget(**{kind: fraction}, head_ratio_scale=s))):
        cost = elastic.cost(elastic.dims(*ratios))
        assert cost[f"{kind}_fraction"] <= fraction + 1e-12
        assert ratios[1] == pytest.approx(budget_line(ratios[0], scale)[1], abs=1e-12)  # s * r, then to (1, 1)
        assert ratios[1] == pytest.approx(scale * ratios[0]) or ratios[0] > HEAD_SHARE_KNEE
        if ratios[0] > 0:  # the largest model on the line that fits: a little less pruning does not fit
            slightly_less = elastic.cost(elastic.dims(*budget_line(ratios[0] - 1e-3, scale)))
            assert slightly_less[f"{kind}_fraction"] > fraction - 0.02
    sub = elastic.subnet(**{kind: fraction})
    assert count_params(sub)["total"] == elastic.cost(elastic.dims(*elastic.resolve_budget(**{kind: fraction})))["params"]


def test_the_head_share_of_a_fraction_follows_the_correction() -> None:
    # Held out, corrected subnets keep most with DEFAULT_HEAD_RATIO_SCALE of the MLP ratio cut from the heads, plain
    # cuts with both alike (docs/defaults.md); the plain cut of a fraction is the one of earlier versions.
    elastic, dense = _elastic("test_vit4")
    plain = elastic.resolve_budget(flops=0.6)
    assert plain[0] == plain[1]
    sub = elastic.subnet(flops=0.6, correct="none")
    assert [block_dims(b) for b in get_blocks(sub)] == elastic.dims(*plain)
    x = model_input(elastic.model, 4)
    elastic.attach_stats(elastic.collect_stats(torch.rand(8, *x.shape[1:]), ranking=True))
    corrected = elastic.resolve_budget(flops=0.6)  # statistics attached: subnet() corrects, so does the default share
    assert corrected == elastic.resolve_budget(flops=0.6, head_ratio_scale=DEFAULT_HEAD_RATIO_SCALE) != plain
    assert [block_dims(b) for b in get_blocks(elastic.subnet(flops=0.6, correct="none"))] == elastic.dims(*plain)
    assert count_flops(elastic.subnet(flops=0.6))["total"] == elastic.cost(elastic.ranked_view().dims(*corrected))["flops"]


@pytest.mark.parametrize("scale", [DEFAULT_HEAD_RATIO_SCALE, 0.0, 1.0])
def test_every_fraction_down_to_the_smallest_model_stays_reachable(scale: float) -> None:
    # Past HEAD_SHARE_KNEE the heads catch up: with a head share below 1 the neurons alone reached their minimum.
    elastic, _ = _elastic("test_vit4")
    top = math.nextafter(1.0, 0.0)
    floor = elastic.cost(elastic.dims(top, top))["flops_fraction"]
    mlp, head = elastic.resolve_budget(flops=floor, head_ratio_scale=scale)
    assert elastic.dims(mlp, head) == elastic.dims(top, top)
    with pytest.raises(ValueError, match=f"below the smallest reachable fraction {math.ceil(floor * 1e4) / 1e4:.4f}"):
        elastic.resolve_budget(flops=floor * 0.999, head_ratio_scale=scale)
    previous = None
    for f in torch.linspace(1.0, floor, 25).tolist():  # smaller budgets: never more of either kind of unit
        dims = elastic.dims(*elastic.resolve_budget(flops=max(f, floor), head_ratio_scale=scale))
        if previous is not None:
            assert all(a.num_heads <= b.num_heads and a.mlp_hidden <= b.mlp_hidden for a, b in zip(dims, previous))
        previous = dims


def test_budget_errors() -> None:
    elastic, _ = _elastic("test_vit")
    with pytest.raises(ValueError, match="flops must be a fraction in \\(0, 1\\]"):
        elastic.subnet(flops=0.0)
    with pytest.raises(ValueError, match="params must be a fraction"):
        elastic.subnet(params=1.5)
    with pytest.raises(ValueError, match="not both"):
        elastic.subnet(0.3, flops=0.5)
    with pytest.raises(ValueError, match="only one of flops and params"):
        elastic.subnet(flops=0.5, params=0.5)
    with pytest.raises(ValueError, match="below the smallest reachable fraction"):
        elastic.subnet(flops=0.01)
    with pytest.raises(ValueError, match="mlp_ratio must be a number in \\[0, 1\\)"):
        elastic.subnet(1.0, 0.0)
    with pytest.raises(TypeError, match="head_ratio_scale must be a number in \\[0, 1\\], got '1'"):
        elastic.subnet(flops=0.5, head_ratio_scale="1")
    with pytest.raises(TypeError, match=r"latency_budget\(\) got unknown options \['bogus'\]; .* warmup, repeats"):
        elastic.latency_budget(10.0, bogus=1)


def test_a_ratio_beyond_the_blocks_minimum_keep_is_named_by_the_cut_it_gives() -> None:
    elastic, _ = _elastic("test_vit")  # 192 neurons and 2 heads per block; each keeps 10 neurons and 1 head
    top = elastic.scores.max_ratios
    assert top == (1 - 10 / 192, 0.5)
    largest = elastic.subnet(*top)
    assert [b.mlp.fc1.out_features for b in largest.blocks] == [10] * len(largest.blocks)
    assert [b.attn.num_heads for b in largest.blocks] == [1] * len(largest.blocks)
    assert elastic.resolve_budget(0.99, 0.9) == top and elastic.resolve_budget(0.3, 0.9) == (0.3, 0.5)
    with pytest.warns(UserWarning) as said:  # as `snapvit slice` prints it (subnet() cut it without a word)
        capped = elastic.subnet(0.99, 0.9)
    assert [str(w.message) for w in said] == [
        f"mlp_ratio=0.99 cuts as {top[0]:.4f}: every block keeps its minimum (min_mlp_keep 0.05, min_head_keep 0.2); a "
        "larger ratio cuts no more", "head_ratio=0.9 cuts as 0.5000: every block keeps its minimum (min_mlp_keep 0.05, "
        "min_head_keep 0.2); a larger ratio cuts no more"] and said[0].filename == __file__
    assert [block_dims(b) for b in get_blocks(capped)] == [block_dims(b) for b in get_blocks(largest)]
    # A FLOPs fraction resolves to reachable ratios: the same cut, and a valid ratio budget (as `slice` passes it on).
    for fraction in (0.4, 0.45, 0.5, 0.7, 0.95):
        ratios = elastic.resolve_budget(flops=fraction)
        assert elastic.resolve_budget(*ratios) == ratios and ratios[1] <= 0.5
        assert elastic.dims(*ratios) == [block_dims(b) for b in get_blocks(elastic.subnet(flops=fraction))]


def test_a_subnet_budget_must_be_a_dict_a_subnet_file_can_hold(tmp_path) -> None:
    elastic, _ = _elastic("test_vit")
    with pytest.raises(TypeError, match="budget must be a dict of plain JSON values or None, got 'x'"):
        elastic.save_subnet(tmp_path / "s.safetensors", elastic.subnet(0.3), budget="x")
    with pytest.raises(TypeError, match=r"save_subnet\(model, path, ...\) takes the model first, got the path '.*s.safetensors'"):
        save_subnet(tmp_path / "s.safetensors", elastic.subnet(0.3), model_name="test_vit", model_kwargs={})
    with pytest.raises(TypeError, match=r"ElasticViT.save_subnet\(path, subnet, ...\) takes the path first, got a module"):
        elastic.save_subnet(elastic.subnet(0.3), tmp_path / "s.safetensors")
    assert not (tmp_path / "s.safetensors").exists()


def test_construction_errors() -> None:
    model, _, _ = tiny_model("test_vit")
    with pytest.raises(ValueError, match="do not match the model's"):
        ElasticViT(model, ImportanceScores(torch.rand(6, 10), torch.rand(6, 2)))
    with pytest.raises(UnsupportedModelError):
        ElasticViT(torch.nn.Linear(2, 2), random_scores(model))
    with pytest.raises(ValueError, match="not a registered timm model"):
        ElasticViT(model, random_scores(model), model_name="no_such_model")
    with pytest.raises(ValueError, match="does not rebuild this model"):
        ElasticViT(model, random_scores(model), model_name="test_vit2")
    headed = timm.create_model("test_vit", pretrained=False, num_classes=8)  # a fine-tuner's own head module
    headed.head = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(headed.embed_dim, 8))
    with pytest.raises(ValueError, match=r"does not rebuild this model's classifier head .* a head replaced after timm "
                                         r"built the ViT is rebuilt by no model_kwargs; keep the ViT headless"):
        ElasticViT(headed, random_scores(headed))
    with pytest.raises(ValueError, match="JSON values only.*timm.models.register_model"):
        ElasticViT(model, random_scores(model), model_kwargs={"act_layer": torch.nn.GELU})
    with pytest.raises(TypeError, match="scores must be ImportanceScores, got str"):
        ElasticViT(model, "scores.safetensors")
    sliced, _, _ = tiny_model("test_vit")
    from snapvit_lightning.structure import slice_block

    slice_block(sliced.blocks[0], 1, 10)
    with pytest.raises(ValueError, match="blocks of different sizes"):
        ElasticViT(sliced, random_scores(model))


def test_options_without_weights_are_recorded_or_refused(tmp_path) -> None:
    # A file records model_name/model_kwargs; options that change no weight shape (an activation, pooling
    # over the prefix tokens, the block class) were dropped without a word, and the file loaded as another model.
    import timm
    from timm.models.vision_transformer import ResPostBlock

    def build(**options):
        torch.manual_seed(0)
        return timm.create_model("test_vit", pretrained=False, img_size=32, **options).eval()

    for options, difference in [
        ({"act_layer": "silu"}, "blocks.0.mlp.act: rebuilt GELU, this model SiLU; blocks.1.mlp.act:"),  # in block order
        ({"global_pool": "avg", "pool_include_prefix": True},
         "<model>: rebuilt {'pool_include_prefix': False}, this model {'pool_include_prefix': True}"),
        ({"block_fn": ResPostBlock, "init_values": 0.1}, "blocks.0: rebuilt Block, this model ResPostBlock"),
        ({"norm_layer": "rmsnorm"}, "blocks.0.norm1.bias: rebuilt (64,), this model nothing"),  # by the weights
        ({"mlp_ratio": 2.0}, "blocks.0.mlp.fc2.weight: rebuilt (64, 192), this model (64, 128)"),  # 2-tuples: shapes, not settings
    ]:
        model = build(**options)
        with pytest.raises(ValueError, match=f"does not rebuild this model.*{re.escape(difference)}"):
            ElasticViT(model, random_scores(model))
    model = build(act_layer="silu")
    elastic = ElasticViT(model, random_scores(model), model_kwargs={"img_size": 32, "act_layer": "silu"})
    elastic.save(tmp_path / "silu.elastic.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ElasticViT.load(tmp_path / "silu.elastic.safetensors").model(x), elastic.model(x))
    model = build(drop_rate=0.1, drop_path_rate=0.1)  # the identity in eval mode: nothing to record
    assert ElasticViT(model, random_scores(model)).model_kwargs == {
        "num_classes": 1000, "img_size": [32, 32], "global_pool": "token", "dynamic_img_size": True}
    model = build(dynamic_img_size=False)  # test_vit's default is True: recorded either way
    fixed = ElasticViT(model, random_scores(model))
    assert fixed.model_kwargs["dynamic_img_size"] is False
    fixed.save(tmp_path / "fixed.elastic.safetensors")
    assert ElasticViT.load(tmp_path / "fixed.elastic.safetensors").model.dynamic_img_size is False


def test_bad_files_raise_and_change_nothing(tmp_path) -> None:
    elastic, _ = _elastic("test_vit")
    good = tmp_path / "good.elastic.safetensors"
    elastic.save(good)
    with pytest.raises(FileNotFoundError, match="no elastic checkpoint or subnet file"):
        ElasticViT.load(tmp_path / "missing.elastic.safetensors")
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        ElasticViT.load(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        ElasticViT.load(tmp_path / "junk.safetensors")
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pth")  # was "corrupt or truncated?: header too large"
    with pytest.raises(ValueError, match=r"weights.pth is a zip or pickle file \(torch.save's formats\), not safetensors; .* never unpickles"):
        ElasticViT.load(tmp_path / "weights.pth")
    with pytest.raises(TypeError, match="path must be a file path .*, got int"):
        read_metadata(5)
    with pytest.raises(ValueError, match="model_name 3 is not a registered timm model"):  # was an AttributeError
        ElasticViT(elastic.model, elastic.scores, model_name=3)

    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(good))

    def variant(name: str, **changes: str) -> str:
        path = tmp_path / name
        save_file(tensors, str(path), metadata={**meta, **changes})
        return str(path)

    with pytest.raises(ValueError, match="has format_version '99'"):
        ElasticViT.load(variant("v99.safetensors", format_version="99"))
    with pytest.raises(ValueError, match="is a safetensors file without snapvit's metadata \\(model weights\\?\\); this reads elastic checkpoint or subnet files"):
        ElasticViT.load(variant("other.safetensors", format="something-else"))
    with pytest.raises(ValueError, match=r"model_name 'os.system' is not a registered timm model \(one your own code "
                                         r"registers with timm's @register_model: load the file from Python after "
                                         r"importing that code\)$"):
        ElasticViT.load(variant("name.safetensors", model_name="os.system"))
    with pytest.raises(ValueError, match="the weights do not fit"):
        ElasticViT.load(variant("dims.safetensors", block_dims=json.dumps([[1, 5]] * 6)))
    with pytest.raises(ValueError, match="embed_dim=32 but the patch embedding has 64"):
        ElasticViT.load(variant("kw.safetensors", model_kwargs=json.dumps({"embed_dim": 32})))
    scores_bad = dict(tensors)
    scores_bad["scores.mlp"] = torch.rand(6, 7)
    save_file(scores_bad, str(tmp_path / "scores.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="do not match the model's"):
        ElasticViT.load(tmp_path / "scores.safetensors")
    # a failed save leaves no file behind
    with pytest.raises(ValueError):
        save_subnet(elastic.model, tmp_path / "bad.safetensors", model_name="test_vit", model_kwargs={"depth": 2})
    assert not (tmp_path / "bad.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_real_dinov2_slicing(real_weights) -> None:
    """The real DINOv2 ViT-S/14 at 112 px: (0.35, 0.2) cuts block params by the expected amount."""
    model = load_real_model(real_weights)
    elastic = ElasticViT(model, random_scores(model), model_name="vit_small_patch14_dinov2",
                         model_kwargs={"num_classes": 0, "img_size": 112})
    sub = elastic.subnet(0.35, 0.2)  # its speed is measured by `python -m snapvit_lightning.bench_slice`
    dims = [block_dims(b) for b in get_blocks(sub)]
    assert sum(d.mlp_hidden for d in dims) == 12 * 1536 - round(0.35 * 12 * 1536)
    assert sum(d.num_heads for d in dims) == 12 * 6 - round(0.2 * 72)
    dense_blocks = sum(count_params(model)["blocks"])
    sub_blocks = sum(count_params(sub)["blocks"])
    # per neuron: fc1 row + bias + fc2 column = 769; per head: 64 * (3 * 385 + 384) = 98496
    expected_cut = round(0.35 * 12 * 1536) * 769 + round(0.2 * 72) * 98496
    assert dense_blocks - sub_blocks == expected_cut
    x = torch.randn(2, 3, 112, 112)
    assert torch.isfinite(_forward(sub, x)).all()


# ----------------------------------------------------------------------------------------------
# Corrected subnets cut by the statistics' own ranking


def _with_ranking(elastic: ElasticViT, images: torch.Tensor, seed: int = 11):
    """Statistics of ``elastic`` carrying a random ranking (distinct positive scores)."""
    import dataclasses

    g = torch.Generator().manual_seed(seed)
    stats = elastic.collect_stats(images)
    return dataclasses.replace(stats, ranking_mlp=torch.rand(elastic.scores.mlp.shape, generator=g) + 0.01,
                               ranking_heads=torch.rand(elastic.scores.heads.shape, generator=g) + 0.01)


def _plain_cut(elastic: ElasticViT, mlp_ratio: float, head_ratio: float) -> torch.nn.Module:
    """Today's plain subnet, built without subnet(): the permuted model, sliced."""
    import copy

    from snapvit_lightning.structure import slice_model

    sub = copy.deepcopy(elastic.model)
    slice_model(sub, elastic.dims(mlp_ratio, head_ratio))
    return sub


def _gathered_corrected(elastic: ElasticViT, stats, mlp_ratio: float, head_ratio: float, method: str):
    """The elastic model's top units by the ranking, gathered per block, each cut layer refitted
    directly from the statistics in the elastic model's own order (no permuted statistics)."""
    import copy

    from snapvit_lightning.correction import _assign, augmented_weight, solve_layer, stats_damping
    from snapvit_lightning.structure import select_units

    ranking = ImportanceScores(stats.ranking_mlp, stats.ranking_heads, min_mlp_keep=elastic.scores.min_mlp_keep,
                               min_head_keep=elastic.scores.min_head_keep)
    neurons, heads = ranking.keep_counts(mlp_ratio, head_ratio)
    sub, kept = copy.deepcopy(elastic.model), []
    for i, (dense, block) in enumerate(zip(get_blocks(elastic.model), get_blocks(sub))):
        keep_n = torch.argsort(stats.ranking_mlp[i], descending=True, stable=True)[: int(neurons[i])]
        keep_h = torch.argsort(stats.ranking_heads[i], descending=True, stable=True)[: int(heads[i])]
        kept.append((keep_n, keep_h))
        select_units(block, keep_n, keep_h)
        hd = dense.attn.head_dim
        channels = (keep_h[:, None] * hd + torch.arange(hd)).flatten()
        for layer, whole, moment, index in ((block.mlp.fc2, dense.mlp.fc2, stats.mlp[i], keep_n),
                                             (block.attn.proj, dense.attn.proj, stats.attn[i], channels)):
            n = whole.in_features
            if len(index) == n:
                continue
            cols = torch.cat([index, torch.tensor([n])])
            gram = moment.double()
            weight, bias = solve_layer(augmented_weight(whole) @ gram[:, cols], whole.weight.detach().double()[:, index],
                                       gram[cols][:, cols], whole.bias is not None, method, stats_damping(None, stats),
                                       "mean", f"block {i}")
            _assign(layer, weight, bias)
    return sub, kept


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("key", "method"), [("test_vit", "lstsq"), ("test_vit2", "lstsq"), ("swiglu", "lstsq"), ("test_vit", "bias")])
def test_corrected_subnet_keeps_the_top_units_of_the_statistics_ranking(key: str, method: str) -> None:
    elastic, dense = _elastic(key)
    images = model_input(dense, batch=6, seed=5)
    stats = _with_ranking(elastic, images)
    elastic.attach_stats(stats)
    view = elastic.ranked_view()
    assert view is elastic.ranked_view() and view.model is not elastic.model  # built once, a copy
    ranking = elastic.ranking_scores()  # the ranking as scores of the elastic model's units: the view's order
    assert ranking.criterion == "corrected-ranking" and torch.equal(ranking.mlp, stats.ranking_mlp)
    assert torch.equal(ranking.mlp[torch.arange(ranking.num_blocks)[:, None], view.mlp_order], view.scores.mlp)
    assert view.stats.fingerprint == view.fingerprint != elastic.fingerprint and not view.stats.has_ranking
    # The permuted statistics are those of the view's own model (collected again, up to rounding).
    again = view.collect_stats(images)
    torch.testing.assert_close(view.stats.mlp, again.mlp, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(view.stats.attn, again.attn, rtol=1e-4, atol=1e-5)
    x = model_input(dense, batch=2, seed=7)
    for ratios in ((0.4, 0.5), (0.65, 0.5)):
        sub = elastic.subnet(*ratios, correct=method)
        reference, kept = _gathered_corrected(elastic, stats, *ratios, method)
        for (name, a), (ref_name, b) in zip(sub.state_dict().items(), reference.state_dict().items()):
            assert name == ref_name
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        assert_close_fp32(_forward(sub, x), _forward(reference, x))
        for i, (keep_n, keep_h) in enumerate(kept):  # the view's prefix: exactly the ranking's top units
            assert set(view.mlp_order[i, : len(keep_n)].tolist()) == set(keep_n.tolist())
            assert set(view.head_order[i, : len(keep_h)].tolist()) == set(keep_h.tolist())
        # The same FLOPs and parameters as the plain cut at these ratios (other counts per block).
        plain_dims, dims = elastic.dims(*ratios), [block_dims(b) for b in get_blocks(sub)]
        assert dims == view.dims(*ratios) and dims != plain_dims
        cost = elastic.cost(plain_dims)
        assert count_params(sub)["total"] == cost["params"] and measure_flops(sub, x[:1]) == cost["flops"]
        # The plain path is today's, bit for bit.
        plain, expected = elastic.subnet(*ratios, correct="none").state_dict(), _plain_cut(elastic, *ratios).state_dict()
        assert list(plain) == list(expected) and all(torch.equal(plain[k], expected[k]) for k in plain)


@pytest.mark.usefixtures("one_thread")
def test_latency_budget_times_the_cuts_subnet_gives() -> None:
    """With a ranking attached the bisection times the ranked cuts (other per-block widths), not plain ones."""
    elastic, dense = _elastic("test_vit")
    elastic.attach_stats(_with_ranking(elastic, model_input(dense, batch=6, seed=5)))
    timed: list[list] = []

    def timer(models):  # a deterministic latency: 1 ms per MFLOP; records what was timed
        timed.extend([block_dims(b) for b in get_blocks(m)] for m in models)
        return [count_flops(m)["total"] / 1e6 for m in models]

    target = 0.7 * count_flops(dense)["total"] / 1e6
    widths = lambda model: [block_dims(b) for b in get_blocks(model)]  # noqa: E731
    for correct in ("auto", "none"):
        timed.clear()
        budget = elastic.latency_budget(target, timer=timer, correct=correct)
        chosen, other = elastic.subnet(flops=budget.flops, correct=correct), elastic.subnet(
            flops=budget.flops, correct="none" if correct == "auto" else "lstsq")
        assert widths(chosen) in timed and widths(other) != widths(chosen) and widths(other) not in timed


def test_ranked_view_is_used_only_for_one_shot_corrections_and_rebuilt_for_new_statistics() -> None:
    elastic, dense = _elastic("test_vit")
    images = model_input(dense, batch=6, seed=5)
    stats = _with_ranking(elastic, images)
    unranked = elastic.collect_stats(images)

    def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
        sa, sb = a.state_dict(), b.state_dict()
        return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)

    # Without a ranking: as before, the corrected cut of the elastic model's own prefix.
    elastic.attach_stats(unranked)
    assert elastic.ranked_view() is None
    assert same(elastic.subnet(0.4, 0.5), elastic.slice(elastic.dims(0.4, 0.5), correct="lstsq"))
    # A ranking passed as calibration is used too; attaching statistics drops the cached view.
    by_calibration = elastic.subnet(0.4, 0.5, calibration=stats)
    first = elastic.ranked_view(stats)
    elastic.attach_stats(stats)
    view = elastic.ranked_view()
    assert view is not first and same(elastic.subnet(0.4, 0.5), by_calibration)
    assert same(elastic.subnet(0.4, 0.5), view.slice(view.dims(0.4, 0.5), correct="lstsq"))
    elastic.attach_stats(stats)
    assert elastic.ranked_view() is not view
    # slice() and images (one-shot or sequential) keep the checkpoint's order.
    dims = elastic.dims(0.4, 0.5)
    sliced = elastic.slice(dims)
    assert [block_dims(b) for b in get_blocks(sliced)] == dims
    sequential = elastic.subnet(0.4, 0.5, correct="lstsq", calibration=images, sequential=True)
    assert same(sequential, elastic.slice(dims, correct="lstsq", calibration=images, sequential=True))
    # A FLOPs budget resolves to the same ratios at one head share; the ranked cut has the plain cut's size.
    ranked, plain = elastic.subnet(flops=0.6), elastic.subnet(flops=0.6, correct="none", head_ratio_scale=DEFAULT_HEAD_RATIO_SCALE)
    assert count_params(ranked)["total"] == count_params(plain)["total"]
    assert measure_flops(ranked, images[:1]) == measure_flops(plain, images[:1])
    # Statistics of another elastic model are refused before any view is built.
    with pytest.raises(TypeError, match="stats must be CorrectionStats or None"):
        elastic.ranked_view(images)
    foreign = _with_ranking(_elastic("test_vit")[0], images)
    foreign.fingerprint = "0" * 16
    with pytest.raises(ValueError, match="belong to another elastic model"):
        elastic.subnet(0.4, 0.5, calibration=foreign)


@pytest.mark.usefixtures("one_thread")
def test_collect_stats_with_ranking_and_the_ranked_cut_round_trip(tmp_path) -> None:
    elastic, dense = _elastic("test_vit2")
    images = model_input(dense, batch=4, seed=5)
    stats = elastic.collect_stats(images, ranking=True)
    assert stats.has_ranking and stats.ranking_mlp.shape == elastic.scores.mlp.shape
    assert not elastic.collect_stats(images).has_ranking  # opt-in
    path = tmp_path / "m.elastic.safetensors"
    elastic.save(path)
    stats.save(tmp_path / "m.stats.safetensors")
    loaded = ElasticViT.load(path)
    assert loaded.stats.has_ranking
    elastic.attach_stats(stats)
    a, b = elastic.subnet(0.5, 0.5), loaded.subnet(0.5, 0.5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _damaged(tmp_path, edit) -> Path:
    """The tiny elastic checkpoint, its tensors and metadata changed by ``edit(tensors, meta)``."""
    el, _ = _elastic("test_vit")
    path = tmp_path / "m.elastic.safetensors"
    el.save(path)
    tensors, meta = load_file(str(path)), read_metadata(path)
    edit(tensors, meta)
    save_file(tensors, str(path), metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    return path


def _set_kwargs(meta: dict, **kwargs) -> None:
    meta["model_kwargs"] = {**(json.loads(meta["model_kwargs"]) if isinstance(meta["model_kwargs"], str) else meta["model_kwargs"]), **kwargs}


@pytest.mark.parametrize(
    ("edit", "match"),
    [  # damaged files a new user's probe loaded as good (or built for minutes)
        (lambda t, m: t["model.blocks.0.mlp.fc1.weight"].view(-1)[0].fill_(float("nan")),
         "model tensor 'blocks.0.mlp.fc1.weight' holds NaN or infinite values"),
        (lambda t, m: t.update({"model.blocks.0.mlp.fc1.weight": t["model.blocks.0.mlp.fc1.weight"].half()}),
         r"must share one floating dtype, got \['float16', 'float32'\]"),
        (lambda t, m: _set_kwargs(m, depth=1_000_000), "depth=1000000 but block_dims lists"),
        (lambda t, m: _set_kwargs(m, embed_dim=60_000), "embed_dim=60000 but the patch embedding has"),
        (lambda t, m: _set_kwargs(m, act_layer="os.system"), "the weights do not fit test_vit"),
        (lambda t, m: t["order.mlp"][0].fill_(0), "order.mlp must hold a permutation of each block's units"),
        (lambda t, m: t.update({"order.heads": t["order.heads"].int()}), "order.heads must hold a permutation"),
        (lambda t, m: m.update(input_size=[1_000_000, 1_000_000]), r"input_size \[1000000, 1000000\] is not the model's"),
        (lambda t, m: _set_kwargs(m, checkpoint_path="/etc/passwd"), "model_kwargs holds checkpoint_path='/etc/passwd'"),
        # a forged depth beside as many block_dims built that model for minutes (30000: 197 s, 2.5 GB) before refusing
        (lambda t, m: (_set_kwargs(m, depth=300), m.update(block_dims=[[2, 192]] * 300)),
         "block_dims lists 300 blocks, but the file's weights hold 6"),
        (lambda t, m: (_set_kwargs(m, depth=30_000), m.update(block_dims=[[2, 192]] * 30_000)),
         r"block_dims lists 30000 blocks, more than any ViT has \(at most 1024\)"),
    ],
)
def test_damaged_checkpoints_are_refused_on_load(tmp_path, edit, match) -> None:
    path = _damaged(tmp_path, edit)
    with pytest.raises(ValueError, match=match):
        ElasticViT.load(path)


def test_a_folder_given_as_a_checkpoint_is_named(tmp_path) -> None:
    with pytest.raises(IsADirectoryError, match="is a folder; give the elastic checkpoint or subnet file"):
        ElasticViT.load(tmp_path)


def test_arguments_that_would_be_ignored_or_out_of_range_are_refused() -> None:
    # A new user's probe: these ran and silently ignored the argument, or returned a nonsense cost.
    from snapvit_lightning.structure import BlockDims

    el, _ = _elastic("test_vit")
    with pytest.raises(ValueError, match=r"head_ratio_scale=0.5 applies to a flops/params fraction only"):
        el.subnet(0.3, head_ratio_scale=0.5)
    with pytest.raises(ValueError, match=r"calibration/sequential/damping/damping_reference are only used with"):
        el.subnet(0.3, damping=0.01, correct="none")
    with pytest.raises(ValueError, match=r"dims must be a list of 6 BlockDims .* got list of 6"):
        el.slice([(2, 16)] * 6)
    with pytest.raises(ValueError, match=r"dims\[0\] = .* is outside the block's 2 heads and \d+ neurons"):
        el.cost([BlockDims(1000, 99999)] * 6)
    with pytest.raises(ValueError, match=r"dims must be a list of 6 BlockDims .* got NoneType"):
        el.cost(None)


def test_given_model_kwargs_are_completed_by_what_the_model_says(tmp_path) -> None:
    # model_kwargs=dict(depth=..., embed_dim=..., num_heads=...) replaced the sizes read from the model, so the
    # rebuild was refused again on the classifier and the position embedding until every setting was spelled out.
    import timm

    kwargs = dict(depth=1, embed_dim=32, num_heads=2)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, num_classes=5, **kwargs).eval()
    elastic = ElasticViT(model, random_scores(model), model_kwargs=kwargs)
    assert elastic.model_kwargs == {**kwargs, "img_size": [32, 32], "num_classes": 5, "global_pool": "token",
                                    "dynamic_img_size": False}
    elastic.save(tmp_path / "m.elastic.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ElasticViT.load(tmp_path / "m.elastic.safetensors").model(x), elastic.model(x))
    given = ElasticViT(model, random_scores(model), model_kwargs={**kwargs, "img_size": 32}).model_kwargs
    assert given["img_size"] == 32  # what is given wins


_DEPLOY_SCRIPT = """
import sys

BLOCKED = ("lightning", "pytorch_lightning", "lightning_fabric", "lightning_utilities", "torchmetrics", "jsonargparse",
           "matplotlib", "skimage", "torchdata")


class Block:  # a deploying machine without the training stack: importing any of it fails
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed here")
        return None


sys.meta_path.insert(0, Block())
import torch
from snapvit_lightning import ElasticViT, load_subnet

elastic = ElasticViT.load(sys.argv[1])  # with the statistics beside it
sub = load_subnet(sys.argv[2])
x = torch.load(sys.argv[3], weights_only=True)
with torch.no_grad():
    assert torch.equal(sub(x), torch.load(sys.argv[4], weights_only=True))
    assert torch.allclose(elastic.subnet(0.5, 0.5)(x), sub(x), atol=1e-5)  # corrected, as sliced before
print("loaded", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


def test_a_subnet_loads_and_slices_without_the_training_stack(tmp_path) -> None:
    """usage.md: a deploying machine needs torch, timm, safetensors and this package without its dependencies."""
    import subprocess
    import sys

    from snapvit_lightning.correction import stats_path_for

    model, name, kwargs = tiny_model("test_vit")
    elastic = ElasticViT(model, random_scores(model), model_name=name, model_kwargs=kwargs)
    x = model_input(model, 3)
    elastic.attach_stats(elastic.collect_stats(torch.rand(8, *x.shape[1:]), ranking=True))
    path = tmp_path / "m.elastic.safetensors"
    elastic.save(path)
    elastic.stats.save(stats_path_for(path))
    sub = elastic.subnet(0.5, 0.5)
    elastic.save_subnet(tmp_path / "sub.safetensors", sub)
    with torch.no_grad():
        torch.save(load_subnet(tmp_path / "sub.safetensors")(x), tmp_path / "y.pt")
    torch.save(x, tmp_path / "x.pt")
    (tmp_path / "deploy.py").write_text(_DEPLOY_SCRIPT)
    run = subprocess.run([sys.executable, str(tmp_path / "deploy.py"), str(path), str(tmp_path / "sub.safetensors"),
                          str(tmp_path / "x.pt"), str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("loaded []")


def test_a_model_resized_after_the_build_saves_and_loads_at_its_new_size(tmp_path) -> None:
    # timm's set_input_size (what the docs point to for other sizes) left model_kwargs at the old img_size:
    # save() wrote a file that load() refused ("size mismatch for pos_embed"), save_subnet() refused to write
    model = timm.create_model("test_vit", pretrained=False, img_size=64, dynamic_img_size=False).eval()
    elastic = ElasticViT(model, random_scores(model))
    elastic.model.set_input_size(img_size=96)
    elastic.save(tmp_path / "m.elastic.safetensors")
    loaded = ElasticViT.load(tmp_path / "m.elastic.safetensors")
    x = torch.randn(2, 3, 96, 96)
    assert loaded.model_kwargs["img_size"] == [96, 96] and loaded.input_size == (96, 96)
    assert torch.equal(_forward(loaded.model, x), _forward(elastic.model, x))
    # the in-memory model's FLOPs follow the new size too (they were the old size's: flops budgets refused)
    fresh = ElasticViT(elastic.model, elastic.scores)
    assert elastic.cost(elastic.dims(0.5, 0.5)) == fresh.cost(fresh.dims(0.5, 0.5))
    assert elastic.resolve_budget(flops=0.6) == fresh.resolve_budget(flops=0.6)
    sub = elastic.subnet(0.5, 0.5, correct="none")
    sub.set_input_size(img_size=(96, 64))
    elastic.save_subnet(tmp_path / "s.safetensors", sub)
    y = torch.randn(2, 3, 96, 64)
    assert torch.equal(_forward(load_subnet(tmp_path / "s.safetensors"), y), _forward(sub, y))
    elastic.model.set_input_size(img_size=96, patch_size=8)  # model_kwargs do not record a patch size: refused, not written
    with pytest.raises(ValueError, match=r"state dict shapes differ from the rebuilt model \(patch_embed.proj.weight: "
                                         r"\[64, 3, 8, 8\], rebuilt \[64, 3, 16, 16\]"):
        elastic.save(tmp_path / "p8.elastic.safetensors")
    assert not (tmp_path / "p8.elastic.safetensors").exists()
    headless = timm.create_model("test_vit", pretrained=False, num_classes=0)  # rebuilt with the default head: named
    with pytest.raises(ValueError, match=r"head.bias: missing, rebuilt \[1000\].*\); the model is headless: pass "
                                         r"model_kwargs with num_classes=0"):
        save_subnet(headless, tmp_path / "h.safetensors", model_name="test_vit", model_kwargs={})


def test_forward_hooks_on_the_model_are_named_in_a_warning() -> None:
    # a hook that doubled a block's output went, without a word, into every subnet and an ONNX graph
    model = timm.create_model("test_vit", pretrained=False).eval()
    model.blocks[0].mlp.register_forward_hook(lambda module, args, out: 2 * out)
    with pytest.warns(UserWarning, match=r"model has forward hooks on blocks.0.mlp: they are copied into the elastic model"):
        ElasticViT(model, random_scores(model))


def test_paths_with_a_tilde_are_the_home_folder(tmp_path, monkeypatch) -> None:
    # save() made a literal ./~ folder, load() read from it; export_elastic and the data paths expanded ~
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    elastic, model = _elastic("test_vit")
    elastic.attach_stats(elastic.collect_stats(model_input(model, batch=4)))
    elastic.save("~/m.elastic.safetensors")
    elastic.save_subnet("~/s.safetensors", elastic.subnet(0.5, 0.5, correct="none"))
    assert (tmp_path / "m.elastic.safetensors").is_file() and (tmp_path / "s.safetensors").is_file()
    assert not (tmp_path / "~").exists()
    assert ElasticViT.load("~/m.elastic.safetensors").stats is not None  # found beside it: the subnets stay corrected
    assert read_metadata("~/s.safetensors")["kind"] == "subnet"


def test_a_corrected_fraction_subnet_is_cut_under_inference_mode(tmp_path) -> None:
    # FLOP counting and the statistics' weight versions failed on tensors made under inference_mode
    elastic, model = _elastic("test_vit")
    elastic.attach_stats(elastic.collect_stats(model_input(model, batch=4), ranking=True))
    elastic.save(tmp_path / "m.elastic.safetensors")
    x = model_input(model, batch=2)
    with torch.inference_mode():
        loaded = ElasticViT.load(tmp_path / "m.elastic.safetensors")
        inside = loaded.subnet(flops=0.6)(x)
    assert torch.equal(inside, _forward(ElasticViT.load(tmp_path / "m.elastic.safetensors").subnet(flops=0.6), x))
