"""Tests for snapvit_lightning.module (SnapViTModule: gradient scores with Lightning)."""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.core.optimizer import _MockOptimizer
from lightning.pytorch.plugins import MixedPrecision
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from conftest import assert_close_fp32
from snapvit_lightning.data import ResumableDataLoader
from snapvit_lightning.module import CRITERIA, SnapViTModule, dino_loss
from snapvit_lightning.scores import ImportanceScores, lamp_scores
from snapvit_lightning.structure import UnsupportedModelError, get_blocks, mlp_input_layers

pytestmark = pytest.mark.filterwarnings(
    "error:.*configure_optimizers.*returned `None`:UserWarning",  # scoring declares no optimizer quietly
    "ignore:.*module\\(s\\) in eval mode:UserWarning",
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*LeafSpec.*",
    "ignore:.*`weights_only` was not set.*",
)

REPO = Path(__file__).resolve().parents[1]
VIT = "test_vit"
VIT_KW = {"img_size": 32}
MODELS = {
    "mlp": (VIT, VIT_KW),
    "swiglu": ("aimv2_large_patch14_224", dict(depth=2, embed_dim=64, num_heads=2, img_size=56, num_classes=0)),
    "glu": ("vit_giant_patch14_dinov2", dict(depth=2, embed_dim=96, num_heads=3, img_size=56)),
}


def views(n: int, v: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, 3, size, size, generator=g)


def loader(x: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 2) -> DataLoader:
    labels = torch.full((x.shape[0],), -1, dtype=torch.long) if labels is None else labels
    return DataLoader(TensorDataset(x, labels), batch_size=batch_size)


def trainer(**kwargs) -> pl.Trainer:
    base = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**base, **kwargs})


def fit(module: SnapViTModule, x: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 2, **kw):
    trainer(**kw).fit(module, loader(x, labels, batch_size))
    return module.scores


def vit(seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(VIT, pretrained=False, **{**VIT_KW, **kwargs})


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """The tiny test_vit's weights as a safetensors file (same weights for every run)."""
    path = tmp_path_factory.mktemp("w") / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit().state_dict().items()}, str(path))
    return path


def scoring(weights: Path, **kwargs) -> SnapViTModule:
    return SnapViTModule(VIT, checkpoint_path=str(weights), model_kwargs=VIT_KW, **kwargs)


def assert_scores_close(a: ImportanceScores, b: ImportanceScores, rtol: float) -> None:
    for x, y in ((a.mlp, b.mlp), (a.heads, b.heads)):
        torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * float(y.abs().max()))


def hand_scores(model: torch.nn.Module, x: torch.Tensor, tt: float | None, st: float | None):
    """Paper's scores by hand: one forward of all images, explicit pair loops, autograd.grad."""
    model = model.eval()
    b, v = x.shape[:2]
    emb = model.forward_head(model.forward_features(x.flatten(0, 1)), pre_logits=True).view(b, v, -1)
    z = emb / emb.norm(dim=-1, keepdim=True)
    loss = torch.zeros(())
    for i in range(b):
        for t in range(2):
            p = torch.softmax(z[i, t].detach() / (tt or 1.0), dim=-1)
            for s in range(v):
                if s != t:
                    loss = loss - (p * torch.log_softmax(z[i, s] / (st or 1.0), dim=-1)).sum()
    blocks = get_blocks(model)
    params = [blk.mlp.fc1.weight for blk in blocks] + [blk.attn.qkv.weight for blk in blocks]
    grads = torch.autograd.grad(loss, params)
    mlp = torch.stack([g.square().mean(1) for g in grads[: len(blocks)]])
    heads = []
    for blk, g in zip(blocks, grads[len(blocks) :]):
        d = blk.attn.num_heads * blk.attn.head_dim
        heads.append(g[2 * d :].view(blk.attn.num_heads, blk.attn.head_dim, -1).square().mean(dim=(1, 2)))
    return mlp.double(), torch.stack(heads).double()


# ------------------------------------------------------------------------------ scores


@pytest.mark.parametrize("kind", list(MODELS))
def test_scores_shapes_finite_nonnegative(kind: str) -> None:
    name, kwargs = MODELS[kind]
    torch.manual_seed(0)
    module = SnapViTModule(name, model_kwargs=kwargs)
    size = module.student.patch_embed.img_size[0]
    scores = fit(module, views(2, v=3, size=size))
    blocks = get_blocks(module.student)
    assert scores.mlp.shape == (len(blocks), blocks[0].mlp.fc2.in_features)
    assert scores.heads.shape == (len(blocks), blocks[0].attn.num_heads)
    for s in (scores.mlp, scores.heads):
        assert torch.isfinite(s).all() and (s >= 0).all() and (s > 0).any()
    assert scores.criterion == "dino" and scores.min_mlp_keep == 0.05 and scores.min_head_keep == 0.2
    assert module.num_samples == 2


