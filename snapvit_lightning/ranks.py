"""Work done on global rank 0 only, then every rank ends alike (the export of a DDP run)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from .errors import Terminated

__all__ = [
    "DistributedSigterm", "RankZeroFailed", "RankZeroTimeout", "collective_safe_sigterm", "files_placed",
    "finish_on_every_rank", "stop_if_terminated", "stop_started_ranks", "stops_on_sigterm", "uninterrupted",
]

#: What :func:`collective_safe_sigterm`'s handler has seen: ``active`` while it is installed, ``seen`` once
#: SIGTERM came, ``stop`` while rank 0's own work (:func:`stops_on_sigterm`) may be stopped at once, ``pending``
#: a SIGTERM :class:`DistributedSigterm` noted after the scoring, ``done`` once rank 0's files are in place.
_SIGTERM = {"active": False, "seen": False, "stop": False, "pending": False, "done": False}

#: The exit status of a process SIGTERM stopped (a shell's 128 + 15), carried by the ``SIGTERMException``
#: raised here: Lightning's own carries none, so a user's script that a SIGTERM stopped ended with status 0.
TERMINATED_STATUS = 143


class RankZeroFailed(ValueError):
    """Raised on the other ranks when the work on global rank 0 failed (rank 0 raises the error itself)."""


class RankZeroTimeout(ValueError):
    """Raised on a rank that waited for global rank 0's work longer than the process group's timeout (a setting)."""


def _timed_out(error: BaseException) -> bool:
    """Whether a collective failed by the process group's timeout (gloo's and NCCL's texts)."""
    text = str(error).lower()
    return "timed out" in text or "timeout" in text


def _collective_failed(trainer: pl.Trainer, what: str, error: BaseException | None, err: RuntimeError) -> NoReturn:
    """Raise what a failed barrier or broadcast of :func:`finish_on_every_rank` means here."""
    limit = getattr(trainer.strategy, "_timeout", None)
    limit = "its default" if limit is None else str(limit)
    if error is not None:  # rank 0 failed or was stopped (Ctrl-C reaches every rank): its own error says why
        raise error from None
    if getattr(trainer, "global_rank", 0) == 0:
        raise RuntimeError(
            f"{what} is done on global rank 0 (its files are written and complete), but the other ranks had stopped "
            f"waiting for it: one failed, or waited longer than the process group's timeout ({limit}), as its own "
            f"error says; the run ends as failed ({err})") from err
    if not _timed_out(err):
        raise err
    raise RankZeroTimeout(
        f"{what}: global rank {trainer.global_rank} waited for global rank 0 to finish it longer than the process "
        f"group's timeout ({limit}), so the run fails: Lightning stops rank 0 too, whose files are written only if "
        "it finished first (never half-written). Rank 0 does this work alone (on a CPU a big model takes long): give "
        "the strategy a longer timeout, DDPStrategy(timeout=datetime.timedelta(hours=2)) in Python, or in a config "
        "`strategy: {class_path: lightning.pytorch.strategies.DDPStrategy, init_args: {timeout: '2:00:00'}}`"
    ) from err


def finish_on_every_rank(trainer: pl.Trainer, error: BaseException | None, what: str) -> None:
    """Wait until rank 0's work is done, then raise its error there and a :class:`RankZeroFailed` elsewhere.

    Every rank must call it (a barrier, then a broadcast), whether or not its own part failed, so no
    rank waits forever and none returns from ``fit`` as if the files existed.

    Args:
        trainer: The Trainer of the run.
        error: What rank 0's work raised (``None`` on success, and on the other ranks).
        what: The work, for the other ranks' message (e.g. ``"the export"``).

    Raises:
        BaseException: ``error``, on rank 0 (also when the other ranks are gone, e.g. after a Ctrl-C).
        RankZeroFailed: On the other ranks when rank 0 failed, with rank 0's error in its message (under
            ``ddp_spawn`` the process that called ``fit`` may report any failed rank's error first).
        SIGTERMException: On the other ranks when a SIGTERM stopped rank 0 (``KeyboardInterrupt``: Ctrl-C).
        RankZeroTimeout: On the other ranks when rank 0's work outlasted the process group's timeout.
    """
    how = ("terminated" if isinstance(error, (SIGTERMException, Terminated)) else "interrupted"
           if isinstance(error, KeyboardInterrupt) else "failed" if error is not None else "")
    cause = "" if how != "failed" else " ".join(f"{type(error).__name__}: {error}".split())[:500]
    try:
        trainer.strategy.barrier(f"snapvit: {what}")
        failed, said = trainer.strategy.broadcast((how, cause), src=0)
    except RuntimeError as err:
        _collective_failed(trainer, what, error, err)
    if error is not None:
        raise error
    if failed == "terminated":  # a signal, not a failure: every rank stops as rank 0 did
        raise SIGTERMException(TERMINATED_STATUS)
    if failed == "interrupted":
        raise KeyboardInterrupt
    if failed:
        raise RankZeroFailed(f"{what} failed on global rank 0, so nothing was written: {said}")


