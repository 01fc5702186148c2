"""``python -m snapvit_lightning.benchmarks.balance`` runs end to end on a tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import random_scores, tiny_model
from snapvit_lightning.benchmarks import balance as bench_balance
from snapvit_lightning.elastic import ElasticViT
from snapvit_lightning.search import DEFAULT_GUARD


def _checkpoint_and_photos(tmp_path, num_photos: int):
    """A tiny elastic checkpoint and a folder of random photos."""
    model, name, kwargs = tiny_model("test_vit")
    path = tmp_path / "tiny.elastic.safetensors"
    ElasticViT(model, random_scores(model), model_name=name, model_kwargs=kwargs).save(path)
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(num_photos):
        Image.fromarray(rng.integers(0, 256, (170, 170, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    return path, photos


def _printed(out: str, label: str) -> list[float]:
    """The uncorrected then corrected values of the row ``label`` of bench_balance's output."""
    row = next(line for line in out.splitlines()[1:] if " ".join(line.split(":")[0].split()) == label)
    return [float(v) for v in row.split(": ", 1)[1].replace("|", " ").split()]


def test_bench_balance_prints_both_starts(tmp_path, capsys, one_thread) -> None:
    from snapvit_lightning.data import load_eval_images
    from snapvit_lightning.evaluation import extract_features
    from snapvit_lightning.search import DEFAULT_BALANCE

    path, photos = _checkpoint_and_photos(tmp_path, 6)
    assert bench_balance.main([str(path), "--data", str(photos), "--max-evals", "2"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.split(":")[0].split()[-1] in ("start", "searched")]
    assert [row.split(":")[0].split() for row in rows] == [
        ["paper", "start"], ["paper", "searched"], ["balance=0.5,0.65", "start"], ["balance=0.5,0.65", "searched"]]
    for row in rows:
        plain, corrected = row.split(": ", 1)[1].split(" | ")
        values = [float(v) for v in plain.split() + corrected.split()]
        assert len(values) == 2 * len(bench_balance.BUDGETS) and all(-1.0 <= v <= 1.0 + 1e-6 for v in values)
    # The balanced start is w = 1 on the scores balanced at the search's default quantiles.
    elastic = ElasticViT.load(path)
    start = ElasticViT(elastic.model, elastic.scores.balanced(DEFAULT_BALANCE), model_name=elastic.model_name,
                       model_kwargs=elastic.model_kwargs)
    images = load_eval_images(photos, elastic.model)[0]
    plain, corrected = bench_balance.fidelities(start, images, extract_features(elastic.model, images))
    np.testing.assert_allclose(_printed(out, "balance=0.5,0.65 start"), plain + corrected, atol=6e-4)


def test_bench_balance_corrected_fitness_one_start_and_uniform(tmp_path, capsys, one_thread) -> None:
    path, photos = _checkpoint_and_photos(tmp_path, 8)
    argv = [str(path), "--data", str(photos), "--max-evals", "2", "--starts", "balance", "--balance", "rank",
            "--fitness-correct", "lstsq", "--uniform", "--guard", "2"]
    assert bench_balance.main(argv) == 0
    out = capsys.readouterr().out
    assert "fitness correction lstsq" in out and "guard 2.0," in out
    rows = [line for line in out.splitlines()[1:] if " | " in line]
    assert [row.split(":")[0].split()[0] for row in rows] == ["uniform", "balance=rank", "balance=rank"]


def test_bench_balance_gradient_only_and_pairs(tmp_path, capsys, one_thread) -> None:
    from snapvit_lightning.data import load_eval_images
    from snapvit_lightning.evaluation import extract_features

    path, photos = _checkpoint_and_photos(tmp_path, 6)
    argv = [str(path), "--data", str(photos), "--max-evals", "2", "--starts", "balance", "--gradient-only",
            "--pairs", "0.3,0.2", "0.6,0.4", "--sigma", "0.3"]
    assert bench_balance.main(argv) == 0
    out = capsys.readouterr().out
    assert "pairs [(0.3, 0.2), (0.6, 0.4)]" in out and "seed 0, sigma 0.3;" in out and f"guard {DEFAULT_GUARD}," in out
    printed = _printed(out, "gradient-only")
    # The checkpoint's scores carry no search weights: gradient-only is the checkpoint's own slicing.
    elastic = ElasticViT.load(path)
    images = load_eval_images(photos, elastic.model)[0]
    plain, corrected = bench_balance.fidelities(elastic, images, extract_features(elastic.model, images))
    np.testing.assert_allclose(printed, plain + corrected, atol=6e-4)


@pytest.mark.parametrize("option, value, message", [
    ("--pairs", "0.3", "a pair is MLP_RATIO,HEAD_RATIO"),
    ("--balance", "0.5,0.6,0.7", "a balance is Q, MLP_Q,HEAD_Q or rank"),
    ("--balance", "half", "a balance is Q, MLP_Q,HEAD_Q or rank"),
    ("--starts", None, "nothing to measure: --starts names no start"),  # it printed a header and exited 0
])
def test_bench_balance_rejects_bad_options(tmp_path, capsys, option, value, message) -> None:
    with pytest.raises(SystemExit):
        bench_balance.main([str(tmp_path / "x.elastic.safetensors"), "--data", str(tmp_path), option,
                            *([] if value is None else [value])])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("holdout, search, measure", [([], 0, 1), (["odd"], 1, 0)])
def test_bench_balance_holdout_measures_unseen_images(tmp_path, capsys, one_thread, holdout, search, measure) -> None:
    from snapvit_lightning.data import load_eval_images
    from snapvit_lightning.evaluation import extract_features

    path, photos = _checkpoint_and_photos(tmp_path, 7)
    argv = [str(path), "--data", str(photos), "--max-evals", "2", "--starts", "balance", "--gradient-only",
            "--holdout", *holdout]
    assert bench_balance.main(argv) == 0
    out = capsys.readouterr().out
    sizes = (4, 3) if search == 0 else (3, 4)
    side = "even" if search == 0 else "odd"
    assert f"{sizes[0]} fitness images, {sizes[1]} evaluation images (held out: search on the {side}-position ones)" in out
    printed = _printed(out, "gradient-only")
    elastic = ElasticViT.load(path)
    measured = load_eval_images(photos, elastic.model)[0][measure::2]  # the rows are measured on the other half only
    plain, corrected = bench_balance.fidelities(elastic, measured, extract_features(elastic.model, measured))
    np.testing.assert_allclose(printed, plain + corrected, atol=6e-4)

    (tmp_path / "few").mkdir()
    path, photos = _checkpoint_and_photos(tmp_path / "few", 3)
    with pytest.raises(SystemExit, match="--holdout needs at least 4 images"):
        bench_balance.main([str(path), "--data", str(photos), "--holdout"])


def test_bench_balance_random_reference_without_search(tmp_path, capsys, one_thread) -> None:
    from snapvit_lightning.benchmarks.bench import _baseline_scores
    from snapvit_lightning.data import load_eval_images
    from snapvit_lightning.evaluation import extract_features

    path, photos = _checkpoint_and_photos(tmp_path, 6)
    assert bench_balance.main([str(path), "--data", str(photos), "--starts", "--random", "--magnitude-lamp"]) == 0
    out = capsys.readouterr().out
    rows = [line.split(":")[0].strip() for line in out.splitlines()[1:] if " | " in line]
    assert rows == ["random (x3)", "magnitude", "lamp"]  # the references only: no search ran
    elastic = ElasticViT.load(path)
    images = load_eval_images(photos, elastic.model)[0]
    dense = extract_features(elastic.model, images)
    runs = {}
    for method, _, s in _baseline_scores(elastic):
        rebuilt = ElasticViT(elastic.model, s, model_name=elastic.model_name, model_kwargs=elastic.model_kwargs)
        plain, corrected = bench_balance.fidelities(rebuilt, images, dense)
        runs.setdefault(method, []).append(plain + corrected)
    np.testing.assert_allclose(_printed(out, "random (x3)"), np.mean(runs["random"], axis=0), atol=6e-4)
    np.testing.assert_allclose(_printed(out, "magnitude"), runs["magnitude"][0], atol=6e-4)
    np.testing.assert_allclose(_printed(out, "lamp"), runs["lamp"][0], atol=6e-4)