def test_only_mlp_input_and_qkv_require_grad_and_weights_unchanged(weights: Path) -> None:
    module = scoring(weights)
    expected = set()
    for i, block in enumerate(get_blocks(module.student)):
        expected |= {f"blocks.{i}.attn.qkv.weight", f"blocks.{i}.mlp.fc1.weight"}
    assert {n for n, p in module.student.named_parameters() if p.requires_grad} == expected
    before = copy.deepcopy(module.student.state_dict())
    t = trainer()
    t.fit(module, loader(views(4)))
    assert len(t.optimizers) == 1 and isinstance(t.optimizers[0], _MockOptimizer)  # Lightning's placeholder
    assert t.global_step == 2  # its step() counts the batches
    after = module.student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in module.student.parameters())
    assert not any(m.training for m in module.student.modules())  # never left eval mode


def test_swiglu_requires_grad_on_both_input_layers() -> None:
    name, kwargs = MODELS["swiglu"]
    module = SnapViTModule(name, model_kwargs=kwargs)
    block = get_blocks(module.student)[0]
    assert [layer.weight.requires_grad for layer in mlp_input_layers(block)] == [True, True]
    assert not block.mlp.fc2.weight.requires_grad and not block.attn.proj.weight.requires_grad


def test_dead_neuron_and_head_score_zero() -> None:
    model = vit()
    dead_neuron, dead_head = 5, 1
    with torch.no_grad():
        for block in get_blocks(model)[:2]:
            block.mlp.fc1.weight[dead_neuron] = 0
            block.mlp.fc1.bias[dead_neuron] = 0
            block.mlp.fc2.weight[:, dead_neuron] = 0
            d, hd = block.attn.num_heads * block.attn.head_dim, block.attn.head_dim
            rows = slice(2 * d + dead_head * hd, 2 * d + (dead_head + 1) * hd)
            block.attn.qkv.weight[rows] = 0
            block.attn.qkv.bias[rows] = 0
            block.attn.proj.weight[:, dead_head * hd : (dead_head + 1) * hd] = 0
    scores = fit(SnapViTModule(model), views(2))
    assert (scores.mlp[:2, dead_neuron] == 0).all() and (scores.heads[:2, dead_head] == 0).all()
    assert (scores.mlp[:2].sum(1) > 0).all() and (scores.mlp[2:, dead_neuron] > 0).all()
    assert (scores.heads[2:, dead_head] > 0).all()


@pytest.mark.parametrize("temps", [(None, None), (0.04, 0.1)])
def test_matches_hand_computation(temps) -> None:
    # Dropout and drop-path are on in the config: scoring must run in eval mode regardless.
    model = vit(proj_drop_rate=0.3, drop_path_rate=0.3)
    reference = copy.deepcopy(model)
    x = views(4, v=4)
    module = SnapViTModule(model, teacher_temp=temps[0], student_temp=temps[1])
    scores = fit(module, x, batch_size=2)  # two batches, accumulated
    mlp, heads = hand_scores(reference, x, *temps)
    torch.testing.assert_close(scores.mlp, mlp, rtol=1e-5, atol=1e-5 * float(mlp.max()))
    torch.testing.assert_close(scores.heads, heads, rtol=1e-5, atol=1e-5 * float(heads.max()))


@pytest.mark.parametrize("autocast", [False, True])
def test_v_rows_weight_grads_equal_autograd_on_the_v_rows(autocast: bool) -> None:
    """The patched qkv: same output and input gradient, V-row weight gradient, zeros elsewhere."""
    from snapvit_lightning.loss import _v_rows_weight_grads

    model = vit().eval()
    x = views(2, v=1).flatten(0, 1)
    grads = []
    for patched in (False, True):
        model.zero_grad()
        inp = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with _v_rows_weight_grads(model) if patched else contextlib.nullcontext():
                out = model.forward_head(model.forward_features(inp), pre_logits=True)
        out.float().square().sum().backward()
        grads.append((out.detach().float(), inp.grad, [b.attn.qkv.weight.grad for b in get_blocks(model)]))
    assert all("forward" not in vars(b.attn.qkv) for b in get_blocks(model))  # unpatched after the context
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1][0], grads[0][0], **tol)
    torch.testing.assert_close(grads[1][1], grads[0][1], **tol)
    for block, full, rows in zip(get_blocks(model), grads[0][2], grads[1][2]):
        d = block.attn.num_heads * block.attn.head_dim
        assert rows.dtype == full.dtype and torch.equal(rows[: 2 * d], torch.zeros_like(rows[: 2 * d]))
        scale = float(full[2 * d :].abs().max())
        torch.testing.assert_close(rows[2 * d :], full[2 * d :], rtol=tol["rtol"], atol=tol["atol"] * scale)
        assert scale > 0


def test_dino_loss_skips_same_view_pairs() -> None:
    emb = torch.randn(3, 2, 8)
    same = torch.stack([emb[:, 0], emb[:, 0]], dim=1)  # two identical global views
    z = F.normalize(emb[:, 0], dim=-1)
    expected = -2 * (z.softmax(-1) * z.log_softmax(-1)).sum(-1)  # entropy, counted twice
    torch.testing.assert_close(dino_loss(same), expected)
    assert dino_loss(emb).shape == (3,)
    with pytest.raises(ValueError, match="V >= 2"):
        dino_loss(torch.randn(3, 1, 8))


