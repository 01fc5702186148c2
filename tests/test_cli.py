from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from lightning.pytorch import Callback
from PIL import Image

from snapvit_lightning import __version__
from snapvit_lightning.cli import main
from snapvit_lightning.cli_info import INFO_BUDGETS
from snapvit_lightning.data import load_calibration_views
from snapvit_lightning.elastic import ElasticViT, load_subnet, read_metadata
from snapvit_lightning.evaluation import model_cost
from snapvit_lightning.scores import ImportanceScores
from snapvit_lightning.search import DEFAULT_FITNESS_SAMPLES, DEFAULT_GUARD, DEFAULT_RATIO_PAIRS, PAPER_RATIO_PAIRS

from conftest import REPO, random_scores, tiny_model


def test_version_and_help() -> None:
    out = subprocess.run([sys.executable, "-m", "snapvit_lightning.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout
    assert main([]) == 0


def test_info_lists_budgets(tmp_path, capsys) -> None:
    model, _, _ = tiny_model("test_vit")
    scores = ImportanceScores(torch.rand(6, 192), torch.rand(6, 2))
    path = tmp_path / "m.elastic.safetensors"
    ElasticViT(model, scores).save(path)
    assert main(["info", str(path), "--budgets", "0,0", "0.5,0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "100.0%" in lines[2] and lines[3].split()[:2] == ["0.50", "0.50"]
    assert lines[4].startswith("correction statistics: none at") and len(lines) == 5
    assert main(["info", str(path)]) == 0  # its own grid, which a new user took for the export's budgets
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("budgets: info's own grid of ratios") and [r.split()[:2] for r in lines[3:10]] == [
        [f"{m:.2f}", f"{h:.2f}"] for m, h in INFO_BUDGETS]


def test_info_errors(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["info", str(tmp_path / "missing.elastic.safetensors")])
    assert exc.value.code == 2 and "no elastic checkpoint or subnet file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["info", "x", "--budgets", "0.3"])
    assert exc.value.code == 2 and "MLP_RATIO,HEAD_RATIO" in capsys.readouterr().err


def test_slice_writes_a_subnet(tmp_path, capsys) -> None:
    from snapvit_lightning.elastic import load_subnet
    from snapvit_lightning.structure import count_flops

    model, _, _ = tiny_model("test_vit")
    scores = ImportanceScores(torch.rand(6, 192), torch.rand(6, 2))
    path = tmp_path / "m.elastic.safetensors"
    ElasticViT(model, scores).save(path)
    out = tmp_path / "s.safetensors"
    assert main(["slice", str(path), "--flops", "0.6", "-o", str(out)]) == 0
    sub = load_subnet(out)
    assert count_flops(sub)["total"] <= 0.6 * count_flops(model)["total"]
    assert main(["slice", str(path), "--mlp-ratio", "0.3", "--head-ratio", "0.2", "-o", str(out), "--overwrite"]) == 0
    with pytest.raises(SystemExit) as exc:  # exists, no --overwrite
        main(["slice", str(path), "--flops", "0.5", "-o", str(out)])
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["slice", str(path), "--flops", "0.5", "--mlp-ratio", "0.1", "-o", str(tmp_path / "x.safetensors")])
    assert exc.value.code == 2 and "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["slice", str(path), "--flops", "1.5", "-o", str(tmp_path / "y.safetensors")])
    assert exc.value.code == 2 and "argument --flops: must be a fraction in (0, 1], got '1.5'" in capsys.readouterr().err


def test_fit_subcommand_goes_to_lightning_cli(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--print_config"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "criterion: dino" in printed and "num_local_crops: 10" in printed


@pytest.mark.parametrize("name", ["deit_base", "dino_vitb16", "dinov2_vits14", "multi_gpu", "quickstart"])
def test_shipped_configs_parse(name, capsys) -> None:
    import yaml

    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(REPO / "configs" / f"{name}.yaml"), "--print_config"])
    assert exc.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    search = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("EvolutionarySearch"))
    # The paper-settings config keeps the paper's start and fitness; the others use our defaults.
    assert search["init_args"]["balance"] == (None if name == "dino_vitb16" else [0.5, 0.65])
    assert search["init_args"]["space"] == ("pca" if name == "dino_vitb16" else "raw")
    paper = name == "dino_vitb16"
    assert search["init_args"]["guard"] == (0.0 if paper else DEFAULT_GUARD)
    assert search["init_args"]["fitness_samples"] == (None if paper else DEFAULT_FITNESS_SAMPLES)
    pairs = [tuple(p) for p in search["init_args"]["ratio_pairs"]]
    assert pairs == list(PAPER_RATIO_PAIRS if paper else DEFAULT_RATIO_PAIRS)


_DDP_CONFIG = """
seed_everything: 0
model:
  model: test_vit
  model_kwargs: {{img_size: 32}}
data:
  data_dir: {images}
  batch_size: 2
  num_local_crops: 2
trainer:
  accelerator: cpu
  max_epochs: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: snapvit_lightning.search.EvolutionarySearch
      init_args: {{max_evals: 4, autocast: false}}
    - class_path: snapvit_lightning.export.ElasticExport
      init_args: {{dirpath: {out}, budgets: [[0.0, 0.0], [0.35, 0.2]]}}
"""


def test_fit_with_two_ddp_processes_equals_one(tmp_path) -> None:
    """`snapvit fit` on 2 CPU processes (DDP, gloo) writes the same elastic checkpoint as 1 process.

    Seven images: Lightning's DistributedSampler would score one of them twice under DDP.
    """
    import os

    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    for i in range(7):  # not divisible by the ranks: one rank's share is evened out by a repeated image, not scored
        folder = tmp_path / "images" / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"out{devices}"
        config = tmp_path / f"config{devices}.yaml"
        config.write_text(_DDP_CONFIG.format(images=tmp_path / "images", out=out))
        cmd = [sys.executable, "-m", "snapvit_lightning.cli", "fit", "--config", str(config), "--trainer.devices", str(devices)]
        if devices > 1:
            cmd += ["--trainer.strategy", "ddp"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = load_file(str(out / "test_vit.elastic.safetensors"))
    one, two = results[1], results[2]
    assert set(one) == set(two)
    for key in one:
        if key.startswith("scores.mlp") or key.startswith("scores.heads"):
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-9)
        else:  # permuted weights, unit orders, search weights and covariance: identical
            assert torch.equal(two[key], one[key]), key


# ------------------------------------------------------------------------------ resuming an interrupted fit

_RESUME_CONFIG = """
seed_everything: 0
model:
  model: test_vit
  model_kwargs: {{img_size: 32}}
data:
  data_dir: {images}
  batch_size: 2
  num_local_crops: 2
trainer:
  accelerator: cpu
  max_epochs: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: snapvit_lightning.search.EvolutionarySearch
      init_args: {{max_evals: 4, autocast: false, log_every_n_evals: 0}}
    - class_path: snapvit_lightning.export.ElasticExport
      init_args: {{dirpath: {out}, budgets: [[0.0, 0.0], [0.35, 0.2]]}}
"""


class CrashAtBatch(Callback):
    """Raise at the start of training batch ``batch_idx`` (simulates a killed run)."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.batch_idx:
            raise RuntimeError(f"simulated crash at batch {batch_idx}")


class RecordBatches(Callback):
    """Record the batch indices trained and the module's sample count at the end (class-level)."""

    seen: list[int] = []
    num_samples: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        RecordBatches.seen.append(batch_idx)

    def on_train_end(self, trainer, pl_module) -> None:
        RecordBatches.num_samples = pl_module.num_samples


def _images(root, n: int) -> None:
    import numpy as np
    from PIL import Image

    for i in range(n):
        folder = root / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_fit_interrupted_and_resumed_from_checkpoint_equals_uninterrupted(tmp_path, one_thread, capsys) -> None:
    """`snapvit fit --ckpt_path` after a crash mid-scoring writes the same elastic checkpoint as one run."""
    from safetensors.torch import load_file

    _images(tmp_path / "images", 9)  # batches of 2: 5 batches, the last one incomplete
    here = __name__
    ckpt_cb = (
        '--trainer.callbacks+={"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": '
        f'{{"dirpath": "{tmp_path / "ckpts"}", "every_n_train_steps": 2, "save_top_k": -1, '
        '"save_on_train_epoch_end": false}}'
    )

    def fit(name: str, *extra: str) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        config = tmp_path / f"{name}.yaml"
        config.write_text(_RESUME_CONFIG.format(images=tmp_path / "images", out=out))
        RecordBatches.seen, RecordBatches.num_samples = [], None
        main(["fit", "--config", str(config), *extra, f"--trainer.callbacks+={here}.RecordBatches"])
        return load_file(str(out / "test_vit.elastic.safetensors"))

    straight = fit("straight", "--trainer.enable_checkpointing", "false")
    assert RecordBatches.seen == [0, 1, 2, 3, 4] and RecordBatches.num_samples == 9

    with pytest.raises(RuntimeError, match="simulated crash at batch 3"):  # checkpoint after step 2, crash in step 4
        fit("crashed", "--trainer.enable_checkpointing", "true", ckpt_cb, f"--trainer.callbacks+={here}.CrashAtBatch",
            "--trainer.callbacks.batch_idx", "3")
    assert not (tmp_path / "crashed" / "test_vit.elastic.safetensors").exists()
    ckpt = tmp_path / "ckpts" / "epoch=0-step=2.ckpt"
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == [ckpt.name]
    raw = torch.load(ckpt, weights_only=True)  # plain tensors and values only
    assert raw["snapvit_scoring"]["num_samples"] == 4 and raw["snapvit_scoring"]["scores"] is None
    (loader_state,) = raw["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # torchdata's StatefulDataLoader
    assert loader_state["num_samples"] == 9 and loader_state["_num_yielded"] == 2

    with pytest.raises(SystemExit) as exc:  # Lightning would take the checkpoint's accumulation without a word
        fit("changed", "--trainer.enable_checkpointing", "false", "--ckpt_path", str(ckpt), "--model.accumulation", "fisher")
    assert exc.value.code == 2 and not (tmp_path / "changed").exists()
    assert "changes: model.accumulation='fisher' (the checkpoint's: 'sum_then_square')" in capsys.readouterr().err
    _images(tmp_path / "others", 9)  # as many images as the checkpoint's, in another folder: other crops after the skip
    Image.fromarray(np.zeros((50, 40, 3), dtype=np.uint8)).save(tmp_path / "others" / "a" / "0.png")  # one differs
    for option, value, said in (("--data.seed", "5", "data.seed=5 (the checkpoint's: 0)"),
                                ("--data.batch_size", "3", "data.batch_size=3 (the checkpoint's: 2)"),
                                ("--data.num_workers", "1", "data.num_workers=1 (the checkpoint's: 0)"),  # torchdata's state
                                ("--data.data_dir", str(tmp_path / "others"), "data.images='")):
        with pytest.raises(SystemExit) as exc:
            fit("changed", "--trainer.enable_checkpointing", "false", "--ckpt_path", str(ckpt), option, value)
        assert exc.value.code == 2 and not (tmp_path / "changed").exists()  # the Lightning checkpoint's own data
        assert f"a resumed fit continues the checkpoint's scoring, whose calibration data this one changes: {said}" \
            in capsys.readouterr().err

    old = {k: v for k, v in torch.load(ckpt, weights_only=True).items() if k != "CalibrationDataModule"}
    torch.save(old, tmp_path / "old.ckpt")  # as saved before the datamodule compared: its options, as given
    with pytest.raises(SystemExit) as exc:
        fit("changed", "--trainer.enable_checkpointing", "false", "--ckpt_path", str(tmp_path / "old.ckpt"), "--data.seed", "5")
    assert exc.value.code == 2 and "whose calibration data this one changes: data.seed=5 (the checkpoint's: 0)" \
        in capsys.readouterr().err
    began = raw["snapvit_scoring"]["precision"]["trainer_precision"]
    other = "bf16-mixed" if began == "32-true" else "32-true"
    with pytest.raises(SystemExit) as exc:  # half the gradients in one precision, half in the other
        fit("changed", "--trainer.enable_checkpointing", "false", "--ckpt_path", str(ckpt), "--trainer.precision", other)
    assert exc.value.code == 2 and f"the checkpoint's scoring ran in {began} (this fit: {other})" \
        in capsys.readouterr().err
    shutil.copytree(tmp_path / "images", tmp_path / "moved")  # the same images elsewhere (a re-mounted scratch folder)
    resumed = fit("resumed", "--trainer.enable_checkpointing", "false", "--ckpt_path", str(ckpt),
                  "--data.data_dir", os.path.relpath(tmp_path / "moved"), "--trainer.precision", "auto")
    # auto probed again (and could choose otherwise): it takes the checkpoint's choice
    assert f"precision: {began}, as the resumed checkpoint's scoring began" in capsys.readouterr().out
    assert RecordBatches.seen == [2, 3, 4]  # only the remaining batches, none counted twice
    assert RecordBatches.num_samples == 9
    assert set(resumed) == set(straight)
    for key, value in straight.items():
        assert torch.equal(resumed[key], value), key
    # a checkpoint whose scoring the probe chose: auto applies that record (attention kernel, search) with no new probe
    record = {"trainer_precision": "32-true", "scoring": "fp32-explicit", "scoring_explicit_attention": True,
              "search": "fp32-explicit", "search_autocast": None, "search_explicit_attention": True, "tf32": False}
    probed = torch.load(ckpt, weights_only=True)
    probed["snapvit_scoring"]["precision"] = {"trainer_precision": "32-true", "explicit_attention": True, "probe": record}
    torch.save(probed, tmp_path / "probed.ckpt")
    fit("probed", "--trainer.enable_checkpointing", "false", "--ckpt_path", str(tmp_path / "probed.ckpt"),
        "--trainer.precision", "auto")
    assert "precision probe" not in capsys.readouterr().out
    from snapvit_lightning.checkpoint import read_metadata

    meta = json.loads(read_metadata(tmp_path / "probed" / "test_vit.elastic.safetensors")["scores_meta"])
    scoring = ("trainer_precision", "scoring", "scoring_explicit_attention")  # the config's search: autocast false
    assert {k: meta["build_info"]["precision"][k] for k in scoring} == {k: record[k] for k in scoring}
    # the checkpoint's precision given explicitly: its probe's attention kernel is taken too (it was refused)
    fit("probed32", "--trainer.enable_checkpointing", "false", "--ckpt_path", str(tmp_path / "probed.ckpt"),
        "--trainer.precision", "32-true")
    meta = json.loads(read_metadata(tmp_path / "probed32" / "test_vit.elastic.safetensors")["scores_meta"])
    assert {k: meta["build_info"]["precision"][k] for k in scoring} == {k: record[k] for k in scoring}

    # A checkpoint saved at the epoch's end: the resumed fit runs nothing, which is an error, not status 0.
    end = ckpt_cb.replace('"every_n_train_steps": 2, ', "").replace('"save_on_train_epoch_end": false', '"save_on_train_epoch_end": true')
    fit("ended", "--trainer.enable_checkpointing", "true", end.replace("ckpts", "end_ckpts"))
    (ended,) = (tmp_path / "end_ckpts").iterdir()
    with pytest.raises(SystemExit) as exc, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit("after_end", "--trainer.enable_checkpointing", "false", "--ckpt_path", str(ended))
    assert exc.value.code == 2 and not (tmp_path / "after_end").exists()
    assert not [w for w in caught if "no on_train_end callback ran" in str(w.message)]  # said once, by the error
    assert "was saved after the scoring epoch had ended, so the resumed fit ran no search and wrote nothing" in capsys.readouterr().err
    # a mid-epoch checkpoint resumed with --trainer.max_steps at its step: the command's limit, not the checkpoint
    with pytest.raises(SystemExit) as exc:
        fit("limited", "--trainer.enable_checkpointing", "false", "--ckpt_path", str(ckpt), "--trainer.max_steps", "2")
    assert exc.value.code == 2 and not (tmp_path / "limited").exists()
    assert ("the resumed fit stopped before a step (max_steps=2, at the checkpoint's step 2), so nothing was searched "
            "or written; resume without max_steps") in capsys.readouterr().err


class _Canary:
    """Unpickling it creates a file: a checkpoint that runs code when read without weights_only."""

    def __init__(self, path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("given", ["file", "last"])
def test_a_checkpoint_holding_pickled_objects_is_never_unpickled(tmp_path, capsys, monkeypatch, given) -> None:
    # --ckpt_path last skipped the command's weights-only check, and Lightning read the file with torch's default:
    # under torch < 2.6 (here forced by torch's own variable) that ran the pickle.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    _images(tmp_path / "images", 4)
    config = tmp_path / "c.yaml"
    config.write_text(_RESUME_CONFIG.format(images=tmp_path / "images", out=tmp_path / "out"))
    (tmp_path / "ck").mkdir()
    torch.save({"pytorch-lightning_version": "2.6.0", "state_dict": {}, "x": _Canary(tmp_path / "ran")},
               tmp_path / "ck" / "last.ckpt")
    extra = (["--trainer.enable_checkpointing", "true", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
              "--trainer.callbacks.dirpath", str(tmp_path / "ck"), "--ckpt_path", "last"] if given == "last"
             else ["--ckpt_path", str(tmp_path / "ck" / "last.ckpt")])
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), "--trainer.precision", "32-true", *extra])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "holds pickled objects besides tensors and plain values, which are never unpickled" in err
    assert "Traceback" not in err and not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), "--weights_only", "false"])
    assert exc.value.code == 2 and "--weights_only false would unpickle what the checkpoint holds" in capsys.readouterr().err


