"""``python -m snapvit_lightning.benchmarks.job``: the main job at both settings on the real ViT-S/14, tiny."""

from __future__ import annotations

import json

import pytest

from snapvit_lightning.benchmarks import job

#: The keys time_official.py prints under "timings" (values from a 10-evaluation run).
OFFICIAL_TIMINGS = {
    "load_data_and_base_s": 3.1, "official_setup_s": 0.4, "gradient_scoring_s": 162.0, "gradient_scoring_images": 196,
    "fitness_setup_s": 4.0, "evolutionary_search_s": 142.0, "search_evals": 10, "search_s_per_eval": 14.2,
    "search_pruning_copies_s": 3.0, "fitness_at_init_s": 14.1,
}


def _official(tmp_path, timings=OFFICIAL_TIMINGS, **extra):
    path = tmp_path / "official.json"
    path.write_text(json.dumps({"timings": timings, "best_fitness": 0.41, **extra}))
    return path


def _row(table: str, label: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.strip("|").split("|")[1:]]


def test_job_benchmark_on_real_model(real_weights, photo_folder, tmp_path, capsys) -> None:
    # 56 px and a fixed precision keep it short (the default's precision probe alone takes minutes on 2 busy cores).
    fit_args = ["--model.model_kwargs", '{"num_classes": 0, "img_size": 56}', "--trainer.precision", "32-true",
                "--trainer.enable_progress_bar", "false", "--data.batch_size", "2"]
    argv = ["--data", str(photo_folder), "--max-samples", "4", "--search-evals", "2", "--weights", str(real_weights),
            "--official", str(_official(tmp_path)), "--out", str(tmp_path / "out"),
            "--settings", "default", "uncorrected", "paper", *fit_args]
    assert job.main(argv) == 0
    table = capsys.readouterr().out
    assert table == (tmp_path / "out" / "job.md").read_text()
    assert _row(table, "stage") == ["default", "uncorrected", "paper", "official (measured)"]
    result = json.loads((tmp_path / "out" / "job.json").read_text())
    uncorrected = json.loads((tmp_path / "out" / "uncorrected" / "report.json").read_text())
    assert uncorrected["correction"] is None and uncorrected["scores"].get("balance") is not None  # only the export differs
    cost = result["correction"]
    assert cost["added_s"] == pytest.approx(result["runs"]["default"]["wall_s"] - result["runs"]["uncorrected"]["wall_s"])
    assert f"The correction adds {cost['added_s']:+.1f} s" in table
    assert f"its export {cost['export_added_s']:+.1f} s ({100 * cost['export_added_fraction']:+.1f} % of the uncorrected job)" in table
    official = result["official"]
    assert official["search_s"] == pytest.approx(146.0) and official["search_s_per_eval"] == pytest.approx(14.6)
    for k, name in enumerate(("default", "uncorrected", "paper")):
        run = result["runs"][name]
        assert run["search_evaluations"] == 2 and run["images"] == 4
        for key in ("scoring_s", "search_s", "export_s", "wall_s", "search_s_per_eval"):
            assert run[key] > 0, (name, key)
        assert run["wall_s"] > run["scoring_s"] + run["search_s"] + run["export_s"]
        assert float(_row(table, "scoring (s)")[k]) == pytest.approx(run["scoring_s"], abs=0.05)
        # The official times scaled to 2 evaluations and 4 of its 196 images, and the speed-up.
        scaled_scoring = 162.0 * 4 / 196
        scaled_search = (4.0 + 142.0 / 10 * 2) * 4 / 196
        ours = run["scoring_s"] + run["search_s"]
        comparison = result["comparison"][name]
        assert comparison["official_total_s"] == pytest.approx(scaled_scoring + scaled_search)
        assert comparison["speedup"] == pytest.approx((scaled_scoring + scaled_search) / ours)
        assert float(_row(table, "speed-up (official s / our s)")[k]) == pytest.approx(comparison["speedup"], abs=0.005)
    paper = json.loads((tmp_path / "out" / "paper" / "report.json").read_text())
    assert paper["correction"] is None and paper["scores"].get("balance") is None  # the paper's plain cut and raw start
    assert result["official_machine_differs"] == [] and "records no machine" in table


def test_paper_config_has_the_papers_search(tmp_path) -> None:
    import yaml

    settings = yaml.safe_load(job.paper_config(job.CONFIG, tmp_path).read_text())
    search = next(c["init_args"] for c in settings["trainer"]["callbacks"] if c["class_path"].endswith("EvolutionarySearch"))
    assert [tuple(p) for p in search["ratio_pairs"]] == list(job.PAPER_RATIO_PAIRS)
    assert (search["space"], search["guard"], search["balance"]) == ("pca", 0.0, None)
    assert settings["trainer"]["precision"] == "32-true"


def test_uncorrected_config_changes_only_the_export(tmp_path) -> None:
    import yaml

    default = yaml.safe_load(job.CONFIG.read_text())
    settings = yaml.safe_load(job.uncorrected_config(job.CONFIG, tmp_path).read_text())
    export = next(c["init_args"] for c in settings["trainer"]["callbacks"] if c["class_path"].endswith("ElasticExport"))
    assert export.pop("correct") == "none"
    next(c["init_args"] for c in default["trainer"]["callbacks"] if c["class_path"].endswith("ElasticExport")).pop("correct", None)
    assert settings == default