def test_fisher_and_sum_then_square_and_batch_size_invariance(weights: Path) -> None:
    x = views(4)
    s2 = fit(scoring(weights), x, batch_size=2)
    s4 = fit(scoring(weights), x, batch_size=4)
    assert_scores_close(s2, s4, rtol=1e-4)  # loss summed over samples: invariant to batching
    fisher2 = fit(scoring(weights, accumulation="fisher"), x, batch_size=2)
    fisher4 = fit(scoring(weights, accumulation="fisher"), x, batch_size=4)
    assert_scores_close(fisher4, s4, rtol=1e-5)  # one batch: sum of squares == square of sum
    for s in (fisher2.mlp, fisher2.heads):
        assert torch.isfinite(s).all() and (s >= 0).all()
    assert not torch.allclose(fisher2.mlp, s2.mlp, rtol=1e-2)
    assert not torch.allclose(fisher2.heads, s2.heads, rtol=1e-2)


def test_bf16_mixed_runs(weights: Path) -> None:
    x = views(2)
    ref = fit(scoring(weights), x)
    bf16 = fit(scoring(weights), x, precision="bf16-mixed")
    assert torch.isfinite(bf16.mlp).all() and (bf16.mlp >= 0).all()
    corr = torch.corrcoef(torch.stack([ref.mlp.flatten(), bf16.mlp.flatten()]))[0, 1]
    assert corr > 0.9


# ------------------------------------------------------------------------------ criteria


@pytest.mark.parametrize("criterion", CRITERIA)
def test_criteria_by_name(weights: Path, criterion: str) -> None:
    x = views(2)
    labels = torch.tensor([3, 7])
    module = scoring(weights, criterion=criterion, seed=3)
    scores = fit(module, x, labels)
    assert scores.criterion == criterion and scores.mlp.shape == (6, 192) and scores.heads.shape == (6, 2)
    assert torch.isfinite(scores.mlp).all() and (scores.mlp >= 0).all() and (scores.heads >= 0).all()
    blocks = get_blocks(module.student)
    w_mlp = torch.stack([b.mlp.fc1.weight.detach().double().square().mean(1) for b in blocks])
    if criterion == "magnitude":
        torch.testing.assert_close(scores.mlp, w_mlp)
    elif criterion == "lamp":
        assert torch.allclose(scores.mlp.amax(1), torch.ones(6, dtype=torch.float64))
        assert torch.equal(scores.mlp.argsort(1), w_mlp.argsort(1))  # same order within a block
    elif criterion == "random":
        again = scoring(weights, criterion=criterion, seed=3).compute_scores()
        other = scoring(weights, criterion=criterion, seed=4).compute_scores()
        assert torch.equal(again.mlp, scores.mlp) and not torch.equal(other.mlp, scores.mlp)
        assert (scores.mlp < 1).all()
    else:
        assert (scores.mlp > 0).any() and module.num_samples == 2


@pytest.mark.parametrize("kind", list(MODELS))
def test_magnitude_reads_each_units_rows(kind: str) -> None:
    name, kwargs = MODELS[kind]
    module = SnapViTModule(name, model_kwargs=kwargs, criterion="magnitude")
    scores = module.compute_scores()  # data-free: no fit needed
    block = get_blocks(module.student)[-1]
    hidden, heads = block.mlp.fc2.in_features, block.attn.num_heads
    j, h = hidden - 1, heads - 1
    if kind == "swiglu":
        rows = torch.cat([block.mlp.fc1_g.weight[j], block.mlp.fc1_x.weight[j]])
    elif kind == "glu":
        rows = torch.cat([block.mlp.fc1.weight[j], block.mlp.fc1.weight[j + hidden]])
    else:
        rows = block.mlp.fc1.weight[j]
    d, hd = heads * block.attn.head_dim, block.attn.head_dim
    v_rows = block.attn.qkv.weight[2 * d + h * hd : 2 * d + (h + 1) * hd]
    torch.testing.assert_close(scores.mlp[-1, j], rows.detach().double().square().mean())
    torch.testing.assert_close(scores.heads[-1, h], v_rows.detach().double().square().mean())


def test_snip_is_abs_weight_times_accumulated_grad(weights: Path) -> None:
    x = views(2)
    snip = scoring(weights, criterion="snip_magnitude")
    fit(snip, x)
    dino = scoring(weights)
    fit(dino, x)
    g = dino._reduced()[0]["blocks.0.mlp.0"]
    w = dino.student.blocks[0].mlp.fc1.weight.detach()
    torch.testing.assert_close(snip.scores.mlp[0], (w * g).abs().mean(1).double())
    torch.testing.assert_close(dino.scores.mlp[0], g.square().mean(1).double())


