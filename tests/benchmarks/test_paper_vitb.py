"""``python -m snapvit_lightning.benchmarks.paper_vitb``: the paper's ViT-B/16 run, here shrunk to seconds on CPU."""

from __future__ import annotations

import json

import pytest
import yaml

from snapvit_lightning.benchmarks import paper_vitb


def test_paper_vitb_runs_the_whole_job_and_reports_its_stages(photo_folder, tmp_path, capsys) -> None:
    # The script's own arguments at a small size, and a 2-block ViT-B/16 (model_kwargs) so the test stays short.
    tiny = '{"num_classes": 0, "img_size": 32, "depth": 2, "embed_dim": 64, "num_heads": 2}'
    argv = ["--data", str(photo_folder), "--out", str(tmp_path / "out"), "--calibration", "6", "--fitness", "5",
            "--evals", "3", "--pca", "4", "--accelerator", "cpu",
            "--model.model_kwargs", tiny, "--trainer.enable_progress_bar", "false", "--data.batch_size", "3"]
    assert paper_vitb.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "paper_vitb.json").read_text())
    times = result["times"]
    assert times["search_evaluations"] == 3 and times["images"] == 5  # the fitness images, held out
    assert times["wall_s"] > times["scoring_s"] + times["search_s"] + times["export_s"] > 0
    assert f"whole run {times['wall_s']:.1f} s" in printed and "3 evaluations" in printed
    images = sorted((tmp_path / "out" / "images").iterdir())
    assert len(images) == 11 and all(p.is_symlink() and p.resolve().parent.parent == photo_folder.resolve() for p in images)
    used = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert used["model"]["checkpoint_path"] is None and used["data"]["holdout"] == 5
    search = next(c for c in used["trainer"]["callbacks"] if c["class_path"].endswith("EvolutionarySearch"))["init_args"]
    assert (search["max_evals"], search["pca_components"], search["balance"], search["space"]) == (3, 4, None, "pca")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model_name"].startswith("vit_base_patch16_224") and report["model_kwargs"]["depth"] == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(calibration=0), "calibration must be an int >= 1, got 0"),
    (dict(evals=True), "evals must be an int >= 1, got True"),
])
def test_paper_vitb_refuses_bad_sizes(photo_folder, tmp_path, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        paper_vitb.run_paper_vitb(photo_folder, tmp_path / "out", **kwargs)


def test_copy_images_draws_every_class_in_turn(photo_folder, tmp_path) -> None:
    classes = sorted(p.name for p in photo_folder.iterdir() if p.is_dir())
    assert len(classes) >= 2
    out = paper_vitb.copy_images(photo_folder, tmp_path / "images", 2 * len(classes))
    drawn = [p.resolve().parent.name for p in sorted(out.iterdir())]
    assert drawn == classes + classes  # not the first class's images only


def test_copy_images_refuses_a_used_folder(photo_folder, tmp_path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="exists and is not empty"):
        paper_vitb.copy_images(photo_folder, tmp_path / "images", 3)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_paper_vitb_without_a_gpu_is_refused_unless_asked_for_the_cpu(photo_folder, tmp_path, capsys) -> None:
    # --accelerator auto started an hours-long ViT-B run on the CPU without a word.
    with pytest.raises(SystemExit) as exc:
        paper_vitb.main(["--data", str(photo_folder), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and not (tmp_path / "out").exists()
    assert "--accelerator auto found no GPU; this benchmark times the paper's ViT-B/16 run on one" in capsys.readouterr().err
