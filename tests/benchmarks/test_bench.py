"""``snapvit bench`` on a tiny model: JSON/markdown outputs, dense row, fractions, errors."""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_scores, tiny_model
from snapvit_lightning.benchmarks import bench
from snapvit_lightning.data import load_eval_images
from snapvit_lightning.elastic import ElasticViT

BUDGETS = ["0.15,0", "0.35,0.2", "0.65,0.5"]
FAST = ["--batch-size", "4", "--repeats", "2", "--warmup", "0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    model, name, kwargs = tiny_model("test_vit")
    path = root / "tiny.elastic.safetensors"
    ElasticViT(model, random_scores(model), model_name=name, model_kwargs=kwargs or None).save(path)
    data = root / "photos"
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("cats", "dogs")):
        (data / cls).mkdir(parents=True)
        for i in range(4):  # two classes of differently tinted noise
            arr = rng.integers(0, 128, (40, 48, 3), dtype=np.uint8) + np.uint8(100 * c)
            Image.fromarray(arr).save(data / cls / f"{i}.png")
    return path, data, root


@pytest.fixture(scope="module")
def result(setup):
    path, data, root = setup
    out = root / "out"
    assert bench.main([str(path), "--data", str(data), "--budgets", *BUDGETS, *FAST, "--out", str(out)]) == 0
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def test_json_rows_and_settings(result, setup) -> None:
    js, _ = result
    rows, settings = js["rows"], js["settings"]
    assert len(rows) == len(BUDGETS) + 1
    assert [(r["mlp_ratio"], r["head_ratio"]) for r in rows] == [(0.0, 0.0), (0.15, 0.0), (0.35, 0.2), (0.65, 0.5)]
    dense = rows[0]
    assert dense["dense"] and dense["fidelity"] == pytest.approx(1.0, abs=1e-5)
    assert dense["centered_fidelity"] == pytest.approx(1.0, abs=1e-5)
    assert all(r["method"] == "snapvit" for r in rows) and js["settings"]["baselines"] == []
    assert dense["flops_fraction"] == pytest.approx(1.0) and dense["params_fraction"] == pytest.approx(1.0)
    assert dense["speedup"] == pytest.approx(1.0, abs=1e-6)
    for key in ("flops_fraction", "params_fraction"):
        fr = [r[key] for r in rows]
        assert all(a > b for a, b in zip(fr, fr[1:])), (key, fr)
    for r in rows:
        assert -1.0 <= r["fidelity"] <= 1.0 + 1e-6 and -1.0 <= r["centered_fidelity"] <= 1.0 + 1e-6
        assert 0.0 <= r["knn_1nn"] <= 1.0 and 0.0 <= r["knn_weighted"] <= 1.0
        assert r["latency_ms"] > 0 and r["speedup"] > 0
        assert len(r["kept_heads"]) == len(r["kept_neurons"]) == 6
    assert settings["num_images"] == 8 and settings["num_classes"] == 2 and settings["knn"]
    # test_vit has a 1000-class head: how often each subnet predicts the dense model's class
    assert settings["classifier"] and dense["agreement"] == 1.0 and all(0.0 <= r["agreement"] <= 1.0 for r in rows)
    assert settings["knn_protocol"]["k"] == [1, 7]  # 8 images, leave-one-out: 7 vote, not 20
    assert settings["batch_size"] == 4 and settings["repeats"] == 2
    assert settings["command"].startswith("snapvit bench ") and "--budgets 0.15,0 0.35,0.2 0.65,0.5" in settings["command"]
    assert {"processor", "machine", "torch_threads"} <= settings["hardware"].keys()
    assert {"torch", "timm"} <= settings["versions"].keys()


def test_markdown(result) -> None:
    js, md = result
    assert js["settings"]["command"] in md and "(1-NN; weighted 7-NN" in md  # the k used with 8 images
    lines = [line for line in md.split("\nBuild time")[0].splitlines() if line.startswith("|")]
    assert lines[0].startswith("| method | mlp_ratio | head_ratio |") and "fidelity" in lines[0] and "speed-up" in lines[0]
    assert "| 1-NN | 7-NN |" in lines[0]  # the column is named by the k it used (20 with enough images)
    assert f"| latency (ms / batch of {js['settings']['batch_size']}) |" in lines[0]
    assert len(lines) == 2 + len(js["rows"])
    assert lines[2].startswith("| snapvit | 0.00 | 0.00 | 100.0% | 100.0% | 1.0000 | 1.0000 | 100.0% |")
    assert "| centered | agreement | 1-NN |" in lines[0] and lines[1].count("---:|") == 12
    assert "agreement: the share of images whose class from the model's classifier head" in md