def test_a_spawned_ranks_refusal_of_a_pickled_checkpoint_is_the_same_line() -> None:
    # under ddp_spawn torch wraps the rank's UnpicklingError in ProcessRaisedException: an 83-line traceback, status 1
    from torch.multiprocessing import ProcessRaisedException

    from snapvit_lightning.precision_cli import AutoPrecisionCLI

    class Spawned:
        def fit(self, **kwargs):
            raise ProcessRaisedException("_pickle.UnpicklingError: Weights only load failed. ...", 1, 123)

    cli = AutoPrecisionCLI.__new__(AutoPrecisionCLI)
    cli.trainer = Spawned()
    with pytest.raises(ValueError, match=r"^--ckpt_path last: the checkpoint holds pickled objects besides tensors"):
        cli.fit(ckpt_path="last")
    Spawned.fit = lambda self, **kwargs: (_ for _ in ()).throw(ProcessRaisedException("RuntimeError: other", 1, 123))
    with pytest.raises(ProcessRaisedException, match="other"):  # any other failure of a rank passes unchanged
        cli.fit(ckpt_path="last")


def test_a_bad_checkpoint_file_is_one_line_before_the_fit(tmp_path, capsys) -> None:
    _images(tmp_path / "images", 4)
    config = tmp_path / "c.yaml"
    config.write_text(_RESUME_CONFIG.format(images=tmp_path / "images", out=tmp_path / "out"))
    good = tmp_path / "good.ckpt"
    torch.save({"pytorch-lightning_version": "2.6.0", "state_dict": {"w": torch.ones(64)}}, good)
    (tmp_path / "truncated.ckpt").write_bytes(good.read_bytes()[:300])
    (tmp_path / "text.ckpt").write_text("hello\n")
    (tmp_path / "report.json").write_text('{"budgets": []}\n')  # torch's 490-character pickle text before
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    for name, said in (("truncated.ckpt", "not a readable Lightning checkpoint (truncated, corrupt or not a torch "
                                          "file?): torch.load raised RuntimeError: PytorchStreamReader failed"),
                       ("text.ckpt", "not a readable Lightning checkpoint (truncated, corrupt or not a torch file?)"),
                       ("report.json", "a JSON file (a report?), not a Lightning checkpoint: give a .ckpt file"),
                       ("plain.pt", "a torch file, but not a Lightning checkpoint (no 'pytorch-lightning_version')"),
                       ("images", "a folder; give a .ckpt file a ModelCheckpoint saved"),
                       ("missing.ckpt", "not found; give a .ckpt file a ModelCheckpoint saved")):
        with pytest.raises(SystemExit) as exc:
            main(["fit", "--config", str(config), "--ckpt_path", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"snapvit fit: error: --ckpt_path {tmp_path / name}: {said}" in err, err
        assert "Traceback" not in err and not (tmp_path / "out").exists()


def _image_folder(path, n: int = 6):
    import numpy as np
    from PIL import Image

    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (180, 200, 3), dtype=np.uint8)).save(path / f"{i}.png")
    return path


