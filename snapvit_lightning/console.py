"""A quiet console for ``snapvit fit`` and the main job.

A scoring run trains nothing, so some of Lightning's notices do not apply to it. Most are
avoided where they arise: the CLI's Trainer defaults turn the model summary off (its table
and its bf16 size warning say nothing about a run that only reads gradients),
:meth:`SnapViTModule.configure_optimizers` says "no optimizer" the way that does not warn, and
:func:`lightning_cli_args` hands LightningCLI an ``args`` list without a second command line
beside it. :func:`quiet_lightning` silences, by message and module, only the notices that
no setting of ours avoids. It is used by the CLI alone, never installed for a user's own
Trainer or code; :func:`internal_fit` adds Lightning's set-up lines for a Trainer the package runs
for a measurement of its own (``snapvit bench``'s SNIP epoch).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.warnings import PossibleUserWarning

__all__ = [
    "args_from_python",
    "internal_fit",
    "lightning_cli_args",
    "quiet_lightning",
    "quiet_spawned_process",
]

#: The Lightning logger that prints ``rank_zero_info`` messages (and the litlogger tip).
_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"
_LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"
#: Set while :func:`quiet_lightning` is in effect, for :func:`quiet_spawned_process`.
_QUIET_ENV = "SNAPVIT_QUIET_LIGHTNING"


def _not_litlogger_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_LITLOGGER_TIP)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence the Lightning notices that a scoring run causes and that no setting avoids.

    * "Found N module(s) in eval mode at the start of training" (``PossibleUserWarning`` from
      Lightning's fit loop): the student is in eval mode on purpose (no dropout or drop-path
      while its gradients are read; nothing is trained) and Lightning has no way to declare it.
    * "`isinstance(treespec, LeafSpec)` is deprecated" (``FutureWarning`` from Lightning's own
      ``lightning.pytorch.utilities._pytree``): Lightning 2.6's CombinedLoader builds torch's
      deprecated ``LeafSpec`` for every DataLoader of every fit; no call of ours avoids it.
    * The "💡 Tip" to install litlogger: Lightning logs it from ``Trainer.__init__`` whenever no
      ``LitLogger`` is among the loggers, whatever the run.
    * "Using ModelCheckpoint with manual optimization and every_n_train_steps, but no
      pre-optimization state was saved" (``ModelCheckpoint``, the mid-epoch checkpoints of
      docs/resume.md): the scoring's optimizer never changes the model, so the states before and
      after a step are the same.
    * "No seed found, seed set to 0" (``seed_everything`` of a run without ``seed_everything`` in
      its config, LightningCLI's default): the "Seed set to 0" line after it says the same.

    Everything else, warnings of user code and Lightning's other notices included, passes. The
    processes that a ``ddp_spawn`` fit starts inside it silence the same warnings
    (:func:`quiet_spawned_process`, from :meth:`SnapViTModule.setup`).
    """
    rank_zero_log = logging.getLogger(_RANK_ZERO_LOGGER)
    quiet_env = os.environ.get(_QUIET_ENV)
    with warnings.catch_warnings():
        _ignore_notices()
        rank_zero_log.addFilter(_not_litlogger_tip)
        os.environ[_QUIET_ENV] = "1"  # read by spawned processes (ddp_spawn), which inherit no filters
        try:
            yield
        finally:
            rank_zero_log.removeFilter(_not_litlogger_tip)
            if quiet_env is None:
                os.environ.pop(_QUIET_ENV, None)
            else:
                os.environ[_QUIET_ENV] = quiet_env


def _ignore_notices() -> None:
    """Add the warning filters of :func:`quiet_lightning` (to the filters in effect)."""
    warnings.filterwarnings(
        "ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training",
        category=PossibleUserWarning, module=r"lightning\.pytorch\.loops\.fit_loop",
    )
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree",
    )
    warnings.filterwarnings(
        "ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps, but no "
        r"pre-optimization state was saved", category=UserWarning,
    )
    warnings.filterwarnings(
        "ignore", message=r"No seed found, seed set to \d+$", module=r"lightning\.fabric\.utilities\.seed",
    )


