"""Tests of snapvit_lightning.plugin: the SnapViT callback in a user's own Trainer (tiny models)."""

from __future__ import annotations

import logging
import warnings

import lightning.pytorch as pl
import pytest
import timm
import torch
from conftest import cpu_trainer as _trainer
from conftest import multicrop_loader as _multicrop_loader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from snapvit_lightning import export as ex
from snapvit_lightning import plugin as pg
from snapvit_lightning.data import CalibrationDataModule
from snapvit_lightning.elastic import ElasticViT
from snapvit_lightning.export import ElasticExport
from snapvit_lightning.module import SnapViTModule
from snapvit_lightning.plugin import SnapViT, find_vit
from snapvit_lightning.structure import UnsupportedModelError

IMG = 32

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.mark.parametrize("plugin", [False, True])
def test_export_measures_on_the_models_device(tmp_path, monkeypatch, plugin):
    # On a GPU run the fidelity and statistics must not fall back to the CPU (minutes for ViT-B):
    # both callbacks hand export_elastic the device the model was scored on.
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device"))
        return real(*args, **kwargs)

    where = pg if plugin else ex  # the module whose callback calls export_elastic
    real = where.export_elastic
    monkeypatch.setattr(where, "export_elastic", spy)
    if plugin:
        callback = SnapViT(datamodule=_multicrop_loader(), dirpath=tmp_path / "e", search_evals=0, budgets=[(0.0, 0.0)])
        _user_trainer(tmp_path, [callback]).fit(UserModule(), train_dataloaders=_user_loader())
    else:
        callback = ElasticExport(tmp_path / "e", budgets=[(0.0, 0.0)], images=torch.randn(2, 3, IMG, IMG))
        _trainer(tmp_path, [callback]).fit(SnapViTModule("test_vit", model_kwargs={"img_size": IMG}),
                                           train_dataloaders=_multicrop_loader())
    assert seen == [torch.device("cpu")]
    assert callback.report["build_times"]["export_machine"]["device"] == "cpu"
    # the plug-in without a search recorded no scoring time (its export line said only the export's)
    assert callback.report["build_times"]["scoring_s"] > 0 and callback.report["build_times"]["machine"]["device"] == "cpu"



# ----------------------------------------------------------------------------------------------
# SnapViT plug-in in a user's own LightningModule / Trainer


class UserModule(pl.LightningModule):
    def __init__(self, num_vits: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        if num_vits >= 1:
            self.backbone = timm.create_model("test_vit", pretrained=False, img_size=IMG, num_classes=0)
        if num_vits >= 2:
            self.aux = nn.ModuleDict({"teacher": timm.create_model("test_vit", pretrained=False, img_size=IMG, num_classes=0)})
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        feats = self.backbone(x) if hasattr(self, "backbone") else x.mean(dim=(2, 3)).repeat(1, 22)[:, :64]
        return self.head(feats)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _user_loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(6, 3, IMG, IMG, generator=g), torch.randint(0, 3, (6,), generator=g)), batch_size=2)


class Snapshot(pl.Callback):
    def on_fit_end(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.requires_grad = [p.requires_grad for p in pl_module.parameters()]


def _user_trainer(tmp_path, callbacks) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, default_root_dir=str(tmp_path),
    )