def test_agreement_is_the_share_of_the_dense_models_classes_kept(result, setup) -> None:
    js, _ = result
    path, data, _ = setup
    elastic = ElasticViT.load(path)
    images = load_eval_images(data, elastic.model)[0]
    with torch.inference_mode():
        dense = elastic.model(images).argmax(-1)
        for r in js["rows"][1:]:
            sub = elastic.subnet(mlp_ratio=r["mlp_ratio"], head_ratio=r["head_ratio"], correct="none")
            assert r["agreement"] == pytest.approx(float((sub(images).argmax(-1) == dense).double().mean()), abs=1e-9)
    # a model without a classifier head (num_classes=0) has no such column
    model, name, _ = tiny_model("test_vit")
    model.reset_classifier(0)
    bare = setup[2] / "bare.elastic.safetensors"
    ElasticViT(model, random_scores(model), model_name=name, model_kwargs={"num_classes": 0}).save(bare)
    out = setup[2] / "bare_out"
    assert bench.main([str(bare), "--data", str(data), "--budgets", "0.35,0.2", *FAST, "--no-latency", "--out", str(out)]) == 0
    bare_js = json.loads((out / "bench.json").read_text())
    assert not bare_js["settings"]["classifier"] and bare_js["rows"][1]["agreement"] is None
    assert "agreement" not in (out / "bench.md").read_text()


def test_a_distilled_models_agreement_is_said_to_be_missing(setup, capsys) -> None:
    # its two heads read two tokens: the features (their average) do not give its logits
    model, name, kwargs = tiny_model("distilled")
    path = setup[2] / "distilled.elastic.safetensors"
    ElasticViT(model, random_scores(model), model_name=name, model_kwargs=kwargs).save(path)
    out = setup[2] / "distilled_out"
    assert bench.main([str(path), "--data", str(setup[1]), "--budgets", "0.35,0.2", *FAST, "--no-latency", "--out", str(out)]) == 0
    assert "agreement: none for a distilled model" in capsys.readouterr().out
    assert json.loads((out / "bench.json").read_text())["rows"][1]["agreement"] is None


def test_printed_table_says_what_its_numbers_are(setup, capsys) -> None:
    path, data, _ = setup
    assert bench.main([str(path), "--data", str(data), "--budgets", "0.35,0.2", *FAST, "--no-latency"]) == 0
    said = capsys.readouterr()
    printed = said.out.split("| method |")[0]  # the lines above the table, as in bench.md
    # minutes of silence on a slow CPU: what it measures is said on stderr as it starts (the table alone on stdout)
    assert said.err.splitlines() == ["bench: the dense model and 1 budget(s), plain, on 8 images"]
    assert "k-NN: leave-one-out on 8 images, 2 classes" in printed and "differences under ~35 points are noise" in printed
    assert f"on the 8 images of {data}" in printed and "Held out only if neither" in printed
    assert "latency: not measured (--no-latency)" in printed


def test_knn_noise_is_the_binomial_standard_error() -> None:
    assert "one image is 0.5 points; the standard error of an accuracy near 50 % is 3.6 points, so differences " \
           "under ~7 points are noise" in bench._knn_noise(196)


def test_build_times_unknown_for_checkpoint_without_timings(result) -> None:
    js, md = result  # the fixture's checkpoint has no build_info and no report.json beside it
    bt = js["build_times"]
    assert {k: bt[k] for k in ("scoring_s", "search_s", "search_evaluations", "export_s")} == dict.fromkeys(
        ("scoring_s", "search_s", "search_evaluations", "export_s"))
    assert bt["report"] is None and bt["build_machine"] is None
    assert "Build time" in md and "| scoring | – |" in md and "| export | – |" in md