def test_stats_and_corrected_slice(tmp_path, capsys) -> None:
    from snapvit_lightning.correction import CorrectionStats
    from snapvit_lightning.elastic import load_subnet

    model, name, kwargs = tiny_model("test_vit")
    path = tmp_path / "m.elastic.safetensors"
    ElasticViT(model, ImportanceScores(torch.rand(6, 192), torch.rand(6, 2)), model_name=name, model_kwargs=kwargs).save(path)
    photos = _image_folder(tmp_path / "photos")
    out = tmp_path / "s.safetensors"
    with pytest.raises(SystemExit) as exc:  # no statistics yet
        main(["slice", str(path), "--flops", "0.6", "--correct", "lstsq", "-o", str(out)])
    assert exc.value.code == 2 and "snapvit stats" in capsys.readouterr().err
    assert main(["stats", str(path), "--data", str(photos)]) == 0
    assert "6 images (8 views each: 48 inputs" in capsys.readouterr().out
    stats = CorrectionStats.load(tmp_path / "m.stats.safetensors")
    assert stats.has_ranking and stats.views_per_image == 8  # `snapvit stats` also stores the ranking, and the views
    assert main(["slice", str(path), "--mlp-ratio", "0.4", "--head-ratio", "0.5", "--correct", "lstsq", "-o", str(out)]) == 0
    elastic = ElasticViT.load(path)
    expected = elastic.subnet(0.4, 0.5, correct="lstsq", calibration=stats)
    view = elastic.ranked_view(stats)
    sliced = view.slice(view.dims(0.4, 0.5), correct="lstsq")  # the ranked cut
    for a, b, c in zip(load_subnet(out).state_dict().values(), expected.state_dict().values(), sliced.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert main(["info", str(path), "--budgets", "0.4,0.5"]) == 0
    assert "ranking: the statistics carry the corrected path's own ranking" in capsys.readouterr().out
    CorrectionStats(stats.attn, stats.mlp, stats.num_images, stats.num_tokens, stats.fingerprint).save(tmp_path / "m.stats.safetensors")
    assert main(["info", str(path), "--budgets", "0.4,0.5"]) == 0  # statistics without a ranking (as version 2 wrote)
    assert "ranking: none in the statistics" in capsys.readouterr().out
    assert main(["slice", str(path), "--mlp-ratio", "0.4", "--head-ratio", "0.5", "-o", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    expected = elastic.slice(elastic.dims(0.4, 0.5), correct="lstsq", calibration=stats)  # the checkpoint's prefix
    assert all(torch.equal(a, b) for a, b in zip(load_subnet(out).state_dict().values(), expected.state_dict().values()))
    # An image folder works too (one-shot or sequential), and the options are checked.
    assert main(["slice", str(path), "--flops", "0.7", "--correct", "bias", "--calibration", str(photos),
                 "--sequential", "-o", str(out), "--overwrite"]) == 0
    one = sorted(p for p in photos.rglob("*") if p.is_file())[0]  # one image file, as a folder of one
    assert main(["slice", str(path), "--flops", "0.7", "--correct", "bias", "--calibration", str(one),
                 "-o", str(out), "--overwrite"]) == 0
    assert "statistics and ranking collected there" in capsys.readouterr().out
    # images give what `snapvit stats` then `slice` give: statistics of their views, with the ranking
    collected = elastic.collect_stats(load_calibration_views(one, elastic.model)[0], ranking=True)
    expected = elastic.subnet(flops=0.7, correct="bias", calibration=collected)
    assert all(torch.equal(a, b) for a, b in zip(load_subnet(out).state_dict().values(), expected.state_dict().values()))
    for argv, match in (
        (["--no-correct", "--calibration", str(photos)], "not --no-correct"),
        (["--no-correct", "--correct", "bias"], "give --no-correct or --correct bias, not both"),
        (["--correct", "lstsq", "--sequential"], "--sequential needs an image folder as --calibration, got none (statistics do not do)"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["slice", str(path), "--flops", "0.7", "-o", str(out), "--overwrite", *argv])
        assert exc.value.code == 2 and match in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # stats exist, no --overwrite
        main(["stats", str(path), "--data", str(photos)])
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err


# ------------------------------------------------------------------------------ a quiet console

#: A warning line (``file.py:N: message``) or one of Lightning's tips.
WARNING_LINE = re.compile(r"\.py:\d+: |💡 Tip|PossibleUserWarning|^snapvit[ a-z]*: warning: |^python -m snapvit_lightning.quickstart: warning: ")
#: Lightning's notices that a scoring run caused before they were silenced at their source.
SCORING_NOTICES = ("returned `None`", "module(s) in eval mode", "args parameter is intended", "model summary",
                   "litlogger", "LeafSpec", "logging interval", "Modules in eval mode")


def quiet_config(images, out) -> str:
    """The DDP test's tiny run with a CSV logger, bf16, progress bars and model summary as the CLI defaults."""
    import yaml

    config = yaml.safe_load(_DDP_CONFIG.format(images=images, out=out))
    trainer = config["trainer"]
    for key in ("enable_progress_bar", "enable_model_summary"):
        del trainer[key]
    trainer["precision"] = "bf16-mixed"
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out), "name": "log"}}
    trainer["callbacks"][0]["init_args"] = {"max_evals": 3, "ratio_pairs": [[0.35, 0.2], [0.65, 0.5]]}
    return yaml.safe_dump(config)


def warning_lines(text: str) -> list[str]:
    """The warning lines of a console output (progress-bar redraws split at carriage returns)."""
    return [line for line in text.replace("\r", "\n").splitlines() if WARNING_LINE.search(line)]


def test_fit_console_is_quiet_and_the_search_logs_its_curves(tmp_path) -> None:
    """`snapvit fit` with a logger, bf16 and progress bars: no Lightning chatter a scoring run causes."""
    import csv
    import os

    _images(tmp_path / "images", 4)
    out = tmp_path / "out"
    config = tmp_path / "config.yaml"
    config.write_text(quiet_config(tmp_path / "images", out))
    cmd = [sys.executable, "-m", "snapvit_lightning.cli", "fit", "--config", str(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert len(warning_lines(console)) <= 3, warning_lines(console)
    assert [n for n in SCORING_NOTICES if n in console] == []
    assert "Search: 100%" in console and "best=" in console  # the search's bar, under the training bar
    with (out / "log" / "version_0" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["search/fitness"]]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert all(r["search/cos_mlp0.35_head0.2"] and r["search/cos_mlp0.65_head0.5"] for r in rows)


def test_fit_without_an_export_warns_that_it_writes_nothing(tmp_path, monkeypatch) -> None:
    import warnings

    monkeypatch.chdir(tmp_path)
    photos = _image_folder(tmp_path / "photos", n=4)
    base = ["fit", "--model.model", "test_vit", "--model.model_kwargs", "{img_size: 32}", "--data.data_dir", str(photos),
            "--data.batch_size", "2", "--data.num_local_crops", "2", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.precision", "32-true"]
    with pytest.warns(UserWarning, match="this fit has no ElasticExport callback, so it writes no elastic model"):
        main([*base[:-1], "bf16"])  # Lightning's short name of bf16-mixed is accepted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main([*base, "--trainer.callbacks+=snapvit_lightning.export.ElasticExport", "--trainer.callbacks.dirpath",
              str(tmp_path / "out"), "--trainer.callbacks.correct", "none"])
    assert not [w for w in caught if "writes nothing" in str(w.message) or "exports 2 times" in str(w.message)]
    assert (tmp_path / "out" / "test_vit.elastic.safetensors").is_file()
    # the config it ran, beside the export (only the main job wrote one), as `snapvit fit --config` re-runs it
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["trainer"]["callbacks"][-1]["init_args"]["dirpath"] == str(tmp_path / "out")
    assert saved["data"]["data_dir"] == str(photos) and saved["model"]["model"] == "test_vit"
    export = ["--trainer.callbacks+=snapvit_lightning.export.ElasticExport", "--trainer.callbacks.correct", "none"]
    with pytest.warns(UserWarning, match=r"this fit has 2 ElasticExport callbacks, so it exports 2 times \(.*a, .*b\)"):
        main([*base, *export, "--trainer.callbacks.dirpath", str(tmp_path / "a"), *export,  # a config's, then one more
              "--trainer.callbacks.dirpath", str(tmp_path / "b")])


def test_slice_says_and_records_how_it_cut(tmp_path, capsys) -> None:
    # --damping and --sequential were not in slice's line, and a subnet file did not say how it was cut.
    from test_errors import _photos

    from snapvit_lightning.checkpoint import read_metadata
    from snapvit_lightning.elastic import load_subnet
    from snapvit_lightning.structure import block_dims

    model, name, kwargs = tiny_model("test_vit")
    elastic = ElasticViT(model, ImportanceScores(torch.rand(6, 192), torch.rand(6, 2)), model_name=name, model_kwargs=kwargs)
    path = tmp_path / "e.elastic.safetensors"
    elastic.save(path)
    _photos(tmp_path / "photos", n=3)
    out = tmp_path / "s.safetensors"
    argv = ["slice", str(path), "--flops", "0.6", "--calibration", str(tmp_path / "photos"), "-o", str(out), "--overwrite"]
    for extra, said in ((["--damping", "0.1"], "correction lstsq (calibration photos: statistics and ranking collected there, damping 0.1)"),
                        (["--correct", "bias", "--sequential"], "correction bias (calibration photos, sequential)")):
        assert main([*argv, *extra]) == 0
        assert said in capsys.readouterr().out
        budget = read_metadata(out)["budget"]
        assert budget["correction"] == said.removeprefix("correction ") and budget["elastic"] == path.name
        assert budget["requested"] == {"flops": 0.6}
        sizes = [(d.num_heads, d.mlp_hidden) for d in map(block_dims, load_subnet(out).blocks)]
        plain = [(d.num_heads, d.mlp_hidden) for d in elastic.dims(budget["mlp_ratio"], budget["head_ratio"])]
        if "sequential" in said:  # the checkpoint's own cut
            assert sizes == plain
        else:  # the ranking collected from the images: as many units in all, spread by it
            assert [sum(column) for column in zip(*sizes)] == [sum(column) for column in zip(*plain)]
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"cut from {path.name} (asked: flops 0.6): mlp_ratio" in printed
    cost, size = model_cost(load_subnet(out)), model.patch_embed.img_size
    assert f"input {size[0]} x {size[1]} px, {cost['params']:,} params, {cost['flops']:,} FLOPs per image" in printed
    with pytest.raises(SystemExit) as exit_:  # was "no correction statistics file at ...", for a folder given
        main([*argv[:4], "--calibration", str(tmp_path / "nope"), "-o", str(tmp_path / "t.safetensors")])
    assert exit_.value.code == 2
    assert f"--calibration: '{tmp_path / 'nope'}' does not exist (give a statistics file" in capsys.readouterr().err
    from safetensors import safe_open
    from safetensors.torch import load_file

    from snapvit_lightning.file_io import write_safetensors

    with safe_open(str(out), "pt") as f:  # save_subnet refuses a budget that is not a dict: crafted by hand
        meta = {**f.metadata(), "budget": "[0.5]"}
    write_safetensors(tmp_path / "odd.safetensors", load_file(out), meta)  # refused on read
    with pytest.raises(ValueError, match="metadata 'budget' must be a JSON object"):
        read_metadata(tmp_path / "odd.safetensors")


def test_info_says_when_the_fidelity_was_measured_on_the_calibration_images(tmp_path, capsys) -> None:
    from snapvit_lightning.export import export_elastic

    model, name, kwargs = tiny_model("test_vit")
    elastic = ElasticViT(model, ImportanceScores(torch.rand(6, 192), torch.rand(6, 2)), model_name=name, model_kwargs=kwargs)
    images = torch.randn(4, 3, *elastic.input_size, generator=torch.Generator().manual_seed(0))
    result = export_elastic(elastic, tmp_path, budgets=[(0.4, 0.5)], fitness_images=images, calibration_images=images)
    assert result["report"]["correction"]["fidelity_images_are_calibration_images"] is True
    path = result["paths"]["elastic"]
    assert main(["info", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "4 images; in-sample: the images the run calibrated on, so it flatters):" in printed
    stats = path.with_name(path.name.replace(".elastic.", ".stats."))  # named, not a STATS placeholder
    assert f"held out: `snapvit bench {path} --data TEST_DIR --correct lstsq --calibration {stats}`" in printed


def test_slice_and_info_are_corrected_by_default_when_stats_exist(tmp_path, capsys) -> None:
    import copy

    from snapvit_lightning.elastic import load_subnet
    from snapvit_lightning.export import export_elastic
    from snapvit_lightning.structure import slice_model

    model, name, kwargs = tiny_model("test_vit")
    elastic = ElasticViT(model, ImportanceScores(torch.rand(6, 192), torch.rand(6, 2)), model_name=name, model_kwargs=kwargs)
    images = torch.randn(6, 3, *elastic.input_size, generator=torch.Generator().manual_seed(0))
    result = export_elastic(elastic, tmp_path, budgets=[(0.0, 0.0), (0.4, 0.5)], fitness_images=images[:3],
                            calibration_images=images[3:])
    path = result["paths"]["elastic"]
    plain_reference = copy.deepcopy(elastic.model)  # today's plain cut, built without subnet()
    slice_model(plain_reference, elastic.dims(0.4, 0.5))
    stats = result["paths"]["stats"]
    argv = ["slice", str(path), "--mlp-ratio", "0.4", "--head-ratio", "0.5", "--overwrite", "-o"]
    for extra, expected, said in (
        # the statistics' name, not their path on the slicing machine (the subnet file records it)
        ([], ElasticViT.load(path).subnet(0.4, 0.5), f"correction lstsq (default, statistics {stats.name}, damping automatic)"),
        (["--no-correct"], plain_reference, "correction none (the plain cut)"),
        (["--correct", "none"], plain_reference, "correction none (the plain cut)"),
    ):
        out = tmp_path / "s.safetensors"
        assert main([*argv, str(out), *extra]) == 0
        assert said in capsys.readouterr().out
        got, want = load_subnet(out).state_dict(), expected.state_dict()
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in got), extra
    corrected = ElasticViT.load(path).subnet(0.4, 0.5).state_dict()
    assert not all(torch.equal(corrected[k], v) for k, v in plain_reference.state_dict().items())
    assert main(["info", str(path), "--budgets", "0.4,0.5"]) == 0
    printed = capsys.readouterr().out
    assert f"correction statistics: {stats} (3 inputs" in printed and "lstsq-corrected by default" in printed
    from snapvit_lightning.correction import CorrectionStats, stats_damping

    stored = CorrectionStats.load(stats)
    assert f"damping {stats_damping(None, stored):.3g} (automatic, from {stored.num_images} inputs, {stored.num_tokens} tokens)" in printed
    assert "ranking: the statistics carry the corrected path's own ranking" in printed  # the export stored one
    fidelity = {(f"{b['mlp_ratio']:.2f}", f"{b['head_ratio']:.2f}"): b for b in result["report"]["budgets"]}
    row = [r for r in printed.splitlines() if r.split()[:4] == ["mlp_ratio", "head_ratio", "flops", "%"]]
    assert row and row[0].split()[-1] == "(lstsq)"
    half = fidelity[("0.40", "0.50")]
    line = [r for r in printed.splitlines() if r.split()[:2] == ["0.40", "0.50"] and f"{half['fidelity']:.4f}" in r]
    assert line and line[0].split()[-2:] == [f"{half['fidelity']:.4f}", f"{half['fidelity_corrected']:.4f}"]
    assert not [r for r in printed.splitlines() if r.split()[:2] == ["0.00", "0.00"]]  # --budgets: the fidelity table too
    assert "in-sample" not in printed and "held out:" not in printed  # other images than the calibration's
    assert main(["info", str(path), "--budgets", "0.3,0.2"]) == 0
    assert "fidelity: report.json measured none of --budgets (its budgets: 0,0, 0.4,0.5)" in capsys.readouterr().out
    # The budgets table shows the cut `slice` gives: the corrected subnet's blocks, or with --no-correct the plain cut's.
    def kept(subnet) -> list[str]:
        return [f"{b.attn.num_heads}/{b.mlp.fc1.out_features}" for b in subnet.blocks]

    def table_row(text: str) -> list[str]:
        header = [r for r in text.splitlines() if r.split()[:3] == ["mlp_ratio", "head_ratio", "params"]]
        rows = [r.split() for r in text.splitlines() if r.split()[:2] == ["0.40", "0.50"] and "%" in r.split()[4]]
        return [header[0].split()[-2][1:] + " " + header[0].split()[-1][:-1], *rows[0][5:]]

    assert table_row(printed) == ["corrected cut", *kept(ElasticViT.load(path).subnet(0.4, 0.5))]
    assert kept(ElasticViT.load(path).subnet(0.4, 0.5)) != kept(plain_reference)  # the test means something
    assert main(["info", str(path), "--budgets", "0.4,0.5", "--no-correct"]) == 0
    printed_plain = capsys.readouterr().out
    assert table_row(printed_plain) == ["plain cut", *kept(plain_reference)]
    assert "the table shows the plain cut (--no-correct)" in printed_plain
    assert main(["info", str(path), "--budgets", "0.4,0.5", "--latency"]) == 0  # times the cut the table shows
    timed, blocks = table_row(capsys.readouterr().out), kept(ElasticViT.load(path).subnet(0.4, 0.5))
    assert timed[0] == "corrected cut" and timed[-len(blocks):] == blocks
    # Statistics replaced (other images, as many): the report's corrected fidelity no longer describes them.
    assert result["report"]["correction"]["stats_digest"] == CorrectionStats.load(stats).digest  # survives the file
    assert "corrected: not shown" not in printed
    other = ElasticViT.load(path, stats=False).collect_stats(images[:3].flip(-1), ranking=True)
    other.save(stats)
    assert other.num_images == stored.num_images and other.digest != stored.digest
    assert main(["info", str(path)]) == 0
    printed = capsys.readouterr().out
    assert ("corrected: not shown, the statistics now beside the checkpoint (3 inputs) are not those the report "
            "measured it with (3 inputs)") in printed and "--correct lstsq` measures the subnets corrected with them" in printed
    assert len([r for r in printed.splitlines() if r.split()[:2] == ["0.00", "0.00"]]) == 2  # both tables, by default
    line = [r for r in printed.splitlines() if r.split()[:2] == ["0.40", "0.50"] and f"{half['fidelity']:.4f}" in r]
    assert line and line[0].split()[-2:] == [f"{half['fidelity']:.4f}", "-"]
    # Without the statistics file: the plain cut, and the printed line says why.
    stats.unlink()
    out = tmp_path / "p.safetensors"
    assert main(["slice", str(path), "--mlp-ratio", "0.4", "--head-ratio", "0.5", "-o", str(out)]) == 0
    assert "correction none (no statistics at" in capsys.readouterr().out
    assert main(["info", str(path)]) == 0  # gone: bench fits its own (it said "corrected with them")
    assert ("the report's statistics are no longer beside the checkpoint; `snapvit bench" in (gone := capsys.readouterr().out)
            and "--correct lstsq` measures subnets corrected with statistics fit on FOLDER" in gone)
    got, want = load_subnet(out).state_dict(), plain_reference.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_fast_dev_run_checks_the_set_up_and_writes_nothing(tmp_path, monkeypatch, capsys) -> None:
    # It ran the whole search and wrote a full export from one batch: with the main job's overwrite: true,
    # a smoke test replaced the real results.
    from test_errors import _photos

    from snapvit_lightning.search import EvolutionarySearch

    monkeypatch.chdir(tmp_path)
    _photos(tmp_path / "photos", n=4)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.json").write_text("{}")  # an earlier export (no overwrite: a smoke test writes nothing)
    seen = []
    end = EvolutionarySearch.on_train_end

    def record(self, trainer, module):
        end(self, trainer, module)
        seen.append(len(self.history))

    monkeypatch.setattr(EvolutionarySearch, "on_train_end", record)
    assert main(["fit", "--model.model", "test_vit", "--model.model_kwargs", "{img_size: 32}", "--data.data_dir",
                 str(tmp_path / "photos"), "--data.holdout", "2", "--trainer.precision", "32-true", "--trainer.logger",
                 "false", "--trainer.enable_progress_bar", "false", "--trainer.fast_dev_run", "true",
                 "--trainer.callbacks+=snapvit_lightning.search.EvolutionarySearch", "--trainer.callbacks.max_evals", "40",
                 "--trainer.callbacks.popsize", "6", "--trainer.callbacks+=snapvit_lightning.export.ElasticExport",
                 "--trainer.callbacks.dirpath", str(tmp_path / "out")]) == 0
    assert seen == [6]  # one generation
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["report.json"] and (tmp_path / "out" / "report.json").read_text() == "{}"


def test_options_before_config_are_named(capsys) -> None:
    # jsonargparse applies them in order: the config's precision and batch size replaced them without a word
    with pytest.raises(SystemExit), pytest.warns(UserWarning, match=(
            r"^--trainer.precision, --data.batch_size come before --config, whose values replace them: put --config "
            r"first$")):
        main(["fit", "--trainer.precision", "32-true", "--data.batch_size=4", "--config", str(REPO / "configs" / "quickstart.yaml"),
              "--print_config"])
    assert "precision: auto" in capsys.readouterr().out
    config = str(REPO / "configs" / "quickstart.yaml")
    for argv in (["--data.batch_size=4", f"--config={config}"], ["--data.batch_size", "4", "-c", config],
                 ["--data.batch_size", "4", f"-c{config}"],
                 ["--config", config, "--data.batch_size", "4", "--config", config]):  # the last config counts
        with pytest.raises(SystemExit), pytest.warns(UserWarning, match=r"^--data.batch_size comes before --config, "
                                                                         r"whose values replace it: put"):
            main(["fit", *argv, "--print_config"])


def test_options_before_a_config_that_does_not_set_them_are_not_warned_about(tmp_path, capsys) -> None:
    # the warning named every option before --config, also those the config leaves alone (they stand)
    import warnings

    config = str(REPO / "configs" / "quickstart.yaml")
    with pytest.raises(SystemExit), warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*before --config")
        main(["fit", "--data.holdout", "3", "--data.seed=4", "--config", config, "--print_config"])
    out = capsys.readouterr().out
    assert "holdout: 3" in out and "seed: 4" in out
    (tmp_path / "list.yaml").write_text("trainer:\n  callbacks: []\n")  # a list replaces what was added to it
    with pytest.raises(SystemExit), pytest.warns(UserWarning, match=r"^--trainer.callbacks\+ comes before --config"):
        main(["fit", "--model.model", "test_vit", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
              "--config", str(tmp_path / "list.yaml"), "--print_config"])


def test_an_optimizer_is_refused(capsys) -> None:
    # LightningCLI adds --optimizer and --lr_scheduler; the scoring ran with them, ignored, and the same output
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--model.model", "test_vit", "--trainer.precision", "32-true", "--optimizer", "Adam"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "snapvit fit: error: optimizer: the scoring computes gradients and steps no weights, so optimizer would be "
        "ignored; remove --optimizer (or the config's key)")


def test_a_callback_added_twice_is_one_line(tmp_path, capsys) -> None:
    # Lightning's "Found more than one stateful callback" ended in a 40-line traceback with status 1
    search = "--trainer.callbacks+=snapvit_lightning.search.EvolutionarySearch"
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--model.model", "test_vit", "--model.model_kwargs", "{img_size: 32}", "--trainer.precision",
              "32-true", "--trainer.logger", "false", search, search, "--trainer.callbacks.max_evals", "4"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("snapvit fit: error: trainer.callbacks holds two EvolutionarySearch callbacks (--trainer.callbacks+= "
                       "adds one beside the config's): set the config's own callback options in a copy of the config")


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["slice", "--help"], ["--version"]])
def test_help_needs_neither_torch_nor_timm(argv) -> None:
    code = ("import sys\nfrom snapvit_lightning.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print([m for m in ('torch', 'timm', 'lightning') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True, cwd=REPO)
    assert done.stdout.splitlines()[-1] == "[]"


def test_stats_refuses_a_model_statistics_cannot_correct(tmp_path, capsys) -> None:
    kwargs = dict(depth=1, embed_dim=32, num_heads=2, img_size=32, scale_mlp_norm=True)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, **kwargs)
    path = tmp_path / "m.elastic.safetensors"
    ElasticViT(model, ImportanceScores(torch.rand(1, 128), torch.rand(1, 2)), model_name="vit_small_patch16_224",
               model_kwargs=kwargs).save(path)
    with pytest.raises(SystemExit) as exc:
        main(["stats", str(path), "--data", str(_image_folder(tmp_path / "photos"))])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "snapvit stats: error: statistics cannot correct this model" in err
    assert "--sequential --calibration DIR" in err and not (tmp_path / "m.stats.safetensors").exists()
    for extra in (["--correct", "lstsq"], ["--calibration", str(tmp_path / "photos")]):  # not collect_stats', nor "snapvit stats"
        with pytest.raises(SystemExit):
            main(["slice", str(path), "--flops", "0.8", *extra, "-o", str(tmp_path / "s.safetensors")])
        assert "snapvit slice: error: --correct lstsq: statistics cannot correct this model" in capsys.readouterr().err
    assert main(["slice", str(path), "--flops", "0.8", "--sequential", "--calibration", str(tmp_path / "photos"),
                 "-o", str(tmp_path / "s.safetensors")]) == 0  # what the message offers