def test_snapvit_plugin_with_dataloader(tmp_path):
    user = UserModule()
    initial = {k: v.clone() for k, v in user.state_dict().items()}
    snapshot = Snapshot()
    plugin = SnapViT(
        datamodule=_multicrop_loader(), dirpath=tmp_path / "elastic", search_evals=2,
        budgets=[(0.0, 0.0), (0.5, 0.5)], search_kwargs={"pca_components": 2, "log_every_n_evals": 0},
    )
    _user_trainer(tmp_path, [snapshot, plugin]).fit(user, train_dataloaders=_user_loader())
    assert plugin.model_path == "backbone"
    assert plugin.export_paths["elastic"].is_file()
    loaded = ElasticViT.load(plugin.export_paths["elastic"])
    assert loaded.scores.block_weights is not None  # the search ran
    assert loaded.model_kwargs["num_classes"] == 0 and loaded.model_kwargs["img_size"] == [IMG, IMG]
    assert plugin.report["budgets"][0]["fidelity"] == pytest.approx(1.0, abs=1e-5)
    # The search times its precisions (autocast "auto", as in the configs; it ran bf16 whatever was faster).
    precision = plugin.report["build_times"]["precision"]
    assert precision["search"] in precision["fitness_s"] and "not probed" not in precision["search"], precision
    # Corrected by default: the statistics ship beside the checkpoint and ElasticViT.load attaches them.
    assert plugin.report["correction"]["method"] == "lstsq" and plugin.export_paths["stats"].is_file()
    assert loaded.stats is not None and plugin.report["budgets"][1]["fidelity_corrected"] is not None
    # The user's training happened and the plug-in changed nothing of it.
    assert not torch.equal(initial["backbone.blocks.0.mlp.fc1.weight"], user.state_dict()["backbone.blocks.0.mlp.fc1.weight"])
    after = user.state_dict()
    assert all(torch.equal(snapshot.state[k], after[k]) for k in snapshot.state)
    assert [p.requires_grad for p in user.parameters()] == snapshot.requires_grad
    # The elastic dense model is the user's trained backbone (permuted): same features.
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), user.backbone.eval()(x), atol=1e-5)


def _fit_user(tmp_path, callbacks, checkpointing: bool) -> tuple[UserModule, torch.Tensor]:
    """A user's fit from seed 0, and the next draws of torch's global generator after it."""
    torch.manual_seed(0)
    user = UserModule()
    user.backbone.set_grad_checkpointing(checkpointing)
    _user_trainer(tmp_path, callbacks).fit(user, train_dataloaders=_user_loader())
    return user, torch.rand(4)