def test_no_latency_flat_folder(setup, tmp_path, capsys) -> None:
    path, data, _ = setup
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(sorted(data.rglob("*.png"))[:3]):
        (flat / f"{i}.png").write_bytes(f.read_bytes())
    out = tmp_path / "out"
    assert bench.main([str(path), "--data", str(flat), "--budgets", "0.5,0.5", "--no-latency",
                       "--batch-size", "4", "--out", str(out)]) == 0
    js = json.loads((out / "bench.json").read_text())
    assert len(js["rows"]) == 2 and js["settings"]["knn"] is False and js["settings"]["latency"] is False
    for r in js["rows"]:
        assert r["latency_ms"] is None and r["speedup"] is None
        assert r["knn_1nn"] is None and r["knn_weighted"] is None
    printed = capsys.readouterr().out
    assert "| snapvit | 0.00 | 0.00 |" in printed and "k-NN: none (labels come from class subfolders alone" in printed
    assert "k-NN: none (labels come from class subfolders alone" in (out / "bench.md").read_text()


def test_errors(setup, tmp_path, capsys) -> None:
    path, data, _ = setup
    missing = tmp_path / "missing.elastic.safetensors"
    with pytest.raises(SystemExit) as err:
        bench.main([str(missing), "--data", str(data)])
    assert err.value.code == 2 and str(missing) in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        bench.main([str(path), "--data", str(tmp_path / "nowhere")])
    assert err.value.code == 2 and "nowhere" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as err:
        bench.main([str(path), "--data", str(empty), "--no-latency"])
    assert err.value.code == 2 and "no image files" in capsys.readouterr().err
    for bad in (["--budgets", "0.3"], ["--budgets", "1.2,0"], ["--batch-size", "0"]):
        with pytest.raises(SystemExit) as err:
            bench.main([str(path), "--data", str(data), *bad])
        assert err.value.code == 2
    with pytest.raises(FileNotFoundError, match="missing"):
        bench.run_bench(argparse.Namespace(
            path=str(missing), data=str(data), budgets=[(0.1, 0.0)], batch_size=4, repeats=1, warmup=0,
            threads=None, out=None, no_latency=True,
        ))


def test_latency_in_another_dtype_times_cast_copies_and_keeps_float32_features(result, setup, tmp_path,
                                                                            monkeypatch) -> None:
    import torch

    from snapvit_lightning import evaluation

    path, data, _ = setup
    timed_dtypes = []
    measure = evaluation.measure_latency

    def spy(model, **kwargs):
        timed_dtypes.append(next(model.parameters()).dtype)
        return measure(model, **kwargs)

    monkeypatch.setattr(evaluation, "measure_latency", spy)
    out = tmp_path / "bf16"
    assert bench.main([str(path), "--data", str(data), "--budgets", *BUDGETS, *FAST, "--dtype", "bfloat16",
                       "--device", "cpu", "--out", str(out)]) == 0
    js = json.loads((out / "bench.json").read_text())
    settings = js["settings"]
    assert settings["dtype"] == "bfloat16" and settings["device"] == "cpu" and settings["device_name"]
    assert "--dtype bfloat16" in settings["command"] and "--device" not in settings["command"]  # cpu: the default
    assert timed_dtypes and set(timed_dtypes) == {torch.bfloat16}
    assert all(r["latency_ms"] > 0 for r in js["rows"])
    size = settings["img_size"]  # the size the latency was timed at (bench named none)
    assert f"batch 4 at {size} x {size} px, cpu, bfloat16, torch.inference_mode" in (out / "bench.md").read_text()
    float32_rows = result[0]["rows"]  # the same checkpoint and images timed in float32
    assert [r["fidelity"] for r in js["rows"]] == [r["fidelity"] for r in float32_rows]
    assert result[0]["settings"]["dtype"] == "float32" and "--dtype" not in result[0]["settings"]["command"]


def test_latency_device_and_dtype_are_checked(setup, capsys) -> None:
    path, data, _ = setup
    for bad, says in ((["--device", "nope"], "nope"), (["--dtype", "int8"], "invalid choice: 'int8'")):
        with pytest.raises(SystemExit) as err:
            bench.main([str(path), "--data", str(data), *bad])
        assert err.value.code == 2 and says in capsys.readouterr().err
    with pytest.raises(ValueError, match="dtype must be one of"):
        bench.run_bench(argparse.Namespace(
            path=str(path), data=str(data), budgets=[(0.1, 0.0)], batch_size=4, repeats=1, warmup=0,
            threads=None, out=None, no_latency=True, dtype="int8",
        ))


