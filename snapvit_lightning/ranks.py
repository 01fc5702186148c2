"""Work done on global rank 0 only, then every rank ends alike (the export of a DDP run)."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["RankZeroFailed", "finish_on_every_rank", "stop_if_terminated"]


class RankZeroFailed(ValueError):
    """Raised on the other ranks when the work on global rank 0 failed (rank 0 raises the error itself)."""


def finish_on_every_rank(trainer: pl.Trainer, error: BaseException | None, what: str) -> None:
    """Wait until rank 0's work is done, then raise its error there and a :class:`RankZeroFailed` elsewhere.

    Every rank must call it (a barrier, then a broadcast), whether or not its own part failed, so no
    rank waits forever and none returns from ``fit`` as if the files existed.

    Args:
        trainer: The Trainer of the run.
        error: What rank 0's work raised (``None`` on success, and on the other ranks).
        what: The work, for the other ranks' message (e.g. ``"the export"``).

    Raises:
        BaseException: ``error``, on rank 0.
        RankZeroFailed: On the other ranks when rank 0 failed.
    """
    trainer.strategy.barrier(f"snapvit: {what}")
    failed = trainer.strategy.broadcast(error is not None, src=0)
    if error is not None:
        raise error
    if failed:
        raise RankZeroFailed(f"{what} failed on global rank 0 (its error is printed there); nothing was written")


def stop_if_terminated(trainer: pl.Trainer) -> None:
    """Raise Lightning's ``SIGTERMException`` on every rank once global rank 0 has received SIGTERM.

    Lightning notes a SIGTERM and stops the fit only between training steps; the search and the
    export run in ``on_train_end``, after the last one, and would otherwise run to their end. Every
    rank must call it at the same point (under DDP rank 0's flag is broadcast, so all stop together).

    Raises:
        SIGTERMException: When rank 0 has received SIGTERM.
    """
    terminated = bool(getattr(trainer, "received_sigterm", False))
    if trainer.world_size > 1:
        terminated = bool(trainer.strategy.broadcast(terminated, src=0))
    if terminated:
        raise SIGTERMException
