"""``python -m snapvit_lightning.benchmarks.first_gains``: the default search's first generations, per seed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from conftest import random_scores, tiny_model
from snapvit_lightning.benchmarks import first_gains
from snapvit_lightning.data import load_eval_images
from snapvit_lightning.elastic import ElasticViT
from snapvit_lightning.search import run_search


def test_first_gains_reports_the_default_search_generation_by_generation(tmp_path, one_thread, capsys) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)).save(tmp_path / "photos" / f"{i}.png")
    model, name, kwargs = tiny_model("test_vit")
    elastic = ElasticViT(model, random_scores(model), model_name=name, model_kwargs=kwargs)
    path = tmp_path / "tiny.elastic.safetensors"
    elastic.save(path)
    argv = [str(path), "--data", str(tmp_path / "photos"), "--seeds", "0", "3", "--generations", "2",
            "--fitness-samples", "5", "--out", str(tmp_path / "out")]
    assert first_gains.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "first_gains.json").read_text())
    popsize = result["popsize"]
    images = load_eval_images(tmp_path / "photos", elastic.model)[0]
    for seed in (0, 3):
        row = result["seeds"][str(seed)]
        # The same search through the public API: its candidates' best after each generation.
        _, _, history = run_search(elastic.model, elastic.scores.raw(), images, max_evals=2 * popsize, seed=seed,
                                   autocast=False, fitness_samples=5)
        for g, best in enumerate(row["best_after"], 1):
            assert best == min(f for f in history[: g * popsize] if not math.isnan(f))
        gains = [g for g, best in enumerate(row["best_after"], 1) if best < row["start"]]
        assert row["first_gain"] == (gains[0] if gains else None)
        assert f"seed {seed}: start {row['start']:.5f}, best after each generation" in printed
    assert result["beat_within"] == [sum(1 for s in result["seeds"].values() if s["first_gain"] and s["first_gain"] <= g)
                                     for g in (1, 2)]
    assert f"beat the start within 2 generation(s): {result['beat_within'][1]} of 2 seeds" in printed


def test_first_gains_refuses_zero_generations(tmp_path) -> None:
    with pytest.raises(ValueError, match="generations must be an int >= 1, got 0"):
        first_gains.first_gains(tmp_path / "x.elastic.safetensors", tmp_path, [0], 0)


def test_first_gains_refuses_an_out_that_is_a_file_before_the_searches(tmp_path) -> None:
    # It ran every search, then failed in mkdir with a traceback.
    (tmp_path / "afile").write_text("")
    with pytest.raises(NotADirectoryError, match="--out: '.*afile' is a file, not a folder"):
        first_gains.main([str(tmp_path / "missing.elastic.safetensors"), "--data", str(tmp_path), "--out", str(tmp_path / "afile")])