def test_subcommand_registration() -> None:
    parser = argparse.ArgumentParser(prog="snapvit")
    sub = parser.add_subparsers(dest="command")
    bench.add_bench_parser(sub)
    args = parser.parse_args(["bench", "x.safetensors", "--data", "d"])
    assert args.func is bench.run_bench and args.budgets == list(bench.DEFAULT_BUDGETS)
    assert args.batch_size == 32 and args.repeats == 10 and args.warmup == 3 and not args.no_latency
    help_text = sub.choices["bench"].format_help()
    assert not args.baselines
    assert args.device == "cpu" and args.dtype == "float32"
    for option in ("--data", "--budgets", "--batch-size", "--repeats", "--warmup", "--out", "--no-latency",
                   "--baselines", "--device", "--dtype"):
        assert option in help_text


def test_run_bench_rejects_bad_budget(setup) -> None:
    path, data, _ = setup
    with pytest.raises(ValueError, match="MLP_RATIO"):
        bench.run_bench(argparse.Namespace(
            path=str(path), data=str(data), budgets=[(1.5, 0.0)], batch_size=4, repeats=1, warmup=0,
            threads=None, out=None, no_latency=True,
        ))


def test_baselines(setup, capsys, caplog) -> None:
    import logging
    import warnings

    import shutil

    path, photos, root = setup
    data = root / "photos_and_a_broken_file"
    shutil.copytree(photos, data)
    (data / "dogs" / "broken.png").write_bytes(b"not a png")
    out = root / "baselines"
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert bench.main([str(path), "--data", str(data), "--budgets", "0.35,0.2", "0.65,0.5", "--no-latency",
                           "--baselines", "--batch-size", "4", "--out", str(out)]) == 0
    # the SNIP epoch's Trainer is ours: none of Lightning's set-up lines or notices about it
    assert [r.getMessage() for r in caplog.records if r.name.startswith("lightning")] == []
    assert [str(w.message) for w in caught if "lightning" in w.filename and "snapvit_lightning" not in w.filename] == []
    # the broken file is named once, by --data (the SNIP epoch reads the folder again, as `data_dir`)
    skipped = [str(w.message) for w in caught if "skipped 1 of 9 images" in str(w.message)]
    assert len(skipped) == 1 and "--data=" in skipped[0], skipped
    js = json.loads((out / "bench.json").read_text())
    rows, settings = js["rows"], js["settings"]
    assert settings["baselines"] == list(bench.BASELINES) and "--baselines" in settings["command"]
    budgets = [(0.35, 0.2), (0.65, 0.5)]
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    assert list(by_method) == ["snapvit", *bench.BASELINES]
    assert [(r["mlp_ratio"], r["head_ratio"]) for r in by_method["snapvit"]] == [(0.0, 0.0), *budgets]
    assert by_method["snapvit"][0]["dense"] and by_method["snapvit"][0]["fidelity"] == pytest.approx(1.0, abs=1e-5)
    for method in bench.BASELINES:
        assert [(r["mlp_ratio"], r["head_ratio"]) for r in by_method[method]] == budgets, method
    for r in rows:
        assert -1.0 <= r["fidelity"] <= 1.0 + 1e-6 and 0.0 <= r["knn_1nn"] <= 1.0
        assert r["latency_ms"] is None and 0.0 < r["flops_fraction"] <= 1.0
        assert ("fidelity_std" in r) == (r["method"] == "random")
    for r in by_method["random"]:
        assert r["fidelity_std"] >= 0.0 and r["seeds"] == [0, 1, 2] and len(r["per_seed"]) == 3
        assert r["fidelity"] == pytest.approx(sum(s["fidelity"] for s in r["per_seed"]) / 3)
        assert r["centered_fidelity"] == pytest.approx(sum(s["centered_fidelity"] for s in r["per_seed"]) / 3)
    # The test checkpoint has no search weights: gradient-only is the same ranking as snapvit.
    for g, s in zip(by_method["gradient-only"], by_method["snapvit"][1:]):
        assert g["kept_heads"] == s["kept_heads"] and g["kept_neurons"] == s["kept_neurons"]
        assert g["fidelity"] == pytest.approx(s["fidelity"], abs=1e-6)
    for r, s in zip(by_method["uniform"], by_method["snapvit"][1:]):  # equal totals: equal cost
        assert max(r["kept_neurons"]) - min(r["kept_neurons"]) <= 1 and max(r["kept_heads"]) - min(r["kept_heads"]) <= 1
        assert sum(r["kept_neurons"]) == sum(s["kept_neurons"]) and sum(r["kept_heads"]) == sum(s["kept_heads"])
        assert r["flops_fraction"] == pytest.approx(s["flops_fraction"]) and r["params"] == s["params"]
    md = (out / "bench.md").read_text()
    table = [line for line in md.split("\nBuild time")[0].splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows) and table[0].startswith("| method |")
    assert any(line.startswith("| random |") and "±" in line for line in table)