def _saved_tiny_elastic(tmp_path) -> tuple[ElasticViT, Path]:
    model, name, kwargs = tiny_model("test_vit")
    path = tmp_path / "m.elastic.safetensors"
    elastic = ElasticViT(model, ImportanceScores(torch.rand(6, 192), torch.rand(6, 2)), model_name=name, model_kwargs=kwargs)
    elastic.save(path)
    return elastic, path


def test_slice_info_and_bench_name_a_ratio_beyond_the_blocks_minimum_by_the_cut_it_gives(tmp_path, capsys) -> None:
    # --mlp-ratio 0.99 wrote the 0.9479 cut (every block at its minimum keep) and recorded 0.99.
    _, path = _saved_tiny_elastic(tmp_path)
    out = tmp_path / "p.safetensors"
    assert main(["slice", str(path), "--mlp-ratio", "0.99", "--head-ratio", "0.9", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "--mlp-ratio 0.99 cuts as 0.9479: every block keeps its minimum" in printed
    assert "--head-ratio 0.9 cuts as 0.5000" in printed and "mlp_ratio 0.9479, head_ratio 0.5000" in printed
    budget = read_metadata(out)["budget"]
    assert budget["requested"] == {"mlp_ratio": 0.99, "head_ratio": 0.9} and budget["head_ratio"] == 0.5
    assert [b.mlp.fc1.out_features for b in load_subnet(out).blocks] == [10] * 6
    assert main(["info", str(path), "--budgets", "0.99,0.9", "0.3,0.2"]) == 0
    rows = [r.split()[:2] for r in capsys.readouterr().out.splitlines() if "%" in r and r.split()[0][0] == "0"]
    assert rows == [["0.95", "0.50"], ["0.30", "0.20"]]
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        Image.fromarray(np.full((40, 40, 3), 50 * i, dtype=np.uint8)).save(photos / f"{i}.png")
    assert main(["bench", str(path), "--data", str(photos), "--budgets", "0.99,0.9", "--no-latency",
                 "--out", str(tmp_path / "bench")]) == 0
    assert "--budgets 0.99,0.9 cuts as 0.9479,0.5000: every block keeps its minimum" in capsys.readouterr().out
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())["rows"]
    assert [(r["mlp_ratio"], r["head_ratio"]) for r in rows if not r["dense"]] == [(1 - 10 / 192, 0.5)]


def test_output_paths_long_names_home_and_broken_links(tmp_path, capsys, monkeypatch) -> None:
    _, path = _saved_tiny_elastic(tmp_path)
    long = tmp_path / ("c" * 235 + ".safetensors")  # a legal name; its staging name was too long (OSError traceback)
    assert main(["slice", str(path), "--flops", "0.6", "-o", str(long)]) == 0 and load_subnet(long) is not None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging file left
    with pytest.raises(SystemExit) as exc:
        main(["slice", str(path), "--flops", "0.6", "-o", str(tmp_path / ("c" * 300 + ".safetensors"))])
    assert exc.value.code == 2 and "-o: the file name is 312 bytes long; this file system takes at most" in capsys.readouterr().err
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["slice", str(path), "--flops", "0.6", "-o", "~/s.safetensors"]) == 0
    assert (tmp_path / "home" / "s.safetensors").is_file() and not (tmp_path / "~").exists()
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    with pytest.raises(SystemExit) as exc:
        main(["slice", str(path), "--flops", "0.6", "-o", str(tmp_path / "dangling" / "s.safetensors")])
    assert exc.value.code == 2 and "is a broken link (to '" in capsys.readouterr().err


