"""snapvit_lightning.ranks: rank 0's work under DDP, and SIGTERM while every rank runs the package's end of a fit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
from lightning.pytorch.utilities.exceptions import SIGTERMException

from snapvit_lightning.ranks import (
    RankZeroFailed, collective_safe_sigterm, stop_if_terminated, stop_started_ranks, stops_on_sigterm,
)


def _two_ranks() -> SimpleNamespace:
    """A Trainer as rank 0 of two sees it (its broadcast returns rank 0's value)."""
    return SimpleNamespace(world_size=2, received_sigterm=False, strategy=SimpleNamespace(broadcast=lambda obj, src: obj))


def test_sigterm_is_noted_until_every_rank_can_stop_together() -> None:
    trainer, before = _two_ranks(), signal.getsignal(signal.SIGTERM)
    with pytest.raises(SIGTERMException):
        with collective_safe_sigterm(trainer):
            os.kill(os.getpid(), signal.SIGTERM)  # noted, not raised: the ranks may be inside a collective
            with pytest.raises(SIGTERMException):
                stop_if_terminated(trainer)  # the point every rank reaches: all stop there
    assert signal.getsignal(signal.SIGTERM) is before
    with collective_safe_sigterm(trainer):  # a fresh start: nothing noted
        stop_if_terminated(trainer)


def test_rank_zeros_own_work_stops_at_once() -> None:
    trainer, reached = _two_ranks(), []
    with pytest.raises(SIGTERMException):
        with collective_safe_sigterm(trainer):
            with stops_on_sigterm():
                os.kill(os.getpid(), signal.SIGTERM)
                reached.append("after")  # the handler raised before this line
    assert reached == []
    with pytest.raises(SIGTERMException), collective_safe_sigterm(trainer):
        os.kill(os.getpid(), signal.SIGTERM)
        with stops_on_sigterm():  # noted before the block: it does not start
            reached.append("block")
    assert reached == []


def test_a_sigterm_after_rank_zeros_files_are_placed_stops_nothing() -> None:
    # under DDP it ended with status 143 and "the export ... wrote none" beside the five files it had placed
    from snapvit_lightning.ranks import files_placed

    trainer = _two_ranks()
    with collective_safe_sigterm(trainer):
        with stops_on_sigterm():
            files_placed()
            os.kill(os.getpid(), signal.SIGTERM)  # dropped: nothing is left to stop
        stop_if_terminated(trainer)
    with pytest.raises(SIGTERMException), collective_safe_sigterm(trainer):  # the next fit: a SIGTERM counts again
        os.kill(os.getpid(), signal.SIGTERM)
    files_placed()  # outside: nothing


def test_steps_that_must_all_happen_are_stopped_after_them() -> None:
    # a SIGTERM between the export's renames left report.json beside "wrote none"
    from snapvit_lightning.ranks import uninterrupted

    trainer, done = _two_ranks(), []
    with pytest.raises(SIGTERMException), collective_safe_sigterm(trainer), stops_on_sigterm():
        with uninterrupted():
            for step in range(3):
                if step == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                done.append(step)
        done.append("after")  # not reached: the block's end raised
    assert done == [0, 1, 2]
    with uninterrupted():  # outside collective_safe_sigterm: nothing changes
        done.append("outside")


def test_a_sigterm_in_the_scoring_stops_every_rank_after_the_same_step() -> None:
    # Lightning's handler broadcast from inside the signal handler; with every process signalled, all ranks hung.
    from snapvit_lightning.ranks import DistributedSigterm

    def rank(number, broadcast):
        connector = SimpleNamespace(received_sigterm=False)
        return SimpleNamespace(world_size=2, global_rank=number, _signal_connector=connector,
                               strategy=SimpleNamespace(broadcast=broadcast))

    before = signal.getsignal(signal.SIGTERM)
    try:
        callback, rank0 = DistributedSigterm(), rank(0, lambda obj, src: obj)
        callback.on_train_start(rank0, None)
        callback.on_train_batch_end(rank0, None)
        assert not rank0._signal_connector.received_sigterm
        os.kill(os.getpid(), signal.SIGTERM)  # noted only: nothing raised, no collective inside the handler
        assert not rank0._signal_connector.received_sigterm
        callback.on_train_batch_end(rank0, None)  # after the step: Lightning's check stops this rank
        assert rank0._signal_connector.received_sigterm
        for hook in ("on_train_batch_end", "on_train_epoch_end"):
            rank1 = rank(1, lambda obj, src: True)  # rank 0 saw it: this rank stops after the same step
            getattr(DistributedSigterm(), hook)(rank1, None)
            assert rank1._signal_connector.received_sigterm, hook
        # after the epoch's end: kept for the search's first check, not Lightning's flag (rank 0 alone stopped at
        # Lightning's check after the epoch, and the other ranks waited in the search's first broadcast)
        late = rank(0, lambda obj, src: obj)
        callback = DistributedSigterm()
        callback.on_train_start(late, None)
        callback.on_train_epoch_end(late, None)
        os.kill(os.getpid(), signal.SIGTERM)
        assert not late._signal_connector.received_sigterm
        with pytest.raises(SIGTERMException), collective_safe_sigterm(late):
            stop_if_terminated(late)
        with collective_safe_sigterm(late):  # read once
            stop_if_terminated(late)
        os.kill(os.getpid(), signal.SIGTERM)  # after the export, or with none: not a next fit's
        callback.teardown(late, None, "fit")
        with collective_safe_sigterm(late):
            stop_if_terminated(late)
        alone = rank(1, lambda obj, src: False)  # this rank's own signal, not rank 0's: dropped
        callback = DistributedSigterm()
        callback.on_train_start(alone, None)
        os.kill(os.getpid(), signal.SIGTERM)
        callback.on_train_batch_end(alone, None)
        assert not alone._signal_connector.received_sigterm
    finally:
        signal.signal(signal.SIGTERM, before)


def test_one_process_keeps_its_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    one = SimpleNamespace(world_size=1, received_sigterm=False)
    with collective_safe_sigterm(one), stops_on_sigterm():
        assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("error, raised", [(SIGTERMException(143), SIGTERMException), (KeyboardInterrupt(), KeyboardInterrupt),
                                           (ValueError("x"), RankZeroFailed)])
def test_the_other_ranks_stop_as_rank_zero_did(error, raised) -> None:
    from snapvit_lightning.ranks import finish_on_every_rank

    sent = []

    def broadcast(obj, src):
        sent.append(obj)
        return obj

    rank0 = SimpleNamespace(strategy=SimpleNamespace(barrier=lambda name: None, broadcast=broadcast))
    with pytest.raises(type(error)):
        finish_on_every_rank(rank0, error, "the export")
    rank1 = SimpleNamespace(strategy=SimpleNamespace(barrier=lambda name: None, broadcast=lambda obj, src: sent[-1]))
    with pytest.raises(raised) as stop:
        finish_on_every_rank(rank1, None, "the export")
    if raised is SIGTERMException:  # a user's script ends with the status a shell gives a SIGTERM, not 0
        assert stop.value.code == 143
    if raised is RankZeroFailed:  # rank 0's own error travels (a ddp_spawn parent may report this rank's first)
        assert str(stop.value) == "the export failed on global rank 0, so nothing was written: ValueError: x"


def _wait_at_the_barrier(rank: int, port: int, queue) -> None:
    import datetime
    import time

    import torch.distributed as dist

    from snapvit_lightning.ranks import finish_on_every_rank

    limit = datetime.timedelta(seconds=2)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=limit)
    trainer = SimpleNamespace(global_rank=rank, strategy=SimpleNamespace(
        barrier=lambda name: dist.barrier(), broadcast=lambda obj, src: obj, _timeout=limit))
    if rank == 0:
        time.sleep(4)  # rank 0's export outlasts the process group's timeout
        return
    try:
        finish_on_every_rank(trainer, None, "the export")
        queue.put("returned")
    except Exception as err:  # noqa: BLE001 - the test reads what was raised
        queue.put(f"{type(err).__name__}: {err}")