def test_snip_and_uniform_baselines_are_search_free(setup, tmp_path, one_thread) -> None:
    """snip-magnitude = SnapViTModule's scores after one calibration epoch on --data; uniform keeps
    each block's units in the gradient-only order, not in the order the search weights give."""
    import copy

    import lightning.pytorch as pl
    import torch

    from snapvit_lightning.data import CalibrationDataModule
    from snapvit_lightning.evaluation import extract_features, feature_fidelity
    from snapvit_lightning.module import SnapViTModule

    _, data, _ = setup
    model, name, kwargs = tiny_model("test_vit")
    scores = random_scores(model)
    # head weights that favour each block's lower-scored head: the weighted order inside a block differs
    flip = torch.where(scores.heads == scores.heads.amax(1, keepdim=True), 0.1, 2.0).flatten()
    w = torch.cat([torch.ones(scores.num_blocks), flip]).double()
    path = tmp_path / "searched.elastic.safetensors"
    ElasticViT(model, scores.with_weights(w), model_name=name, model_kwargs=kwargs or None).save(path)
    out = tmp_path / "out"
    assert bench.main([str(path), "--data", str(data), "--budgets", "0.35,0.2", "0.65,0.5", "--no-latency",
                       "--baselines", "--batch-size", "4", "--out", str(out)]) == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]

    elastic = ElasticViT.load(path)
    images = load_eval_images(data, elastic.model)[0]
    dense = extract_features(elastic.model, images, batch_size=4)

    def fidelity(source: ElasticViT, dims) -> float:
        return feature_fidelity(extract_features(source.slice(dims), images, batch_size=4), dense)

    module = SnapViTModule(copy.deepcopy(elastic.model), criterion="snip_magnitude")
    pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(module, datamodule=CalibrationDataModule(data_dir=data))
    snip = ElasticViT(elastic.model, module.scores, model_name=name, model_kwargs=kwargs or None)
    raw = ElasticViT(elastic.model, elastic.scores.raw(), model_name=name, model_kwargs=kwargs or None)
    differs = False
    for budget in [(0.35, 0.2), (0.65, 0.5)]:
        row = {r["method"]: r for r in rows if (r["mlp_ratio"], r["head_ratio"]) == budget}
        dims = snip.dims(*budget)
        assert row["snip-magnitude"]["kept_heads"] == [d.num_heads for d in dims]
        assert row["snip-magnitude"]["fidelity"] == pytest.approx(fidelity(snip, dims), abs=1e-5)
        dims = bench._uniform_dims(elastic.scores, *budget)
        assert row["uniform"]["fidelity"] == pytest.approx(fidelity(raw, dims), abs=1e-5)
        differs |= abs(fidelity(elastic, dims) - fidelity(raw, dims)) > 1e-3
    assert differs  # the search weights reorder heads here, so the order matters to this check


def test_random_baseline_is_drawn_per_original_unit() -> None:
    """Two checkpoints of one model, permuted differently, draw the same random scores per original unit."""
    import torch

    model, name, kwargs = tiny_model("test_vit")
    drawn = []
    for seed in (0, 1):
        elastic = ElasticViT(model, random_scores(model, seed=seed), model_name=name, model_kwargs=kwargs or None)
        randoms = [s for method, _, s in bench._baseline_scores(elastic) if method == "random"]
        # back to the original units: unit elastic.mlp_order[b, i] has the score at position i
        drawn.append([(torch.empty_like(s.mlp).scatter_(1, elastic.mlp_order, s.mlp),
                       torch.empty_like(s.heads).scatter_(1, elastic.head_order, s.heads)) for s in randoms])
        assert not torch.equal(elastic.mlp_order, torch.arange(elastic.mlp_order.shape[1]).expand_as(elastic.mlp_order))
    assert len(drawn[0]) == len(bench.RANDOM_SEEDS)
    for (mlp0, heads0), (mlp1, heads1) in zip(*drawn):
        assert torch.equal(mlp0, mlp1) and torch.equal(heads0, heads1)
    assert not torch.equal(drawn[0][0][0], drawn[0][1][0])  # the seeds differ