def _times(wall: float, export: float) -> dict:
    return {"scoring_s": 1.0, "search_s": 2.0, "export_s": export, "search_evaluations": 2, "search_s_per_eval": 1.0,
            "other_s": wall - 3.0 - export, "wall_s": wall, "images": 14, "precision": None, "run_dir": "r"}


def test_correction_cost_is_the_difference_of_medians_over_interleaved_rounds() -> None:
    runs = {"default-1": _times(50.0, 9.0), "uncorrected-1": _times(44.0, 1.5), "default-2": _times(52.0, 10.0),
            "uncorrected-2": _times(43.0, 1.3), "default-3": _times(70.0, 9.5), "uncorrected-3": _times(42.0, 1.4)}
    cost = job.correction_cost(runs)
    assert cost["wall_s"] == {"default": [50.0, 52.0, 70.0], "uncorrected": [44.0, 43.0, 42.0]}
    assert cost["added_s"] == pytest.approx(52.0 - 43.0) and cost["added_fraction"] == pytest.approx(9.0 / 43.0)
    assert cost["export_added_s"] == pytest.approx(9.5 - 1.4)
    assert cost["export_added_fraction"] == pytest.approx((9.5 - 1.4) / 43.0)
    assert job.correction_cost({"default": _times(50.0, 9.0), "paper": _times(40.0, 1.0)}) is None


def test_run_job_refuses_bad_repeats(tmp_path) -> None:
    with pytest.raises(ValueError, match="repeats must be an int >= 1, got 0"):
        job.run_job(None, tmp_path / "out", ["default", "uncorrected"], repeats=0)


@pytest.mark.parametrize("change, match", [
    ({"search_evals": None}, r"timings lack \['search_evals'\]"),
    ({"gradient_scoring_s": 0}, "gradient_scoring_s must be a positive number, got 0"),
    ({"fitness_setup_s": "4"}, "fitness_setup_s must be a positive number"),
])
def test_load_official_refuses_incomplete_timings(tmp_path, change, match) -> None:
    timings = {k: v for k, v in {**OFFICIAL_TIMINGS, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        job.load_official(_official(tmp_path, timings))


def test_load_official_refuses_other_json(tmp_path) -> None:
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="no 'timings' object"):
        job.load_official(path)


@pytest.mark.parametrize("machine, differs", [
    ({"device_name": "Other CPU", "cpu": "Other CPU", "torch_threads": 2}, ["device_name", "cpu"]),
    ({"device_name": "This CPU", "cpu": "This CPU", "torch_threads": 2}, []),
])
def test_machine_differs_names_the_fields(tmp_path, machine, differs) -> None:
    official = job.load_official(_official(tmp_path, machine=machine))
    ours = {"device": "cpu", "device_name": "This CPU", "cpu": "This CPU", "torch_threads": 2}
    assert job.machine_differs(ours, official) == differs


@pytest.mark.parametrize("settings, match", [([], "settings must be"), (["paper", "paper"], "settings must be"),
                                             (["fast"], r"got \['fast'\]")])
def test_run_job_refuses_bad_settings(tmp_path, settings, match) -> None:
    with pytest.raises(ValueError, match=match):
        job.run_job(tmp_path, tmp_path / "out", settings)


def test_markdown_warns_of_another_machine(tmp_path) -> None:
    official = job.load_official(_official(tmp_path, machine={"device_name": "Other CPU", "cpu": "Other CPU"}))
    run = {"scoring_s": 10.0, "search_s": 30.0, "export_s": 5.0, "search_evaluations": 10, "search_s_per_eval": 3.0,
           "other_s": 2.0, "wall_s": 47.0, "images": 196, "precision": None, "run_dir": str(tmp_path)}
    ours = {"device": "cpu", "device_name": "This CPU", "cpu": "This CPU", "torch_threads": 2, "platform": "Linux"}
    result = {"runs": {"paper": run}, "machine": ours, "official": official,
              "comparison": {"paper": job.compare(run, official)}, "official_machine_differs": job.machine_differs(ours, official)}
    table = job.markdown(result)
    assert "WARNING: the official times come from another machine (device_name, cpu differ)" in table
    assert "Scaled linearly" not in table  # same images and evaluations: nothing scaled
    assert _row(table, "speed-up (official s / our s)") == [f"{(162.0 + 146.0) / 40.0:.2f}"]


def test_errors_name_the_program_and_the_argument(tmp_path, capsys) -> None:
    # It printed "error: data: no folder at ...", neither the command nor the option.
    with pytest.raises(SystemExit) as exit_:
        job.main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (f"python -m snapvit_lightning.benchmarks.job: error: --data: image folder not found: "
                                       f"'{tmp_path / 'nope'}' (give a folder of images or one image file)\n")
    # An empty folder and an --out that is a file: before any run (they were named data_dir / dirpath after one).
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("")
    for argv, said in ((["--data", str(tmp_path / "empty")], "--data: no image files"),
                       (["--out", str(tmp_path / "afile")], f"--out: '{tmp_path / 'afile'}' is a file, not a folder")):
        with pytest.raises(SystemExit) as exit_:
            job.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith(f"python -m snapvit_lightning.benchmarks.job: error: {said}"), err
        assert "Seed set" not in err