def test_snapvit_plugin_leaves_the_users_run_alone(tmp_path):
    # timm gradient checkpointing on the user's backbone crashed the scoring after the user's fit (the
    # recomputation ran outside the explicit-attention forward); the calibration drew from torch's
    # global generator, so the user's later draws changed; the inner fit warned about eval mode.
    alone, draws_alone = _fit_user(tmp_path / "a", [], checkpointing=True)
    plugin = SnapViT(datamodule=_multicrop_loader(), dirpath=tmp_path / "elastic", search_evals=2, budgets=[0.5],
                     search_kwargs={"pca_components": 2, "log_every_n_evals": 0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        user, draws = _fit_user(tmp_path / "b", [plugin], checkpointing=True)
    assert plugin.export_paths["elastic"].is_file() and plugin.export_paths["stats"].is_file()
    assert torch.equal(draws, draws_alone)
    assert all(torch.equal(v, alone.state_dict()[k]) for k, v in user.state_dict().items())
    assert user.backbone.grad_checkpointing  # the user's model keeps its setting; the copy scored without it
    assert not [w for w in caught if "eval mode" in str(w.message)]


@pytest.mark.parametrize("bar", [True, False, "disabled"])
def test_snapvit_scoring_shows_progress_when_the_users_fit_did(tmp_path, monkeypatch, bar):
    # The inner scoring fit had no progress bar: minutes of silence on a CPU after the user's own bar.
    inner_bars = []

    def spy(trainer, *args, **kwargs):
        inner_bars.append(trainer.progress_bar_callback is not None)
        return fit(trainer, *args, **kwargs)

    fit = pg.fit
    monkeypatch.setattr(pg, "fit", spy)
    plugin = SnapViT(datamodule=_multicrop_loader(), dirpath=tmp_path / "e", search_evals=0, budgets=[(0.0, 0.0)])
    # a bar the user turned off (refresh_rate=0) is a callback all the same
    off = [pl.callbacks.TQDMProgressBar(refresh_rate=0)] if bar == "disabled" else []
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=bar is not False, enable_model_summary=False, callbacks=[plugin, *off],
                         default_root_dir=str(tmp_path))
    trainer.fit(UserModule(), train_dataloaders=_user_loader())
    assert inner_bars == [bar is True] and plugin.export_paths["elastic"].is_file()


def test_snapvit_plugin_skips_the_work_under_fast_dev_run(tmp_path, caplog):
    (tmp_path / "elastic").mkdir()
    (tmp_path / "elastic" / "report.json").write_text("{}")  # an earlier export: a smoke test beside it runs
    plugin = SnapViT(datamodule=_multicrop_loader(), dirpath=tmp_path / "elastic", search_evals=2)
    trainer = pl.Trainer(accelerator="cpu", fast_dev_run=True, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[plugin], default_root_dir=str(tmp_path))
    with caplog.at_level(logging.INFO):
        trainer.fit(UserModule(), train_dataloaders=_user_loader())
    assert plugin.model_path == "backbone" and plugin.elastic is None  # the set-up was checked, nothing ran
    assert [p.name for p in (tmp_path / "elastic").iterdir()] == ["report.json"]
    assert "SnapViT: fast_dev_run, so no calibration and no export" in caplog.text


def test_snapvit_refuses_a_loader_of_single_images_before_the_users_fit(tmp_path):
    user = UserModule()
    before = {k: v.clone() for k, v in user.state_dict().items()}
    plugin = SnapViT(datamodule=_user_loader(), dirpath=tmp_path, search_evals=2)
    with pytest.raises(ValueError, match=r"datamodule: SnapViT's calibration data \(the DataLoader\) must yield "
                                         r"multi-crop views .* holds \[2, 3, 32, 32\]"):
        _user_trainer(tmp_path, [plugin]).fit(user, train_dataloaders=_user_loader())
    assert all(torch.equal(before[k], v) for k, v in user.state_dict().items())  # failed before training


def test_snapvit_refuses_a_vit_statistics_cannot_correct_before_the_users_fit(tmp_path):
    user = UserModule()
    kwargs = dict(depth=1, embed_dim=64, num_heads=2, img_size=IMG, num_classes=0, scale_attn_norm=True)
    user.backbone = timm.create_model("vit_small_patch16_224", pretrained=False, **kwargs)
    before = {k: v.clone() for k, v in user.state_dict().items()}
    plugin = SnapViT(datamodule=_multicrop_loader(), dirpath=tmp_path, search_evals=2,
                     model_name="vit_small_patch16_224", model_kwargs=kwargs)
    with pytest.raises(ValueError, match=r"SnapViT\(correct='lstsq'\): statistics cannot correct this model"):
        _user_trainer(tmp_path, [plugin]).fit(user, train_dataloaders=_user_loader())
    assert all(torch.equal(before[k], v) for k, v in user.state_dict().items())  # failed before training


class _UsersDataModule(pl.LightningDataModule):
    """A user's own datamodule: ``loader()``'s batches, images for the fitness, calls of its hooks counted."""

    def __init__(self, loader) -> None:
        super().__init__()
        self.loader, self.calls = loader, []

    def prepare_data(self) -> None:
        self.calls.append("prepare_data")

    def setup(self, stage: str) -> None:
        assert self.trainer is not None  # as in a fit: a datamodule may read it (world_size, ...)
        self.calls.append("setup:fit" if stage == "fit" else f"setup:{stage}")  # Lightning passes TrainerFn.FITTING

    def train_dataloader(self) -> DataLoader:
        return self.loader()

    def fitness_images(self) -> torch.Tensor:
        return torch.rand(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))


def test_snapvit_refuses_a_datamodule_of_single_images_before_the_users_fit(tmp_path):
    # A user's own LightningDataModule of (image, label) batches passed every check, the whole training ran,
    # then the calibration failed on its first batch.
    user = UserModule()
    before = {k: v.clone() for k, v in user.state_dict().items()}
    dm = _UsersDataModule(_user_loader)
    plugin = SnapViT(datamodule=dm, dirpath=tmp_path, search_evals=2)
    with pytest.raises(ValueError, match=r"datamodule: SnapViT's calibration data \(_UsersDataModule.train_dataloader\(\)\) "
                                         r"must yield multi-crop views .* holds \[2, 3, 32, 32\]"):
        _user_trainer(tmp_path, [plugin]).fit(user, train_dataloaders=_user_loader())
    assert all(torch.equal(before[k], v) for k, v in user.state_dict().items())  # failed before training
    assert dm.calls == ["prepare_data", "setup:fit"]  # as Lightning prepares a datamodule


