"""``python -m snapvit_lightning.benchmarks.head_share``: both halves of both directions, on tiny checkpoints."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import random_scores, tiny_model
from snapvit_lightning import quickstart
from snapvit_lightning.benchmarks import head_share, heldout
from snapvit_lightning.correction import stats_path_for
from snapvit_lightning.data import load_calibration_views, load_eval_images
from snapvit_lightning.elastic import ElasticViT
from snapvit_lightning.evaluation import extract_features, feature_fidelity


def test_each_scale_is_measured_on_both_halves_as_subnet_cuts_it(tmp_path, photo_folder, one_thread) -> None:
    data = photo_folder
    halves = heldout.split_links(data, tmp_path / "out")
    for calibrate in ("even", "odd"):  # what two main jobs ship: a checkpoint and its statistics with a ranking
        model, name, kwargs = tiny_model("test_vit")
        elastic = ElasticViT(model, random_scores(model, seed=len(calibrate)), model_name=name, model_kwargs=kwargs)
        path = heldout.main_job_dir(tmp_path / "out", calibrate, 0) / f"{quickstart.MODEL_NAME}.elastic.safetensors"
        path.parent.mkdir(parents=True)
        elastic.save(path)
        views = load_calibration_views(halves[calibrate], elastic.model)[0]
        g = torch.Generator().manual_seed(len(calibrate))
        ranking = dict(ranking_mlp=torch.rand(elastic.scores.mlp.shape, generator=g, dtype=torch.float64) + 0.01,
                       ranking_heads=torch.rand(elastic.scores.heads.shape, generator=g, dtype=torch.float64) + 0.01)
        dataclasses.replace(elastic.collect_stats(views), **ranking).save(stats_path_for(path))
    argv = ["--heldout", str(tmp_path / "out"), "--data", str(data), "--fractions", "0.8", "0.6", "--scales", "1", "0.5"]
    assert head_share.main(argv) == 0
    report = json.loads((tmp_path / "out" / "head_share.json").read_text())
    for calibrate, other in (("even", "odd"), ("odd", "even")):
        shipped = ElasticViT.load(heldout.main_job_dir(tmp_path / "out", calibrate, 0) / path.name)
        for where, half in (("in_sample", calibrate), ("held_out", other)):
            images = load_eval_images(tmp_path / "out" / f"{half}_images", shipped.model)[0]
            dense = extract_features(shipped.model, images)
            for scale in (1.0, 0.5):
                expected = [feature_fidelity(extract_features(shipped.subnet(flops=f, head_ratio_scale=scale), images), dense)
                            for f in (0.8, 0.6)]
                assert report[calibrate][where]["lstsq"][str(scale)] == pytest.approx(expected, abs=1e-6)
        heads = [h for _, h in report[calibrate]["ratios"]["0.5"]]
        mlps = [m for m, _ in report[calibrate]["ratios"]["0.5"]]
        assert heads == pytest.approx([m / 2 for m in mlps])  # s = 0.5: half the MLP share of the heads
        assert report[calibrate]["chosen"] in ("1.0", "0.5")


def test_the_reference_scale_is_required(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        head_share.main(["--heldout", str(tmp_path), "--data", str(tmp_path), "--scales", "0.5"])
    assert "--scales must include 1" in capsys.readouterr().err
