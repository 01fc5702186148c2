"""``python -m snapvit_lightning.benchmarks.damping``: held-out rows per damping on the real ViT-S/14."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from conftest import load_real_model
from snapvit_lightning.benchmarks import damping as bench_damping
from snapvit_lightning.correction import auto_damping
from snapvit_lightning.data import load_calibration_views, load_eval_images
from snapvit_lightning.elastic import ElasticViT
from snapvit_lightning.evaluation import extract_features, feature_fidelity
from snapvit_lightning.module import SnapViTModule
from snapvit_lightning.obs import with_ranking


def test_parse_damping() -> None:
    assert bench_damping.parse_damping("auto") is None
    assert bench_damping.parse_damping("0.03") == 0.03 and bench_damping.parse_damping("0") == 0.0
    for bad in ("-0.1", "nan", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"'auto' or a number >= 0, got '{bad}'"):
            bench_damping.parse_damping(bad)


def test_rows_are_the_shipped_corrected_path_measured_on_the_other_half(real_weights, photo_folder, tmp_path, capsys) -> None:
    out = tmp_path / "damping.json"
    argv = ["--data", str(photo_folder), "--img-size", "56", "--images", "3", "--damping", "auto",
            "--calibrate", "odd", "--weights", str(real_weights), "--out", str(out)]
    assert bench_damping.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["half"], r["images"], r["inputs"], r["automatic"]) for r in rows] == [("odd", 3, 24, True)]
    # auto_damping of 3 images x 8 views (the eval view and 7 crops) at 56 px (16 patches + CLS = 17 tokens each).
    damping = auto_damping(1536, 24, 24 * 17)
    assert rows[0]["damping"] == pytest.approx(damping)
    assert f"[odd -> even] N=3    d=auto ({damping:.3g})" in capsys.readouterr().out
    # Recomputed by hand: the 3 seeded odd-position images calibrate, the even ones are measured.
    model = load_real_model(real_weights, img_size=56)
    el = ElasticViT(model, SnapViTModule(model, criterion="magnitude").compute_scores(),
                    model_name="vit_small_patch14_dinov2", model_kwargs={"num_classes": 0, "img_size": 56})
    images = load_eval_images(photo_folder, el.model)[0]
    held_out, odd = images[0::2], torch.arange(1, len(images), 2)
    chosen = odd[torch.randperm(len(odd), generator=torch.Generator().manual_seed(0))[:3]]
    # The export's inputs for 3 images: their eval views, then 7 crops of each (seeded by position in the set).
    links = tmp_path / "chosen"
    links.mkdir()
    files = sorted(p for p in photo_folder.rglob("*.png"))
    assert len(files) == len(images)
    for k, i in enumerate(chosen.tolist()):
        (links / f"{k}.png").symlink_to(files[i])
    calibration, views = load_calibration_views(links, el.model)
    assert views == 8 and torch.equal(calibration[:3], images[chosen])
    ranked = with_ranking(el.model, el.collect_stats(calibration), calibration,
                          min_mlp_keep=el.scores.min_mlp_keep, min_head_keep=el.scores.min_head_keep)
    m, h = bench_damping.BUDGETS[-1]
    expected = feature_fidelity(extract_features(el.subnet(m, h, calibration=ranked), held_out),
                                extract_features(el.model, held_out))
    assert rows[0]["fidelity"][-1] == pytest.approx(expected, abs=1e-6)
    assert rows[0]["mean"] == pytest.approx(sum(rows[0]["fidelity"]) / 4)


def test_more_images_than_a_half_is_refused(real_weights, photo_folder, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_damping.main(["--data", str(photo_folder), "--img-size", "56", "--images", "8",
                            "--weights", str(real_weights)])
    assert exit_info.value.code == 2
    assert "--images: each N must be in [1, 7] (the smaller half of 14 images), got [8]" in capsys.readouterr().err


def test_an_out_that_is_a_folder_is_refused_before_the_measurement(tmp_path) -> None:
    with pytest.raises(ValueError, match="--out: '.*' is a folder; give the JSON file's name"):
        bench_damping.main(["--data", str(tmp_path), "--out", str(tmp_path)])