def test_snapvit_takes_a_users_datamodule_of_multicrop_views(tmp_path):
    torch.manual_seed(0)
    dm = _UsersDataModule(_multicrop_loader)
    plugin = SnapViT(datamodule=dm, dirpath=tmp_path / "elastic", search_evals=2, budgets=[0.5], correct="none",
                     search_kwargs={"pca_components": 2, "log_every_n_evals": 0})  # the search takes its fitness_images()
    user = UserModule()
    _user_trainer(tmp_path, [plugin]).fit(user, train_dataloaders=_user_loader())
    draws = torch.rand(4)
    assert plugin.export_paths["elastic"].is_file() and plugin.elastic.scores.block_weights is not None  # searched
    assert dm.calls == ["prepare_data", "setup:fit"]  # once, before the user's fit: the calibration runs on its loader
    assert dm.trainer is None  # the user's Trainer was attached for the set-up only
    alone, draws_alone = _fit_user(tmp_path / "alone", [], checkpointing=False)
    assert torch.equal(draws, draws_alone)  # the check's first batch left the global random state alone


def test_find_vit_unwraps_a_compiled_backbone():
    user = UserModule()
    user.backbone = torch.compile(user.backbone)  # compiles lazily: nothing runs here
    where, model = find_vit(user, model_attr="backbone")
    assert where == "backbone._orig_mod" and model is user.backbone._orig_mod
    assert find_vit(user)[1] is model
    with pytest.raises(ValueError, match=r"model_attr='model': UserModule has no such attribute; its submodules: "
                                         r"\['backbone', 'head'\]"):
        find_vit(user, model_attr="model")


def test_find_vit_names_an_unsupported_vit_like_backbone():
    # An Eva backbone was skipped in silence ("found no supported timm VisionTransformer; pass model_attr=").
    from timm.models.eva import Eva

    class MyEva(Eva):  # a user's own subclass too
        pass

    user = UserModule(num_vits=0)
    for cls in (Eva, MyEva):
        user.backbone = cls(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=0)
        with pytest.raises(UnsupportedModelError, match=rf"unsupported ones: \['backbone \(model .*\.{cls.__name__} is not a timm Vis"
                                             r".*SnapViT cannot prune these$"):
            find_vit(user)


def test_find_vit_names_other_timm_backbones():
    # A ConvNeXt (or Swin) backbone read as "found no ... pass model_attr= if it is there", as if it were missing.
    user = UserModule(num_vits=0)
    user.backbone = timm.create_model("convnext_atto", pretrained=False, num_classes=0)
    with pytest.raises(UnsupportedModelError, match=r"found no supported timm VisionTransformer in UserModule; unsupported "
                                                    r"ones: \['backbone \(ConvNeXt: not a timm VisionTransformer\)'\]; "
                                                    r"SnapViT cannot prune these$"):
        find_vit(user)
    from timm.models.convnext import ConvNeXt

    class MyConvNeXt(ConvNeXt):  # a user's subclass: named as the backbone, not by its stages
        pass

    user.backbone = MyConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), num_classes=0)
    with pytest.raises(UnsupportedModelError, match=r"ones: \['backbone \(MyConvNeXt: not a timm VisionTransformer\)'\];"):
        find_vit(user)
    with pytest.raises(UnsupportedModelError, match=r"ones: \['\(the module itself\) \(MyConvNeXt: not a timm "):
        find_vit(user.backbone)  # given the model itself: it alone, not its stages too