def stop_if_terminated(trainer: pl.Trainer) -> None:
    """Raise Lightning's ``SIGTERMException`` on every rank once global rank 0 has received SIGTERM.

    Lightning notes a SIGTERM and stops the fit only between training steps; the search and the
    export run in ``on_train_end``, after the last one, and would otherwise run to their end. Every
    rank must call it at the same point (under DDP rank 0's flag is broadcast, so all stop together).

    Raises:
        SIGTERMException: When rank 0 has received SIGTERM.
    """
    terminated = bool(getattr(trainer, "received_sigterm", False)) or _SIGTERM["seen"]
    if trainer.world_size > 1:
        terminated = bool(trainer.strategy.broadcast(terminated, src=0))
    if terminated:
        raise SIGTERMException(TERMINATED_STATUS)


@contextmanager
def collective_safe_sigterm(trainer: pl.Trainer) -> Iterator[None]:
    """Under DDP, SIGTERM only noted while every rank runs this package's end-of-fit work.

    Lightning's SIGTERM handler broadcasts from rank 0 inside the handler. During the search (a
    collective per evaluation) and the export (rank 0 works, the others wait at a barrier) that
    broadcast meets another collective, or none, on the other ranks, and every rank waited forever.
    Here the handler only notes the signal: :func:`stop_if_terminated` (called by every rank at the
    same point) then stops all ranks together, and rank 0's own work inside :func:`stops_on_sigterm`
    stops at once. A SIGTERM that :class:`DistributedSigterm` noted after the scoring's last step
    counts as noted here. On leaving, a SIGTERM noted meanwhile stops every rank (one broadcast). One
    process, or outside the main thread: nothing changes.
    """
    if trainer.world_size == 1 or threading.current_thread() is not threading.main_thread() or _SIGTERM["active"]:
        yield
        return

    def note(signum: int, frame: object) -> None:
        if _SIGTERM["done"]:  # rank 0's files are in place: nothing is left to stop (as in one process)
            return
        _SIGTERM["seen"] = True
        if _SIGTERM["stop"]:
            _SIGTERM["stop"] = False
            raise SIGTERMException(TERMINATED_STATUS)

    previous = signal.signal(signal.SIGTERM, note)
    _SIGTERM.update(active=True, seen=_SIGTERM["pending"], stop=False, pending=False, done=False)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        seen = _SIGTERM["seen"]
        _SIGTERM.update(active=False, seen=False, stop=False, done=False)
    if bool(trainer.strategy.broadcast(seen, src=0)):  # every rank, when the block ended alike on all
        raise SIGTERMException(TERMINATED_STATUS)


@contextmanager
def stops_on_sigterm() -> Iterator[None]:
    """Inside :func:`collective_safe_sigterm`, a SIGTERM stops this block at once (``SIGTERMException``).

    For work that calls no collective (the export on rank 0 while the others wait), so stopping it
    anywhere leaves no rank inside a collective; a SIGTERM noted before the block raises on entry.
    Outside :func:`collective_safe_sigterm` (one process) it does nothing: Lightning's handler and
    the CLI's own stop the work there.
    """
    if not _SIGTERM["active"]:
        yield
        return
    _SIGTERM["stop"] = True  # before the check: a signal between the two raises in the handler
    if _SIGTERM["seen"]:
        _SIGTERM["stop"] = False
        raise SIGTERMException(TERMINATED_STATUS)
    try:
        yield
    finally:
        _SIGTERM["stop"] = False