def test_slice_by_a_parameter_fraction(tmp_path, capsys) -> None:
    # Python's subnet(params=...) had no command-line form ("unrecognized arguments: --params").
    elastic, path = _saved_tiny_elastic(tmp_path)
    out = tmp_path / "p.safetensors"
    assert main(["slice", str(path), "--params", "0.6", "-o", str(out)]) == 0
    assert read_metadata(out)["budget"]["requested"] == {"params": 0.6}
    expected = elastic.subnet(params=0.6)
    assert [b.mlp.fc1.out_features for b in load_subnet(out).blocks] == [b.mlp.fc1.out_features for b in expected.blocks]
    assert elastic.cost(elastic.dims(*elastic.resolve_budget(params=0.6)))["params_fraction"] <= 0.6
    for extra, said in ((["--flops", "0.5"], "give either --flops or --params, not both"),
                        (["--mlp-ratio", "0.5"], "give either --params or --mlp-ratio/--head-ratio, not both"),
                        (["--latency-ms", "5"], "give either --latency-ms or --flops/--params/--mlp-ratio/--head-ratio"),
                        ([], "--params: params=0.01 is below the smallest reachable fraction")):
        with pytest.raises(SystemExit) as exc:
            main(["slice", str(path), "--params", "0.01" if not extra else "0.6", *extra, "-o", str(tmp_path / "x.safetensors")])
        assert exc.value.code == 2 and said in capsys.readouterr().err