def test_correction_rows_are_cross_fitted(setup) -> None:
    import torch

    from snapvit_lightning.evaluation import centered_fidelity, extract_features, feature_fidelity

    path, data, root = setup
    out = root / "corrected"
    assert bench.main([str(path), "--data", str(data), "--budgets", "0.35,0.2", "--no-latency", "--batch-size", "4",
                       "--correct", "bias", "lstsq", "--out", str(out)]) == 0
    js = json.loads((out / "bench.json").read_text())
    rows, settings = js["rows"], js["settings"]
    assert [r["method"] for r in rows] == ["snapvit", "snapvit", "snapvit+bias", "snapvit+lstsq"]
    assert settings["correction"]["methods"] == ["bias", "lstsq"] and "--correct bias lstsq" in settings["command"]
    assert rows[3]["flops"] == rows[1]["flops"] and sum(rows[3]["kept_neurons"]) == sum(rows[1]["kept_neurons"])
    # The same number by hand: each half's features from the subnet() corrected (and ranked) on the other half.
    el = ElasticViT.load(path)
    images = load_eval_images(data, el.model)[0]
    dense = extract_features(el.model, images, batch_size=4)
    even, odd = torch.arange(0, len(images), 2), torch.arange(1, len(images), 2)
    feats = torch.empty_like(dense)
    for cal, idx in ((even, odd), (odd, even)):
        sub = el.subnet(0.35, 0.2, correct="lstsq", calibration=el.collect_stats(images[cal], batch_size=4, ranking=True))
        feats[idx] = extract_features(sub, images[idx], batch_size=4)
        if cal is even:  # the row lists the units of the subnet corrected on the even half
            assert rows[3]["kept_neurons"] == [b.mlp.fc1.out_features for b in sub.blocks]
            assert rows[3]["kept_neurons"] != rows[1]["kept_neurons"]  # the ranking's cut, not the plain one
    assert rows[3]["fidelity"] == pytest.approx(feature_fidelity(feats, dense), abs=1e-6)
    assert rows[3]["centered_fidelity"] == pytest.approx(centered_fidelity(feats, dense), abs=1e-6)
    assert "weight correction (bias, lstsq): 2-fold cross-fit" in (out / "bench.md").read_text()


def test_correction_statistics_announced_and_booked_apart(setup, monkeypatch, capsys) -> None:
    # The cross-fit's statistics can take minutes: a line says so first, and their time goes to
    # settings.correction.stats_s, not to the first corrected row's quality_wall_s. A clock that
    # jumps 100 s in each collection stands in for slow statistics.
    from snapvit_lightning.benchmarks import bench_correction

    path, data, root = setup
    collect, jumped = ElasticViT.collect_stats, [0.0]

    def slow_collect(self, *args, **kwargs):
        jumped[0] += 100.0
        return collect(self, *args, **kwargs)

    clock = type("Clock", (), {"perf_counter": staticmethod(lambda: time.perf_counter() + jumped[0])})
    monkeypatch.setattr(ElasticViT, "collect_stats", slow_collect)
    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(bench_correction, "time", clock)
    out = root / "slow"
    assert bench.main([str(path), "--data", str(data), "--budgets", "0.35,0.2", "--no-latency", "--batch-size", "4",
                       "--correct", "lstsq", "--out", str(out)]) == 0
    assert "collecting correction statistics for snapvit (2-fold cross-fit on --data" in capsys.readouterr().err
    js = json.loads((out / "bench.json").read_text())
    assert js["settings"]["correction"]["stats_s"] >= 200.0  # two folds
    assert js["rows"][2]["method"] == "snapvit+lstsq" and js["rows"][2]["quality_wall_s"] < 100.0


def test_statistics_of_each_model_are_announced_by_its_method(setup, capsys) -> None:
    # --baselines --correct collects statistics per baseline model: each line names the rows' method,
    # the calibration source only the first.
    from snapvit_lightning.benchmarks.bench_correction import Calibrator

    path, data, _ = setup
    elastic = ElasticViT.load(path)
    images = load_eval_images(data, elastic.model)[0]
    other = ElasticViT(elastic.model, random_scores(elastic.model, seed=1), model_name=elastic.model_name)
    calibrate = Calibrator(None, images, batch_size=4)
    for source, label in ((elastic, "snapvit"), (other, "random (seed 1)")):
        calibrate.corrected(source, (0.35, 0.2), source.dims(0.35, 0.2), "lstsq", ranking=False, label=label)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["collecting correction statistics for snapvit (2-fold cross-fit on --data: features of even/odd "
                     "images from subnets corrected on the other half) ...",
                     "collecting correction statistics for random (seed 1) ..."]