def test_a_rank_that_waits_longer_than_the_timeout_says_why() -> None:
    # Rank 1 waited at the export's barrier while rank 0 worked; at the process group's timeout gloo's
    # "Timed out waiting 20000ms for recv operation" ended the run without naming what it waited for.
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_wait_at_the_barrier, args=(rank, port, queue)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    said = queue.get(timeout=120)
    for proc in procs:
        proc.join(timeout=60)
    assert said.startswith("RankZeroTimeout: the export: global rank 1 waited for global rank 0"), said
    assert "process group's timeout (0:00:02)" in said and "DDPStrategy(timeout=datetime.timedelta(hours=2))" in said


def test_a_barrier_that_fails_after_rank_zeros_work_says_what_happened() -> None:
    from snapvit_lightning.ranks import finish_on_every_rank

    def broken(name):
        raise RuntimeError("Connection closed by peer")

    def ranked(rank):
        return SimpleNamespace(global_rank=rank, strategy=SimpleNamespace(barrier=broken, broadcast=lambda obj, src: obj))

    with pytest.raises(RuntimeError, match="^Connection closed by peer$"):  # another rank gone: not a timeout
        finish_on_every_rank(ranked(1), None, "the export")
    # Ctrl-C reaches every rank: rank 0 printed the barrier's (or the broadcast's) traceback instead of "interrupted"
    with pytest.raises(KeyboardInterrupt):
        finish_on_every_rank(ranked(0), KeyboardInterrupt(), "the export")
    gone_after_barrier = SimpleNamespace(global_rank=0, strategy=SimpleNamespace(
        barrier=lambda name: None, broadcast=lambda obj, src: broken(None)))
    with pytest.raises(KeyboardInterrupt):
        finish_on_every_rank(gone_after_barrier, KeyboardInterrupt(), "the export")
    with pytest.raises(ValueError, match="^bad$"):
        finish_on_every_rank(ranked(0), ValueError("bad"), "the export")
    # rank 0 wrote its files, then found the others gone (one timed out at the barrier, or failed)
    with pytest.raises(RuntimeError, match=r"^the export is done on global rank 0 \(its files are written and complete\), "
                                           r"but the other ranks had stopped waiting for it: .*Connection closed by peer"):
        finish_on_every_rank(ranked(0), None, "the export")


