"""Tests of snapvit_lightning.precision_cli: ``trainer.precision: auto`` in the CLI, one choice under DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from snapvit_lightning.precision_cli import CHOICE_ENV, AutoPrecisionTrainer, _launched_with_choice

RECORD = {"trainer_precision": "32-true", "scoring_explicit_attention": True, "tf32": False}


def test_auto_is_resolved_before_the_trainer() -> None:
    with pytest.raises(ValueError, match="resolved before the Trainer is built"):
        AutoPrecisionTrainer(precision="auto")


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),  # one process: it probes
        ({"LOCAL_RANK": "1", "WORLD_SIZE": "2", CHOICE_ENV: json.dumps({"pid": os.getppid(), "record": RECORD})}, RECORD),
        ({"LOCAL_RANK": "0", "WORLD_SIZE": "2", CHOICE_ENV: json.dumps({"pid": os.getppid(), "record": RECORD})}, None),
        ({"LOCAL_RANK": "0", CHOICE_ENV: json.dumps({"pid": -1, "record": RECORD})}, None),  # stale, from elsewhere
    ],
)
def test_processes_lightning_starts_take_rank_zeros_choice(monkeypatch, env: dict, expected: dict | None) -> None:
    for key in ("LOCAL_RANK", "WORLD_SIZE", CHOICE_ENV):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _launched_with_choice() == expected


@pytest.mark.parametrize("local_rank", ["0", "1"])
@pytest.mark.parametrize("stale", [False, True])
def test_auto_refused_in_processes_started_by_another_launcher(monkeypatch, local_rank: str, stale: bool) -> None:
    monkeypatch.delenv(CHOICE_ENV, raising=False)
    if stale:  # a choice some other process left in the environment: not rank 0's of this launch
        monkeypatch.setenv(CHOICE_ENV, json.dumps({"pid": -1, "record": RECORD}))
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("WORLD_SIZE", "2")  # e.g. torchrun: no rank 0 choice in the environment
    with pytest.raises(ValueError, match=r"precision 'auto' in a run of WORLD_SIZE=2 processes started outside Lightning"):
        _launched_with_choice()


def test_ddp_runs_one_probe_and_every_rank_applies_it(tmp_path) -> None:
    # Before, each DDP process timed its own probe, at once on the same cores: two runs chose
    # 32-true and bf16-mixed side by side. Now rank 0 probes and the process it starts reuses the choice.
    import numpy as np
    from PIL import Image

    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    probe_file = tmp_path / "probe.py"  # writes each rank's applied choice when its training starts
    probe_file.write_text(
        "import sys, json\nfrom snapvit_lightning import cli\n"
        "from lightning.pytorch.callbacks import Callback\n"
        "class Show(Callback):\n"
        "    def on_train_start(self, trainer, pl_module):\n"  # not at the end: rank 0 may stop rank 1 then
        "        with open(f'choice{trainer.global_rank}.txt', 'w') as f:\n"
        "            f.write(f'{trainer.precision} {pl_module.explicit_attention}')\n"
        "sys.exit(cli.main())\n"  # the command line itself: Lightning restarts it in the second process
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", CHOICE_ENV)}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, str(probe_file), "fit", "--model.model", "test_vit", "--model.model_kwargs", "{img_size: 32}",
           "--data.data_dir", str(tmp_path), "--data.batch_size", "2", "--data.num_local_crops", "2",
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--trainer.precision", "auto", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
           "--trainer.callbacks+=__main__.Show"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("precision probe on cpu") == 1, out[-3000:]
    choices = [(tmp_path / f"choice{rank}.txt").read_text() for rank in (0, 1)]
    assert choices[0] == choices[1] and choices[0].split()[0] in ("32-true", "bf16-mixed"), choices


def test_ddp_with_arguments_from_python_is_refused_before_the_fit(tmp_path, capsys) -> None:
    # Lightning starts DDP's other processes by re-running the command line; arguments given from Python
    # (the main job, cli.main([...])) are not on it, so the second process ran something else and rank 0
    # waited for it forever.
    from test_errors import _photos

    from snapvit_lightning.cli import main

    _photos(tmp_path / "photos", n=2)
    args = ["fit", "--model.model", "test_vit", "--model.model_kwargs", "{img_size: 32}", "--data.data_dir", str(tmp_path / "photos"),
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--trainer.precision", "32-true", "--trainer.logger", "false"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "snapvit fit: error: trainer.strategy DDPStrategy starts its other 1 process(es) by re-running the command line" in err
    assert "--trainer.strategy ddp_spawn" in err and "Traceback" not in err


@pytest.mark.parametrize("precision, autocast", [("auto", "false"), ("32-true", "false"), ("32-true", "auto")])
def test_the_record_says_the_search_ran_as_set_when_it_was_not_probed(tmp_path, monkeypatch, precision, autocast) -> None:
    # precision: auto probes scoring and search; a search given autocast: false ran in fp32, and report.json
    # still said the probe's choice ('search': 'bf16-fused', 'search_autocast': 'bfloat16'). With an explicit
    # precision report.json recorded none at all (null).
    from test_errors import _photos

    from snapvit_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    _photos(tmp_path / "photos", n=4)
    assert main(["fit", "--model.model", "test_vit", "--model.model_kwargs", "{img_size: 32}", "--data.data_dir",
                 str(tmp_path / "photos"), "--data.holdout", "2", "--trainer.precision", precision, "--trainer.logger", "false",
                 "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=snapvit_lightning.search.EvolutionarySearch",
                 "--trainer.callbacks.max_evals", "2", "--trainer.callbacks.autocast", autocast,
                 "--trainer.callbacks+=snapvit_lightning.export.ElasticExport", "--trainer.callbacks.dirpath",
                 str(tmp_path / "out"), "--trainer.callbacks.correct", "none"]) == 0
    record = json.loads((tmp_path / "out" / "report.json").read_text())["build_times"]["precision"]
    if autocast == "auto":  # the search's own probe, beside the precision given
        assert record["search"] in ("fp32-fused", "fp32-explicit", "bf16-fused", "bf16-explicit") and record["probe_s"] > 0
    else:
        assert record["search"] == "fp32 (autocast=False, not probed)" and record["search_autocast"] is None
    if precision == "auto":
        assert record["trainer_precision"] in ("32-true", "bf16-mixed") and record["probe_s"] > 0  # the scoring's probe stays
    else:
        assert record["trainer_precision"] == "32-true" and record["scoring"] == "not probed (trainer.precision given)"


def test_a_bad_holdout_is_refused_before_the_probe(tmp_path, monkeypatch, capsys) -> None:
    # The probe takes seconds to a minute: a data error that needs no model came after it.
    from test_errors import _photos

    from snapvit_lightning import precision_cli
    from snapvit_lightning.cli import main

    def no_probe(*args, **kwargs):
        raise AssertionError("the probe ran before the data were checked")

    monkeypatch.setattr(precision_cli, "resolve_precision", no_probe)
    monkeypatch.chdir(tmp_path)
    _photos(tmp_path / "photos", n=4)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--model.model", "test_vit", "--data.data_dir", str(tmp_path / "photos"), "--data.holdout", "4",
              "--trainer.precision", "auto", "--trainer.logger", "false"])
    assert exc.value.code == 2 and "`holdout`=4 leaves no calibration images out of 4" in capsys.readouterr().err
    # an explicit precision: checked before the Trainer is built too (under DDP it came after every rank started)

    def no_trainer(*args, **kwargs):
        raise AssertionError("the Trainer was built before the data were checked")

    monkeypatch.setattr(precision_cli.LightningCLI, "instantiate_trainer", no_trainer)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--model.model", "test_vit", "--data.data_dir", str(tmp_path / "photos"), "--data.holdout", "4",
              "--trainer.precision", "bf16-mixed", "--trainer.logger", "false"])
    assert exc.value.code == 2 and "`holdout`=4 leaves no calibration images out of 4" in capsys.readouterr().err
