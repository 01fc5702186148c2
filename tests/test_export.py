"""Tests of snapvit_lightning.export: export_elastic and the ElasticExport hook (tiny models)."""

from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import cpu_trainer as _trainer
from conftest import multicrop_loader as _multicrop_loader
from conftest import random_scores, tiny_model
from PIL import Image

from snapvit_lightning import export as ex
from snapvit_lightning.benchmarks import bench
from snapvit_lightning.checkpoint import read_metadata
from snapvit_lightning.correction import CorrectionStats, collect_stats
from snapvit_lightning.data import CalibrationDataModule
from snapvit_lightning.elastic import ElasticViT, load_subnet
from snapvit_lightning.export import ElasticExport, export_elastic
from snapvit_lightning.module import SnapViTModule
from snapvit_lightning.search import EvolutionarySearch

BUDGETS = [(0.0, 0.0), (0.5, 0.5), 0.6]
IMG = 32


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def elastic() -> ElasticViT:
    model, name, kwargs = tiny_model("test_vit")
    return ElasticViT(model, random_scores(model), model_name=name, model_kwargs=kwargs)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 160, 160, generator=torch.Generator().manual_seed(0))


def _listing(path):
    return sorted((p.name, p.stat().st_mtime_ns) for p in path.iterdir())


# ----------------------------------------------------------------------------------------------
# export_elastic