def test_lamp_scores_definition() -> None:
    m = torch.tensor([[4.0, 1.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[4 / 4, 1 / 9, 2 / 8, 2 / 8], [0, 0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(lamp_scores(m), expected)


def test_gradient_scores_before_any_image_are_refused() -> None:
    # they were all zeros, which ElasticViT took: an arbitrary ranking without a word
    with pytest.raises(RuntimeError, match="criterion='dino' has seen no calibration images"):
        SnapViTModule(vit()).compute_scores()
    assert SnapViTModule(vit(), criterion="magnitude").compute_scores().mlp.sum() > 0  # weight criteria need no images


def test_bad_images_get_the_package_error_not_torchs() -> None:
    # uint8 / 1-channel / 4-D views gave "Input type (unsigned char) and bias type (float)", "expected 4, got 3"
    module = SnapViTModule(vit())
    good = views(2)
    with pytest.raises(ValueError, match=r"views must be a float tensor \[B, V, 3, S, S\] of multi-crop views, got \[2, "):
        module.compute_loss(good[:, 0])
    for bad in (good.to(torch.uint8), good[:, :, :1], torch.full_like(good, float("nan"))):
        with pytest.raises(ValueError, match=r"views \(their 2 x 4 views as one batch\) (must be a non-empty float tensor|hold "
                                             r"non-finite values)"):
            module.compute_loss(bad)
    with pytest.raises(ValueError, match=r"x are torch.float16, the model torch.float32: give torch.float32 images"):
        module.embed(good[:, 0].half())  # was "Input type (c10::Half) and bias type (float) should be the same"
    with pytest.raises(ValueError, match=r"x must be a non-empty float tensor \[N, 3, "):
        module.embed(good[:, 0].half().to(torch.int16))
    assert module.embed(good[:, 0]).shape[0] == 2


def test_cross_entropy_needs_labels(weights: Path) -> None:
    module = scoring(weights, criterion="cross_entropy")
    with pytest.raises(ValueError, match="label >= 0"):
        fit(module, views(2), torch.tensor([1, -1]))


def test_cross_entropy_refuses_labels_its_head_cannot_take_before_the_scoring(tmp_path) -> None:
    import numpy as np
    from PIL import Image

    from snapvit_lightning.data import CalibrationDataModule

    for folder, classes in (("labelled", ["a", "b", "c"]), ("flat", [""])):
        for c in classes:
            (tmp_path / folder / c).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.fromarray(np.full((40, 40, 3), 40 * i, dtype=np.uint8)).save(tmp_path / folder / c / f"{i}.png")
    for folder, match in (("labelled", r"criterion='cross_entropy': the data has 3 classes \(a, b, c\) but the model's "
                                       r"head has num_classes=2; labels are the class folders' indices in sorted order"),
                          ("flat", r"criterion='cross_entropy' needs labelled images: one subfolder per class")):
        module = SnapViTModule(VIT, model_kwargs={**VIT_KW, "num_classes": 2}, criterion="cross_entropy")
        dm = CalibrationDataModule(data_dir=str(tmp_path / folder), batch_size=2, num_local_crops=0)
        with pytest.raises(ValueError, match=match):
            trainer().fit(module, datamodule=dm)
        assert module.scores is None
    pairs = [(torch.rand(3, 40, 40), i % 2) for i in range(4)]  # a labelled dataset without `classes`: scored
    module = SnapViTModule(VIT, model_kwargs={**VIT_KW, "num_classes": 2}, criterion="cross_entropy")
    trainer().fit(module, datamodule=CalibrationDataModule(dataset=pairs, batch_size=2, num_local_crops=0))
    assert module.scores is not None
    module = SnapViTModule(VIT, model_kwargs={**VIT_KW, "num_classes": 2}, criterion="cross_entropy")  # any other loader
    with pytest.raises(ValueError, match=r"label 5 is not a class of the model's head \(num_classes=2\)"):
        fit(module, views(2), torch.tensor([1, 5]))


def test_cross_entropy_matches_hand_computation() -> None:
    model = vit()
    reference = copy.deepcopy(model).eval()
    x, labels = views(2, v=2), torch.tensor([4, 9])
    scores = fit(SnapViTModule(model, criterion="cross_entropy"), x, labels, batch_size=1)
    loss = F.cross_entropy(reference(x[:, 0]), labels, reduction="sum")
    g = torch.autograd.grad(loss, reference.blocks[3].mlp.fc1.weight)[0]
    assert_close_fp32(scores.mlp[3], g.square().mean(1).double())


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(criterion="hessian"), ValueError, r"criterion must be one of \['dino', 'cross_entropy'"),
        (dict(accumulation="mean"), ValueError, "accumulation must be one of"),
        (dict(teacher_temp=0.0), ValueError, "teacher_temp must be None or a finite number > 0, got 0.0"),
        (dict(student_temp=-1), ValueError, "student_temp must be None or a finite number > 0, got -1"),
        (dict(student_temp=float("nan")), ValueError, "student_temp"),
        (dict(teacher_temp="0.1"), ValueError, "teacher_temp"),
        (dict(min_mlp_keep=1.5), ValueError, "min_mlp_keep must be a number in"),
        (dict(checkpoint_path="/nonexistent/w.safetensors"), FileNotFoundError,
         "checkpoint_path '/nonexistent/w.safetensors' does not exist; give local weights .*hf-hub:timm/NAME"),
        (dict(model="no_such_vit"), ValueError, "not a registered timm model"),
        (dict(model=3), TypeError, "model must be a timm model name or an nn.Module, got int"),
        (dict(model="resnet18", model_kwargs={}), UnsupportedModelError, "not a timm VisionTransformer"),
        (dict(criterion="cross_entropy", model_kwargs=dict(VIT_KW, num_classes=0)), ValueError, "num_classes"),
    ],
)
def test_argument_errors(kwargs, error, match) -> None:
    args = dict(model=VIT, model_kwargs=VIT_KW)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        SnapViTModule(**args)


def test_model_kwargs_with_instance_refused() -> None:
    with pytest.raises(ValueError, match="model_kwargs"):
        SnapViTModule(vit(), model_kwargs={"img_size": 64})
    with pytest.raises(UnsupportedModelError):
        SnapViTModule(torch.nn.Linear(3, 3))


@pytest.mark.parametrize("precision", ["16-mixed", "16-true"])
def test_fp16_precision_refused(weights: Path, precision: str) -> None:
    # On CPU Lightning itself turns "16-mixed" into "bf16-mixed"; a plugin forces real fp16 AMP.
    kw = (
        dict(plugins=[MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))])
        if precision == "16-mixed"
        else dict(precision=precision)
    )
    with pytest.raises(ValueError, match=f"precision='{precision}' is not supported for scoring: fp16 .*loss scaling"):
        fit(scoring(weights), views(2), **kw)


