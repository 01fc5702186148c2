"""Tests for snapvit_lightning.search.progress (what the search reports per evaluation)."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import timm
import torch
from lightning.pytorch.loggers import CSVLogger

from snapvit_lightning.search import EvolutionarySearch
from snapvit_lightning.search.progress import SearchProgress, cosine_metric_names

from conftest import random_scores
from test_search import Scoring

PAIRS = [(0.35, 0.2), (0.65, 0.5)]
COS = ["search/cos_mlp0.35_head0.2", "search/cos_mlp0.65_head0.5"]


pytestmark = pytest.mark.usefixtures("one_thread")


def search(tmp_path: Path, max_evals: int = 6, guard: float = 0.0, **trainer_kw) -> EvolutionarySearch:
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, img_size=32).eval()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    callback = EvolutionarySearch(
        max_evals=max_evals, popsize=4, sigma=0.3, ratio_pairs=PAIRS, pca_components=4, autocast=False,
        images=images, guard=guard, log_every_n_evals=2,
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, callbacks=[callback], enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=tmp_path, **{"logger": False, "enable_progress_bar": False, **trainer_kw},
    )
    trainer.fit(Scoring(model, random_scores(model)))
    return callback


def test_names_of_the_cosine_metrics() -> None:
    assert cosine_metric_names([(0.35, 0.2), (0.0, 0.0), (0.15, 0)]) == [
        "search/cos_mlp0.35_head0.2", "search/cos_mlp0_head0", "search/cos_mlp0.15_head0",
    ]


@pytest.mark.parametrize("guard", [0.0, 10.0])
def test_csv_logger_gets_one_row_per_evaluation(tmp_path: Path, guard: float) -> None:
    callback = search(tmp_path, max_evals=6, guard=guard, logger=CSVLogger(tmp_path, name="log"))
    with next(tmp_path.glob("log/*/metrics.csv")).open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("search/fitness")]
    assert {"step", "search/fitness", "search/best", *COS} <= set(rows[0])
    assert [int(r["step"]) for r in rows] == list(range(6))
    fitness = [float(r["search/fitness"]) for r in rows]
    best = [float(r["search/best"]) for r in rows]
    assert fitness == pytest.approx(callback.history, nan_ok=True)  # a stopped candidate: nan
    assert all(b1 <= b0 for b0, b1 in zip(best, best[1:]))  # never gets worse
    running = callback.initial_fitness
    for f, b in zip(fitness, best):  # the best so far, the start point included
        running = min(running, f)
        assert b == pytest.approx(running)
    assert best[-1] == pytest.approx(callback.best_fitness)
    for r, f in zip(rows, fitness):
        if math.isnan(f):  # stopped early: only its sparsest pairs' cosines were evaluated
            continue
        cos = [float(r[name]) for name in COS]
        assert all(-1.0 <= c <= 1.0 for c in cos)
        if guard == 0:  # the paper's fitness is the mean of (1 - cosine) over the pairs
            assert f == pytest.approx(sum(1 - c for c in cos) / len(cos))
        else:  # the guard only adds
            assert f >= sum(1 - c for c in cos) / len(cos) - 1e-9


def test_bar_shows_evaluations_fitness_and_best(tmp_path: Path, capsys) -> None:
    callback = search(tmp_path, max_evals=5, enable_progress_bar=True)
    out = capsys.readouterr().out
    last = [part for part in out.replace("\r", "\n").splitlines() if part.startswith("Search")][-1]
    assert "5/5" in last
    assert f"best={min([callback.initial_fitness, *callback.history]):.4f}" in last
    assert f"fitness={callback.history[-1]:.4f}" in last
    assert "EvolutionarySearch: eval" not in out  # the bar replaces the periodic lines


def test_no_bar_without_progress_bars_prints_lines(tmp_path: Path, capsys, caplog) -> None:
    with caplog.at_level(logging.INFO):
        search(tmp_path, max_evals=5)
    assert "Search" not in capsys.readouterr().out
    lines = [r.getMessage() for r in caplog.records if "EvolutionarySearch: eval" in r.getMessage()]
    assert [line.split()[2] for line in lines] == ["2/5", "4/5", "5/5"]  # every 2 and the last


class _Loggers:
    """A Trainer stand-in: no progress bar, one recording logger."""

    def __init__(self) -> None:
        self.progress_bar_callback = None
        self.is_global_zero = True
        self.logged: list[tuple[dict, int]] = []
        self.saves = 0
        outer = self

        class Recorder:
            def log_metrics(self, metrics: dict, step: int) -> None:
                outer.logged.append((metrics, step))

            def save(self) -> None:
                outer.saves += 1

        self.loggers = [Recorder()]


def test_update_logs_every_evaluation_and_saves() -> None:
    trainer = _Loggers()
    progress = SearchProgress(trainer, total=3, done=1, ratio_pairs=PAIRS, log_every_n_evals=0)
    progress.update(1, 0.5, 0.4, [0.6, 0.4])
    progress.update(2, 0.3, 0.3, [0.8, 0.6])
    progress.close()
    assert trainer.logged == [
        ({"search/fitness": 0.5, "search/best": 0.4, COS[0]: 0.6, COS[1]: 0.4}, 1),
        ({"search/fitness": 0.3, "search/best": 0.3, COS[0]: 0.8, COS[1]: 0.6}, 2),
    ]
    assert trainer.saves == 2 and progress.bar is None


def test_a_stopped_candidate_shows_as_stopped(caplog) -> None:
    """A candidate stopped early (fitness nan): the loggers get nan, the console says "stopped"."""
    trainer = _Loggers()
    progress = SearchProgress(trainer, total=2, done=0, ratio_pairs=PAIRS, log_every_n_evals=1)
    with caplog.at_level(logging.INFO):
        progress.update(0, math.nan, 0.4, [math.nan, 0.5])
        progress.update(1, 0.3, 0.3, [0.8, 0.6])
    lines = [r.getMessage() for r in caplog.records if "EvolutionarySearch: eval" in r.getMessage()]
    assert "eval 1/2 fitness stopped best 0.400000" in lines[0] and "eval 2/2 fitness 0.300000" in lines[1]
    assert math.isnan(trainer.logged[0][0]["search/fitness"])


def test_the_bar_shows_a_stopped_candidate_as_stopped(tmp_path: Path, capsys) -> None:
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    progress = SearchProgress(trainer, total=2, done=0, ratio_pairs=PAIRS, log_every_n_evals=1)
    progress.update(0, math.nan, 0.4, [math.nan, 0.5])
    progress.close()
    out = capsys.readouterr()
    assert "fitness=stopped" in out.out + out.err and "nan" not in out.out + out.err


def test_a_pulse_redraws_the_bar_without_counting(tmp_path: Path, capsys) -> None:
    # a staged generation reports its candidates when it ends: the bar sat at 0/17 for minutes, its clock stopped
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    progress = SearchProgress(trainer, total=3, done=0, ratio_pairs=PAIRS, log_every_n_evals=1)
    capsys.readouterr()
    progress.pulse()  # captured output is no terminal: each redraw would be another line of a log file
    assert capsys.readouterr().out == ""
    progress.bar.fp.isatty = lambda: True
    progress.pulse()
    out = capsys.readouterr()
    assert "Search" in out.out + out.err and "0/3" in out.out + out.err and progress.bar.n == 0
    progress.close()
    progress.pulse()  # closed: nothing to redraw


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(total=0), "total must be >= 1, got 0"),
        (dict(done=4), r"done must be in \[0, total=3\], got 4"),
        (dict(done=-1), r"done must be in \[0, total=3\], got -1"),
        (dict(log_every_n_evals=-2), "log_every_n_evals must be >= 0, got -2"),
    ],
)
def test_progress_errors(kwargs: dict, match: str) -> None:
    args = dict(total=3, done=0, ratio_pairs=PAIRS, log_every_n_evals=1) | kwargs
    with pytest.raises(ValueError, match=match):
        SearchProgress(_Loggers(), **args)


def test_update_needs_one_cosine_per_pair() -> None:
    progress = SearchProgress(_Loggers(), total=3, done=0, ratio_pairs=PAIRS, log_every_n_evals=0)
    with pytest.raises(ValueError, match="cosines must hold 2 values .* got 3"):
        progress.update(0, 0.5, 0.5, [0.1, 0.2, 0.3])