def quiet_spawned_process() -> None:
    """In a process spawned by a fit inside :func:`quiet_lightning` (``ddp_spawn``), silence the same notices.

    A spawned process starts with Python's default filters; it runs the fit and ends, so the filters
    are added for the rest of the process, and this package's warnings are ``PROG: warning: ...``
    lines as in the command's own process (:func:`~snapvit_lightning.errors.own_warnings_in_spawned_process`).
    Elsewhere (the CLI's own process, a user's Trainer, the processes ``ddp`` starts, which run the
    command again) this does nothing.
    """
    from .errors import own_warnings_in_spawned_process

    if os.environ.get(_QUIET_ENV) == "1" and multiprocessing.parent_process() is not None:
        _ignore_notices()
    own_warnings_in_spawned_process()


class _NoLightningInfo(logging.Filter):
    """Drops ``rank_zero_info`` lines that Lightning's own code logs (the record names its caller's file)."""

    def __init__(self) -> None:
        super().__init__()
        self.roots = tuple(
            str(Path(module.__file__).resolve().parent) + os.sep
            for module in (sys.modules.get("lightning"), sys.modules.get("pytorch_lightning")) if module is not None
        )

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not str(Path(record.pathname).resolve()).startswith(self.roots)


@contextmanager
def internal_fit() -> Iterator[None]:
    """:func:`quiet_lightning`, and none of Lightning's ``rank_zero_info`` lines, for a fit the package runs itself.

    A fit inside another run (one calibration epoch of ``snapvit bench --baselines``, the plug-in's
    calibration after the user's fit) would print "GPU available", "TPU available" and "`Trainer.fit`
    stopped" in the middle of that run's output, about a Trainer the user never made. The package's
    own lines (the search's progress, the export's) and every warning still pass.
    """
    rank_zero_log = logging.getLogger(_RANK_ZERO_LOGGER)
    lightning_info = _NoLightningInfo()
    with quiet_lightning():
        rank_zero_log.addFilter(lightning_info)
        try:
            yield
        finally:
            rank_zero_log.removeFilter(lightning_info)


def raise_interrupt_of(trainer: Any, exit_: SystemExit) -> None:
    """Raise the Ctrl-C that Lightning ended ``trainer``'s fit with (``sys.exit(1)``, the Trainer interrupted); else return.

    Lightning may also leave Ctrl-C off for the process (``SIGINT`` ignored): it is turned back on.
    """
    from lightning.pytorch.trainer.states import TrainerStatus

    if exit_.code != 1 or trainer is None or trainer.state.status != TrainerStatus.INTERRUPTED:
        return
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    raise KeyboardInterrupt from None


def fit(trainer: Any, *args: Any, **kwargs: Any) -> None:
    """``trainer.fit(*args, **kwargs)`` for a fit the package runs itself; Ctrl-C in it raises ``KeyboardInterrupt``.

    (Lightning ends an interrupted fit with ``sys.exit(1)``: the command would end silently, status 1.)
    """
    try:
        trainer.fit(*args, **kwargs)
    except SystemExit as exit_:
        raise_interrupt_of(trainer, exit_)
        raise


@contextmanager
def lightning_cli_args(args: Sequence[str] | None) -> Iterator[list[str] | None]:
    """The ``args`` to give LightningCLI, with ``sys.argv`` set the way it expects them.

    LightningCLI parses ``args`` *instead of* the command line and warns when ``sys.argv``
    holds arguments too. A caller that passes ``args`` (the main job, tests, notebooks) has
    consumed its own command line already, so while LightningCLI runs ``sys.argv`` holds the
    program name only. ``None`` leaves ``sys.argv`` for LightningCLI to parse.

    Raises:
        TypeError: If ``args`` is a single string rather than a sequence of arguments.
    """
    if args is None:
        yield None
        return
    if isinstance(args, str):
        raise TypeError(f"args must be a sequence of arguments such as ['fit', '--config', 'c.yaml'], got the string {args!r}")
    global _ARGS_FROM_PYTHON
    saved, given = sys.argv, _ARGS_FROM_PYTHON
    sys.argv, _ARGS_FROM_PYTHON = saved[:1], True
    try:
        yield list(args)
    finally:
        sys.argv, _ARGS_FROM_PYTHON = saved, given


_ARGS_FROM_PYTHON = False


def args_from_python() -> bool:
    """Whether the LightningCLI running now got its arguments from :func:`lightning_cli_args`, not the command line."""
    return _ARGS_FROM_PYTHON
