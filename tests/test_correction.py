"""Weight correction: invariants on tiny models, errors, stored statistics, and the real model."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path

import pytest
import timm
import torch

from conftest import load_real_model, model_input, random_scores, tiny_model
from snapvit_lightning.checkpoint import read_metadata
from snapvit_lightning.correction import CorrectionStats, SingularGramError, correct_subnet
from snapvit_lightning.elastic import ElasticViT
from snapvit_lightning.obs import stream_energy
from snapvit_lightning.scores import ImportanceScores
from snapvit_lightning.structure import BlockDims, get_blocks


def _elastic(key: str = "test_vit", seed: int = 0) -> ElasticViT:
    model, name, kwargs = tiny_model(key, seed)
    return ElasticViT(model, random_scores(model, seed), model_name=name, model_kwargs=kwargs)


def _images(model: torch.nn.Module, n: int = 12, seed: int = 3) -> torch.Tensor:
    return model_input(model, batch=n, seed=seed)


def _full_dims(el: ElasticViT) -> list[BlockDims]:
    return [BlockDims(b.num_heads, b.mlp_hidden) for b in el.structure.blocks]


def _redundant(seed: int = 0) -> tuple[ElasticViT, torch.Tensor]:
    """test_vit whose block-0 MLP neuron 5 copies neuron 2 and is ranked last, so it is cut first."""
    model, name, kwargs = tiny_model("test_vit", seed)
    fc1 = get_blocks(model)[0].mlp.fc1
    with torch.no_grad():
        fc1.weight[5] = fc1.weight[2]
        fc1.bias[5] = fc1.bias[2]
    scores = random_scores(model, seed)
    mlp = scores.mlp + 1.0
    mlp[0, 5] = 0.0
    el = ElasticViT(model, ImportanceScores(mlp, scores.heads + 1.0), model_name=name, model_kwargs=kwargs)
    return el, _images(model, n=16)


@pytest.mark.parametrize("key", ["test_vit", "test_vit2", "swiglu", "glu"])
@pytest.mark.parametrize("method", ["bias", "lstsq"])
@pytest.mark.parametrize("sequential", [False, True])
def test_nothing_removed_changes_nothing(key: str, method: str, sequential: bool) -> None:
    el = _elastic(key)
    images = _images(el.model)
    calibration = images if sequential else el.collect_stats(images)
    sub = el.subnet(0.0, 0.0, correct=method, calibration=calibration, sequential=sequential)
    for (name, a), b in zip(el.model.state_dict().items(), sub.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("source", ["stats", "images", "sequential"])
def test_redundant_neuron_is_restored_exactly(source: str) -> None:
    el, images = _redundant()
    dims = _full_dims(el)
    dims[0] = BlockDims(dims[0].num_heads, dims[0].mlp_hidden - 1)
    calibration = el.collect_stats(images) if source == "stats" else images
    x = _images(el.model, n=4, seed=9)
    with torch.inference_mode():
        dense = el.model(x)
        plain = el.slice(dims)(x)
        fixed = el.slice(dims, correct="lstsq", calibration=calibration, damping=0.0, sequential=source == "sequential")(x)
    assert (plain - dense).abs().max() > 1e-3  # the cut matters
    torch.testing.assert_close(fixed, dense, rtol=0, atol=2e-5)


def test_bias_compensation_equals_analytic_expectation() -> None:
    el = _elastic("test_vit")
    images = _images(el.model, n=10)
    inputs: dict[int, list[torch.Tensor]] = {}
    handles = [
        get_blocks(el.model)[i].mlp.fc2.register_forward_pre_hook(
            lambda m, a, i=i: inputs.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for i in range(len(get_blocks(el.model)))
    ]
    with torch.inference_mode():
        el.model(images)
    for h in handles:
        h.remove()
    dims = el.dims(0.5, 0.0)
    sub = el.slice(dims, correct="bias", calibration=el.collect_stats(images))
    for i, (dense_block, block, d) in enumerate(zip(get_blocks(el.model), get_blocks(sub), dims)):
        mean = torch.cat(inputs[i]).double().mean(0)
        k = d.mlp_hidden
        w, b = dense_block.mlp.fc2.weight.double(), dense_block.mlp.fc2.bias.double()
        expected = b + w[:, k:] @ mean[k:]
        torch.testing.assert_close(block.mlp.fc2.bias.double(), expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(block.mlp.fc2.weight, dense_block.mlp.fc2.weight[:, :k])


@pytest.mark.parametrize("damping", [0.0, 0.05, 0.5])
def test_lstsq_minimises_the_damped_objective_of_the_obs_costs(damping: float) -> None:
    """lstsq solves min E||Wx+b - W'x~-b'||^2 + lam ||W' - W_kept||^2: the ridge pulls towards the dense weights.

    The closed form is the OBS refit (tests/test_obs.py): the damped Gram matrix throughout,
    ``[W' | b'] = [W | b] G_d[:, cols] (G_d[cols, cols])^-1``.
    """
    el = _elastic("test_vit")
    stats = el.collect_stats(_images(el.model, n=16))
    dims = el.dims(0.5, 0.5)
    sub = el.slice(dims, correct="lstsq", calibration=stats, damping=damping)
    for i, (dense, block, d) in enumerate(zip(get_blocks(el.model), get_blocks(sub), dims)):
        hd = dense.attn.head_dim
        for layer, whole, moment, k in ((block.mlp.fc2, dense.mlp.fc2, stats.mlp[i], d.mlp_hidden),
                                        (block.attn.proj, dense.attn.proj, stats.attn[i], d.num_heads * hd)):
            n = whole.in_features
            g = moment.double().clone()
            diag = torch.diagonal(g)[:n]
            lam = damping * float(diag[:k].mean())  # the damping is relative to the kept inputs' diagonal
            diag += lam
            cols = torch.cat([torch.arange(k), torch.tensor([n])])
            w_aug = torch.cat([whole.weight.double(), whole.bias.double()[:, None]], 1)
            expected = torch.linalg.solve(g[cols][:, cols], (w_aug @ g[:, cols]).T).T
            torch.testing.assert_close(layer.weight.double(), expected[:, :k].float().double(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(layer.bias.double(), expected[:, k].float().double(), rtol=1e-4, atol=1e-5)


def test_default_damping_is_automatic_from_the_calibration_tokens() -> None:
    """``damping=None`` (the default) is auto_damping(neurons, images, tokens): larger for fewer images or
    tokens, with the tokens of one image counting less than independent images, never below the floor."""
    from snapvit_lightning.correction import AUTO_DAMPING, MIN_DAMPING, auto_damping, stats_damping

    assert auto_damping(1536, 12, 12 * 65) == pytest.approx(AUTO_DAMPING * 1536 / (12 * 65**0.5))
    assert auto_damping(1536, 10**4, 10**6) == MIN_DAMPING
    assert auto_damping(1536, 12, 780) > auto_damping(1536, 12, 1560) > auto_damping(1536, 24, 1560)
    with pytest.raises(ValueError, match="num_tokens must be >= 1 with num_tokens >= num_images, got 1536, 1 and 0"):
        auto_damping(1536, 1, 0)
    with pytest.raises(ValueError, match="got 1536, 12 and 6"):
        auto_damping(1536, 12, 6)
    el = _elastic("test_vit")
    images = _images(el.model, n=4)
    stats = el.collect_stats(images)
    hidden = el.structure.blocks[0].mlp_hidden
    auto = stats_damping(None, stats)
    assert auto == auto_damping(hidden, stats.num_images, stats.num_tokens) > MIN_DAMPING and stats_damping(0.2, stats) == 0.2
    dims = el.dims(0.5, 0.5)

    def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

    by_default = el.slice(dims, correct="lstsq", calibration=stats)
    assert same(by_default, el.slice(dims, correct="lstsq", calibration=stats, damping=auto))
    assert not same(by_default, el.slice(dims, correct="lstsq", calibration=stats, damping=0.01))
    # Images: their statistics' tokens; sequential: the same count, from the images' token grid.
    assert same(el.slice(dims, correct="lstsq", calibration=images), by_default)
    sequential = el.slice(dims, correct="lstsq", calibration=images, sequential=True)
    assert same(sequential, el.slice(dims, correct="lstsq", calibration=images, sequential=True, damping=auto))


def test_singular_gram_raises_without_damping() -> None:
    model, name, kwargs = tiny_model("test_vit")
    fc1 = get_blocks(model)[0].mlp.fc1
    with torch.no_grad():  # a dead neuron: GELU(-30) == 0 on every token
        fc1.weight[7].zero_()
        fc1.bias[7] = -30.0
    scores = random_scores(model)
    mlp = scores.mlp + 1.0
    mlp[0, 7] = 10.0  # ranked first, so it stays
    el = ElasticViT(model, ImportanceScores(mlp, scores.heads + 1.0), model_name=name, model_kwargs=kwargs)
    stats = el.collect_stats(_images(model))
    dims = el.dims(0.3, 0.0)
    with pytest.raises(SingularGramError, match=r"block 0 mlp\.fc2.*not positive definite"):
        el.slice(dims, correct="lstsq", calibration=stats, damping=0.0)
    sub = el.slice(dims, correct="lstsq", calibration=stats, damping=0.01)  # damping makes it solvable
    assert all(torch.isfinite(p).all() for p in sub.parameters())


def test_correction_works_under_inference_mode_and_keeps_elastic_model() -> None:
    el = _elastic("test_vit")
    before = {k: v.clone() for k, v in el.model.state_dict().items()}
    images = _images(el.model)
    with torch.inference_mode():
        stats = el.collect_stats(images)
        sub = el.subnet(0.5, 0.25, correct="lstsq", calibration=stats)
        out = sub(images[:2])
    assert torch.isfinite(out).all()
    for k, v in el.model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(("method", "factor"), [("bias", 0.95), ("lstsq", 0.3)])
def test_correction_reduces_output_error(method: str, factor: float) -> None:
    el = _elastic("test_vit")
    calib, held_out = _images(el.model, n=24, seed=3), _images(el.model, n=8, seed=4)
    with torch.inference_mode():
        dense = el.model.forward_features(held_out)
        plain = el.subnet(0.5, 0.25).forward_features(held_out)
        fixed = el.subnet(0.5, 0.25, correct=method, calibration=el.collect_stats(calib)).forward_features(held_out)
    assert (fixed - dense).pow(2).mean() < factor * (plain - dense).pow(2).mean()


def test_stats_round_trip_and_size(tmp_path: Path) -> None:
    el = _elastic("test_vit")
    stats = el.collect_stats(_images(el.model, n=5))
    s = el.structure.blocks[0]
    c = get_blocks(el.model)[0].attn.proj.in_features
    assert stats.attn.shape == (len(el.structure.blocks), c + 1, c + 1)
    assert stats.mlp.shape == (len(el.structure.blocks), s.mlp_hidden + 1, s.mlp_hidden + 1)
    assert stats.num_images == 5 and stats.num_tokens == 5 * (el.model.patch_embed.num_patches + el.model.num_prefix_tokens)
    assert stats.nbytes == 4 * len(el.structure.blocks) * ((c + 1) ** 2 + (s.mlp_hidden + 1) ** 2)
    torch.testing.assert_close(stats.mlp[:, -1, -1], torch.ones(len(el.structure.blocks)))
    path = tmp_path / "m.stats.safetensors"
    stats.save(path)
    loaded = CorrectionStats.load(path)
    assert torch.equal(loaded.mlp, stats.mlp) and torch.equal(loaded.attn, stats.attn)
    assert (loaded.num_images, loaded.num_tokens, loaded.fingerprint) == (5, stats.num_tokens, el.fingerprint)
    a = el.subnet(0.4, 0.2, correct="lstsq", calibration=stats)
    b = ElasticViT.load(_save(el, tmp_path)).subnet(0.4, 0.2, correct="lstsq", calibration=loaded)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    assert loaded.views_per_image is None  # not recorded for a tensor of images
    dataclasses.replace(stats, views_per_image=5).save(path)
    assert CorrectionStats.load(path).views_per_image == 5  # the export and `snapvit stats` record it
    for bad in (0, 2, 2.5, True):  # 2 does not divide the 5 inputs
        with pytest.raises(ValueError, match=f"views_per_image must be None or an int >= 1 that divides num_images \\(5\\), got {bad}"):
            dataclasses.replace(stats, views_per_image=bad)


def test_stats_record_the_size_they_were_collected_at(tmp_path: Path) -> None:
    # `slice --img-size` and `info` name it: statistics, scores and search are measured at one size
    el = _elastic("test_vit")
    h, w = el.input_size
    stats = el.collect_stats(_images(el.model, n=3), ranking=True)
    assert stats.image_size == (h, w)
    path = tmp_path / "m.stats.safetensors"
    stats.save(path)
    assert CorrectionStats.load(path).image_size == (h, w)
    assert stats.permuted(el.mlp_order, el.head_order, el.fingerprint).image_size == (h, w)
    dataclasses.replace(stats, image_size=None).save(path)  # as files written before it was recorded
    assert CorrectionStats.load(path).image_size is None
    for bad in ((0, 32), (32,), (32.5, 32), "32", (True, 32)):
        with pytest.raises(ValueError, match=r"image_size must be None or \(H, W\), two ints >= 1, got"):
            dataclasses.replace(stats, image_size=bad)


def _save(el: ElasticViT, tmp_path: Path) -> Path:
    path = tmp_path / "m.elastic.safetensors"
    el.save(path)
    return path


def test_stats_of_another_model_are_refused(tmp_path: Path) -> None:
    a, b = _elastic("test_vit", seed=0), _elastic("test_vit", seed=1)
    stats = a.collect_stats(_images(a.model, n=4))
    with pytest.raises(ValueError, match="belong to another elastic model"):
        b.subnet(0.3, 0.2, correct="lstsq", calibration=stats)
    with pytest.raises(FileNotFoundError, match="no correction statistics file"):
        CorrectionStats.load(tmp_path / "missing.stats.safetensors")
    with pytest.raises(ValueError, match="holds an elastic checkpoint or a subnet; this reads correction statistics files"):
        CorrectionStats.load(_save(a, tmp_path))
    junk = tmp_path / "junk.stats.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        CorrectionStats.load(junk)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t, m: t["mlp_triu"].view(-1)[0].fill_(float("nan")), "'mlp' must hold finite float second moments"),
        (lambda t, m: t["attn_triu"][:, 0].fill_(-1.0), "'attn' must hold finite float second moments"),
        (lambda t, m: m.update(num_images="0"), "num_images must be an int >= 1 and num_tokens an int >= num_images, got 0"),
        (lambda t, m: t["mlp_triu"].zero_(), "'mlp' must hold finite float second moments"),  # failed later as "use a larger damping"
        (lambda t, m: t.update(attn_triu=t["attn_triu"].long()), "'attn' must hold finite float second moments"),
    ],
)
def test_damaged_stats_are_refused_on_load(tmp_path: Path, edit, match) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    el = _elastic()
    path = tmp_path / "m.stats.safetensors"
    el.collect_stats(_images(el.model, n=4)).save(path)
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    edit(tensors, meta)
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match=rf"{path.name}: invalid correction statistics: {match}"):
        CorrectionStats.load(path)


def test_the_constructor_refuses_what_load_refuses() -> None:
    # they were taken and failed at subnet(), NaN ones as "not positive definite ... use a larger damping"
    good = _elastic().collect_stats(_images(_elastic().model, n=4))
    nan = good.mlp.clone()
    nan[0, 0, 0] = float("nan")
    for changes, match in [
        (dict(mlp=nan), "'mlp' must hold finite float second moments"),
        (dict(attn=good.attn[0]), r"'attn' must be a \[B, n, n\] torch.Tensor, got \(65, 65\)"),
        (dict(attn=good.attn[:1]), r"'attn' and 'mlp' have different block counts \(1 and 6\)"),
        (dict(num_images=-1), "num_images must be an int >= 1 and num_tokens an int >= num_images, got -1"),
        (dict(num_images="4"), "num_images must be an int >= 1 .* got '4'"),
        (dict(num_tokens=0), "num_tokens an int >= num_images"),
        (dict(fingerprint=None), "fingerprint must be a str"),
    ]:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(good, **changes)
    import numpy as np

    counted = dataclasses.replace(good, num_images=np.int64(good.num_images), num_tokens=torch.tensor(good.num_tokens))
    assert (counted.num_images, counted.num_tokens) == (good.num_images, good.num_tokens)  # numpy/tensor counts: ints
    with pytest.raises(ValueError, match=r"'mlp' must be a \[B, n, n\] torch.Tensor, got a ndarray, not a torch.Tensor"):
        dataclasses.replace(good, mlp=good.mlp.numpy())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(correct="lstsq"), "needs calibration"),
        (dict(correct="none", calibration="x"), "only used with correct='bias' or 'lstsq'"),
        # the default without statistics is the plain cut: say that calibration= is what is missing
        (dict(correct="auto", sequential=True), r"got correct='none' \(the default when no statistics are attached "
                                                r"and no calibration= is given: pass calibration=CorrectionStats or images"),
        (dict(correct="obs"), "correct must be one of"),
        (dict(correct="lstsq", damping=-1.0), r"damping must be None \(automatic\) or a finite number >= 0"),
        (dict(correct="lstsq", damping_reference="median"), "damping_reference must be one of"),
    ],
)
def test_bad_correction_options(kwargs: dict, match: str) -> None:
    el = _elastic("test_vit")
    kwargs.setdefault("calibration", None)
    with pytest.raises(ValueError, match=match):
        el.subnet(0.3, 0.2, **kwargs)


def test_bad_calibration_inputs() -> None:
    el = _elastic("test_vit")
    with pytest.raises(ValueError, match=r"calibration images must be .*\[N, 3, H, W\]"):
        el.subnet(0.3, 0.2, correct="lstsq", calibration=torch.zeros(3, 4))
    images = _images(el.model, n=2)
    with pytest.raises(ValueError, match=r"calibration images must be .*\[N, 3, H, W\] for this model, got \[2, 1, "):
        el.subnet(0.3, 0.2, calibration=images[:, :1])  # channels
    for sequential in (False, True):
        with pytest.raises(ValueError, match="calibration images hold non-finite values"):
            el.subnet(0.3, 0.2, calibration=torch.full_like(images, float("nan")), sequential=sequential)
    with pytest.raises(TypeError, match="ranking must be a bool, got 'yes'"):
        el.collect_stats(images, ranking="yes")
    with pytest.raises(ValueError, match="calibration images are on the meta device"):
        el.collect_stats(images.to("meta"))
    fixed = _elastic("distilled")  # a fixed input size: 64 px
    with pytest.raises(ValueError, match=r"calibration images must be .*\[N, 3, 64, 64\] for this model, got \[2, 3, 32, 32\]"):
        fixed.subnet(0.3, 0.2, calibration=_images(fixed.model, n=2)[:, :, :32, :32])
    with pytest.raises(ValueError, match=r"\[N, 3, 64, 64\]"):
        stream_energy(fixed.model, _images(fixed.model, n=2)[:, :, :32, :32])
    with pytest.raises(ValueError, match="sequential=True needs calibration images"):
        el.subnet(0.3, 0.2, correct="lstsq", calibration=el.collect_stats(_images(el.model, n=2)), sequential=True)
    with pytest.raises(ValueError, match=r"calibration images: 40 x 40 px images do not cut into this model's 16 x 16"):
        el.subnet(0.3, 0.2, calibration=torch.randn(2, 3, 40, 40))  # a dynamic-size model: multiples of the patch


@pytest.mark.parametrize("key", ["test_vit", "swiglu", "glu"])
def test_a_subnet_is_corrected_only_against_the_model_it_was_cut_from(key: str) -> None:
    model, name, kwargs = tiny_model(key)
    original = copy.deepcopy(model)
    el = ElasticViT(model, random_scores(model), model_name=name, model_kwargs=kwargs)
    images = _images(el.model, n=8)
    with pytest.raises(ValueError, match="block 0: the subnet's kept neurons and heads are not the first ones of `dense`"):
        correct_subnet(original, el.subnet(0.5, correct="none"), images)  # unpermuted: other units' columns
    with pytest.raises(ValueError, match="not the first ones of `dense`"):
        correct_subnet(el.model, _elastic(key, seed=1).subnet(0.5, correct="none"), images)  # another model
    expected = correct_subnet(el.model, el.subnet(0.5, correct="none"), images)
    assert torch.equal(expected.blocks[0].mlp.fc2.weight, el.subnet(0.5, calibration=images).blocks[0].mlp.fc2.weight)
    halved = correct_subnet(el.model, el.subnet(0.5, correct="none").to(torch.bfloat16), images.to(torch.bfloat16))
    assert halved.blocks[0].mlp.fc2.weight.dtype == torch.bfloat16


def test_norm_over_cut_dimension_needs_sequential() -> None:
    torch.manual_seed(0)
    kwargs = dict(depth=2, embed_dim=64, num_heads=2, img_size=32, scale_attn_norm=True, scale_mlp_norm=True)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, **kwargs).eval()
    el = ElasticViT(model, random_scores(model), model_name="vit_small_patch16_224", model_kwargs=kwargs)
    images = _images(model, n=8)
    with pytest.raises(ValueError, match="norm over the cut dimension.*sequential=True"):
        el.subnet(0.4, 0.5, correct="lstsq", calibration=images)
    sub = el.subnet(0.4, 0.5, correct="lstsq", calibration=images, sequential=True)
    assert torch.isfinite(sub(images[:2])).all()


def test_real_model_correction_keeps_more_features(real_weights: Path, photos_dir: Path) -> None:
    """Cross-fitted on photos8: calibrate on even images, measure fidelity on odd ones."""
    from snapvit_lightning.data import load_eval_images
    from snapvit_lightning.evaluation import extract_features, feature_fidelity

    model = load_real_model(real_weights)
    images, _, _ = load_eval_images(photos_dir, model)
    from snapvit_lightning.module import SnapViTModule  # magnitude scores: data-free and deterministic

    scores = SnapViTModule(model, criterion="magnitude").compute_scores()
    el = ElasticViT(model, scores, model_name="vit_small_patch14_dinov2", model_kwargs=dict(num_classes=0, img_size=112))
    calib, held_out = images[0::2], images[1::2]
    stats = el.collect_stats(calib)
    dense = extract_features(el.model, held_out)
    plain = feature_fidelity(extract_features(el.subnet(0.55, 0.4), held_out), dense)
    fixed = feature_fidelity(extract_features(el.subnet(0.55, 0.4, correct="lstsq", calibration=stats), held_out), dense)
    assert fixed > plain + 0.1, (plain, fixed)


@pytest.mark.parametrize("img_size", [112, 224])
def test_real_model_automatic_damping_keeps_more_from_few_photos(real_weights: Path, photos_dir: Path, img_size: int) -> None:
    """12 calibration photos (a seeded subset of photos8's even positions), measured on the odd half (every
    other one at 224 px), which they never saw: the automatic damping (0.254 at 112 px, 0.128 at 224 px) keeps
    more of the dense features than a fixed 0.01, for the corrected path as shipped (ranking and solve both
    damped; docs/defaults.md, "Damping of the correction"). Here: .840 vs .782 at 112 px, .872 vs .816 at 224."""
    from snapvit_lightning.data import load_eval_images
    from snapvit_lightning.evaluation import extract_features, feature_fidelity
    from snapvit_lightning.module import SnapViTModule
    from snapvit_lightning.obs import with_ranking

    model = load_real_model(real_weights, img_size=img_size)
    scores = SnapViTModule(model, criterion="magnitude").compute_scores()
    el = ElasticViT(model, scores, model_name="vit_small_patch14_dinov2",
                    model_kwargs=dict(num_classes=0, img_size=img_size))
    images = load_eval_images(photos_dir, el.model)[0]
    calib = images[0::2][torch.randperm(98, generator=torch.Generator().manual_seed(0))[:12]]
    held_out = images[1::2] if img_size == 112 else images[1::4]  # 49 at 224 px, where a forward costs 4x
    stats = el.collect_stats(calib)
    dense = extract_features(el.model, held_out)
    kept = {}
    for damping in (None, 0.01):
        ranked = with_ranking(el.model, stats, calib, damping=damping, min_mlp_keep=scores.min_mlp_keep,
                              min_head_keep=scores.min_head_keep)
        subnets = [el.subnet(m, h, calibration=ranked, damping=damping) for m, h in ((0.35, 0.2), (0.55, 0.4))]
        kept[damping] = sum(feature_fidelity(extract_features(sub, held_out), dense) for sub in subnets) / 2
    assert kept[None] > kept[0.01] + 0.03, kept


# ----------------------------------------------------------------------------------------------
# Corrected by default: attached statistics, compact files


def _plain_reference(el: ElasticViT, mlp_ratio: float, head_ratio: float) -> torch.nn.Module:
    """The plain cut as it always was, built without subnet(): the permuted model, sliced."""
    import copy

    from snapvit_lightning.structure import slice_model

    sub = copy.deepcopy(el.model)
    slice_model(sub, el.dims(mlp_ratio, head_ratio))
    return sub


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("key", ["test_vit", "test_vit2", "swiglu"])
def test_subnet_default_is_corrected_when_stats_exist(key: str) -> None:
    el = _elastic(key)
    stats = el.collect_stats(_images(el.model, n=6))
    assert _same(el.subnet(0.4, 0.3), _plain_reference(el, 0.4, 0.3))  # nothing attached: the plain cut
    assert _same(el.subnet(0.4, 0.3, calibration=stats), el.subnet(0.4, 0.3, correct="lstsq", calibration=stats))
    el.attach_stats(stats)
    corrected = el.subnet(0.4, 0.3)
    assert _same(corrected, el.subnet(0.4, 0.3, correct="lstsq", calibration=stats))
    assert not _same(corrected, _plain_reference(el, 0.4, 0.3))
    assert _same(el.subnet(0.4, 0.3, correct="none"), _plain_reference(el, 0.4, 0.3))  # bit for bit
    if key != "swiglu":  # no bias to compensate into
        assert _same(el.subnet(0.4, 0.3, correct="bias"), el.subnet(0.4, 0.3, correct="bias", calibration=stats))
    el.attach_stats(None)
    assert _same(el.subnet(0.4, 0.3), _plain_reference(el, 0.4, 0.3))


def test_prepared_targets_match_the_direct_solve() -> None:
    el = _elastic("test_vit")
    stats = el.collect_stats(_images(el.model, n=6))
    el.attach_stats(stats)
    for budget in ((0.2, 0.0), (0.6, 0.5), (0.3, 0.2)):  # any order, from the same prepared targets
        fast, direct = el.subnet(*budget), el.subnet(*budget, correct="lstsq", calibration=stats)
        for a, b in zip(fast.state_dict().values(), direct.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_load_attaches_stats_beside_and_checks_them(tmp_path: Path) -> None:
    el = _elastic("test_vit")
    path = _save(el, tmp_path)
    assert ElasticViT.load(path).stats is None
    stats = el.collect_stats(_images(el.model, n=4))
    stats.save(tmp_path / "m.stats.safetensors")
    loaded = ElasticViT.load(path)
    assert loaded.stats is not None and torch.equal(loaded.stats.mlp, stats.mlp)
    assert _same(loaded.subnet(0.5, 0.5), el.subnet(0.5, 0.5, correct="lstsq", calibration=stats))
    assert ElasticViT.load(path, stats=False).stats is None
    other = _elastic("test_vit", seed=1)
    other.collect_stats(_images(other.model, n=4)).save(tmp_path / "m.stats.safetensors")
    with pytest.raises(ValueError, match=r"m\.stats\.safetensors.*belong to another elastic model"):
        ElasticViT.load(path)
    assert ElasticViT.load(path, stats=False).stats is None
    with pytest.raises(ValueError, match="belong to another elastic model"):
        el.attach_stats(CorrectionStats.load(tmp_path / "m.stats.safetensors"))
    with pytest.raises(TypeError, match="stats must be CorrectionStats or None"):
        el.attach_stats(tmp_path)
    # the right fingerprint, matrices of another size: attached and announced, refused only by the first subnet()
    small = dataclasses.replace(stats, attn=stats.attn[:, :33, :33].clone())
    with pytest.raises(ValueError, match=r"'attn' matrices are \(6, 33, 33\), this model needs \[6, 65, 65\]"):
        el.attach_stats(small)
    small.save(tmp_path / "m.stats.safetensors")
    with pytest.raises(ValueError, match=r"m\.stats\.safetensors \(beside .*\): the correction statistics' 'attn' matrices"):
        ElasticViT.load(path)


def test_save_writes_the_attached_stats_beside_the_checkpoint(tmp_path: Path) -> None:
    el = _elastic("test_vit")
    el.attach_stats(el.collect_stats(_images(el.model, n=4), ranking=True))
    el.save(tmp_path / "copy.elastic.safetensors")
    loaded = ElasticViT.load(tmp_path / "copy.elastic.safetensors")
    assert loaded.stats is not None and loaded.stats.has_ranking
    assert _same(loaded.subnet(0.5, 0.5), el.subnet(0.5, 0.5))  # corrected, as before the save
    el.save(tmp_path / "alone.elastic.safetensors", stats=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone.elastic.safetensors", "copy.elastic.safetensors",
                                                         "copy.stats.safetensors"]
    with pytest.raises(TypeError, match="stats must be a bool"):
        el.save(tmp_path / "x.elastic.safetensors", stats="yes")


def test_load_warns_when_the_statistics_written_with_a_checkpoint_are_gone(tmp_path: Path) -> None:
    # Shipping the elastic file alone silently gave plain subnets (cosine .51 against .95 corrected, helper's ViT-S).
    el = _elastic("test_vit")
    el.attach_stats(el.collect_stats(_images(el.model, n=4)))
    el.save(tmp_path / "m.elastic.safetensors")
    el.save(tmp_path / "alone.elastic.safetensors", stats=False)
    assert read_metadata(tmp_path / "m.elastic.safetensors")["stats_file"] == "m.stats.safetensors"
    assert "stats_file" not in read_metadata(tmp_path / "alone.elastic.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none while they are there, or for a checkpoint written alone
        assert ElasticViT.load(tmp_path / "m.elastic.safetensors").stats is not None
        assert ElasticViT.load(tmp_path / "alone.elastic.safetensors").stats is None
    (tmp_path / "m.stats.safetensors").unlink()
    with pytest.warns(UserWarning, match=r"m\.elastic\.safetensors was written with correction statistics "
                                         r"\(m\.stats\.safetensors\), but there are none beside it .* plain subnets"):
        moved = ElasticViT.load(tmp_path / "m.elastic.safetensors")
    assert moved.stats is None and _same(moved.subnet(0.5, 0.5), el.subnet(0.5, 0.5, correct="none"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ElasticViT.load(tmp_path / "m.elastic.safetensors", stats=False)  # the model alone, as asked


@pytest.mark.parametrize("fold_rows", [1 << 15, 7])  # 7: folds into float64 after every batch of 5 images
def test_stats_are_the_second_moments_of_the_cut_layers_inputs(monkeypatch: pytest.MonkeyPatch, fold_rows: int) -> None:
    from snapvit_lightning import correction

    monkeypatch.setattr(correction, "_FOLD_ROWS", fold_rows)
    el = _elastic("test_vit2")
    images = _images(el.model, n=13)
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        layer.register_forward_pre_hook(lambda m, args, key=key: seen.setdefault(key, []).append(args[0].detach()))
        for i, block in enumerate(get_blocks(el.model))
        for key, layer in ((f"attn{i}", block.attn.proj), (f"mlp{i}", block.mlp.fc2))
    ]
    with torch.no_grad():
        el.model(images)
    for h in handles:
        h.remove()
    stats = correction.collect_stats(el.model, images, batch_size=5)
    for branch, stored in (("attn", stats.attn), ("mlp", stats.mlp)):
        assert torch.equal(stored, stored.transpose(1, 2))
        for i in range(stored.shape[0]):
            x = seen[f"{branch}{i}"][0].double().flatten(0, -2)
            xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
            torch.testing.assert_close(stored[i].double(), xa.T @ xa / x.shape[0], rtol=1e-5, atol=1e-6)


def test_stats_file_stores_upper_triangles_losslessly(tmp_path: Path) -> None:
    from safetensors import safe_open

    el = _elastic("test_vit2")
    stats = el.collect_stats(_images(el.model, n=5))
    for t in (stats.attn, stats.mlp):
        assert torch.equal(t, t.transpose(1, 2))  # exactly symmetric
    path = tmp_path / "m.stats.safetensors"
    stats.save(path)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["attn_triu", "mlp_triu"] and f.metadata()["format_version"] == "3"
        stored = sum(f.get_tensor(k).numel() * 4 for k in f.keys())
    b, n, m = stats.mlp.shape[0], stats.attn.shape[1], stats.mlp.shape[1]
    assert stored == stats.stored_bytes == 4 * b * (n * (n + 1) // 2 + m * (m + 1) // 2)
    assert stats.stored_bytes < 0.51 * stats.nbytes
    loaded = CorrectionStats.load(path)
    assert torch.equal(loaded.attn, stats.attn) and torch.equal(loaded.mlp, stats.mlp)
    asymmetric = CorrectionStats(stats.attn.clone(), stats.mlp.clone(), 5, stats.num_tokens, stats.fingerprint)
    asymmetric.mlp[0, 0, 1] += 1.0
    with pytest.raises(ValueError, match="'mlp' are not symmetric"):
        asymmetric.save(tmp_path / "bad.stats.safetensors")


def test_version_1_stats_file_is_still_read(tmp_path: Path) -> None:
    from snapvit_lightning.checkpoint import _write

    el = _elastic("test_vit")
    stats = el.collect_stats(_images(el.model, n=4))
    path = tmp_path / "m.stats.safetensors"
    _write(path, {"attn": stats.attn, "mlp": stats.mlp}, {  # what version 1 wrote: the full matrices
        "format": "snapvit-correction-stats", "format_version": "1", "num_images": "4",
        "num_tokens": str(stats.num_tokens), "fingerprint": stats.fingerprint, "snapvit_version": "0"})
    loaded = CorrectionStats.load(path)
    assert torch.equal(loaded.attn, stats.attn) and torch.equal(loaded.mlp, stats.mlp)
    assert _same(ElasticViT.load(_save(el, tmp_path)).subnet(0.4, 0.2), el.subnet(0.4, 0.2, calibration=stats))
    _write(path, {"attn_triu": stats.attn[:, 0]}, {"format": "snapvit-correction-stats", "format_version": "4"})
    with pytest.raises(ValueError, match="format_version '4'.*reads versions 1, 2, 3"):
        CorrectionStats.load(path)


def _ranked_stats(el: ElasticViT, n: int = 4, seed: int = 0) -> CorrectionStats:
    """Statistics of ``el`` with a random ranking (distinct positive scores)."""
    import dataclasses

    g = torch.Generator().manual_seed(seed)
    stats = el.collect_stats(_images(el.model, n=n))
    return dataclasses.replace(stats, ranking_mlp=torch.rand(el.scores.mlp.shape, generator=g),
                               ranking_heads=torch.rand(el.scores.heads.shape, generator=g))


def test_ranking_is_stored_in_version_3_and_older_files_load_without_one(tmp_path: Path) -> None:
    from safetensors import safe_open

    from snapvit_lightning.checkpoint import _write
    from snapvit_lightning.correction_stats import _triu

    el = _elastic("test_vit")
    stats = _ranked_stats(el)
    assert stats.has_ranking and stats.ranking_mlp.dtype == torch.float64
    path = tmp_path / "m.stats.safetensors"
    stats.save(path)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["attn_triu", "mlp_triu", "ranking_heads", "ranking_mlp"]
        assert f.metadata()["format_version"] == "3"
        stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    b, n, m = stats.mlp.shape[0], stats.attn.shape[1], stats.mlp.shape[1]
    ranking_bytes = 8 * b * (el.scores.mlp_hidden + el.scores.num_heads)
    assert stored == stats.stored_bytes == 4 * b * (n * (n + 1) // 2 + m * (m + 1) // 2) + ranking_bytes
    assert stats.nbytes == 4 * b * (n * n + m * m) + ranking_bytes
    loaded = CorrectionStats.load(path)
    assert torch.equal(loaded.ranking_mlp, stats.ranking_mlp) and torch.equal(loaded.ranking_heads, stats.ranking_heads)
    assert torch.equal(loaded.mlp, stats.mlp) and loaded.fingerprint == stats.fingerprint
    # Version 2 (what the previous release wrote): triangles only, loads with no ranking.
    meta = {"format": "snapvit-correction-stats", "format_version": "2", "num_images": "4",
            "num_tokens": str(stats.num_tokens), "fingerprint": stats.fingerprint, "snapvit_version": "0"}
    _write(path, {"attn_triu": _triu(stats.attn), "mlp_triu": _triu(stats.mlp)}, meta)
    old = CorrectionStats.load(path)
    assert not old.has_ranking and old.ranking_heads is None and torch.equal(old.attn, stats.attn)
    assert old.stored_bytes == stats.stored_bytes - ranking_bytes


def test_a_ranking_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    import dataclasses

    from snapvit_lightning.checkpoint import _write
    from snapvit_lightning.correction_stats import _triu

    el = _elastic("test_vit")
    stats = _ranked_stats(el)
    b, hidden, heads = el.scores.num_blocks, el.scores.mlp_hidden, el.scores.num_heads
    for change, match in (
        ({"ranking_heads": None}, "ranking_mlp and ranking_heads must be given together"),
        ({"ranking_mlp": torch.rand(b, hidden - 1)}, rf"ranking_mlp must be \[{b}, {hidden}\].*got \({b}, {hidden - 1}\)"),
        ({"ranking_mlp": torch.rand(b + 1, hidden)}, rf"ranking_mlp must be a \[{b}, units\] tensor.*got \({b + 1}, {hidden}\)"),
        ({"ranking_heads": torch.rand(b, 5)}, "ranking_heads has 5 heads per block, which do not divide"),
        ({"ranking_heads": -torch.rand(b, heads)}, "ranking_heads must hold finite, non-negative"),
        ({"ranking_mlp": torch.full((b, hidden), float("nan"))}, "ranking_mlp must hold finite, non-negative"),
    ):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(stats, **change)
    path = tmp_path / "bad.stats.safetensors"
    meta = {"format": "snapvit-correction-stats", "format_version": "3", "num_images": "4",
            "num_tokens": str(stats.num_tokens), "fingerprint": stats.fingerprint, "snapvit_version": "0"}
    tensors = {"attn_triu": _triu(stats.attn), "mlp_triu": _triu(stats.mlp)}
    _write(path, {**tensors, "ranking_mlp": stats.ranking_mlp[:, :-2], "ranking_heads": stats.ranking_heads}, meta)
    with pytest.raises(ValueError, match=rf"bad\.stats\.safetensors: invalid correction statistics: ranking_mlp must be \[{b}, {hidden}\]"):
        CorrectionStats.load(path)
    _write(path, {**tensors, "ranking_mlp": stats.ranking_mlp}, meta)
    with pytest.raises(ValueError, match="invalid correction statistics: ranking_mlp and ranking_heads must be given together"):
        CorrectionStats.load(path)
    # Statistics whose ranking does not fit the model (another head count) are refused when used.
    other = dataclasses.replace(stats, ranking_heads=torch.rand(b, 1))
    with pytest.raises(ValueError, match=r"ranking_mlp / ranking_heads have shapes .* this model needs"):
        el.subnet(0.3, 0.2, calibration=other)


def test_statistics_are_summed_at_full_float32_precision_where_a_run_enabled_tf32() -> None:
    el = _elastic("test_vit2")
    seen: list[str] = []
    hook = get_blocks(el.model)[0].mlp.fc2.register_forward_pre_hook(
        lambda m, args: seen.append(torch.get_float32_matmul_precision()))
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # what a probe that chose TF32 leaves for the process
    try:
        el.collect_stats(_images(el.model, n=3))
        el.subnet(0.5, 0.5, correct="lstsq", calibration=_images(el.model, n=3), sequential=True)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        hook.remove()
        torch.set_float32_matmul_precision(previous)
    assert seen and set(seen) == {"highest"}


def test_moments_of_both_kinds_in_one_accumulator_stay_exact() -> None:
    from snapvit_lightning.correction import _Moments

    torch.manual_seed(0)
    a, b, c = torch.randn(9, 6), torch.randn(9, 6), torch.randn(5, 6)
    moments = _Moments()
    moments.add(a)  # a second moment: one triangle pending
    moments.add(b, c.repeat(2, 1)[:9])  # a cross moment: folds the triangle first
    moments.add(c)
    rows = [(a, a), (b, c.repeat(2, 1)[:9]), (c, c)]
    xy = sum(x.double().T @ y.double() for x, y in rows) / 23
    torch.testing.assert_close(moments.augmented()[:6, :6], xy, rtol=1e-6, atol=1e-6)


def test_corrected_subnets_are_trainable_and_follow_the_current_weights() -> None:
    # A new user's probe: corrected subnets (the default) came from a frozen, cached copy of the
    # weights: fine-tuning them failed, and a weight changed in place afterwards was ignored.
    el = _elastic()
    el.attach_stats(el.collect_stats(_images(el.model, n=8), ranking=True))
    for sub in (el.subnet(0.35, 0.2), el.subnet(0.35, 0.2, correct="bias"), el.subnet(0.35, 0.2, correct="none")):
        assert all(p.requires_grad for p in sub.parameters())
        sub.train()(_images(el.model, n=2)).pow(2).mean().backward()
    x = _images(el.model, n=2)
    before = el.subnet(0.35, 0.2).eval()(x)
    with torch.no_grad():
        el.model.blocks[1].mlp.fc1.weight.mul_(0.5)
    after = el.subnet(0.35, 0.2).eval()(x)
    assert not torch.allclose(before, after)
    fresh = _elastic()  # the same change made before the first cut
    with torch.no_grad():
        fresh.model.blocks[1].mlp.fc1.weight.mul_(0.5)
    fresh.attach_stats(el.stats)
    torch.testing.assert_close(after, fresh.subnet(0.35, 0.2).eval()(x))
    el.ranked_view().attach_stats(None)  # the view is a cache of el's: changing it is undone, not inherited
    torch.testing.assert_close(el.subnet(0.35, 0.2).eval()(x), after)


def test_solve_layer_refuses_what_it_would_solve_wrongly() -> None:
    """Was: method 'lsq' solved as lstsq, reference 'min' as 'max', a 7 x 7 Gram with 3 kept columns solved."""
    from snapvit_lightning.correction import solve_layer

    g = torch.randn(40, 4, dtype=torch.float64)
    gram = torch.cat([g, torch.ones(40, 1, dtype=torch.float64)], 1).T @ torch.cat([g, torch.ones(40, 1, dtype=torch.float64)], 1) / 40
    kept, target = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    weight, bias = solve_layer(target, kept, gram, True, "lstsq", 0.01, "mean", "fc2")
    assert weight.shape == (2, 4) and bias.shape == (2,)
    for kwargs, said in (({"method": "lsq"}, "method must be 'bias' or 'lstsq' and reference 'mean' or 'max', got method='lsq'"),
                         ({"reference": "min"}, "reference='min'"),
                         ({"damping": float("nan")}, "damping must be a finite number >= 0, got nan"),
                         ({"damping": -0.1}, "damping must be a finite number >= 0, got -0.1"),
                         ({"kept_weight": kept[:, :3]}, r"shapes do not fit together: target \[2, 5\] \(\[out, k\+1\]\), kept_weight \[2, 3\]"),
                         ({"gram": gram[:4, :4]}, r"gram \[4, 4\]")):
        args = {"target": target, "kept_weight": kept, "gram": gram, "has_bias": True, "method": "lstsq",
                "damping": 0.01, "reference": "mean", "where": "fc2", **kwargs}
        with pytest.raises(ValueError, match=f"fc2: .*{said}"):
            solve_layer(**args)