@pytest.mark.parametrize("kw", [{"max_epochs": 0}, {"max_steps": 0}, {"limit_train_batches": 0}, {"limit_train_batches": 0.0}])
def test_a_fit_that_would_score_nothing_is_refused(weights: Path, kw: dict) -> None:
    # Lightning skips the training without a word: the fit ended with status 0 and wrote nothing
    name = next(iter(kw))
    with pytest.raises(ValueError, match=rf"{name}=0: this fit would score no calibration image and write nothing"):
        fit(scoring(weights), views(2), **kw)


def test_a_fit_that_would_score_forever_is_refused(weights: Path) -> None:
    with pytest.raises(ValueError, match=r"max_epochs=-1 \(no limit; .* without max_steps: this fit would score until"):
        fit(scoring(weights), views(2), max_epochs=-1)


def test_max_steps_within_the_epoch_warns(weights: Path) -> None:
    # the scores came from half the images without a word
    with pytest.warns(UserWarning, match=r"max_steps=1 stops the scoring epoch after 1 of its 2 batches") as said:
        fit(scoring(weights), views(4), max_steps=1)
    # the line that called trainer.fit, not Lightning's or the package's
    assert [w.filename for w in said if "max_steps=1" in str(w.message)] == [__file__]


def test_more_than_one_epoch_over_the_calibration_datamodule_warns(weights: Path) -> None:
    from snapvit_lightning.data import CalibrationDataModule

    dm = CalibrationDataModule(dataset=[torch.rand(3, 40, 40) for _ in range(2)], batch_size=2, num_local_crops=0)
    with pytest.warns(UserWarning, match=r"max_epochs=2: the scoring is one epoch, and each further one scores the same") as said:
        trainer(max_epochs=2).fit(scoring(weights), datamodule=dm)
    assert [w.filename for w in said if "max_epochs=2" in str(w.message)] == [__file__]