def test_snapvit_plugin_with_calibration_datamodule(tmp_path):
    dataset = [torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    dm = CalibrationDataModule(dataset=dataset, num_local_crops=2, batch_size=2)  # size from the model
    user = UserModule(num_vits=2)
    plugin = SnapViT(
        datamodule=dm, dirpath=tmp_path, model_attr="aux.teacher", search_evals=0, budgets=[0.8], name="teacher",
        correct="bias",
    )
    _user_trainer(tmp_path, [plugin]).fit(user, train_dataloaders=_user_loader())
    assert plugin.model_path == "aux.teacher"
    assert (tmp_path / "teacher.elastic.safetensors").is_file()
    assert (tmp_path / "teacher.stats.safetensors").is_file()
    assert plugin.report["correction"]["method"] == "bias" and plugin.report["correction"]["calibration_images"] == 4
    assert plugin.report["budgets"][0]["fidelity_corrected"] is not None
    assert plugin.report["fidelity_images"] == 4
    assert plugin.scores.block_weights is None  # no search


def test_snapvit_model_getter(tmp_path):
    where, model = find_vit(UserModule(num_vits=2), model_getter=lambda m: m.aux["teacher"])
    assert where == "<model_getter>" and isinstance(model, timm.models.vision_transformer.VisionTransformer)


@pytest.mark.parametrize("num_vits, match", [(0, "found no supported timm VisionTransformer"), (2, r"several .*'backbone', 'aux.teacher'")])
def test_snapvit_autodetect_errors_before_fit(tmp_path, num_vits, match):
    user = UserModule(num_vits=num_vits)
    before = {k: v.clone() for k, v in user.state_dict().items()}
    plugin = SnapViT(datamodule=_multicrop_loader(), dirpath=tmp_path, search_evals=0)
    with pytest.raises(ValueError, match=match):
        _user_trainer(tmp_path, [plugin]).fit(user, train_dataloaders=_user_loader())
    assert all(torch.equal(before[k], v) for k, v in user.state_dict().items())  # failed before training


@pytest.mark.parametrize("accelerator, precision, match", [
    ("tpu", "32-true", r"accelerator='tpu' is not available on this machine"),
    ("abacus", "32-true", r"accelerator must be None, 'auto', 'gpu' or one of \[.*'cpu'.*\], got 'abacus'"),
])
def test_snapvit_refuses_a_bad_accelerator_before_the_users_fit(tmp_path, accelerator, precision, match):
    user = UserModule()
    before = {k: v.clone() for k, v in user.state_dict().items()}
    plugin = SnapViT(datamodule=_multicrop_loader(), dirpath=tmp_path, search_evals=0, accelerator=accelerator,
                     precision=precision)
    with pytest.raises(ValueError, match=match):
        _user_trainer(tmp_path, [plugin]).fit(user, train_dataloaders=_user_loader())
    assert all(torch.equal(before[k], v) for k, v in user.state_dict().items())  # failed before training


def test_snapvit_refuses_a_vit_its_file_would_not_rebuild_before_the_users_fit(tmp_path):
    # A SiLU backbone was exported as the GELU model timm builds by its name: the file loaded as another model.
    user = UserModule()
    torch.manual_seed(0)
    user.backbone = timm.create_model("test_vit", pretrained=False, img_size=IMG, num_classes=0, act_layer="silu")
    before = {k: v.clone() for k, v in user.state_dict().items()}
    plugin = SnapViT(datamodule=_multicrop_loader(), dirpath=tmp_path / "out", search_evals=0)
    with pytest.raises(ValueError, match="does not rebuild this model.*blocks.0.mlp.act: rebuilt GELU, this model SiLU"):
        _user_trainer(tmp_path, [plugin]).fit(user, train_dataloaders=_user_loader())
    assert all(torch.equal(before[k], v) for k, v in user.state_dict().items())  # refused before training
    plugin = SnapViT(datamodule=_multicrop_loader(), dirpath=tmp_path / "out", search_evals=0,
                     model_kwargs={"img_size": IMG, "num_classes": 0, "act_layer": "silu"})
    _user_trainer(tmp_path, [plugin]).fit(user, train_dataloaders=_user_loader())  # told how to rebuild it: runs
    loaded = ElasticViT.load(plugin.export_paths["elastic"])
    assert type(loaded.model.blocks[0].mlp.act).__name__ == "SiLU"


@pytest.mark.parametrize("kwargs, match", [
    ({"datamodule": CalibrationDataModule(dataset=TensorDataset(torch.rand(4, 3, 40, 40)), img_size=13)},
     r"datamodule: img_size=13: 13 x 13 px images do not cut into this model's 16 x 16 px patches; give a size "
     r"that is a multiple of 16"),
    ({"fitness_images": torch.randn(2, 3, 8, 8)}, r"fitness_images: 8 x 8 px images do not cut into"),
    ({"fitness_images": DataLoader(TensorDataset(torch.randn(2, 3, 8, 8)))}, r"fitness_images: 8 x 8 px images do not cut"),
    ({"fitness_images": [torch.randn(3, 32, 32)]}, r"fitness_images: batches must be \[B, 3, H, W\] tensors"),
    ({"search_kwargs": {"initial_weights": torch.rand(3)}}, r"initial_weights must be a finite tensor of shape \[18\]"),
    ({"search_kwargs": {"initial_covariance": torch.eye(3)}}, r"initial_covariance must have shape \[18, 18\]"),
    ({"criterion": "cross_entropy"}, r"criterion='cross_entropy' needs the ViT's own classifier head; the model has num_classes=0 .*a head outside the ViT, as a plug-in user's, is not scored: use criterion='dino'"),
    ({"search_kwargs": {"ratio_pairs": [(0.99, 0.0), (0.98, 0.0)]}}, r"several pairs cut as \(0.9479, 0\)"),
    ({"budgets": [0.8, {"flops": 0.01}]}, r"SnapViT\(budgets=...\): flops=0.01 is below the smallest reachable fraction "
     r"0\.\d+ \(every block at its minimum keep: min_mlp_keep=0.05, min_head_keep=0.2\)"),
])
def test_snapvit_refuses_images_and_a_start_the_vit_cannot_take_before_the_users_fit(tmp_path, kwargs, match):
    user = UserModule()
    before = {k: v.clone() for k, v in user.state_dict().items()}
    with pytest.raises(ValueError, match=match):  # when the plug-in is built (a list of single images) or the fit starts
        plugin = SnapViT(**{"datamodule": _multicrop_loader(), "dirpath": tmp_path, "search_evals": 2, **kwargs})
        _user_trainer(tmp_path, [plugin]).fit(user, train_dataloaders=_user_loader())
    assert all(torch.equal(before[k], v) for k, v in user.state_dict().items())  # refused before training


def test_snapvit_refuses_more_class_folders_than_the_head_has_before_the_users_fit(tmp_path):
    from PIL import Image

    for name in ("a", "b", "c"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(tmp_path / "photos" / name / "x.png")
    user = UserModule()
    user.backbone = timm.create_model("test_vit", pretrained=False, img_size=IMG, num_classes=2)
    user.head = nn.Linear(2, 3)
    before = {k: v.clone() for k, v in user.state_dict().items()}
    plugin = SnapViT(datamodule=CalibrationDataModule(tmp_path / "photos"), dirpath=tmp_path / "out", search_evals=0,
                     criterion="cross_entropy", model_kwargs={"img_size": IMG, "num_classes": 2})
    with pytest.raises(ValueError, match=r"the data has 3 classes \(a, b, c\) but the model's head has num_classes=2"):
        _user_trainer(tmp_path, [plugin]).fit(user, train_dataloaders=_user_loader())
    assert all(torch.equal(before[k], v) for k, v in user.state_dict().items())  # refused before training


def test_snapvit_refuses_an_empty_calibration_folder_before_the_users_fit(tmp_path):
    (tmp_path / "empty").mkdir()
    user = UserModule()
    before = {k: v.clone() for k, v in user.state_dict().items()}
    plugin = SnapViT(datamodule=CalibrationDataModule(tmp_path / "empty"), dirpath=tmp_path / "out", search_evals=0)
    with pytest.raises(ValueError, match=r"data_dir: no image files .* found in"):
        _user_trainer(tmp_path, [plugin]).fit(user, train_dataloaders=_user_loader())
    assert all(torch.equal(before[k], v) for k, v in user.state_dict().items())  # refused before training
    (tmp_path / "photos").mkdir()
    torch.manual_seed(0)
    from PIL import Image
    Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(tmp_path / "photos" / "a.png")
    dm = CalibrationDataModule(tmp_path / "photos", fitness_data_dir=tmp_path / "empty")  # the fitness folder too
    with pytest.raises(ValueError, match=r"fitness_data_dir: no image files .* found in"):
        _user_trainer(tmp_path, [SnapViT(datamodule=dm, dirpath=tmp_path / "out2", search_evals=2)]).fit(
            user, train_dataloaders=_user_loader())
    assert all(torch.equal(before[k], v) for k, v in user.state_dict().items())


def test_snapvit_scores_a_float32_copy_of_a_bf16_true_model(tmp_path, caplog):
    user = UserModule()
    plugin = SnapViT(datamodule=_multicrop_loader(), dirpath=tmp_path / "elastic", search_evals=0, budgets=[0.5])
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, precision="bf16-true", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[plugin], default_root_dir=str(tmp_path))
    with caplog.at_level(logging.INFO):
        trainer.fit(user, train_dataloaders=_user_loader())
    assert "your model's weights are bfloat16; the copy is exported in float32" in caplog.text
    assert {p.dtype for p in user.parameters()} == {torch.bfloat16}  # the user's model is left as it is
    loaded = ElasticViT.load(plugin.export_paths["elastic"])
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():  # the same weights, upcast exactly: the dense elastic model is the user's, in float32
        assert torch.allclose(loaded.model(x), user.backbone.float().eval()(x), atol=1e-5)


def test_snapvit_refuses_existing_export_before_fit(tmp_path):
    (tmp_path / "report.json").write_text("{}")
    plugin = SnapViT(datamodule=_multicrop_loader(), dirpath=tmp_path, search_evals=0)
    with pytest.raises(FileExistsError, match=r"report.json exists .*\(SnapViT\(overwrite=True\); in a config"):
        _user_trainer(tmp_path, [plugin]).fit(UserModule(), train_dataloaders=_user_loader())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"datamodule": [1, 2]}, TypeError, "datamodule"),
        ({"model_attr": "a", "model_getter": lambda m: m}, ValueError, "not both"),
        ({"model_attr": "a-b"}, ValueError, "model_attr"),
        ({"model_getter": 3}, TypeError, "model_getter"),
        ({"criterion": "hessian"}, ValueError, "criterion"),
        ({"search_evals": -1}, ValueError, "search_evals"),
        ({"budgets": [2.0]}, ValueError, "budgets"),
        ({"budgets": [(0.3, 0.3), 0.5, [0.3, 0.3]]}, ValueError, r"budgets holds \[0.3, 0.3\] more than once"),
        ({"precision": "16-mixed"}, ValueError, "precision"),
        ({"search_kwargs": {"sigma": -1.0}}, ValueError, "^search_kwargs: sigma"),
        ({"search_kwargs": {"popsize": "a"}}, ValueError, "^search_kwargs: popsize must be an int"),
        ({"datamodule": pl.LightningDataModule()}, ValueError, "fitness images"),
        ({"search_kwargs": {"images": torch.rand(2, 3, 32, 32)}}, ValueError,
         "search_kwargs must not hold images; use fitness_images"),
        ({"search_kwargs": {"bogus": 1}}, ValueError, r"search_kwargs: unknown key\(s\) \['bogus'\]; EvolutionarySearch takes \[.*'sigma'"),
        ({"dirpath": __file__}, ValueError, "dirpath must be a folder, but '.*test_plugin.py' is a file"),
    ],
)
def test_snapvit_bad_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        SnapViT(**{"datamodule": _multicrop_loader(), "dirpath": tmp_path, **kwargs})