@contextmanager
def uninterrupted() -> Iterator[None]:
    """Inside :func:`stops_on_sigterm`, a SIGTERM during the block is only noted and stops the work after it.

    For steps that must happen all or not at all (the renames that place an export's files: a SIGTERM
    between two renames left the report, the mark of a complete export, beside "wrote none").
    """
    stop = _SIGTERM["stop"]
    _SIGTERM["stop"] = False
    try:
        yield
    finally:
        _SIGTERM["stop"] = stop
    if stop and _SIGTERM["seen"]:
        raise SIGTERMException(TERMINATED_STATUS)


def files_placed() -> None:
    """Inside :func:`collective_safe_sigterm`: rank 0's files are in place, so a SIGTERM from now on is dropped.

    The work it would stop is done: the fit then ends as one process ends at a SIGTERM after its export
    (status 0, every file), not with "terminated ... wrote none" beside the files. Outside it: nothing.
    """
    if _SIGTERM["active"]:
        _SIGTERM.update(stop=False, done=True)


def stop_started_ranks(trainer: object) -> None:
    """SIGTERM the processes a DDP launcher in this process started, when its fit ends in an exception.

    ``ddp``: this process is rank 0; a SIGTERM or an error while the ranks were still starting
    (before Lightning's own handling) left the other ranks waiting for rank 0 in their rendezvous
    for half an hour. ``ddp_spawn``: this process only waits for the ranks, which never see a
    SIGTERM sent to it, so they searched and exported to the end (Python waits for them before
    exiting). Processes that already ended are skipped; other launchers have none to stop.
    """
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    if isinstance(launcher, _SubprocessScriptLauncher):
        for proc in getattr(launcher, "procs", None) or []:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
    elif isinstance(launcher, _MultiProcessingLauncher):  # every rank notes it; rank 0's flag stops them together
        launcher.kill(signal.SIGTERM)


class DistributedSigterm(Callback):
    """Under DDP, a SIGTERM during the scoring stops every rank after the same step, never inside a collective.

    Lightning's handler broadcasts from inside the signal handler and signals the other ranks, which
    broadcast too: with a SIGTERM to every process (a scheduler's), their broadcasts met the training
    loop's own per-step one and every rank waited forever (1 of 3 tries with a ViT). From the scoring's
    start this handler only notes the signal; after every step (and at the epoch's end) all ranks read
    rank 0's note (one broadcast) and, if it is set, stop together at Lightning's next check. After the
    last step it is kept for the search's first check (:func:`collective_safe_sigterm`): Lightning's own
    check after the epoch is rank 0's alone, and rank 0 stopped there while the others searched. As there,
    a signal to another rank alone is dropped. A rank other than 0 that stops ends quietly at the further
    SIGTERM of rank 0's command (:func:`stop_started_ranks`): this handler only notes it (Lightning's
    printed that rank's traceback after the command had ended). ``snapvit fit`` adds it; add it to a DDP
    Trainer of your own.
    """

    def __init__(self) -> None:
        self._seen = False
        self._scoring = False

    @staticmethod
    def _connector(trainer: pl.Trainer) -> object | None:
        connector = getattr(trainer, "_signal_connector", None)  # Lightning's: holds received_sigterm
        if trainer.world_size == 1 or threading.current_thread() is not threading.main_thread():
            return None
        return connector if hasattr(connector, "received_sigterm") else None

    def _stop_with_rank_zero(self, trainer: pl.Trainer) -> None:
        connector = self._connector(trainer)
        if connector is not None and bool(trainer.strategy.broadcast(self._seen, src=0)):
            connector.received_sigterm = True  # every rank: Lightning raises SIGTERMException after this step

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen, self._scoring = False, True
        _SIGTERM["pending"] = False
        connector = self._connector(trainer)
        if connector is not None:

            def note(signum: int, frame: object) -> None:
                self._seen = True
                if not self._scoring:
                    _SIGTERM["pending"] = True

            signal.signal(signal.SIGTERM, note)  # Lightning's connector restores the handlers after the fit

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self._stop_with_rank_zero(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_with_rank_zero(trainer)
        self._scoring = False

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _SIGTERM["pending"] = False  # noted after the export, or with no search or export: not a next fit's