def test_checkpoint_path_formats(tmp_path: Path, weights: Path) -> None:
    reference = vit()
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    torch.save({"state_dict": {f"student.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "l.ckpt")
    for path in (weights, tmp_path / "w.pt", tmp_path / "l.ckpt"):
        module = SnapViTModule(VIT, checkpoint_path=str(path), model_kwargs=VIT_KW)
        loaded = module.student.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items())
    # other img_size: position embeddings resampled by timm's checkpoint_filter_fn
    torch.save(vit(img_size=48).state_dict(), tmp_path / "48px.pt")
    module = SnapViTModule(VIT, checkpoint_path=str(tmp_path / "48px.pt"), model_kwargs=VIT_KW)
    assert module.student.pos_embed.shape[1] == 1 + 4
    torch.save(vit(depth=2).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"does not match the model: missing keys \['blocks\.2\..*\(the file has 2 blocks, "
                                         r"the model \d+: weights of another architecture\?\)"):
        SnapViTModule(VIT, checkpoint_path=str(tmp_path / "other.pt"), model_kwargs=VIT_KW)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk.pt' is not a safetensors file and holds no state dict torch.load\(weights_"
                                         r"only=True\) can read \(a damaged file, or not a checkpoint\); save model"):
        SnapViTModule(VIT, checkpoint_path=str(tmp_path / "junk.pt"), model_kwargs=VIT_KW)
    # Common layouts a new user brought: DeiT/timm scripts' {"model": ...}, safetensors under another
    # suffix (torch.load's advice to drop weights_only would not even have worked), a module's keys.
    torch.save({"model": reference.state_dict(), "epoch": 3}, tmp_path / "deit.pth")
    (tmp_path / "w.bin").write_bytes(weights.read_bytes())
    for path in (tmp_path / "deit.pth", tmp_path / "w.bin"):
        loaded = SnapViTModule(VIT, checkpoint_path=str(path), model_kwargs=VIT_KW).student.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items())
    # a LightningModule's own checkpoint: its ViT under an attribute, beside its other tensors (was refused,
    # naming the prefix: a user had to write a conversion script for every fine-tuned model)
    own = {f"net.{k}": v for k, v in reference.state_dict().items()} | {"crit.weight": torch.ones(3)}
    torch.save({"state_dict": own, "epoch": 2}, tmp_path / "mine.ckpt")
    torch.save({f"backbone.{k}": v for k, v in reference.state_dict().items()} | {"head.weight": torch.zeros(3, 8)},
               tmp_path / "user.pt")
    for path in (tmp_path / "mine.ckpt", tmp_path / "user.pt"):
        loaded = SnapViTModule(VIT, checkpoint_path=str(path), model_kwargs=VIT_KW).student.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in reference.state_dict().items()), path
    torch.save({"state_dict": own | {f"ema.net.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "two.ckpt")
    with pytest.raises(ValueError, match=r"two.ckpt' holds 2 ViTs \(patch embeddings under 'ema\.net\.', 'net\.'\): "
                                         r"save the one to prune, e.g. module.ema.net.state_dict\(\)"):
        SnapViTModule(VIT, checkpoint_path=str(tmp_path / "two.ckpt"), model_kwargs=VIT_KW)
    # a teacher and a smaller student: the teacher alone matched the model, and loaded without a word
    student = {f"student.{k}": v for k, v in vit(depth=2).state_dict().items()}
    torch.save({"state_dict": {f"teacher.{k}": v for k, v in reference.state_dict().items()} | student}, tmp_path / "ts.ckpt")
    with pytest.raises(ValueError, match=r"holds 2 ViTs \(patch embeddings under 'student\.', 'teacher\.'\)"):
        SnapViTModule(VIT, checkpoint_path=str(tmp_path / "ts.ckpt"), model_kwargs=VIT_KW)
    torch.save(vit(patch_size=8).state_dict(), tmp_path / "p8.pt")  # resampled by timm's filter: said so
    with pytest.warns(UserWarning, match=r"its 8x8 patch embedding was resampled to the model's 16x16"):
        SnapViTModule(VIT, checkpoint_path=str(tmp_path / "p8.pt"), model_kwargs=VIT_KW)
    # A hub file keeps its classifier and its own size: dropped and resampled for a headless model, as
    # timm does; a headless file leaves a model's head fresh (said); what is left wrong is named.
    torch.save(vit(img_size=48).state_dict(), tmp_path / "hub48.pt")
    headless = SnapViTModule(VIT, checkpoint_path=str(tmp_path / "hub48.pt"), model_kwargs={**VIT_KW, "num_classes": 0})
    assert torch.equal(headless.student.blocks[0].attn.qkv.weight, vit(img_size=48).blocks[0].attn.qkv.weight)
    torch.save(vit(img_size=48, num_classes=0).state_dict(), tmp_path / "headless48.pt")
    with pytest.warns(UserWarning, match=r"holds no weights of this model's classifier \(head.weight, head.bias\); the "
                                         r"head keeps its fresh values, and the exported subnets ship it"):
        SnapViTModule(VIT, checkpoint_path=str(tmp_path / "headless48.pt"), model_kwargs=VIT_KW)
    torch.save(vit(img_size=48, num_classes=8).state_dict(), tmp_path / "classes8.pt")  # num_classes forgotten: named
    with pytest.warns(UserWarning, match=r"holds a classifier of another shape \(head.weight \[8, \d+\], head.bias \[8\], "
                                         r"this model's \[\d+, \d+\], \[\d+\]\): give model_kwargs num_classes: 8 to load it"):
        SnapViTModule(VIT, checkpoint_path=str(tmp_path / "classes8.pt"), model_kwargs=VIT_KW)
    torch.save(vit(img_size=48, depth=2).state_dict(), tmp_path / "other48.pt")
    with pytest.raises(ValueError, match=r"does not match the model: missing keys \['blocks\.2\."):  # not pos_embed's size
        SnapViTModule(VIT, checkpoint_path=str(tmp_path / "other48.pt"), model_kwargs=VIT_KW)
    torch.save(vit(reg_tokens=2).state_dict(), tmp_path / "registers.pt")  # torch's pos_embed line alone before
    with pytest.raises(ValueError, match=r"\(the file has register tokens \(reg_token\), the model none: weights of another"):
        SnapViTModule(VIT, checkpoint_path=str(tmp_path / "registers.pt"), model_kwargs=VIT_KW)
    torch.save(vit(embed_dim=16, num_heads=2).state_dict(), tmp_path / "narrow.pt")  # another width: the file's shapes, counted
    with pytest.raises(ValueError, match=r"does not match the model: 79 of its 80 tensors have other shapes \(cls_token: file "
                                         r"\[1, 1, 16\], model \[1, 1, 64\]; .*\); the file's ViT is 16 wide, the model 64: is model.model"):
        SnapViTModule(VIT, checkpoint_path=str(tmp_path / "narrow.pt"), model_kwargs=VIT_KW)
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match=r"does not hold a state dict of tensors \(found \['epoch', 'optimizer'\]\)"):
        SnapViTModule(VIT, checkpoint_path=str(tmp_path / "nothing.pt"), model_kwargs=VIT_KW)
    torch.save(vit(img_size=48), tmp_path / "whole.pt")  # the module itself: torch's advice was weights_only=False
    with pytest.raises(ValueError, match=r"whole\.pt' is not a safetensors file and holds objects besides tensors \(e\.g\. "
                                         r"a whole model saved with torch\.save\(model\)\), which are never unpickled "
                                         r"here; save model\.state_dict\(\)") as refused:
        SnapViTModule(VIT, checkpoint_path=str(tmp_path / "whole.pt"), model_kwargs=VIT_KW)
    assert "weights_only=False" not in str(refused.value)  # torch's advice would run the file's code
    torch.save(vit(img_size=48), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # torch's old format
    with pytest.raises(ValueError, match=r"legacy\.pt' is not a safetensors file and holds objects besides tensors"):
        SnapViTModule(VIT, checkpoint_path=str(tmp_path / "legacy.pt"), model_kwargs=VIT_KW)
    for name, content in (("empty.pt", b""), ("noise.pt", bytes(range(256)) * 4)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"{name}' is not a safetensors file and holds no state dict") as refused:
            SnapViTModule(VIT, checkpoint_path=str(tmp_path / name), model_kwargs=VIT_KW)
        assert "weights_only=False" not in str(refused.value)


# ------------------------------------------------------------------------------ checkpoints


def test_checkpoint_hooks_resume_midway(tmp_path: Path, weights: Path) -> None:
    x = views(4)
    full = fit(scoring(weights), x)
    first = scoring(weights)
    fit(first, x[:2])
    checkpoint: dict = {}
    first.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "half.pt")
    loaded = torch.load(tmp_path / "half.pt", weights_only=True)
    assert loaded["snapvit_scoring"]["num_samples"] == 2
    second = scoring(weights)
    second.on_load_checkpoint(loaded)
    assert_scores_close(second.scores, first.scores, rtol=0)
    fit(second, x[2:])  # continues the restored sums
    assert second.num_samples == 4
    assert_scores_close(second.scores, full, rtol=1e-5)
    with pytest.raises(ValueError, match="accumulation='sum_then_square'"):
        scoring(weights, accumulation="fisher").on_load_checkpoint(loaded)


_ResumableLoader = ResumableDataLoader  # the stateful loader CalibrationDataModule returns


class _SaveAfterFirstBatch(pl.Callback):
    def __init__(self, path: Path, batch_idx: int = 0, crash: bool = False) -> None:
        self.path, self.batch_idx, self.crash = path, batch_idx, crash

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch_idx:
            trainer.save_checkpoint(self.path)
            if self.crash:
                raise RuntimeError("simulated crash")


def test_trainer_checkpoint_resume_mid_epoch(tmp_path: Path, weights: Path, one_thread) -> None:
    x = views(6)
    labels = torch.full((6,), -1)
    ckpt = tmp_path / "mid.ckpt"
    module = scoring(weights)
    data = TensorDataset(x, labels)
    trainer(callbacks=[_SaveAfterFirstBatch(ckpt)]).fit(module, _ResumableLoader(data, batch_size=2))
    raw = torch.load(ckpt, weights_only=True)  # the whole Lightning checkpoint is weights_only
    assert raw["snapvit_scoring"]["num_samples"] == 2 and raw["snapvit_scoring"]["scores"] is None
    raw_precision = raw["snapvit_scoring"]["precision"]
    assert raw_precision == {"trainer_precision": "32-true", "explicit_attention": False, "probe": None}
    with pytest.raises(ValueError, match=r"the checkpoint's scoring ran in 32-true \(this fit: "
                                         r"bf16-mixed\): a resumed scoring would sum gradients of both kinds"):
        trainer(precision="bf16-mixed").fit(scoring(weights), _ResumableLoader(data, batch_size=2), ckpt_path=ckpt)
    resumed = scoring(weights)
    trainer().fit(resumed, _ResumableLoader(data, batch_size=2), ckpt_path=ckpt)
    assert resumed.num_samples == 6
    assert_scores_close(resumed.scores, module.scores, rtol=1e-5)
    # an end-of-run checkpoint restores the scores with load_from_checkpoint
    t = trainer()
    t.fit(module, loader(x))
    t.save_checkpoint(tmp_path / "end.ckpt")
    restored = SnapViTModule.load_from_checkpoint(tmp_path / "end.ckpt", weights_only=True)
    assert_scores_close(restored.scores, module.scores, rtol=0)
    assert restored.hparams.model == VIT and restored.hparams.model_kwargs == VIT_KW


def test_every_batch_is_a_global_step(tmp_path: Path, weights: Path, one_thread) -> None:
    """Step-based checkpointing works: each scoring batch advances trainer.global_step (weights unchanged)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    module = scoring(weights)
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    t = trainer(enable_checkpointing=True, callbacks=[ModelCheckpoint(tmp_path, every_n_train_steps=2, save_top_k=-1)])
    t.fit(module, loader(views(6)))
    assert t.global_step == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=2.ckpt"]
    assert all(torch.equal(before[k], v) for k, v in module.student.state_dict().items())


def test_resume_from_last_batch_checkpoint_computes_scores(tmp_path: Path, weights: Path, one_thread) -> None:
    """Lightning restores a checkpoint saved after the last batch as a processed epoch (no epoch-end hook)."""
    x = views(6)
    data = TensorDataset(x, torch.full((6,), -1))
    full = fit(scoring(weights), x)
    ckpt = tmp_path / "last_batch.ckpt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(callbacks=[_SaveAfterFirstBatch(ckpt, batch_idx=2, crash=True)]).fit(
            scoring(weights), _ResumableLoader(data, batch_size=2)
        )
    resumed = scoring(weights)
    trainer().fit(resumed, _ResumableLoader(data, batch_size=2), ckpt_path=ckpt)
    assert resumed.num_samples == 6
    assert_scores_close(resumed.scores, full, rtol=1e-5)


def test_resume_after_the_epoch_warns_that_nothing_runs(tmp_path: Path, weights: Path, one_thread) -> None:
    x = views(4)
    module = scoring(weights)
    t = trainer()
    t.fit(module, loader(x))
    t.save_checkpoint(tmp_path / "end.ckpt")
    resumed = scoring(weights)
    with pytest.warns(UserWarning, match="no on_train_end callback ran"):
        trainer().fit(resumed, loader(x), ckpt_path=tmp_path / "end.ckpt")
    assert_scores_close(resumed.scores, module.scores, rtol=0)  # restored, not recomputed


def test_images_marked_as_padding_are_not_scored(weights: Path) -> None:
    # A DDP rank's batches (views, labels, keep) from PaddedShards: the repeated images (keep False)
    # add nothing, so the scores are those of the kept images alone; a batch of padding only still steps.
    x = views(6)
    keep = torch.tensor([True, False, True, True, False, False])
    padded = scoring(weights)
    loader = DataLoader(TensorDataset(x, torch.full((6,), -1), keep), batch_size=2)
    trainer().fit(padded, loader)
    assert padded.num_samples == 3 and padded.trainer.global_step == 3
    alone = fit(scoring(weights), x[keep], batch_size=1)
    assert_scores_close(padded.scores, alone, rtol=1e-4)


# ------------------------------------------------------------------------------ DDP

_DDP_SCRIPT = """
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from snapvit_lightning.module import SnapViTModule

torch.set_num_threads(1)
out = Path(sys.argv[1])
data = torch.load(out / "data.pt", weights_only=True)


class Data(pl.LightningDataModule):
    def train_dataloader(self):  # unshuffled: rank 0 gets images 0 2 4 6, rank 1 gets 1 3 5 7
        dataset = TensorDataset(data["views"], data["labels"])
        return DataLoader(dataset, batch_size=2, sampler=DistributedSampler(dataset, shuffle=False))


for accumulation in ("sum_then_square", "fisher"):
    module = SnapViTModule(
        "test_vit", checkpoint_path=str(out / "w.safetensors"), model_kwargs={"img_size": 32}, accumulation=accumulation
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=Data())
    trainer.save_checkpoint(out / f"{accumulation}.ckpt")  # on_save_checkpoint sums the accumulators over ranks
    torch.save(
        {"world_size": trainer.world_size, "num_samples": module.num_samples, **module.scores.state_dict()},
        out / f"{accumulation}_rank{trainer.global_rank}.pt",
    )
"""


def test_ddp_two_processes_match_single_process(tmp_path: Path, weights: Path) -> None:
    x = views(8)
    labels = torch.full((8,), -1)
    torch.save({"views": x, "labels": labels}, tmp_path / "data.pt")
    (tmp_path / "w.safetensors").write_bytes(weights.read_bytes())
    script = tmp_path / "ddp_scores.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT))
    dist_vars = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    for accumulation in ("sum_then_square", "fisher"):
        ranks = [torch.load(tmp_path / f"{accumulation}_rank{r}.pt", weights_only=True) for r in range(2)]
        assert all(r.pop("world_size") == 2 and r.pop("num_samples") == 8 for r in ranks)
        ddp = [ImportanceScores.from_state_dict(r) for r in ranks]
        assert torch.equal(ddp[0].mlp, ddp[1].mlp) and torch.equal(ddp[0].heads, ddp[1].heads)
        # DistributedSampler: rank 0 sees images 0 2 4 6, rank 1 sees 1 3 5 7, two per batch. The
        # single process sees the same batches; for "fisher" a rank-averaged gradient (DDP's
        # all-reduce) would give (g0 + g1)^2 / 2 instead of g0^2 + g1^2.
        order = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])
        single = fit(scoring(weights, accumulation=accumulation), x[order], batch_size=2)
        assert_scores_close(ddp[0], single, rtol=1e-4)
        # the DDP checkpoint holds the accumulators summed over both ranks
        restored = scoring(weights, accumulation=accumulation)
        restored.on_load_checkpoint(torch.load(tmp_path / f"{accumulation}.ckpt", weights_only=True))
        assert restored.num_samples == 8
        assert_scores_close(restored.scores, single, rtol=1e-4)
        restored.on_fit_start()
        assert_scores_close(restored.compute_scores(), single, rtol=1e-4)


def test_a_named_model_without_weights_warns_that_it_scores_random_weights(tmp_path) -> None:
    # A config whose checkpoint_path was left out scored a freshly initialised ViT-B without a word.
    with pytest.warns(UserWarning, match=r"^SnapViTModule: scoring random weights: 'test_vit' was built with "
                                         r"pretrained=False and no checkpoint_path"):
        SnapViTModule("test_vit")
    weights = tmp_path / "w.safetensors"
    save_file(timm.create_model("test_vit", pretrained=False).state_dict(), str(weights))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SnapViTModule("test_vit", checkpoint_path=weights)  # its own weights: nothing to say
        SnapViTModule(timm.create_model("test_vit", pretrained=False))  # a module the user built: theirs to know