_DDP_USER_SCRIPT = """
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from snapvit_lightning.plugin import SnapViT

torch.set_num_threads(1)
out = Path(sys.argv[1])


class User(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.backbone = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=0)

    def training_step(self, batch, batch_idx):
        return self.backbone(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


g = torch.Generator().manual_seed(0)
calibration = DataLoader(TensorDataset(torch.randn(4, 4, 3, 32, 32, generator=g), torch.full((4,), -1)), batch_size=2)


class Calibration(pl.LightningDataModule):  # a user's own, with prepare_data: rank 0's calibration waited forever
    def prepare_data(self):  # at that hook's barrier for the other ranks
        (out / f"prepared{os.environ.get('LOCAL_RANK', '0')}.txt").write_text("yes")

    def train_dataloader(self):
        return calibration


plugin = SnapViT(Calibration(), dirpath=out / "elastic", search_evals=0, budgets=[0.5], correct="none",
                 fitness_images=torch.rand(4, 3, 32, 32))
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=[plugin])
trainer.fit(User(), DataLoader(TensorDataset(torch.randn(4, 3, 32, 32)), batch_size=2))
(out / f"rank{trainer.global_rank}.txt").write_text(str((out / "elastic" / "test_vit.elastic.safetensors").is_file()))

# When rank 0's export fails, the other ranks fail too (they returned as if the files existed).
import snapvit_lightning.plugin as plugin_module


def broken_export(*args, **kwargs):
    raise ValueError("disk full")


plugin_module.export_elastic = broken_export
failing = SnapViT(calibration, dirpath=out / "failing", search_evals=0, budgets=[0.5], correct="none")
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=[failing])
try:
    trainer.fit(User(), DataLoader(TensorDataset(torch.randn(4, 3, 32, 32)), batch_size=2))
    outcome = "returned"
except Exception as err:
    outcome = f"{type(err).__name__}: {err}"
(out / f"fail{trainer.global_rank}.txt").write_text(outcome)
if trainer.global_rank == 0:  # Lightning ends the other ranks when rank 0 exits: wait for rank 1's answer
    import time

    deadline = time.time() + 60
    while not (out / "fail1.txt").exists() and time.time() < deadline:
        time.sleep(0.1)
"""