def test_slice_splits_a_fraction_budget_by_the_head_share(tmp_path, capsys) -> None:
    from snapvit_lightning.cli import build_parser
    from snapvit_lightning.correction import stats_path_for
    from snapvit_lightning.elastic import DEFAULT_HEAD_RATIO_SCALE
    from snapvit_lightning.scores import HEAD_SHARE_KNEE, budget_line

    elastic, path = _saved_tiny_elastic(tmp_path)
    elastic.collect_stats(torch.rand(6, 3, 32, 32), ranking=True).save(stats_path_for(path))  # corrected by default
    for extra, scale in (([], DEFAULT_HEAD_RATIO_SCALE), (["--head-ratio-scale", "1"], 1.0), (["--no-correct"], 1.0),
                         (["--no-correct", "--head-ratio-scale", "0.5"], 0.5)):
        out = tmp_path / f"s{len(extra)}{scale}.safetensors"
        assert main(["slice", str(path), "--flops", "0.6", *extra, "-o", str(out)]) == 0
        budget = read_metadata(out)["budget"]
        assert (budget["mlp_ratio"], budget["head_ratio"]) == elastic.resolve_budget(flops=0.6, head_ratio_scale=scale)
        assert budget["head_ratio"] == pytest.approx(budget_line(budget["mlp_ratio"], scale)[1])  # s * r, past the knee more
        assert (budget["head_ratio_scale"], budget["head_share_knee"]) == (scale, HEAD_SHARE_KNEE)  # how it was split
        said = (" (heads pruned at the neurons' ratio, down to every block's minimum)" if scale == 1 else f" (heads pruned at {scale:g} x the neurons' ratio "
                f"until {HEAD_SHARE_KNEE:g} of the neurons go, then both to every block's minimum)")
        assert said in capsys.readouterr().out
        assert main(["info", str(out)]) == 0
        assert said in capsys.readouterr().out  # slice and info say it alike
        if extra == ["--no-correct"]:  # the plain cut of a fraction as before: both alike
            assert [b.mlp.fc1.out_features for b in load_subnet(out).blocks] == [
                b.mlp.fc1.out_features for b in elastic.subnet(flops=0.6, correct="none").blocks]
    with pytest.raises(SystemExit) as exc:
        main(["slice", str(path), "--mlp-ratio", "0.3", "--head-ratio-scale", "0.5", "-o", str(tmp_path / "x.safetensors")])
    assert exc.value.code == 2 and "--head-ratio-scale splits a --flops/--params/--latency-ms budget" in capsys.readouterr().err
    helps = {a.dest: a.help for a in build_parser()._subparsers._group_actions[0].choices["slice"]._actions}
    assert f"(default: {DEFAULT_HEAD_RATIO_SCALE:g} for corrected" in helps["head_ratio_scale"]  # cli.py imports no torch


