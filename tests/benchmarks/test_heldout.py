"""``python -m snapvit_lightning.benchmarks.heldout``: halves, search specs, and a whole run on a tiny checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_scores, tiny_model
from snapvit_lightning import quickstart
from snapvit_lightning.benchmarks import heldout
from snapvit_lightning.correction import stats_path_for
from snapvit_lightning.errors import Terminated
from snapvit_lightning.elastic import ElasticViT
from snapvit_lightning.search import PAPER_RATIO_PAIRS


def _photos(root, per_class: int = 3):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_split_links_halves_are_disjoint_cover_everything_and_keep_the_layout(tmp_path) -> None:
    from snapvit_lightning.data.sources import find_images

    data = _photos(tmp_path / "photos")
    halves = heldout.split_links(data, tmp_path / "out")
    files, labels, classes = find_images(data)
    even, even_labels, _ = find_images(halves["even"])
    odd, _, _ = find_images(halves["odd"])
    assert [p.resolve() for p in even] == files[0::2] and [p.resolve() for p in odd] == files[1::2]
    assert even_labels == labels[0::2]
    assert heldout.split_links(data, tmp_path / "out") == halves  # again: the links are reused


def test_split_links_refuses_fewer_than_four_images(tmp_path) -> None:
    data = _photos(tmp_path / "photos", per_class=1)
    with pytest.raises(ValueError, match="--data: needs at least 4 images"):
        heldout.split_links(data, tmp_path / "out")


@pytest.mark.parametrize("data", ["missing", "few"])
def test_a_bad_data_folder_is_refused_before_out_is_created(tmp_path, capsys, data) -> None:
    folder = tmp_path / "missing" if data == "missing" else _photos(tmp_path / "photos", per_class=1)
    with pytest.raises(SystemExit) as exc:
        heldout.main(["--data", str(folder), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and "--data" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_parse_search() -> None:
    assert heldout.parse_search("lstsq:correct=lstsq,guard=0,balance=0.5,pairs=paper") == (
        "lstsq", {"correct": "lstsq", "guard": 0, "balance": 0.5, "ratio_pairs": [list(p) for p in PAPER_RATIO_PAIRS]}
    )
    assert heldout.parse_search("raw:balance=none") == ("raw", {"balance": None})
    assert heldout.parse_search("plain") == ("plain", {})
    assert heldout.parse_search("f:autocast=false,early_stop=true") == ("f", {"autocast": False, "early_stop": True})
    with pytest.raises(argparse.ArgumentTypeError, match="not KEY=VALUE"):
        heldout.parse_search("x:correct")


def test_a_whole_run_on_a_tiny_checkpoint_measures_on_the_other_half(tmp_path, one_thread) -> None:
    from snapvit_lightning.data import load_calibration_views, load_eval_images
    from snapvit_lightning.evaluation import extract_features, feature_fidelity

    data = _photos(tmp_path / "photos")
    even = None
    for seed in (0, 1):  # two main jobs (search seeds 0 and 1), reused: none is run
        model, name, kwargs = tiny_model("test_vit")
        elastic = ElasticViT(model, random_scores(model, seed), model_name=name, model_kwargs=kwargs)
        path = heldout.main_job_dir(tmp_path / "out", "even", seed) / f"{quickstart.MODEL_NAME}.elastic.safetensors"
        path.parent.mkdir(parents=True)
        elastic.save(path)
        if even is None:
            even = load_calibration_views(heldout.split_links(data, tmp_path / "out")["even"], elastic.model)[0]  # as the export
        g = torch.Generator().manual_seed(3 + seed)
        ranking = dict(ranking_mlp=torch.rand(elastic.scores.mlp.shape, generator=g, dtype=torch.float64) + 0.01,
                       ranking_heads=torch.rand(elastic.scores.heads.shape, generator=g, dtype=torch.float64) + 0.01)
        dataclasses.replace(elastic.collect_stats(even), **ranking).save(stats_path_for(path))  # what a main job ships
    assert path.parent.name == "main-seed1"
    argv = ["--data", str(data), "--out", str(tmp_path / "out"), "--calibrate", "even", "--seeds", "0", "--main-seeds", "0", "1",
            "--max-evals", "2", "--search", "s:correct=lstsq,guard=0", "--search", "o:scores=ranking,correct=lstsq"]
    assert heldout.main(argv) == 0
    report = json.loads((tmp_path / "out" / "heldout.json").read_text())
    methods = report["even"]["methods"]
    assert set(methods) == {"main job (default)", "gradient-only", "uniform", "random (x3)", "s", "o start", "o"}
    assert report["even"]["measure"] == "odd" and methods["s"]["settings"] == {"correct": "lstsq", "guard": 0}
    assert methods["o"]["settings"] == {"scores": "ranking", "correct": "lstsq"}
    default = methods["main job (default)"]
    assert default["seeds"] == [0, 1] and len(default["per_seed"]) == 2
    # The ranking's own weights (w = 1) cut the units the shipped corrected path keeps: the same corrected fidelity.
    assert methods["o start"]["lstsq"] == pytest.approx(default["per_seed"][0]["lstsq"], abs=1e-5)
    # The default row: each seed's shipped checkpoint's plain cut, measured on the odd half only, and their mean.
    odd = load_eval_images(tmp_path / "out" / "odd_images", elastic.model)[0]
    dense = extract_features(elastic.model, odd)
    per_seed = []
    for seed in (0, 1):
        shipped = ElasticViT.load(heldout.main_job_dir(tmp_path / "out", "even", seed) / path.name)
        per_seed.append([feature_fidelity(extract_features(shipped.subnet(m, h, correct="none"), odd), dense)
                         for m, h in heldout.BUDGETS])
        assert default["per_seed"][seed]["plain"] == pytest.approx(per_seed[-1], abs=1e-6)
    assert per_seed[0] != pytest.approx(per_seed[1], abs=1e-3)  # two different checkpoints
    assert default["plain"] == pytest.approx([(a + b) / 2 for a, b in zip(*per_seed)], abs=1e-6)
    assert len(methods["random (x3)"]["per_seed"]) == 3
    assert all(len(methods[k]["lstsq"]) == len(heldout.BUDGETS) for k in methods)


@pytest.mark.parametrize("stop, status, how", [(KeyboardInterrupt(), 130, "interrupted"),
                                               (Terminated(None), 143, "terminated (SIGTERM)")])
def test_a_stopped_run_is_one_line(tmp_path, monkeypatch, capsys, stop, status, how) -> None:
    def stopped(prog, args):  # as a main job's fit ends when Ctrl-C or SIGTERM stops it
        raise stop

    monkeypatch.setattr(heldout, "_run", stopped)
    monkeypatch.delenv("SNAPVIT_TRACEBACK", raising=False)
    assert heldout.main(["--data", str(tmp_path), "--out", str(tmp_path / "out")]) == status
    err = capsys.readouterr().err
    assert err.strip() == (f"python -m snapvit_lightning.benchmarks.heldout: {how}; {tmp_path / 'out' / 'heldout.json'} "
                           "keeps the methods measured so far (if any); the same command again reuses the finished main jobs")