def test_under_ddp_every_rank_returns_after_the_export(tmp_path):
    # Rank 1 returned from fit() while rank 0 was still scoring (code there that read the export failed),
    # and returned normally when rank 0's export failed.
    import os
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "user_ddp.py"
    script.write_text(textwrap.dedent(_DDP_USER_SCRIPT))
    dist_vars = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["True", "True"]
    assert sorted(p.name for p in tmp_path.glob("prepared*")) == ["prepared0.txt"]  # once per node, as Lightning does
    assert (tmp_path / "fail0.txt").read_text() == "ValueError: disk full"
    assert (tmp_path / "fail1.txt").read_text().startswith("RankZeroFailed: SnapViT's calibration and export failed on global rank 0")


def test_snapvit_with_precision_bf16_true_searches_and_exports_float32(tmp_path, caplog):
    # the inner bf16-true fit cast the copy: its search probe and the export ran float32 images through
    # bf16 weights, "Input type (float) and bias type (c10::BFloat16)", after the user's training
    user = UserModule()
    plugin = SnapViT(datamodule=_multicrop_loader(), dirpath=tmp_path / "elastic", search_evals=2, budgets=[0.5],
                     precision="bf16-true", search_kwargs={"pca_components": 2, "autocast": "auto"})
    with caplog.at_level(logging.INFO):
        _user_trainer(tmp_path, [plugin]).fit(user, train_dataloaders=_user_loader())
    assert "scored with precision='bf16-true'; the copy is exported in float32" in caplog.text
    assert {p.dtype for p in ElasticViT.load(plugin.export_paths["elastic"]).model.parameters()} == {torch.float32}
    assert {p.dtype for p in user.parameters()} == {torch.float32}