def test_slice_of_a_bf16_checkpoint_to_onnx_writes_a_float32_graph(tmp_path, capsys) -> None:
    # save_onnx's "export model.float()" is advice a command-line user cannot follow
    import onnx
    from conftest import random_scores

    model, name, kwargs = tiny_model("test_vit")
    path = tmp_path / "bf16.elastic.safetensors"
    ElasticViT(model.to(torch.bfloat16), random_scores(model), model_name=name, model_kwargs=kwargs).save(path)
    assert main(["slice", str(path), "--flops", "0.5", "-o", str(tmp_path / "x.onnx")]) == 0
    assert "the weights are bfloat16, the graph float32" in capsys.readouterr().out
    graph = onnx.load(str(tmp_path / "x.onnx"))
    assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_a_fraction_far_below_its_budget_is_said(tmp_path, capsys) -> None:
    # two heads per block: the corrected budget line drops a whole head in one step, and --flops 0.6 cut at 52 %
    kwargs = dict(depth=2, embed_dim=64, num_heads=2, num_classes=0)  # 224 px: attention is a large share
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, **kwargs).eval()
    elastic = ElasticViT(model, random_scores(model), model_name="vit_small_patch16_224", model_kwargs=kwargs)
    elastic.attach_stats(elastic.collect_stats(torch.randn(8, 3, 224, 224), ranking=True))
    elastic.save(tmp_path / "two.elastic.safetensors")
    capsys.readouterr()
    assert main(["slice", str(tmp_path / "two.elastic.safetensors"), "--flops", "0.6", "-o", str(tmp_path / "s.safetensors")]) == 0
    got = ElasticViT.load(tmp_path / "two.elastic.safetensors").cost(elastic.dims(*elastic.resolve_budget(
        flops=0.6, head_ratio_scale=0.25)))["flops_fraction"]
    assert got < 0.58  # the test can fail
    assert (f"--flops 0.6 cuts at {100 * got:.1f}%: the largest cut on the budget line within it (with few heads per "
            "block, one head is a large step); mlp_ratio/head_ratio reach others") in capsys.readouterr().out
    with pytest.warns(UserWarning, match=rf"^flops=0.6 cuts at {100 * got:.1f}%: the largest cut") as said:  # in Python too
        ElasticViT.load(tmp_path / "two.elastic.safetensors").subnet(flops=0.6)
    assert said[0].filename == __file__
    assert main(["slice", str(tmp_path / "two.elastic.safetensors"), "--flops", "0.6", "--no-correct",
                 "-o", str(tmp_path / "p.safetensors")]) == 0
    assert "cuts at" not in capsys.readouterr().out  # the plain line (heads at the neurons' ratio) reaches 60 %