def test_correction_argument_errors(setup, tmp_path, capsys, monkeypatch) -> None:
    import snapvit_lightning.data

    path, data, root = setup
    stats = tmp_path / "tiny.stats.safetensors"
    elastic = ElasticViT.load(path)
    elastic.collect_stats(load_eval_images(data, elastic.model)[0][:2]).save(stats)
    read = snapvit_lightning.data.load_eval_images
    for argv, match, early in (
        (["--calibration", str(stats)], "--calibration needs --correct", True),
        (["--correct", "lstsq", "--calibration", str(stats), "--baselines"], "with --baselines give an image folder", True),
        (["--correct", "lstsq", "--calibration", str(tmp_path / "nope.safetensors")], "not found", False),
    ):
        def refuse_to_read(*args, **kwargs):  # the option checks come before the images are read (and warned about)
            raise AssertionError("the images were read before the options were checked")

        monkeypatch.setattr(snapvit_lightning.data, "load_eval_images", refuse_to_read if early else read)
        with pytest.raises(SystemExit) as exc:
            bench.main([str(path), "--data", str(data), "--budgets", "0.35,0.2", "--no-latency", *argv])
        assert exc.value.code == 2 and match in capsys.readouterr().err, argv
    monkeypatch.setattr(snapvit_lightning.data, "load_eval_images", read)
    # Stored statistics of this checkpoint evaluate every image with one corrected subnet: the checkpoint's
    # units without a ranking in the file, the ranking's units with one (what subnet() gives with that file).
    from snapvit_lightning.correction import CorrectionStats
    from snapvit_lightning.data import load_calibration_views
    from snapvit_lightning.evaluation import extract_features, feature_fidelity

    images = load_eval_images(data, elastic.model)[0]
    dense = extract_features(elastic.model, images, batch_size=4)
    for ranking in (False, True):
        elastic.collect_stats(images[:2], ranking=ranking).save(stats)
        out = tmp_path / f"stored{ranking}"
        assert bench.main([str(path), "--data", str(data), "--budgets", "0.35,0.2", "--no-latency", "--batch-size", "4",
                           "--correct", "lstsq", "--calibration", str(stats), "--out", str(out)]) == 0
        plain, corrected = json.loads((out / "bench.json").read_text())["rows"][1:]
        sub = elastic.subnet(0.35, 0.2, correct="lstsq", calibration=CorrectionStats.load(stats))
        assert corrected["fidelity"] == pytest.approx(feature_fidelity(extract_features(sub, images, batch_size=4), dense), abs=1e-6)
        kept = [b.mlp.fc1.out_features for b in sub.blocks]
        assert corrected["kept_neurons"] == kept and (kept == plain["kept_neurons"]) == (not ranking)
    # An image folder calibrates as the export does: eval views and crops, with the ranking.
    out = tmp_path / "folder"
    assert bench.main([str(path), "--data", str(data), "--budgets", "0.35,0.2", "--no-latency", "--batch-size", "4",
                       "--correct", "lstsq", "--calibration", str(data), "--out", str(out)]) == 0
    corrected = json.loads((out / "bench.json").read_text())["rows"][2]
    inputs = load_calibration_views(data, elastic.model)[0]
    sub = elastic.subnet(0.35, 0.2, correct="lstsq", calibration=elastic.collect_stats(inputs, batch_size=4, ranking=True))
    assert corrected["fidelity"] == pytest.approx(feature_fidelity(extract_features(sub, images, batch_size=4), dense), abs=1e-6)