def test_export_writes_everything(tmp_path, elastic, images):
    calibration = torch.randn(8, 3, 160, 160, generator=torch.Generator().manual_seed(5))
    out = export_elastic(elastic, tmp_path / "exp", budgets=BUDGETS, fitness_images=images, save_subnets=True,
                         calibration_images=calibration)  # correct="lstsq" by default
    paths, report = out["paths"], out["report"]
    exp = tmp_path / "exp"
    assert paths["elastic"] == exp / "test_vit.elastic.safetensors"
    assert paths["stats"] == exp / "test_vit.stats.safetensors"  # the statistics ship beside the checkpoint
    assert all(p.is_file() for p in paths.values())
    assert report["correction"]["method"] == "lstsq" and report["correction"]["stats_file"] == "test_vit.stats.safetensors"
    assert not [p for p in exp.iterdir() if p.name.startswith(".")]  # no staging leftovers
    for png in ("fidelity_vs_flops.png", "kept_units.png"):
        assert (exp / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    loaded = ElasticViT.load(paths["elastic"])
    assert torch.equal(loaded.scores.mlp, elastic.scores.mlp)
    assert loaded.stats is not None and loaded.stats.num_images == 8  # attached: subnet() is corrected

    on_disk = json.loads((exp / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["model_name"] == "test_vit" and on_disk["fidelity_images"] == 6
    entries = on_disk["budgets"]
    assert len(entries) == 3
    b = elastic.structure.num_blocks
    for e in entries:
        for key in ("mlp_ratio", "head_ratio", "params", "flops", "params_fraction", "flops_fraction", "fidelity",
                    "fidelity_corrected"):
            assert isinstance(e[key], (int, float)), key
        assert len(e["kept_neurons"]) == b and len(e["kept_heads"]) == b
        sub = load_subnet(exp / e["subnet_file"])  # corrected: its units are the statistics' ranking's
        split = {"head_ratio_scale": 0.25, "head_share_knee": 0.75} if "flops" in e["requested"] else {}  # as slice's
        assert read_metadata(exp / e["subnet_file"])["budget"] == {  # the file says how it was cut
            "mlp_ratio": e["mlp_ratio"], "head_ratio": e["head_ratio"], "correction": "lstsq",
            "elastic": "test_vit.elastic.safetensors", "requested": e["requested"], **split}
        neurons, heads = e.get("kept_neurons_corrected", e["kept_neurons"]), e.get("kept_heads_corrected", e["kept_heads"])
        assert [blk.mlp.fc2.in_features for blk in sub.blocks] == neurons
        assert [blk.attn.num_heads for blk in sub.blocks] == heads
        assert sum(neurons) == sum(e["kept_neurons"]) and sum(heads) == sum(e["kept_heads"])  # same size
        assert ("kept_neurons_corrected" in e or "kept_heads_corrected" in e) == (
            (neurons, heads) != (e["kept_neurons"], e["kept_heads"]))
    assert "kept_neurons_corrected" in entries[1] and "kept_neurons_corrected" not in entries[0]
    assert on_disk["correction"]["ranking"] is True and on_disk["build_times"]["ranking_s"] > 0
    dense, half, flops = entries
    assert dense["fidelity"] == pytest.approx(1.0, abs=1e-5)
    assert dense["flops_fraction"] == pytest.approx(1.0) and dense["params"] == on_disk["dense"]["params"]
    assert half["flops_fraction"] < 1.0 and half["fidelity"] < 1.0
    assert flops["requested"] == {"flops": 0.6} and flops["flops_fraction"] <= 0.6
    assert half["label"] == "mlp0.5_head0.5"


@pytest.mark.parametrize("correct", ["lstsq", "none"])
def test_kept_units_plot_shows_the_subnets_the_export_cuts(tmp_path, elastic, images, monkeypatch, correct):
    import snapvit_lightning.export as export_module

    figures, original = [], export_module._kept_units_figure

    def recording(*args, **kwargs):
        figures.append(original(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(export_module, "_kept_units_figure", recording)
    calibration = torch.randn(8, 3, 160, 160, generator=torch.Generator().manual_seed(5))
    out = export_elastic(elastic, tmp_path, budgets=BUDGETS, correct=correct,
                         calibration_images=calibration if correct != "none" else None)
    entries = out["report"]["budgets"]
    suffix = "_corrected" if correct != "none" else ""
    assert correct == "none" or any("kept_neurons_corrected" in e for e in entries)  # the cuts differ
    (fig,) = figures
    dims = elastic.structure.blocks[0]
    panels = [ax for ax in fig.axes if ax.images]  # not the colour bars
    for ax, key, total in zip(panels, ("kept_neurons", "kept_heads"), (dims.mlp_hidden, dims.num_heads), strict=True):
        expected = [[v / total for v in e.get(key + suffix, e[key])] for e in entries]
        assert torch.allclose(torch.tensor(ax.images[0].get_array().tolist()).double(), torch.tensor(expected, dtype=torch.float64))
        assert ax.get_title().endswith("corrected subnets)" if correct != "none" else "plain cut)")
    assert fig._suptitle.get_text() == elastic.model_name  # the file name is the model's: said once


def test_export_takes_a_parameter_fraction_as_subnet_does(tmp_path, elastic):
    out = export_elastic(elastic, tmp_path, budgets=[{"params": 0.7}], correct="none", save_subnets=True)
    (entry,) = out["report"]["budgets"]
    assert entry["requested"] == {"params": 0.7} and entry["params_fraction"] <= 0.7
    expected = elastic.subnet(params=0.7, correct="none")
    assert (entry["mlp_ratio"], entry["head_ratio"]) == elastic.resolve_budget(params=0.7)
    got = load_subnet(out["paths"][f"subnet:{entry['label']}"])
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), expected.state_dict().values()))


def test_export_without_images_or_subnets(tmp_path, elastic):
    out = export_elastic(elastic, tmp_path, budgets=[{"mlp_ratio": 0.3, "head_ratio": 0.0}], name="mine", correct="none")
    assert set(out["paths"]) == {"elastic", "report", "fidelity_plot", "kept_units_plot"}
    assert (tmp_path / "mine.elastic.safetensors").is_file()
    entry = out["report"]["budgets"][0]
    assert entry["fidelity"] is None and entry["subnet_file"] is None
    assert out["report"]["correction"] is None and not list(tmp_path.glob("*.stats.safetensors"))


@pytest.mark.parametrize("method", ["bias", "lstsq"])
def test_export_with_weight_correction(tmp_path, elastic, images, method):
    from snapvit_lightning.correction import CorrectionStats, auto_damping

    calibration = torch.randn(8, 3, 160, 160, generator=torch.Generator().manual_seed(5))
    out = export_elastic(
        elastic, tmp_path, budgets=[(0.0, 0.0), (0.5, 0.5)], fitness_images=images, save_subnets=True,
        correct=method, calibration_images=calibration,
    )
    report, paths = out["report"], out["paths"]
    stats = CorrectionStats.load(paths["stats"])
    assert paths["stats"].name == "test_vit.stats.safetensors" and stats.num_images == 8
    assert report["correction"] == {
        "method": method, "stats_file": "test_vit.stats.safetensors", "stats_bytes": paths["stats"].stat().st_size - _header(paths["stats"]),
        "stats_digest": stats.digest, "calibration_images": 8, "calibration_views": 8, "views_per_image": 1,
        "calibration_size": [160, 160],
        "damping": auto_damping(elastic.structure.blocks[0].mlp_hidden, stats.num_images, stats.num_tokens) if method == "lstsq" else None,
        "ranking": True, "fidelity_images_are_calibration_images": False,
    }
    assert stats.has_ranking  # computed on the calibration images, stored beside the checkpoint
    dense, half = report["budgets"]
    assert dense["fidelity_corrected"] == pytest.approx(1.0, abs=1e-5)  # nothing cut: nothing changes
    assert half["fidelity_corrected"] is not None and half["fidelity_corrected"] != half["fidelity"]
    # The saved subnet is the corrected one, equal to a correction from the stored statistics.
    saved = load_subnet(tmp_path / half["subnet_file"])
    _assert_same_tensors(saved, ElasticViT.load(paths["elastic"]).subnet(0.5, 0.5, correct=method))
    direct = elastic.subnet(0.5, 0.5, correct=method, calibration=stats)  # the same ranked cut, rebuilt here
    for a, b in zip(saved.state_dict().values(), direct.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The ranking is the corrected path's own: obs-stream scores of the calibration images.
    from snapvit_lightning.obs import corrected_ranking

    ranking = corrected_ranking(elastic.model, stats, calibration, min_mlp_keep=elastic.scores.min_mlp_keep,
                                min_head_keep=elastic.scores.min_head_keep)
    torch.testing.assert_close(stats.ranking_mlp, ranking.mlp, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(stats.ranking_heads, ranking.heads, rtol=1e-5, atol=0.0)
    view = elastic.ranked_view(stats)
    assert [blk.mlp.fc2.in_features for blk in saved.blocks] == [d.mlp_hidden for d in view.dims(0.5, 0.5)]
    assert report["build_times"]["ranking_s"] > 0
    assert elastic.stats is None  # the export attached nothing to the caller's model


def _plain_cut(elastic, mlp_ratio, head_ratio):
    """Today's plain subnet, built independently of subnet(): the permuted model, sliced."""
    import copy

    from snapvit_lightning.structure import slice_model

    sub = copy.deepcopy(elastic.model)
    slice_model(sub, elastic.dims(mlp_ratio, head_ratio))
    return sub


def _assert_same_tensors(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_export_correct_none_writes_the_plain_cut(tmp_path, elastic, images):
    out = export_elastic(elastic, tmp_path, budgets=[(0.5, 0.5)], fitness_images=images, save_subnets=True,
                         correct="none")
    assert "stats" not in out["paths"] and not list(tmp_path.glob("*.stats.safetensors"))
    entry = out["report"]["budgets"][0]
    assert entry["fidelity_corrected"] is None and out["report"]["correction"] is None
    _assert_same_tensors(load_subnet(tmp_path / entry["subnet_file"]), _plain_cut(elastic, 0.5, 0.5))
    assert ElasticViT.load(out["paths"]["elastic"]).stats is None


def test_export_ships_attached_statistics(tmp_path, images):
    model, name, kwargs = tiny_model("test_vit")
    el = ElasticViT(model, random_scores(model), model_name=name, model_kwargs=kwargs)
    el.attach_stats(el.collect_stats(images[:4]))
    out = export_elastic(el, tmp_path, budgets=[(0.5, 0.5)], fitness_images=images, save_subnets=True)
    correction = out["report"]["correction"]
    assert correction["method"] == "lstsq" and correction["calibration_views"] == 4
    assert correction["calibration_images"] is None and correction["views_per_image"] is None  # a tensor: not known
    assert correction["ranking"] is False and out["report"]["build_times"]["ranking_s"] is None  # none attached
    assert not any("kept_neurons_corrected" in e for e in out["report"]["budgets"])
    assert correction["fidelity_images_are_calibration_images"] is None  # not known for attached statistics
    loaded = ElasticViT.load(out["paths"]["elastic"])
    assert torch.equal(loaded.stats.mlp, el.stats.mlp) and torch.equal(loaded.stats.attn, el.stats.attn)
    entry = out["report"]["budgets"][0]
    _assert_same_tensors(load_subnet(tmp_path / entry["subnet_file"]), el.subnet(0.5, 0.5))
    assert entry["fidelity_corrected"] != entry["fidelity"]


def _header(path) -> int:
    """Bytes of a safetensors file before its tensor data (8-byte length + JSON header)."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


@pytest.mark.parametrize("name", ["mine-v1.2.elastic.safetensors", "mine-v1.2.safetensors", "mine-v1.2.onnx",
                                  "mine-v1.2.elastic"])
def test_a_name_with_a_file_suffix_is_refused(tmp_path, elastic, name) -> None:
    with pytest.raises(ValueError, match=f"name is the files' stem, without a suffix: got '{name}', which would write "
                                         f"'{name}.elastic.safetensors'; give 'mine-v1.2'"):
        export_elastic(elastic, tmp_path, name=name, correct="none")
    assert not any(tmp_path.iterdir())


def test_export_names_out_dir_when_it_is_a_file(tmp_path, elastic):
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(ValueError, match=r"out_dir must be a folder, but '.*report.json' is a file"):
        export_elastic(elastic, tmp_path / "report.json", correct="none")


def test_export_correction_needs_calibration_images(tmp_path, elastic):
    with pytest.raises(ValueError, match="correct='lstsq' needs calibration_images.*correct='none' for the plain cut"):
        export_elastic(elastic, tmp_path)  # the default corrects
    with pytest.raises(ValueError, match="correct='lstsq' needs calibration_images"):
        export_elastic(elastic, tmp_path, correct="lstsq")
    with pytest.raises(ValueError, match="correct must be one of"):
        export_elastic(elastic, tmp_path, correct="obs")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_overwrite_and_keeps_first(tmp_path, elastic):
    export_elastic(elastic, tmp_path, correct="none", budgets=[(0.0, 0.0)])
    before = _listing(tmp_path)
    with pytest.raises(FileExistsError, match="test_vit.elastic.safetensors|report.json"):
        export_elastic(elastic, tmp_path, correct="none", budgets=[(0.5, 0.5)])
    assert _listing(tmp_path) == before
    export_elastic(elastic, tmp_path, correct="none", budgets=[(0.5, 0.5)], overwrite=True)
    assert json.loads((tmp_path / "report.json").read_text())["budgets"][0]["mlp_ratio"] == 0.5


def test_overwrite_with_the_plain_cut_removes_an_earlier_exports_statistics(tmp_path, elastic, images):
    export_elastic(elastic, tmp_path, correct="lstsq", budgets=[(0.5, 0.5)], calibration_images=images)
    assert (tmp_path / "test_vit.stats.safetensors").is_file()
    model, name, kwargs = tiny_model("test_vit")
    other = ElasticViT(model, random_scores(model, seed=1), model_name=name, model_kwargs=kwargs)  # another checkpoint
    export_elastic(other, tmp_path, correct="none", budgets=[(0.5, 0.5)], overwrite=True)
    assert not (tmp_path / "test_vit.stats.safetensors").exists()
    assert ElasticViT.load(tmp_path / "test_vit.elastic.safetensors").stats is None  # loads: no foreign statistics
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "test_vit.stats.safetensors").write_bytes(b"left over")
    with pytest.raises(FileExistsError, match=r"test_vit\.stats\.safetensors exists"):  # refused without overwrite
        export_elastic(elastic, tmp_path / "fresh", correct="none", budgets=[(0.5, 0.5)])


def test_overwrite_removes_the_replaced_exports_subnets(tmp_path, elastic, images):
    # They stayed beside the new export: corrected subnets of the old checkpoint next to a plain one's report.
    export_elastic(elastic, tmp_path, correct="lstsq", budgets=[(0.35, 0.2), (0.5, 0.5)], calibration_images=images,
                   save_subnets=True, onnx=True)
    (tmp_path / "mine.txt").write_text("a user's file")
    (tmp_path / "other.elastic.safetensors").write_bytes(b"another export's")
    result = export_elastic(elastic, tmp_path, correct="none", budgets=[(0.5, 0.5)], save_subnets=True, overwrite=True)
    written = {p.name for p in result["paths"].values()}
    assert {p.name for p in tmp_path.iterdir()} == written | {"mine.txt", "other.elastic.safetensors"}
    assert "test_vit.mlp0.5_head0.5.safetensors" in written and "test_vit.stats.safetensors" not in written
    # a report edited by hand: names that are no export file of this name, or no file, are left alone
    report = json.loads((tmp_path / "report.json").read_text())
    report["files"]["notes"] = "test_vit.notes.txt"
    report["budgets"][0]["onnx_file"] = "test_vit.dir.onnx"
    (tmp_path / "report.json").write_text(json.dumps(report))
    (tmp_path / "test_vit.notes.txt").write_text("mine")
    (tmp_path / "test_vit.dir.onnx").mkdir()
    export_elastic(elastic, tmp_path, correct="none", budgets=[(0.4, 0.5)], save_subnets=True, overwrite=True)
    assert (tmp_path / "test_vit.notes.txt").is_file() and (tmp_path / "test_vit.dir.onnx").is_dir()
    assert not (tmp_path / "test_vit.mlp0.5_head0.5.safetensors").exists()
    (tmp_path / "report.json").write_text(json.dumps({**report, "budgets": 5, "files": True}))  # neither is readable
    export_elastic(elastic, tmp_path, correct="none", budgets=[(0.5, 0.5)], save_subnets=True, overwrite=True)
    assert (tmp_path / "test_vit.mlp0.4_head0.5.safetensors").is_file()  # nothing to remove: kept


def test_overwrite_under_another_name_replaces_the_folders_export(tmp_path, elastic, caplog):
    # report.json and the plots are the folder's: the first export's files stayed without a report.
    export_elastic(elastic, tmp_path, name="first", correct="none", budgets=[(0.5, 0.5)], save_subnets=True)
    with pytest.raises(FileExistsError, match=r"report.json exists \(the export 'first'\); overwrite=True replaces it and "
                                              r"removes its 2 files$"):
        export_elastic(elastic, tmp_path, name="second", correct="none", budgets=[(0.5, 0.5)])
    (tmp_path / "first.notes.txt").write_text("a user's file")
    with caplog.at_level("INFO"):
        result = export_elastic(elastic, tmp_path, name="second", correct="none", budgets=[(0.5, 0.5)], overwrite=True)
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in result["paths"].values()} | {"first.notes.txt"}
    assert (f"export: replaced the export 'first' in {tmp_path} (overwrite) and removed its 2 files: "
            "first.elastic.safetensors, first.mlp0.5_head0.5.safetensors") in [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("where", ["_write_json", "_write_figure", "_write_subnet"])
def test_failed_export_leaves_nothing(tmp_path, elastic, monkeypatch, where):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ex, where, boom)
    with pytest.raises(OSError, match="disk full"):
        export_elastic(elastic, tmp_path, correct="none", budgets=[(0.5, 0.5)], save_subnets=True)
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old_export(tmp_path, elastic, monkeypatch):
    export_elastic(elastic, tmp_path, correct="none", budgets=[(0.0, 0.0)])
    before = _listing(tmp_path)
    monkeypatch.setattr(ex, "_write_json", lambda *a: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError, match="boom"):
        export_elastic(elastic, tmp_path, correct="none", budgets=[(0.5, 0.5)], overwrite=True)
    assert _listing(tmp_path) == before


def test_failure_while_renaming_removes_placed_files(tmp_path, elastic, monkeypatch):
    real = ex.os.replace
    calls = []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("rename failed")
        real(src, dst)

    monkeypatch.setattr(ex.os, "replace", flaky)
    with pytest.raises(OSError, match="rename failed"):
        export_elastic(elastic, tmp_path, correct="none", budgets=[(0.0, 0.0)])
    assert list(tmp_path.iterdir()) == []


def test_two_exports_into_one_folder_place_their_files_one_after_the_other(tmp_path, elastic):
    # Two runs writing into one folder at the same moment both placed their files (report of one, checkpoint of
    # the other). An export now renames under a lock on the folder and checks for existing files again there.
    import threading
    import time

    from snapvit_lightning.file_io import folder_lock

    errors = []

    def export():
        try:
            export_elastic(elastic, tmp_path, correct="none", budgets=[(0.5, 0.5)])
        except FileExistsError as err:
            errors.append(err)

    with folder_lock(tmp_path):  # "the other run", placing its files
        worker = threading.Thread(target=export)
        worker.start()
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".report.json.*.partial")) and time.monotonic() < deadline:
            time.sleep(0.05)  # the report is staged last, just before the renames
        time.sleep(0.3)
        assert worker.is_alive() and not [p for p in tmp_path.iterdir() if not p.name.endswith(".partial")]
        (tmp_path / "report.json").write_text("{}")  # the other run's files
    worker.join(60)
    assert len(errors) == 1 and "report.json exists" in str(errors[0])
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # its own staged files removed, nothing mixed


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"budgets": [(1.0, 0.0)]}, "mlp_ratio"),
        ({"budgets": [1.5]}, "FLOPs fraction"),
        ({"budgets": "0.5"}, "budgets"),
        ({"budgets": [{"size": 0.5}]}, "dict budget needs keys mlp_ratio/head_ratio, flops or params"),
        ({"budgets": [{"params": 1.5}]}, r"invalid budget \{'params': 1.5\}: a parameter fraction must be in \(0, 1\]"),
        ({"name": "a/b"}, "name"),
        ({"fitness_images": torch.zeros(2, 3)}, "fitness_images"),
        ({"device": "tpu9"}, "device must name a torch device, got 'tpu9'"),
        ({"budgets": []}, r"budgets must be a non-empty sequence .* got \[\]"),
        ({"fitness_images": torch.full((2, 3, 32, 32), float("nan"))}, r"fitness_images hold non-finite values"),
        ({"fitness_images": torch.zeros(2, 3, 40, 40)}, r"fitness_images: 40 x 40 px images do not cut into"),
        ({"calibration_images": torch.zeros(2, 3, 32, 32)},  # ignored before, where slice() refuses them
         r"calibration_images are only used with correct='lstsq' or 'bias', got correct='none'"),
        ({"views_per_image": 8},  # ignored before: it describes calibration_images
         r"views_per_image describes calibration_images, which were not given \(got views_per_image=8\)"),
        pytest.param({"device": "cuda"}, r"device 'cuda' asked for, but CUDA is not available",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA has it")),
    ],
)
def test_export_bad_arguments(tmp_path, elastic, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export_elastic(elastic, tmp_path, correct="none", **kwargs)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# ElasticExport in a scoring Trainer


def test_a_bf16_true_scoring_fit_exports_a_float32_copy(tmp_path, caplog):
    # the export ran float32 fitness images through the bf16 copy: "Input type (float) and bias type (c10::BFloat16)"
    module = SnapViTModule("test_vit", model_kwargs={"img_size": IMG})
    images = torch.randn(4, 3, IMG, IMG)
    export = ElasticExport(tmp_path / "out", budgets=[(0.4, 0.5)], images=images, correct="none")
    # the search's precision probe ran float32 images through the bf16 weights (the same error)
    search = EvolutionarySearch(max_evals=2, images=images, pca_components=2, autocast="auto", log_every_n_evals=0)
    import lightning.pytorch as pl

    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, precision="bf16-true", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[search, export])
    with caplog.at_level("INFO"):
        trainer.fit(module, train_dataloaders=_multicrop_loader())
    assert "the export writes a float32 copy" in caplog.text
    assert {p.dtype for p in ElasticViT.load(export.export_paths["elastic"]).model.parameters()} == {torch.float32}
    assert 0 < export.report["budgets"][0]["fidelity"] <= 1


def test_export_elastic_refuses_a_model_that_is_not_float32(tmp_path, elastic):
    half = ElasticViT(copy.deepcopy(elastic.model).to(torch.bfloat16), elastic.scores)
    with pytest.raises(ValueError, match=r"export_elastic needs a float32 model, this one has bfloat16 weights"):
        export_elastic(half, tmp_path / "out", correct="none")
    assert not (tmp_path / "out").exists()


def test_elastic_export_callback(tmp_path):
    module = SnapViTModule("test_vit", model_kwargs={"img_size": IMG})
    images = torch.randn(4, 3, IMG, IMG)
    export = ElasticExport(tmp_path / "out", budgets=[(0.0, 0.0), (0.4, 0.5)], save_subnets=True, images=images)
    search = EvolutionarySearch(max_evals=2, images=images, pca_components=2, log_every_n_evals=0)
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    _trainer(tmp_path, [search, export]).fit(module, train_dataloaders=_multicrop_loader())
    paths = export.export_paths
    assert paths["elastic"] == tmp_path / "out" / "test_vit.elastic.safetensors"
    loaded = ElasticViT.load(paths["elastic"])
    assert loaded.model_kwargs == {"img_size": IMG, "num_classes": 1000, "global_pool": "token", "dynamic_img_size": True}
    assert loaded.scores.block_weights is not None and loaded.scores.covariance is not None
    assert torch.allclose(loaded.scores.block_weights, module.scores.block_weights.double())
    assert export.report["budgets"][0]["fidelity"] == pytest.approx(1.0, abs=1e-5)
    assert export.report["scores"]["searched"] is True
    assert paths["subnet:mlp0.4_head0.5"].is_file()
    # Corrected by default: statistics from the fitness images (no datamodule), attached on load.
    assert export.correct == "lstsq" and paths["stats"].is_file() and loaded.stats is not None
    assert export.report["correction"]["fidelity_images_are_calibration_images"] is True
    _assert_same_tensors(load_subnet(paths["subnet:mlp0.4_head0.5"]), loaded.subnet(0.4, 0.5))
    after = module.student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the user's model is untouched

    # A second run into the same directory fails in setup, before any scoring.
    module2 = SnapViTModule("test_vit", model_kwargs={"img_size": IMG})
    with pytest.raises(FileExistsError, match=r"(test_vit.elastic.safetensors|report.json) exists .*ElasticExport\(overwrite=True\)"):
        _trainer(tmp_path, [ElasticExport(tmp_path / "out")]).fit(module2, train_dataloaders=_multicrop_loader())
    assert module2.scores is None


def test_elastic_export_with_calibration_datamodule(tmp_path):
    dataset = [torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    dm = CalibrationDataModule(dataset=dataset, img_size=IMG, num_local_crops=2, batch_size=2)
    module = SnapViTModule("test_vit", model_kwargs={"img_size": IMG})
    export = ElasticExport(tmp_path, budgets=[(0.0, 0.0), 0.7], correct="lstsq")
    _trainer(tmp_path, [export]).fit(module, datamodule=dm)
    assert export.report["fidelity_images"] == 4  # from dm.fitness_images()
    correction = export.report["correction"]
    assert correction["calibration_images"] == 4 and correction["views_per_image"] == 8  # 256 // 4, at most 8
    stored = CorrectionStats.load(export.export_paths["stats"])
    assert correction["calibration_views"] == 32 == stored.num_images and stored.views_per_image == 8
    assert correction["fidelity_images_are_calibration_images"] is True  # no holdout: the eval views come first
    # A re-export of the loaded model from its attached statistics reports the same counts.
    again = export_elastic(ElasticViT.load(export.export_paths["elastic"]), tmp_path / "again", budgets=[0.7])
    keys = ("calibration_images", "calibration_views", "views_per_image", "calibration_size")
    assert {k: again["report"]["correction"][k] for k in keys} == {k: correction[k] for k in keys} \
        == {"calibration_images": 4, "calibration_views": 32, "views_per_image": 8, "calibration_size": [IMG, IMG]}
    assert export.export_paths["stats"].is_file()
    assert export.report["budgets"][0]["fidelity"] == pytest.approx(1.0, abs=1e-5)
    assert export.report["scores"]["searched"] is False
    times = export.report["build_times"]  # no search: ElasticExport records the scoring time
    assert times["scoring_s"] > 0 and times["search_s"] is None and times["search_evaluations"] is None
    assert times["export_s"] > 0



def test_elastic_export_stats_views(tmp_path):
    """stats_views=1 collects the statistics on the eval views alone (as before crops); bad values are refused."""
    dataset = [torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    dm = CalibrationDataModule(dataset=dataset, img_size=IMG, num_local_crops=2, batch_size=2)
    export = ElasticExport(tmp_path, budgets=[(0.0, 0.0), 0.7], stats_views=1)
    _trainer(tmp_path, [export]).fit(SnapViTModule("test_vit", model_kwargs={"img_size": IMG}), datamodule=dm)
    stats = CorrectionStats.load(export.export_paths["stats"])
    assert export.report["correction"]["calibration_views"] == 4 == stats.num_images
    assert read_metadata(export.export_paths["elastic"])["stats_file"] == export.export_paths["stats"].name
    expected = collect_stats(export.elastic.model, dm.calibration_images_eval())
    assert all(torch.allclose(a, b) for a, b in zip(stats.mlp, expected.mlp))
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="stats_views must be an int >= 1"):
            ElasticExport(tmp_path, stats_views=bad)


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_stage_times_travel_to_report_and_bench(tmp_path, capsys):
    module = SnapViTModule("test_vit", model_kwargs={"img_size": IMG})
    images = torch.randn(4, 3, IMG, IMG)
    export = ElasticExport(tmp_path / "out", budgets=[(0.0, 0.0), (0.4, 0.5)], images=images)
    search = EvolutionarySearch(max_evals=2, images=images, pca_components=2, log_every_n_evals=0)
    _trainer(tmp_path, [search, export]).fit(module, train_dataloaders=_multicrop_loader())
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    times = report["build_times"]
    assert all(_positive(times[k]) for k in ("scoring_s", "search_s", "export_s")), times
    assert times["search_evaluations"] == 2 and times["machine"]["device"] == "cpu"
    info = ElasticViT.load(export.export_paths["elastic"]).scores.build_info  # in the checkpoint itself
    assert info["scoring_s"] == times["scoring_s"] and info["search_s"] == times["search_s"]
    assert "export_s" not in info  # known only after writing it: report.json only

    data = tmp_path / "photos"
    data.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, dtype=np.uint8)).save(data / f"{i}.png")
    out = tmp_path / "bench"
    args = [str(export.export_paths["elastic"]), "--data", str(data), "--budgets", "0.4,0.5", "--no-latency",
            "--batch-size", "4", "--out", str(out)]
    assert bench.main(args) == 0
    printed = capsys.readouterr().out
    assert "Build time" in printed and "| search (2 evaluations) |" in printed
    js = json.loads((out / "bench.json").read_text())
    bt = js["build_times"]
    assert {k: bt[k] for k in ("scoring_s", "search_s", "search_evaluations", "export_s")} == {
        k: times[k] for k in ("scoring_s", "search_s", "search_evaluations", "export_s")}
    assert bt["sources"] == {"scoring_s": "checkpoint", "search_s": "checkpoint",
                             "search_evaluations": "checkpoint", "export_s": "report.json"}
    assert bt["build_machine"]["device"] == "cpu" and "Build time" in (out / "bench.md").read_text()


def test_export_says_what_it_computes_before_its_longest_part(tmp_path, caplog):
    model, name, kwargs = tiny_model("test_vit")
    elastic = ElasticViT(model, random_scores(model), model_name=name, model_kwargs=kwargs)
    images = torch.randn(5, 3, *elastic.input_size, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("INFO"):
        export_elastic(elastic, tmp_path / "a", budgets=[(0.4, 0.5), 0.7], fitness_images=images[:2], calibration_images=images)
        export_elastic(elastic, tmp_path / "b", budgets=[(0.4, 0.5)], correct="none")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("export: ")]
    assert [re.sub(r"\d+\.\d s", "T s", line) for line in lines] == [
        "export: correction statistics and the corrected ranking from 5 inputs, then 2 budgets and their fidelity on 2 images (cpu)",
        f"export: wrote 5 files to {tmp_path / 'a'} in T s (the corrected path's ranking T s of it)",
        "export: 1 budget (cpu)", f"export: wrote 4 files to {tmp_path / 'b'} in T s"]


def test_the_stage_times_say_where_the_minutes_went() -> None:
    from snapvit_lightning.report import stage_times

    times = {"scoring_s": 6.51, "search_s": 22.86, "search_evaluations": 50, "ranking_s": 4.52, "export_s": 13.55}
    assert stage_times(times) == ("in 13.6 s (the corrected path's ranking 4.5 s of it; the checkpoint's scoring 6.5 s, "
                                  "search 22.9 s of 50 evaluations)")
    # an export of a loaded checkpoint: its scoring and search are an earlier run's, and said so
    assert stage_times({**times, "ranking_s": None, "search_s": None}) == "in 13.6 s (the checkpoint's scoring 6.5 s)"
    assert stage_times({"scoring_s": None, "search_s": None, "search_evaluations": None, "export_s": 1.0}) == "in 1.0 s"
    assert stage_times({}) == ""


def test_budgets_beyond_the_blocks_minimum_keep_are_named_by_the_cut_they_give(tmp_path, capsys, caplog):
    # min_head_keep=1.0 (MLP pruning only) with the default budgets: every head ratio cuts as 0
    module = SnapViTModule("test_vit", model_kwargs={"img_size": IMG}, min_head_keep=1.0)
    export = ElasticExport(tmp_path / "out", budgets=[(0.35, 0.2), (0.99, 0.0)], correct="none", save_subnets=True)
    with caplog.at_level("INFO"):
        _trainer(tmp_path, [export]).fit(module, train_dataloaders=_multicrop_loader())
    assert [r.getMessage() for r in caplog.records if "cuts as" in r.getMessage()] == [
        "export: budget (0.35, 0.2) cuts as (0.35, 0): every block at its minimum keep (report.json: 'requested')",
        "export: budget (0.99, 0) cuts as (0.9479, 0): every block at its minimum keep (report.json: 'requested')"]
    rows = export.report["budgets"]
    assert [(b["mlp_ratio"], b["head_ratio"]) for b in rows] == [(0.35, 0.0), (1 - 10 / 192, 0.0)]
    assert [b["requested"] for b in rows] == [{"mlp_ratio": 0.35, "head_ratio": 0.2}, {"mlp_ratio": 0.99, "head_ratio": 0.0}]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.mlp*.safetensors")) == [
        "test_vit.mlp0.35_head0.safetensors", "test_vit.mlp0.9479_head0.safetensors"]
    # the same cut asked twice (ratios that differ, one label): one file, a row for each budget asked
    result = export_elastic(export.elastic, tmp_path / "twice", budgets=[(0.99, 0.0), (0.9479, 0.0)], correct="none",
                            save_subnets=True)
    assert [b["requested"]["mlp_ratio"] for b in result["report"]["budgets"]] == [0.99, 0.9479]
    assert len(list((tmp_path / "twice").glob("*.mlp*.safetensors"))) == 1
    # snapvit info --budgets finds the report's rows by the cut's ratios or as asked, each cut once
    from snapvit_lightning.cli import main

    images = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    measured = export_elastic(export.elastic, tmp_path / "fid", budgets=[(0.35, 0.2)], fitness_images=images, correct="none")
    capsys.readouterr()
    assert main(["info", str(measured["paths"]["elastic"]), "--budgets", "0.35,0.2"]) == 0
    printed = capsys.readouterr().out
    assert "measured none" not in printed
    assert len([r for r in printed.splitlines() if r.split()[:2] == ["0.35", "0.00"] and "%" in r]) == 2  # cut + fidelity


def test_a_broken_link_as_dirpath_is_refused_before_the_scoring(tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")  # failed after the fit with "[Errno 17] File exists"
    module = SnapViTModule("test_vit", model_kwargs={"img_size": IMG})
    with pytest.raises(NotADirectoryError, match=r"dirpath: '.*dangling' is a broken link \(to '.*missing'\)"):
        _trainer(tmp_path, [ElasticExport(tmp_path / "dangling", correct="none")]).fit(
            module, train_dataloaders=_multicrop_loader())
    assert module.scores is None


def test_elastic_export_takes_a_loader_of_images_as_the_search_does(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    images = torch.randn(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(images, torch.zeros(4)), batch_size=3)  # (images, labels) batches
    reports = []
    for given in (images, loader):
        export = ElasticExport(tmp_path / str(len(reports)), budgets=[(0.4, 0.5)], correct="none", images=given)
        search = EvolutionarySearch(max_evals=2, images=given, pca_components=2, log_every_n_evals=0)
        torch.manual_seed(0)  # the same random model both times
        _trainer(tmp_path, [search, export]).fit(SnapViTModule("test_vit", model_kwargs={"img_size": IMG}),
                                                 train_dataloaders=_multicrop_loader())
        assert torch.equal(export.images, images)  # read once, in setup
        reports.append(export.report)
    assert reports[1]["fidelity_images"] == 4
    assert [b["fidelity"] for b in reports[0]["budgets"]] == [b["fidelity"] for b in reports[1]["budgets"]]


@pytest.mark.parametrize("images, match", [
    ("photos/", r"images must be a float tensor \[N, 3, H, W\] or an iterable of such batches \(e.g. a DataLoader\), "
                r"got str"),
    ([torch.randn(3, IMG, IMG)], r"images: batches must be \[B, 3, H, W\] tensors .*single images: torch.stack"),
])
def test_elastic_export_refuses_bad_images_before_the_scoring(tmp_path, images, match):
    module = SnapViTModule("test_vit", model_kwargs={"img_size": IMG})
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, [ElasticExport(tmp_path / "out", images=images)]).fit(module, train_dataloaders=_multicrop_loader())
    assert module.scores is None


def test_elastic_export_without_calibration_source_fails_in_setup(tmp_path):
    module = SnapViTModule("test_vit", model_kwargs={"img_size": IMG})
    with pytest.raises(ValueError, match=r"ElasticExport\(correct='lstsq'\) needs calibration images"):
        _trainer(tmp_path, [ElasticExport(tmp_path / "out")]).fit(module, train_dataloaders=_multicrop_loader())
    assert module.scores is None  # before the scoring


def test_elastic_export_refuses_an_unreachable_fraction_before_the_scoring(tmp_path):
    # It was refused by the export, after the scoring and the search; the floor moves with the module's minimum keep.
    module = SnapViTModule("test_vit", model_kwargs={"img_size": IMG}, min_head_keep=1.0)
    export = ElasticExport(tmp_path / "out", correct="none", budgets=[(0.3, 0.0), {"params": 0.5}])
    with pytest.raises(ValueError, match=r"ElasticExport\(budgets=...\): params=0.5 is below the smallest reachable "
                                         r"fraction 0\.\d+ \(every block at its minimum keep: min_mlp_keep=0.05, "
                                         r"min_head_keep=1.0\)"):
        _trainer(tmp_path, [export]).fit(module, train_dataloaders=_multicrop_loader())
    assert module.scores is None  # before the scoring
    module = SnapViTModule("test_vit", model_kwargs={"img_size": IMG})
    export = ElasticExport(tmp_path / "out", correct="none", budgets=[{"params": 0.5}])
    _trainer(tmp_path, [export]).fit(module, train_dataloaders=_multicrop_loader())  # reachable with 20 % of the heads
    assert export.report["budgets"][0]["params_fraction"] <= 0.5


@pytest.mark.parametrize("name", ["test_vit", "test_vit2", "test_vit3"])
@pytest.mark.parametrize("keeps", [(0.05, 0.2), (0.3, 1.0), (0.0, 0.0)])
def test_the_setup_floor_is_the_exports(name, keeps) -> None:
    """_check_reachable refuses exactly the fractions ElasticViT.resolve_budget refuses."""
    from dataclasses import replace

    from snapvit_lightning.export_options import _check_reachable

    model, _, _ = tiny_model(name)
    elastic = ElasticViT(model, replace(random_scores(model), min_mlp_keep=keeps[0], min_head_keep=keeps[1]))
    for kind in ("flops", "params"):
        hi = math.nextafter(1.0, 0.0)  # as resolve_budget reaches for its floor
        floor = elastic.cost(elastic.dims(hi, hi))[f"{kind}_fraction"]
        for f in (floor * (1 - 1e-6), floor * (1 + 1e-6)):
            try:
                elastic.resolve_budget(**{kind: f})
                refused = None
            except ValueError as err:
                refused = err
            try:
                _check_reachable(model, [{kind: f}], *keeps, "budgets")
                assert refused is None, (kind, f, floor)
            except ValueError as err:
                assert refused is not None and "below the smallest reachable fraction" in str(err)
                printed = f"{math.ceil(floor * 1e4) / 1e4:.4f}"  # rounded up: the printed floor is reachable
                assert printed in str(err) and printed in str(refused)
                _check_reachable(model, [{kind: float(printed)}], *keeps, "budgets")
                elastic.resolve_budget(**{kind: float(printed)})


def test_elastic_export_wrong_order_raises(tmp_path):
    module = SnapViTModule("test_vit", model_kwargs={"img_size": IMG})
    callbacks = [ElasticExport(tmp_path), EvolutionarySearch(max_evals=2, images=torch.randn(4, 3, IMG, IMG))]
    with pytest.raises(ValueError, match="ElasticExport must come after EvolutionarySearch"):
        _trainer(tmp_path, callbacks).fit(module, train_dataloaders=_multicrop_loader())
    assert not list(tmp_path.glob("*.safetensors"))


def test_two_exports_into_one_folder_refused_before_the_fit(tmp_path):
    # Each export writes report.json and the plots into its dirpath: the second one failed after the fit.
    module = SnapViTModule("test_vit", model_kwargs={"img_size": IMG})
    same = [ElasticExport(tmp_path / "out", correct="none"), ElasticExport(str(tmp_path / "out") + "/", name="b")]
    with pytest.raises(ValueError, match="two ElasticExport callbacks write into dirpath="):
        _trainer(tmp_path, same).fit(module, train_dataloaders=_multicrop_loader())
    assert module.scores is None  # before the scoring
    apart = [ElasticExport(tmp_path / "a", correct="none"), ElasticExport(tmp_path / "b", correct="none")]
    _trainer(tmp_path, apart).fit(module, train_dataloaders=_multicrop_loader())
    assert (tmp_path / "a" / "report.json").is_file() and (tmp_path / "b" / "report.json").is_file()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"budgets": [(0.5,)]}, ValueError, "budgets"),
        ({"budgets": []}, ValueError, "budgets must be a non-empty sequence"),
        ({"save_subnets": 1}, TypeError, "save_subnets"),
        ({"model_kwargs": "x"}, TypeError, "model_kwargs"),
        ({"dirpath": 3}, TypeError, "dirpath"),
    ],
)
def test_elastic_export_bad_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        ElasticExport(**{"dirpath": tmp_path, **kwargs})


def test_report_fidelity_never_above_one(monkeypatch):
    # The export's fidelity is a float64 cosine mean; rounding put the dense model's at
    # 1.0000000000000004 in a report.json. The precondition shows such features.
    from snapvit_lightning import report

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(14, 384, generator=g) * 10 * torch.rand(14, 1, generator=g)).double()
    assert torch.nn.functional.cosine_similarity(x, x, dim=-1).mean() > 1.0
    monkeypatch.setattr(report, "_features", lambda sub, images, batch_size: x)
    model, _, _ = tiny_model("test_vit")
    assert report._fidelity(model, x, torch.zeros(1), 8) == 1.0


def test_a_read_only_dirpath_is_refused_before_the_fit(tmp_path, monkeypatch):
    # The export hit it only after the scoring and the search. (Root passes chmod: os.access stands in.)
    module = SnapViTModule("test_vit", model_kwargs={"img_size": IMG})
    from snapvit_lightning import file_io

    monkeypatch.setattr(file_io.os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match=f"dirpath: '{tmp_path}' is not writable"):  # the folder to create is in it
        _trainer(tmp_path, [ElasticExport(tmp_path / "new", correct="none")]).fit(module, train_dataloaders=_multicrop_loader())
    assert module.scores is None  # before the scoring
    monkeypatch.undo()
    (tmp_path / "afile").write_text("")
    with pytest.raises(NotADirectoryError, match=f"dirpath: '{tmp_path / 'afile'}' is a file, not a folder"):
        _trainer(tmp_path, [ElasticExport(tmp_path / "afile" / "exp", correct="none")]).fit(
            module, train_dataloaders=_multicrop_loader())
    assert module.scores is None


NORMS = ("vit_small_patch16_224", dict(depth=2, embed_dim=64, num_heads=2, img_size=IMG, scale_attn_norm=True,
                                       scale_mlp_norm=True))  # norms over the cut dimensions


def test_a_model_statistics_cannot_correct_is_refused_before_the_work(tmp_path):
    # The corrected default failed after the scoring and the search (collect_stats at the export) and wrote nothing.
    name, kwargs = NORMS
    module = SnapViTModule(name, model_kwargs=kwargs)
    with pytest.raises(ValueError, match=r"ElasticExport\(correct='lstsq'\): statistics cannot correct this model: .*"
                                         r"scale_attn_norm.* export it with correct='none'.*sequential=True"):
        _trainer(tmp_path, [ElasticExport(tmp_path / "out")]).fit(module, train_dataloaders=_multicrop_loader())
    assert module.scores is None and not (tmp_path / "out").exists()  # before the scoring
    _trainer(tmp_path, [ElasticExport(tmp_path / "out", correct="none")]).fit(module, train_dataloaders=_multicrop_loader())
    elastic = ElasticViT.load(tmp_path / "out" / f"{name}.elastic.safetensors")
    x = torch.rand(4, 3, IMG, IMG)
    with pytest.raises(ValueError, match=r"export_elastic\(correct='bias'\): statistics cannot correct"):
        export_elastic(elastic, tmp_path / "again", correct="bias", calibration_images=x)
    with pytest.raises(ValueError, match=r"collect_stats: statistics cannot correct this model"):
        collect_stats(elastic.model, x)
    assert not (tmp_path / "again").exists()
    sub = elastic.subnet(0.5, 0.5, calibration=x, sequential=True)  # what the message offers works
    assert torch.isfinite(sub(x)).all()