def test_img_size_cuts_counts_and_measures_at_the_deployment_size(tmp_path, capsys) -> None:
    # The CLI took the model's own size only (the Python route: set_input_size before subnet()).
    _, path = _saved_tiny_elastic(tmp_path)  # test_vit: 160 px, patch 16
    for out in (tmp_path / "s.safetensors", tmp_path / "s.onnx"):
        assert main(["slice", str(path), "--flops", "0.6", "--img-size", "96", "-o", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "for 96 x 96 px inputs" in printed and "the elastic model was built for 160 x 160 px inputs (its " in printed
        meta = read_metadata(out)
        assert meta["input_size"] == [96, 96] and meta["model_kwargs"]["img_size"] == [96, 96]
        assert meta["budget"]["elastic_input_size"] == [160, 160]  # where its scores were measured
    python = ElasticViT.load(path)
    python.model.set_input_size(img_size=96)
    expected = python.subnet(flops=0.6)
    sub, x = load_subnet(tmp_path / "s.safetensors"), torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(sub(x), expected(x))
    assert model_cost(sub)["flops"] == model_cost(expected)["flops"] < model_cost(python.model)["flops"]
    assert main(["info", str(path), "--img-size", "96", "--budgets", "0.3,0.5"]) == 0
    printed = capsys.readouterr().out
    assert "(--img-size 96: FLOPs and latency at 96 px)" in printed
    row = next(r for r in printed.splitlines() if r.split()[:2] == ["0.30", "0.50"])
    assert row.split()[3] == f"{python.cost(python.dims(0.3, 0.5))['flops']:,}"
    photos = _image_folder(tmp_path / "photos", n=3)
    assert main(["bench", str(path), "--data", str(photos), "--img-size", "96", "--budgets", "0.3,0.5", "--no-latency",
                 "--out", str(tmp_path / "bench")]) == 0
    benched = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert benched["settings"]["img_size"] == 96 and " --img-size 96 " in benched["settings"]["command"]
    capsys.readouterr()
    for argv, message in (
        (["slice", str(path), "--flops", "0.6", "--img-size", "90", "-o", str(tmp_path / "x.safetensors")],
         "--img-size 90: the images would not cut into this model's 16 x 16 px patches; give a multiple of 16 (e.g. 80 or 96)"),
        (["info", str(path), "--img-size", "5"], "give a multiple of 16 (e.g. 16)"),
        (["info", str(tmp_path / "s.safetensors"), "--img-size", "96"], "--latency/--no-correct/--img-size apply to elastic"),
        (["info", str(path), "--img-size", "0"], "argument --img-size: must be >= 1, got 0"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    from snapvit_lightning.correction import stats_path_for

    python.model.set_input_size(img_size=160)  # statistics at the model's own size, beside it: named by both commands
    python.collect_stats(torch.rand(3, 3, 160, 160), ranking=True).save(stats_path_for(path))
    assert main(["info", str(path)]) == 0
    assert "(3 inputs at 160 x 160 px, " in capsys.readouterr().out
    assert main(["slice", str(path), "--flops", "0.6", "--img-size", "96", "-o", str(tmp_path / "c.safetensors")]) == 0
    assert "(its scores and search ran at its calibration size); its correction statistics were collected at 160 x 160 " \
        "px; `snapvit bench " in capsys.readouterr().out
    (tmp_path / "report.json").write_text(json.dumps({"files": {"elastic": path.name}, "budgets": [
        {"mlp_ratio": 0.3, "head_ratio": 0.5, "flops_fraction": 0.6, "fidelity": 0.9, "fidelity_corrected": 0.95}]}))
    assert main(["info", str(path), "--img-size", "96"]) == 0  # the report's fidelity is of 160 px: not under a 96 px table
    printed = capsys.readouterr().out
    assert "fidelity: report.json measured it at 160 x 160 px; `snapvit bench " in printed and "0.9500" not in printed
    assert f"--img-size 96 --correct lstsq --calibration {stats_path_for(path)}` measures it at 96 px" in printed
    assert main(["info", str(path)]) == 0
    assert "0.9500" in capsys.readouterr().out
    # statistics at the deployment size, for the subnets cut there (and recorded by them)
    assert main(["stats", str(path), "--data", str(photos), "--img-size", "96", "--overwrite"]) == 0
    assert "inputs at 96 x 96 px" in capsys.readouterr().out
    assert main(["slice", str(path), "--flops", "0.6", "--img-size", "96", "--correct", "bias", "-o", str(tmp_path / "b.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "its correction statistics were collected at 96 px too; `snapvit bench " in printed
    assert "--img-size 96 --correct bias --calibration " in printed  # the correction it cut with
    record = read_metadata(tmp_path / "b.onnx")["budget"]
    assert record["elastic_input_size"] == [160, 160] and record["calibration_size"] == [96, 96]
    # a cut at the model's own size from those 96 px statistics (beside it: every default cut uses them) says so
    for size in ([], ["--img-size", "160"]):  # --img-size of its own size is no other size
        assert main(["slice", str(path), "--flops", "0.6", *size, "-o", str(tmp_path / "own.safetensors"), "--overwrite"]) == 0
        printed = capsys.readouterr().out
        assert "the subnet takes 160 px inputs, as the elastic model; its correction statistics were collected at 96 x " \
            "96 px; `snapvit bench " in printed and "built for" not in printed
        record = read_metadata(tmp_path / "own.safetensors")["budget"]
        assert record["calibration_size"] == [96, 96] and "elastic_input_size" not in record
    assert main(["info", str(tmp_path / "b.onnx")]) == 0  # the sizes in words, not as keys
    printed = capsys.readouterr().out
    assert "cut for 96 x 96 px inputs: the elastic model's scores and search were measured at 160 x 160 px; its " \
        "correction statistics were collected at 96 x 96 px" in printed and "calibration_size" not in printed


def test_a_subnet_file_is_written_as_onnx_with_its_record(tmp_path, capsys) -> None:
    # A fine-tuned (or latency-chosen) subnet file had no command-line way to ONNX: slice refused it.
    from snapvit_lightning.onnx_export import OnnxModel

    elastic, path = _saved_tiny_elastic(tmp_path)
    sub = elastic.subnet(flops=0.6, correct="none")
    with torch.no_grad():  # "fine-tuned": weights no elastic cut gives
        sub.blocks[0].mlp.fc2.weight.mul_(1.5)
    elastic.save_subnet(tmp_path / "ft.safetensors", sub, budget={"finetuned": "2 epochs"})
    out = tmp_path / "ft.onnx"
    assert main(["slice", str(tmp_path / "ft.safetensors"), "-o", str(out)]) == 0
    assert "the subnet of ft.safetensors as it is" in capsys.readouterr().out
    saved, written = read_metadata(tmp_path / "ft.safetensors"), read_metadata(out)
    assert written["budget"] == saved["budget"] and written["budget"]["finetuned"] == "2 epochs"
    assert written["block_dims"] == saved["block_dims"] and written["model_kwargs"] == saved["model_kwargs"]
    x = torch.randn(3, 3, *elastic.input_size)
    with torch.no_grad():
        expected = load_subnet(tmp_path / "ft.safetensors")(x)
    assert torch.allclose(OnnxModel(str(out))(x), expected, atol=1e-4)
    for argv, message in (
        (["slice", str(tmp_path / "ft.safetensors"), "--flops", "0.5", "--no-correct", "-o", str(tmp_path / "y.onnx")],
         "ft.safetensors is a subnet, already cut: --flops --no-correct cut elastic checkpoints"),
        (["slice", str(tmp_path / "ft.safetensors"), "-o", str(tmp_path / "y.safetensors")],
         "name an .onnx output to write it as an ONNX graph, got"),
        (["slice", str(tmp_path / "ft.safetensors"), "--mlp-ratio", "0", "--damping", "0", "-o", str(tmp_path / "y.onnx")],
         "ft.safetensors is a subnet, already cut: --mlp-ratio --damping cut elastic checkpoints"),  # 0 == False
        (["slice", str(tmp_path / "ft.safetensors"), "--format", "safetensors", "-o", str(tmp_path / "y.onnx")],
         "--format safetensors: "),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "y.onnx").exists() and not (tmp_path / "y.safetensors").exists()