def test_a_second_fit_with_the_same_snapvit_says_it_wrote_the_export(tmp_path) -> None:
    # "(an earlier export?)" for the callback's own files
    plugin = SnapViT(datamodule=_multicrop_loader(), dirpath=tmp_path / "elastic", search_evals=0, budgets=[0.5],
                     correct="none")
    _user_trainer(tmp_path, [plugin]).fit(UserModule(), train_dataloaders=_user_loader())
    with pytest.raises(FileExistsError, match=r"test_vit.elastic.safetensors exists: this SnapViT wrote it in an "
                                              r"earlier fit; a second fit with the same callback exports again only "
                                              r"with overwrite=True$"):
        _user_trainer(tmp_path, [plugin]).fit(UserModule(), train_dataloaders=_user_loader())


@pytest.mark.parametrize("labels, match", [
    (None, r"needs a label >= 0 for every image \(got \[-1, -1\]\)"),  # the loader's -1: unlabeled
    (torch.tensor([0, 9, 1, 2]), r"label 9 is not a class of the model's head \(num_classes=3\)"),
])
def test_snapvit_checks_a_loaders_first_labels_before_the_users_fit(tmp_path, labels, match) -> None:
    # a DataLoader's labels were checked only after the user's training
    from torch.utils.data import DataLoader, TensorDataset

    user = UserModule()
    user.backbone = timm.create_model("test_vit", pretrained=False, img_size=IMG, num_classes=3)
    user.head = nn.Linear(3, 3)
    before = {k: v.clone() for k, v in user.state_dict().items()}
    loader = _multicrop_loader() if labels is None else DataLoader(
        TensorDataset(torch.randn(4, 4, 3, IMG, IMG), labels), batch_size=4)
    plugin = SnapViT(datamodule=loader, dirpath=tmp_path / "out", search_evals=0, criterion="cross_entropy")
    with pytest.raises(ValueError, match=match):
        _user_trainer(tmp_path, [plugin]).fit(user, train_dataloaders=_user_loader())
    assert all(torch.equal(before[k], v) for k, v in user.state_dict().items())  # refused before training