def test_a_launchers_started_ranks_are_stopped() -> None:
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    launcher = _SubprocessScriptLauncher(LightningEnvironment(), num_processes=2, num_nodes=1)
    launcher.procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])]
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    launcher.procs.append(done)  # ended already: skipped
    stop_started_ranks(SimpleNamespace(strategy=SimpleNamespace(launcher=launcher)))
    assert launcher.procs[0].wait(timeout=30) == -signal.SIGTERM
    stop_started_ranks(SimpleNamespace(strategy=SimpleNamespace(launcher=None)))  # no launcher: nothing to do


def _sleep() -> None:
    import time

    time.sleep(120)


def test_ddp_spawns_ranks_are_stopped() -> None:
    # a SIGTERM to the process that spawned the ranks stopped only it: the ranks searched and exported to the end
    import multiprocessing

    from lightning.pytorch.strategies import DDPStrategy
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    launcher = _MultiProcessingLauncher(DDPStrategy(), start_method="fork")
    launcher.procs = [multiprocessing.get_context("fork").Process(target=_sleep)]
    launcher.procs[0].start()
    stop_started_ranks(SimpleNamespace(strategy=SimpleNamespace(launcher=launcher)))
    launcher.procs[0].join(timeout=30)
    assert launcher.procs[0].exitcode == -signal.SIGTERM


_TERM_DURING_EXPORT = """
import os
import signal
import sys
from pathlib import Path

import snapvit_lightning.export as export
from snapvit_lightning.cli import main

Path(os.environ["PIDS"], f"rank{os.environ.get('LOCAL_RANK', '0')}.pid").write_text(str(os.getpid()))
ranking = export.with_ranking


def terminated_while_ranking(*args, **kwargs):  # the export's ranking, on rank 0 only: the others wait at a barrier
    os.kill(os.getpid(), signal.SIGTERM)
    return ranking(*args, **kwargs)


export.with_ranking = terminated_while_ranking
sys.exit(main())  # the command line, which the other rank re-runs
"""