def test_plain_rows_beside_statistics_say_how_to_measure_the_corrected_subnets(setup, tmp_path, capsys) -> None:
    import shutil

    path, data, _ = setup
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    argv = [str(copy), "--data", str(data), "--budgets", "0.35,0.2", "--no-latency", "--batch-size", "4"]
    assert bench.main(argv) == 0
    assert "plain cuts only" not in capsys.readouterr().err  # no statistics: plain is what slice cuts too
    elastic = ElasticViT.load(copy)
    stats = tmp_path / "tiny.stats.safetensors"
    elastic.collect_stats(load_eval_images(data, elastic.model)[0][:2]).save(stats)
    assert bench.main(argv) == 0
    printed = capsys.readouterr()
    assert (f"plain cuts only: `snapvit slice` and subnet() cut corrected subnets from tiny.stats.safetensors by default; "
            f"`--correct lstsq --calibration {stats}` adds those rows") in printed.err
    assert "plain cuts only" not in printed.out  # advice, not a result: `> table.md` keeps the table alone
    assert bench.main([*argv, "--correct", "lstsq", "--calibration", str(stats)]) == 0
    assert "plain cuts only" not in capsys.readouterr().err
    # --baselines takes no stats file (a baseline's units are not the checkpoint's): the advice names what it takes
    assert bench.main([*argv, "--baselines"]) == 0
    said = capsys.readouterr().err
    assert "`--correct lstsq` adds corrected rows (refit on --data, cross-fit" in said and "--calibration" not in said


def test_an_earlier_bench_is_kept_without_overwrite(result, setup, capsys) -> None:
    # A second bench into the same --out replaced bench.json/bench.md without a word (a 20-minute --baselines run).
    path, data, root = setup
    out = root / "out"
    before = (out / "bench.json").read_text()
    with pytest.raises(SystemExit) as exit_:
        bench.main([str(path), "--data", str(data), "--budgets", "0.35,0.2", *FAST, "--out", str(out)])
    assert exit_.value.code == 2 and f"--out: '{out / 'bench.json'}' exists (an earlier bench?); pass --overwrite" in capsys.readouterr().err
    assert (out / "bench.json").read_text() == before
    assert bench.main([str(path), "--data", str(data), "--budgets", "0.35,0.2", *FAST, "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "bench.json").read_text())["settings"]["command"].endswith("--overwrite")


def test_bench_never_writes_through_a_link_in_its_out_folder(setup, tmp_path, capsys) -> None:
    # bench.json was written with write_text: a (dangling) link planted there wrote a file outside --out
    path, data, _ = setup
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "bench.json").symlink_to(outside / "created")  # dangling: exists() is False
    (outside / "kept.md").write_text("mine\n")
    (out / "bench.md").symlink_to(outside / "kept.md")
    argv = [str(path), "--data", str(data), "--budgets", "0.35,0.2", *FAST, "--out", str(out)]
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    assert exit_.value.code == 2 and "exists (an earlier bench?)" in capsys.readouterr().err
    assert bench.main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in outside.iterdir()) == ["kept.md"] and (outside / "kept.md").read_text() == "mine\n"
    assert not (out / "bench.json").is_symlink() and json.loads((out / "bench.json").read_text())["rows"]
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md"]  # no staged file left


def test_a_busy_machine_is_named_before_bench_times(setup, tmp_path, monkeypatch, capsys) -> None:
    import snapvit_lightning.machine as machine

    path, data, _ = setup
    load = os.cpu_count() + 2.0
    monkeypatch.setattr(machine, "load_average", lambda: load)
    with pytest.warns(UserWarning, match=r"^the machine is busy \(1-minute load average"):
        assert bench.main([str(path), "--data", str(data), "--budgets", "0.35,0.2", *FAST, "--out", str(tmp_path / "b")]) == 0
    settings = json.loads((tmp_path / "b" / "bench.json").read_text())["settings"]
    assert settings["load_average"] == load and settings["busy"] and settings["dtype"] == "float32"
    assert "(busy: above the cores, so the latencies read slow" in (tmp_path / "b" / "bench.md").read_text()
    assert f"float32, torch.inference_mode, 1-minute load average {load:.2f} before" in capsys.readouterr().out
    # more --threads than the process's cores: said too (it was said by info and slice, not by bench)
    monkeypatch.setattr(machine, "load_average", lambda: 0.0)
    many = machine.usable_cores() + 1
    threads = torch.get_num_threads()
    try:
        with pytest.warns(UserWarning, match=f"^the timing runs {many} threads on the {many - 1} core"):
            assert bench.main([str(path), "--data", str(data), "--budgets", "0.35,0.2", *FAST, "--threads", str(many),
                               "--out", str(tmp_path / "t")]) == 0
    finally:
        torch.set_num_threads(threads)  # bench sets torch's threads for the process
