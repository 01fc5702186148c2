"""User errors of `snapvit` and the main job: one line, exit status 2, no traceback."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from snapvit_lightning import quickstart
from snapvit_lightning.cli import main
from snapvit_lightning.data import CalibrationDataModule
from snapvit_lightning.elastic import ElasticViT
from snapvit_lightning.errors import exit_on_user_error, is_user_error
from snapvit_lightning.scores import ImportanceScores

from conftest import REPO, tiny_model


@pytest.fixture
def elastic_file(tmp_path):
    model, name, kwargs = tiny_model("test_vit")
    path = tmp_path / "m.elastic.safetensors"
    ElasticViT(model, ImportanceScores(torch.rand(6, 192), torch.rand(6, 2)), model_name=name, model_kwargs=kwargs).save(path)
    return path


def _photos(folder, n: int = 3, corrupt: tuple[str, ...] = ()):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    for name in corrupt:
        (folder / name).write_bytes(b"not an image")
    return folder


def _fails_in_one_line(argv: list[str], capsys, match: str, run=main) -> str:
    with pytest.raises(SystemExit) as exc:
        run(argv)
    out, err = capsys.readouterr()
    assert out == ""  # checked before any output
    assert exc.value.code == 2, err
    assert "Traceback" not in err and "usage:" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and match in errors[0], err
    return errors[0]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["info", "{tmp}/missing.elastic.safetensors"], "snapvit info: error: no elastic checkpoint or subnet file"),
        (["info", "{tmp}/plain.safetensors"], "is a safetensors file without snapvit's metadata (model weights?); this reads elastic checkpoint or subnet files; `snapvit fit`"),
        (["slice", "{elastic}", "--flops", "1.5", "-o", "{tmp}/s.safetensors"], "argument --flops: must be a fraction"),
        (["slice", "{tmp}/missing.elastic.safetensors", "--flops", "0.5", "-o", "{tmp}/s.safetensors"],
         "no elastic checkpoint or subnet file"),
        (["stats", "{elastic}", "--data", "{tmp}/missing"], "snapvit stats: error: --data: image folder not found"),
        (["stats", "{elastic}", "--data", "{tmp}/empty"], "--data: no image files"),
        (["stats", "{elastic}", "--data", "{tmp}/broken"], "no readable images in --data="),
        (["bench", "{elastic}", "--data", "{tmp}/missing", "--no-latency"], "--data: image folder not found"),
        (["bench", "{elastic}", "--data", "{tmp}/empty", "--no-latency"], "--data: no image files"),
        (["slice", "{elastic}", "-o", "{tmp}/s.safetensors", "--flops", "abc"],
         "snapvit slice: error: argument --flops: expected a number, got 'abc' (see `snapvit slice --help`)"),
        (["info"], "snapvit info: error: the following arguments are required: path"),
        (["info", "{elastic}", "--budgets", "1,1"], "argument --budgets: MLP_RATIO must be in [0, 1), got 1.0 in '1,1'"),
        (["info", "{elastic}", "--latency", "--batch-size", "0"], "snapvit info: error: argument --batch-size: must be >= 1, got 0"),
        (["info", "{elastic}", "--threads", "3"], "--batch-size/--threads/--device/--dtype/--onnx say how --latency measures"),
        (["slice", "{elastic}", "--flops", "0.5", "--format", "safetensors", "-o", "{tmp}/s.ONNX"],
         "--format safetensors would write safetensors into"),
        (["slice", "{elastic}", "-o", "{tmp}/s.safetensors"], "snapvit slice: error: give a budget: --flops F"),
        (["slice", "{elastic}", "--flops", "0.5", "-o", "{tmp}"], "-o: '{tmp}' is a folder; give a file name"),
        (["stats", "{elastic}", "--data", "{tmp}/one", "-o", "{tmp}"], "snapvit stats: error: -o: '{tmp}' is a folder"),
        (["stats", "{elastic}", "--data", "{tmp}/one", "-o", "{tmp}/s.pt"],
         "snapvit stats: error: -o: '{tmp}/s.pt' must end in .safetensors (a statistics file"),
        (["slice", "{elastic}", "--flops", "0.5", "--format", "onnx", "-o", "{tmp}/s.safetensors"],
         "--format onnx would write onnx into '{tmp}/s.safetensors'"),
        (["slice", "{elastic}", "--flops", "0.5", "-o", "{tmp}/s.pt"],  # written, then torch.load failed on it
         "snapvit slice: error: -o: '{tmp}/s.pt' must end in .safetensors (a subnet file, read by load_subnet) or .onnx"),
        (["slice", "{elastic}", "--flops", "0.5", "--format", "onnx", "-o", "{tmp}/graph"], "-o: '{tmp}/graph' must end in"),
        (["slice", "{elastic}", "--flops", "0.5", "--no-correct", "--damping", "0.1", "-o", "{tmp}/s.safetensors"],
         "--calibration/--sequential/--damping/--damping-reference set a correction"),
        (["bench", "{elastic}", "--data", "{tmp}/one", "--no-latency"], "--data: bench needs at least 2 images, got 1"),
        (["nope"], "snapvit: error: argument command: invalid choice: 'nope'"),
        (["validate", "--model.model", "test_vit"], "snapvit: error: argument command: invalid choice: 'validate'"),
        (["fit", "--model.nope", "1"], "snapvit fit: error: unrecognized arguments: --model.nope 1"),
        (["fit", "--config", "{tmp}/unknown_key.yaml"], "does not accept option 'model.nope'"),
        (["fit", "--config", "{tmp}/missing.yaml"], "File does not exist"),
        (["fit", "--model.model", "test_vit", "--data.batch_size", "0"], "`batch_size` must be >= 1, got 0"),
        (["fit", "--model.model", "test_vit", "--trainer.precision", "16-mixed"],
         "snapvit fit: error: trainer.precision must be one of ['auto', '32-true', '32', 'bf16-mixed', 'bf16-true'], got '16-mixed'"),
        (["fit", "--model.model", "test_vit", "--trainer.precision", "64-true"], "got '64-true' (64-bit is not supported)"),
        (["fit", "--model.model", "test_vit", "--trainer.precision", "transformer-engine"],
         "got 'transformer-engine' (Transformer Engine's FP8 is not supported)"),
        # refused by jsonargparse, whose report listed every precision Lightning has (the refused ones too)
        (["fit", "--model.model", "test_vit", "--trainer.precision", "nonsense"],
         "snapvit fit: error: trainer.precision must be one of ['auto', '32-true', '32', 'bf16-mixed', 'bf16-true'], "
         "got 'nonsense' (see `snapvit fit --help`)"),
        (["fit", "--model.model", "test_vit", "--data.data_dir", "{tmp}/missing", "--trainer.logger", "false"],
         "snapvit fit: error: data_dir: image folder not found"),
        (["fit", "--model.model", "test_vit", "--data.data_dir", "{tmp}/empty", "--trainer.logger", "false"],
         "data_dir: no image files"),
        # A search option given on the command line reached the config's last callback (the export).
        (["fit", "--config", "{repo}/configs/quickstart.yaml", "--trainer.callbacks.init_args.max_evals", "3"],
         "snapvit fit: error: ElasticExport takes no option 'max_evals': --trainer.callbacks.init_args.NAME reaches only "
         "the last callback of the list (in the configs, ElasticExport); set another callback's options, e.g. the search's "
         "max_evals, in a copy of the config. jsonargparse: Parser key \"trainer.callbacks\""),
        # ... while a misspelt key in a config's list was told the same, about the export and the command line
        (["fit", "--config", "{tmp}/typo_search.yaml"], "snapvit fit: error: EvolutionarySearch takes no option 'max_eval' "
         "(a misspelt or misplaced key in trainer.callbacks' init_args). jsonargparse: "),
        # A value a callback's option refuses: that callback and option, not the union's 1,500-character report.
        (["fit", "--config", "{repo}/configs/quickstart.yaml", "--trainer.callbacks.init_args.budgets", "[[0.35, 0.2], [0.5]]",
          "--print_config"],
         "snapvit fit: error: ElasticExport: budgets: [0.5] is not a budget (each budget is [mlp_ratio, head_ratio], a FLOPs "
         "fraction in (0, 1], or {{flops: F}} / {{params: P}} / {{mlp_ratio: M, head_ratio: H}}) (see `snapvit fit --help`)"),
        (["fit", "--config", "{repo}/configs/quickstart.yaml", "--trainer.callbacks.init_args.budgets", "0.35", "--print_config"],
         "snapvit fit: error: ElasticExport: budgets: expected a list of budgets, got 0.35 (each budget is"),
        (["fit", "--config", "{tmp}/badtype_search.yaml", "--print_config"],
         "snapvit fit: error: EvolutionarySearch: max_evals: Expected a <class 'int'>. Got value: abc (see `snapvit fit --help`)"),
        (["fit", "--config", "{repo}/configs/quickstart.yaml", "--seed", "3"],  # was taken for --seed_everything
         "snapvit fit: error: unrecognized arguments: --seed 3"),
        # A callback's init argument refused: jsonargparse wraps the error; the message is ours, with the class.
        (["fit", "--config", "{tmp}/bad_search.yaml"], "snapvit fit: error: EvolutionarySearch: max_evals must be an int >= 1, got 0"),
        (["fit", "--model.model", "test_vit", "--trainer.callbacks+=snapvit_lightning.export.ElasticExport",
          "--trainer.callbacks.dirpath", "{tmp}/out", "--trainer.callbacks.budgets", "[[2.0, 0.0]]"],
         "snapvit fit: error: ElasticExport: budgets: invalid budget (2.0, 0.0): mlp_ratio must be a number in [0, 1), got 2.0"),
        (["fit", "--model.model", "test_vit", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
          "--trainer.callbacks.mode", "bad"], "snapvit fit: error: ModelCheckpoint: `mode` can be min, max but got bad"),
        (["fit", "--model.model", "test_vit", "--trainer.precision", "32-true", "--trainer.logger", "false", "--ckpt_path",
          "best"],  # Lightning's traceback, status 1
         "snapvit fit: error: --ckpt_path best: the trainer has no ModelCheckpoint to find a best checkpoint in"),
        (["fit", "--model.model", "test_vit", "--trainer.strategy", "dpp", "--trainer.logger", "false"],
         "snapvit fit: error: You selected an invalid strategy name: `strategy='dpp'`"),
        pytest.param(["fit", "--model.model", "test_vit", "--trainer.accelerator", "gpu", "--trainer.logger", "false"],
                     "snapvit fit: error: No supported gpu backend found! (trainer.accelerator asks for GPUs and this "
                     "machine has none; on its CPU: --trainer.accelerator cpu",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
        pytest.param(["fit", "--model.model", "test_vit", "--trainer.accelerator", "cuda", "--trainer.precision", "auto",
                      "--trainer.logger", "false"],  # the probe's first CUDA call was a traceback
                     "snapvit fit: error: trainer.accelerator='cuda' asks for GPUs and this machine has none; on its CPU:",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
        (["fit", "--model.model", "test_vit", "--trainer.callbacks+=snapvit_lightning.export.ElasticExport",
          "--trainer.callbacks.dirpath", "{tmp}/plain.safetensors"],
         "snapvit fit: error: ElasticExport: dirpath must be a folder, but '{tmp}/plain.safetensors' is a file"),
        (["slice", "{elastic}", "--flops", "0.5", "-o", "{elastic}", "--overwrite"],
         "-o: '{elastic}' is a file this command reads; write to another file"),
        (["stats", "{elastic}", "--data", "{tmp}/one", "-o", "{elastic}", "--overwrite"], "is a file this command reads"),
        (["slice", "{elastic}", "--flops", "0.5", "-o", "{tmp}/m.stats.safetensors", "--overwrite"],
         "-o: '{tmp}/m.stats.safetensors' is a file this command reads"),  # the statistics beside the checkpoint
        (["bench", "{elastic}", "--data", "{tmp}/one", "--no-latency", "--out", "{tmp}/plain.safetensors/b"],
         "snapvit bench: error: --out: '{tmp}/plain.safetensors' is a file, not a folder"),
        (["slice", "{elastic}", "--flops", "0.5", "-o", "{tmp}/plain.safetensors/s.safetensors"],
         "snapvit slice: error: -o: '{tmp}/plain.safetensors' is a file, not a folder"),
        (["bench", "{elastic}", "--data", "{tmp}/one", "--budgets", "-0.1,0"],  # a value, not an unknown option
         "snapvit bench: error: argument --budgets: MLP_RATIO must be in [0, 1), got -0.1 in '-0.1,0'"),
        (["slice", "{elastic}", "--flops", "-.5", "-o", "{tmp}/s.safetensors"],
         "snapvit slice: error: argument --flops: must be a fraction in (0, 1], got '-.5'"),
        (["slice", "{elastic}", "--mlp-ratio", "nan", "-o", "{tmp}/s.safetensors"],
         "snapvit slice: error: argument --mlp-ratio: expected a finite number, got 'nan'"),
        (["info", "{elastic}", "--latency", "--threads", "0"], "snapvit info: error: argument --threads: must be >= 1, got 0"),
        (["slice", "{elastic}", "--flops", "0.5", "--damping", "-1", "-o", "{tmp}/s.safetensors"],
         "snapvit slice: error: argument --damping: must be >= 0, got '-1'"),
        (["slice", "{elastic}", "--flops", "0.001", "-o", "{tmp}/s.safetensors"],
         "snapvit slice: error: --flops: flops=0.001 is below the smallest reachable fraction"),
        (["weights", "dinov2-vitb14", "{tmp}/w.safetensors"], "snapvit weights: error: argument NAME: invalid choice"),
        pytest.param(["slice", "{elastic}", "--latency-ms", "5", "--device", "cuda", "-o", "{tmp}/s.safetensors"],
                     "snapvit slice: error: argument --device: device 'cuda' asked for, but CUDA is not available",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    ],
)
def test_user_errors_are_one_line(argv, match, tmp_path, elastic_file, capsys, monkeypatch) -> None:
    from safetensors.torch import save_file

    monkeypatch.delenv("SNAPVIT_TRACEBACK", raising=False)
    monkeypatch.chdir(tmp_path)  # Lightning writes nothing into the repository
    save_file({"a": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    (tmp_path / "empty").mkdir()
    _photos(tmp_path / "one", n=1)
    _photos(tmp_path / "broken", n=0, corrupt=("a.jpg", "b.png"))
    (tmp_path / "unknown_key.yaml").write_text("model:\n  model: test_vit\n  nope: 1\n")
    (tmp_path / "typo_search.yaml").write_text(
        "model:\n  model: test_vit\ntrainer:\n  logger: false\n  callbacks:\n"
        "    - class_path: snapvit_lightning.search.EvolutionarySearch\n      init_args: {max_eval: 4}\n"
    )
    (tmp_path / "badtype_search.yaml").write_text(
        "model:\n  model: test_vit\ntrainer:\n  logger: false\n  callbacks:\n"
        "    - class_path: snapvit_lightning.search.EvolutionarySearch\n      init_args: {max_evals: abc}\n"
        "    - class_path: snapvit_lightning.export.ElasticExport\n      init_args: {dirpath: out}\n"
    )
    (tmp_path / "bad_search.yaml").write_text(
        "model:\n  model: test_vit\ntrainer:\n  logger: false\n  callbacks:\n"
        "    - class_path: snapvit_lightning.search.EvolutionarySearch\n      init_args: {max_evals: 0}\n"
    )
    words = [w.format(tmp=tmp_path, elastic=elastic_file, repo=REPO) for w in argv]
    match = match.format(tmp=tmp_path, elastic=elastic_file)
    if "broken" in " ".join(words):
        with pytest.warns(UserWarning, match="skipped 2 of 2 images"):
            _fails_in_one_line(words, capsys, match)
    else:
        _fails_in_one_line(words, capsys, match)


def test_a_closed_pipe_ends_quietly(elastic_file) -> None:
    """`snapvit info ... | head`: the reader goes away; no BrokenPipeError traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "snapvit_lightning.cli", "info", str(elastic_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before it writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1 and err == ""


def test_traceback_on_request(tmp_path, elastic_file, monkeypatch) -> None:
    monkeypatch.setenv("SNAPVIT_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="--data: image folder not found"):
        main(["stats", str(elastic_file), "--data", str(tmp_path / "missing")])


class BrokenCallback(Callback):
    """A callback whose ``__init__`` has a bug."""

    def __init__(self, size: int = 1) -> None:
        super().__init__()
        raise RuntimeError(f"a bug, size={size}")


def test_a_bug_in_a_configured_callback_keeps_its_traceback(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SNAPVIT_TRACEBACK", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="a bug, size=1") as exc:  # jsonargparse's wrapper, the bug as its cause
        main(["fit", "--model.model", "test_vit", f"--trainer.callbacks+={__name__}.BrokenCallback"])
    assert isinstance(exc.value.__cause__, RuntimeError) and not is_user_error(exc.value)


def test_a_warning_made_an_error_by_the_user_is_one_line(tmp_path, elastic_file, capsys) -> None:
    import warnings

    _photos(tmp_path / "photos", corrupt=("bad.jpg",))  # a skipped image: our warning, here an error (-W error)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(SystemExit) as exc:
            main(["stats", str(elastic_file), "--data", str(tmp_path / "photos"), "-o", str(tmp_path / "s.safetensors")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("snapvit stats: error: ")
    assert "(a UserWarning that -W error or PYTHONWARNINGS turned into an error)" in err
    assert not (tmp_path / "s.safetensors").exists()


def test_bugs_keep_their_traceback() -> None:
    """Only errors this package raises on purpose are user errors; others are bugs."""
    with pytest.raises(ValueError, match="invalid literal"), exit_on_user_error("snapvit x"):
        int("x")  # a ValueError from outside a `raise` of snapvit_lightning
    with pytest.raises(KeyError), exit_on_user_error("snapvit x"):
        {}["x"]
    with pytest.raises(ValueError, match="batch_size") as exc:
        CalibrationDataModule(batch_size=0)
    assert is_user_error(exc.value)
    assert is_user_error(FileNotFoundError("x")) and is_user_error(ModuleNotFoundError("no onnx", name="onnx"))
    assert not is_user_error(RuntimeError("x"))


@pytest.mark.parametrize("command", ["slice", "stats"])
def test_missing_output_folder_is_created(command, tmp_path, elastic_file, capsys) -> None:
    out = tmp_path / "new" / "folder" / "out.safetensors"
    photos = _photos(tmp_path / "photos", corrupt=("bad.jpg",))
    extra = ["--flops", "0.6"] if command == "slice" else ["--data", str(photos)]
    with pytest.warns(UserWarning, match="bad.jpg") if command == "stats" else contextlib.nullcontext():
        assert main([command, str(elastic_file), *extra, "-o", str(out)]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out


def test_stats_of_one_image_file_under_home(tmp_path, elastic_file, capsys, monkeypatch) -> None:
    _photos(tmp_path / "photos", n=1)
    monkeypatch.setenv("HOME", str(tmp_path))  # "~" as a user quotes it past the shell
    assert main(["stats", str(elastic_file), "--data", "~/photos/0.png", "-o", str(tmp_path / "one.stats.safetensors")]) == 0
    assert "of 1 image" in capsys.readouterr().out and (tmp_path / "one.stats.safetensors").is_file()


def test_stats_skips_a_corrupt_image_and_names_it(tmp_path, elastic_file, capsys) -> None:
    photos = _photos(tmp_path / "photos", n=3, corrupt=("bad.jpg",))
    with pytest.warns(UserWarning, match="skipped 1 of 4 images in --data=.*bad.jpg") as record:
        assert main(["stats", str(elastic_file), "--data", str(photos)]) == 0
    assert sum("could not be read" in str(w.message) for w in record) == 1
    assert "3 images" in capsys.readouterr().out


def test_main_job_user_error_is_one_line(tmp_path, capsys) -> None:
    line = _fails_in_one_line(
        ["--weights", str(tmp_path / "weights.bin"), "--out", str(tmp_path / "run")], capsys,
        "python -m snapvit_lightning.quickstart: error:", run=quickstart.main,
    )
    assert "weights.bin" in line  # the message names the bad value


def test_ctrl_c_ends_in_one_line(elastic_file, capsys, monkeypatch) -> None:
    from snapvit_lightning import cli

    monkeypatch.delenv("SNAPVIT_TRACEBACK", raising=False)

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_info", interrupted)  # build_parser binds the module's run_info when main runs
    assert main(["info", str(elastic_file)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "snapvit info: interrupted" and "Traceback" not in err
    monkeypatch.setenv("LOCAL_RANK", "1")  # another process of a DDP run, stopped alike: the first one says it
    assert main(["info", str(elastic_file)]) == 130 and capsys.readouterr().err == ""


def test_sigterm_while_slice_writes_leaves_no_file(elastic_file, tmp_path, capsys, monkeypatch) -> None:
    # Python's default SIGTERM ended slice/stats/bench at once and in silence, which could leave the staged
    # `.NAME.tmp-PID` file of a write under way behind.
    import os
    import signal
    import time
    from pathlib import Path

    import safetensors.torch

    def terminated_while_writing(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a subnet")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises in here
        raise AssertionError("SIGTERM did not stop the write")

    monkeypatch.setattr(safetensors.torch, "save_file", terminated_while_writing)  # what write_safetensors calls
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    assert main(["slice", str(elastic_file), "--flops", "0.6", "-o", str(out / "s.safetensors")]) == 143
    assert capsys.readouterr().err.strip() == ("snapvit slice: terminated (SIGTERM); files are written under a temporary "
                                               "name and renamed at the end, so none was left half-written")
    assert list(out.iterdir()) == [] and signal.getsignal(signal.SIGTERM) is before  # the handler was put back


def test_ctrl_c_during_the_quickstart_ends_in_one_line(tmp_path, capsys, monkeypatch) -> None:
    from snapvit_lightning import quickstart

    monkeypatch.delenv("SNAPVIT_TRACEBACK", raising=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(quickstart, "run", interrupted)
    assert quickstart.main(["--out", str(tmp_path / "run")]) == 130  # was a traceback
    err = capsys.readouterr().err
    assert err.strip() == "python -m snapvit_lightning.quickstart: interrupted" and "Traceback" not in err


def test_our_warnings_are_one_line_named_by_the_command(elastic_file, tmp_path) -> None:
    # They began with the library's file and line: "/…/snapvit_lightning/data/sources.py:545: skipped 1 of 4 images".
    import subprocess
    import sys

    _photos(tmp_path / "photos", n=2, corrupt=("bad.jpg",))
    proc = subprocess.run([sys.executable, "-m", "snapvit_lightning.cli", "stats", str(elastic_file), "--data",
                           str(tmp_path / "photos")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"snapvit stats: warning: skipped 1 of 3 images in --data='{tmp_path / 'photos'}'" in proc.stderr
    assert "sources.py" not in proc.stderr


def test_an_unwritable_file_is_one_line(tmp_path, monkeypatch) -> None:
    import safetensors.torch

    from snapvit_lightning.errors import is_user_error
    from snapvit_lightning.file_io import write_safetensors

    def read_only(*args, **kwargs):  # what safetensors raises in a read-only folder (root ignores chmod)
        raise RuntimeError("Error while serializing: I/O error: Operation not permitted (os error 1)")

    monkeypatch.setattr(safetensors.torch, "save_file", read_only)
    with pytest.raises(PermissionError, match=r"cannot write '.*w.safetensors': Error while serializing: I/O error") as err:
        write_safetensors(tmp_path / "w.safetensors", {"a": torch.zeros(1)})
    assert is_user_error(err.value) and not list(tmp_path.iterdir())


def test_statistics_of_another_checkpoint_name_the_file(tmp_path, elastic_file, capsys) -> None:
    model, name, kwargs = tiny_model("test_vit", seed=1)
    other = ElasticViT(model, ImportanceScores(torch.rand(6, 192), torch.rand(6, 2)), model_name=name, model_kwargs=kwargs)
    other.collect_stats(torch.randn(4, 3, *model.patch_embed.img_size)).save(tmp_path / "other.stats.safetensors")
    line = _fails_in_one_line(["slice", str(elastic_file), "--flops", "0.5", "--calibration",
                               str(tmp_path / "other.stats.safetensors"), "-o", str(tmp_path / "s.safetensors")], capsys,
                              f"--calibration: '{tmp_path / 'other.stats.safetensors'}' holds the statistics of another elastic model")
    assert f"than '{elastic_file}'" in line and not (tmp_path / "s.safetensors").exists()


@pytest.mark.parametrize("command", ["fit", "bench"])
def test_ctrl_c_during_a_fit_ends_in_one_line(tmp_path, elastic_file, capsys, monkeypatch, command) -> None:
    # Lightning ends a fit stopped by Ctrl-C with sys.exit(1) (status 1, no word of snapvit's): `snapvit fit`,
    # and the fit `snapvit bench --baselines` runs of its own (its calibration epoch).
    import signal

    from snapvit_lightning.module import SnapViTModule

    monkeypatch.delenv("SNAPVIT_TRACEBACK", raising=False)
    monkeypatch.chdir(tmp_path)
    _photos(tmp_path / "photos", n=4)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SnapViTModule, "training_step", interrupted)
    argv = {"fit": ["fit", "--model.model", "test_vit", "--model.model_kwargs", "{img_size: 32}", "--data.data_dir",
                    str(tmp_path / "photos"), "--trainer.precision", "32-true", "--trainer.logger", "false",
                    "--trainer.enable_progress_bar", "false"],
            "bench": ["bench", str(elastic_file), "--data", str(tmp_path / "photos"), "--baselines", "--no-latency",
                      "--budgets", "0.5,0.5"]}[command]
    before = signal.getsignal(signal.SIGINT)
    try:
        assert main(argv) == 130 and capsys.readouterr().err.strip().endswith(f"snapvit {command}: interrupted")
        assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # Ctrl-C works again
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("when", ["search", "before export"])
def test_sigterm_after_the_training_steps_stops_the_fit(tmp_path, capsys, monkeypatch, when) -> None:
    # Lightning checks for SIGTERM only between training steps: the search and the export ran to their end, status 0.
    import os
    import signal

    from snapvit_lightning.search import EvolutionarySearch
    from snapvit_lightning.search.progress import SearchProgress

    monkeypatch.delenv("SNAPVIT_TRACEBACK", raising=False)
    monkeypatch.chdir(tmp_path)
    _photos(tmp_path / "photos", n=4)
    evaluations = []
    update, end = SearchProgress.update, EvolutionarySearch.on_train_end

    def terminate_at_third(self, idx, *args):  # a real SIGTERM, to Lightning's handler
        evaluations.append(idx)
        if when == "search" and len(evaluations) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        update(self, idx, *args)

    def terminate_after(self, *args):
        end(self, *args)
        if when == "before export":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(SearchProgress, "update", terminate_at_third)
    monkeypatch.setattr(EvolutionarySearch, "on_train_end", terminate_after)
    before = signal.getsignal(signal.SIGTERM)
    try:
        status = main(["fit", "--model.model", "test_vit", "--model.model_kwargs", "{img_size: 32}", "--data.data_dir",
                       str(tmp_path / "photos"), "--data.holdout", "2", "--trainer.precision", "32-true",
                       "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                       "--trainer.callbacks+=snapvit_lightning.search.EvolutionarySearch",
                       "--trainer.callbacks.max_evals", "40" if when == "search" else "4",
                       "--trainer.callbacks+=snapvit_lightning.export.ElasticExport",
                       "--trainer.callbacks.dirpath", str(tmp_path / "out"), *([] if when == "search" else [
                           "--trainer.enable_checkpointing", "true", "--trainer.callbacks+=ModelCheckpoint",
                           "--trainer.callbacks.dirpath", str(tmp_path / "ckpts"),
                           "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_on_train_epoch_end",
                           "false"])])
    finally:
        signal.signal(signal.SIGTERM, before)
    err = capsys.readouterr().err
    assert status == 143 and "snapvit fit: terminated (SIGTERM); the export writes its files only at the end" in err
    if when == "before export":  # the last checkpoint is named, to resume from
        (last,) = (tmp_path / "ckpts").iterdir()
        assert err.rstrip().endswith(f"to continue, run the same command with --ckpt_path {last}")
    else:
        assert "--ckpt_path" not in err
    assert len(evaluations) == (3 if when == "search" else 4)  # the search stopped at the evaluation it was told
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_sigterm_around_a_fit_stops_it_only_where_lightning_does_not() -> None:
    # A SIGTERM while DDP ranks started (before Lightning's handler) killed the launcher in silence; its ranks waited.
    import os
    import signal

    from snapvit_lightning.errors import Terminated, sigterm_raises

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), sigterm_raises(unless_replaced=True):
        os.kill(os.getpid(), signal.SIGTERM)  # ours is installed: the command stops
    with sigterm_raises(unless_replaced=True):
        ours = signal.getsignal(signal.SIGTERM)
        seen = []
        signal.signal(signal.SIGTERM, lambda s, f: (seen.append(s), ours(s, f)))  # Lightning's, calling the one it found
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]  # noted by Lightning's; ours does nothing
        signal.signal(signal.SIGTERM, ours)  # Lightning's teardown puts ours back
    assert signal.getsignal(signal.SIGTERM) is before


def test_other_ddp_ranks_say_who_they_are(tmp_path, capsys, monkeypatch) -> None:
    # Under DDP every rank printed the same line: the ones from other ranks now say which rank they are.
    from snapvit_lightning.errors import exit_on_user_error

    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit) as exit_, exit_on_user_error("snapvit fit"):
        raise FileNotFoundError("data_dir: image folder not found: 'x'")
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "[rank 1] snapvit fit: error: data_dir: image folder not found: 'x'\n"


def test_a_user_error_of_a_ddp_spawn_rank_is_one_line() -> None:
    # torch passes on only the rank's traceback text: a refusal before the fit was a 40-line traceback, status 1
    import traceback as tb

    from torch.multiprocessing import ProcessRaisedException

    from snapvit_lightning.errors import is_user_error, user_error_message
    from snapvit_lightning.obs import greedy_removal

    try:
        greedy_removal(torch.zeros(1, 3), torch.eye(3), chunk=0)
    except ValueError:
        text = tb.format_exc()
    spawned = ProcessRaisedException("\n\n-- Process 0 terminated with the following error:\n" + text, 0, 1234)
    assert is_user_error(spawned) and user_error_message(spawned) == "chunk must be an int >= 1, got 0"
    try:
        raise RuntimeError("a bug")
    except RuntimeError:
        bug = ProcessRaisedException("\n\n-- Process 0 terminated with the following error:\n" + tb.format_exc(), 0, 1)
    assert not is_user_error(bug)
    moved = ProcessRaisedException("...\nFileExistsError: /x/config.yaml exists", 0, 1)  # a path error: wherever raised
    assert is_user_error(moved) and user_error_message(moved) == "/x/config.yaml exists"


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_zero_warnings_name_the_callers_line_on_rank_zero_only(monkeypatch, rank) -> None:
    # Lightning's rank_zero_warn pointed at a fixed depth of the stack: inside the package or Lightning.
    import warnings

    from lightning_utilities.core.rank_zero import rank_zero_only

    from snapvit_lightning.errors import warn_at_caller_on_rank_zero

    monkeypatch.setattr(rank_zero_only, "rank", rank)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        warn_at_caller_on_rank_zero("one line")
    assert [(str(w.message), w.filename) for w in said] == ([("one line", __file__)] if rank == 0 else [])


def test_a_warning_in_a_spawned_process_never_names_the_spawn_bootstrap() -> None:
    # under ddp_spawn the walk past multiprocessing stopped at `python -c "...spawn_main..."`: "<string>:1: UserWarning"
    import subprocess
    import sys

    code = ("import multiprocessing as mp\nfrom snapvit_lightning.errors import warn_at_caller\n"
            "if __name__ == '__main__':\n    p = mp.get_context('spawn').Process(target=warn_at_caller, args=('spawned warning',))\n"
            "    p.start()\n    p.join()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    line = next(t for t in proc.stderr.splitlines() if "spawned warning" in t)
    assert not line.startswith("<string>") and line.split(":")[0].endswith(".py"), proc.stderr


def _warn_in_spawned_process() -> None:
    import warnings

    import snapvit_lightning.export
    from snapvit_lightning.console import quiet_spawned_process

    quiet_spawned_process()  # what SnapViTModule.setup calls in every process of a fit
    warnings.warn_explicit("spawned warning", UserWarning, snapvit_lightning.export.__file__, 1)  # as the package warns


@pytest.mark.parametrize("inside", [True, False])
def test_a_spawned_process_of_a_command_says_its_warnings_as_the_command(inside: bool, capfd) -> None:
    # under ddp_spawn the package's warnings were `/path/to/module.py:545: UserWarning: ...`, not `snapvit fit: warning:`
    import contextlib
    import multiprocessing

    from snapvit_lightning.errors import own_warnings_as

    with own_warnings_as("snapvit fit") if inside else contextlib.nullcontext():
        child = multiprocessing.get_context("spawn").Process(target=_warn_in_spawned_process)
        child.start()
        child.join(timeout=120)
    line = next(t for t in capfd.readouterr().err.splitlines() if "spawned warning" in t)
    assert child.exitcode == 0 and (line == "snapvit fit: warning: spawned warning") == inside
    assert "SNAPVIT_WARNINGS_AS" not in __import__("os").environ  # the command's setting ends with it


def test_a_link_at_the_output_is_replaced_only_with_overwrite(elastic_file, tmp_path, capsys) -> None:
    # exists() is False for a dangling link: slice wrote over it without --overwrite (bench already refused)
    out = tmp_path / "d.safetensors"
    out.symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(SystemExit) as exc:
        main(["slice", str(elastic_file), "--flops", "0.6", "-o", str(out)])
    assert exc.value.code == 2 and f"{out} exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert main(["slice", str(elastic_file), "--flops", "0.6", "-o", str(out), "--overwrite"]) == 0
    assert not out.is_symlink() and out.is_file() and not (tmp_path / "nowhere.txt").exists()