_TERM_EVERY_RANK_WHILE_SCORING = """
import os
import signal
import sys
from pathlib import Path

from snapvit_lightning.cli import main
from snapvit_lightning.module import SnapViTModule

Path(os.environ["PIDS"], f"rank{os.environ.get('LOCAL_RANK', '0')}.pid").write_text(str(os.getpid()))
step = SnapViTModule.training_step


def terminated_while_scoring(self, batch, batch_idx):  # a scheduler's SIGTERM reaches every process
    if batch_idx == 0:
        os.kill(os.getpid(), signal.SIGTERM)
    return step(self, batch, batch_idx)


SnapViTModule.training_step = terminated_while_scoring
sys.exit(main())  # the command line, which the other rank re-runs
"""


_TERM_RANK_ZERO_AFTER_THE_SCORING = """
import os
import signal
import sys
from pathlib import Path

from snapvit_lightning.cli import main
from snapvit_lightning.module import SnapViTModule

Path(os.environ["PIDS"], f"rank{os.environ.get('LOCAL_RANK', '0')}.pid").write_text(str(os.getpid()))
end = SnapViTModule.on_train_epoch_end


def terminated_after_the_last_step(self):  # rank 0, after the callbacks' epoch end, before the search
    if self.trainer.global_rank == 0:
        os.kill(os.getpid(), signal.SIGTERM)
    return end(self)


SnapViTModule.on_train_epoch_end = terminated_after_the_last_step
sys.exit(main())  # the command line, which the other rank re-runs
"""


def _run_two_ranks(tmp_path, script: str, images: int = 4) -> subprocess.CompletedProcess:
    """``snapvit fit`` under ``ddp`` on 2 CPU processes through ``script``; it stopped every rank it started."""
    import numpy as np
    from PIL import Image

    from test_cli import _DDP_CONFIG

    for i in range(images):
        folder = tmp_path / "images" / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    config = tmp_path / "config.yaml"
    config.write_text(_DDP_CONFIG.format(images=tmp_path / "images", out=tmp_path / "out"))
    (tmp_path / "run.py").write_text(script)
    cmd = [sys.executable, str(tmp_path / "run.py"), "fit", "--config", str(config), "--trainer.devices", "2",
           "--trainer.strategy", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIDS": str(tmp_path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    for rank in (0, 1):  # no rank is left behind
        pid = int((tmp_path / f"rank{rank}.pid").read_text())
        with pytest.raises(ProcessLookupError):
            for _ in range(100):
                os.kill(pid, 0)
                subprocess.run(["sleep", "0.1"])
    return proc


def test_sigterm_during_a_ddp_export_stops_every_rank(tmp_path) -> None:
    # Lightning's SIGTERM handler broadcasts from rank 0 inside the handler; with the other rank at the
    # export's barrier neither returned (each waited forever; `timeout` could not end them).
    proc = _run_two_ranks(tmp_path, _TERM_DURING_EXPORT)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "snapvit fit: terminated (SIGTERM)" in proc.stderr
    assert "failed on global rank 0" not in proc.stderr  # the other rank stops as terminated, not as failed


def test_sigterm_to_every_rank_during_the_scoring_stops_them_after_the_same_step(tmp_path) -> None:
    # Lightning's handler broadcast inside the signal handler on every rank: all ranks hung (1 in 3), or the
    # other rank printed a traceback after the command had ended.
    proc = _run_two_ranks(tmp_path, _TERM_EVERY_RANK_WHILE_SCORING, images=8)  # 2 steps per rank
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "snapvit fit: terminated (SIGTERM)" in proc.stderr
    assert "Traceback" not in proc.stderr and "EvolutionarySearch:" not in proc.stdout + proc.stderr


def test_sigterm_to_rank_zero_after_the_scoring_stops_every_rank_at_the_search(tmp_path) -> None:
    # rank 0 stopped alone at Lightning's check after the epoch; the other rank, in the search's first
    # broadcast, ended with gloo's "Connection closed by peer" traceback
    proc = _run_two_ranks(tmp_path, _TERM_RANK_ZERO_AFTER_THE_SCORING)
    (tmp_path / "stderr.txt").write_text(proc.stderr)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "snapvit fit: terminated (SIGTERM)" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
