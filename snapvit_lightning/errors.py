"""User errors on the command line: one line on stderr, no traceback.

``snapvit`` (every subcommand, LightningCLI's ``fit`` included) and the main job
``python -m snapvit_lightning.quickstart`` run inside :func:`exit_on_user_error`: an error
caused by the user's input ends the program with ``<prog>: error: <message>`` and exit
status 2. User errors are

* a missing, existing or inaccessible path (``FileNotFoundError``, ``FileExistsError``,
  ``IsADirectoryError``, ``NotADirectoryError``, ``PermissionError``);
* an optional dependency that is not installed (``ModuleNotFoundError`` of another package);
* a ``ValueError``, ``TypeError`` or ``ImportError`` that this package raises on purpose, i.e.
  whose innermost frame is a ``raise`` statement in ``snapvit_lightning`` (argument checks, bad
  image folders, files of another format, a missing optional dependency);
* Lightning's ``MisconfigurationException`` (a Trainer setting that cannot work here) and the
  ``ValueError`` of its accelerator/strategy checks (e.g. ``--trainer.strategy dpp``);
* a config or option LightningCLI cannot parse (an unknown key, a value of the wrong type):
  :func:`one_line_error_parser` prints those in the same one-line form;
* one of the above raised by a class jsonargparse instantiates from a config (a callback's
  ``init_args``): jsonargparse wraps it in its own error (``Does not validate against any of the
  Union subtypes`` and the whole config); the message is the wrapped error's, after the name of the
  class that raised it, e.g. ``EvolutionarySearch: max_evals must be an int >= 1, got 0``.

Anything else is a bug and keeps its traceback. ``SNAPVIT_TRACEBACK=1`` in the environment
shows the full traceback (and LightningCLI's full usage) for user errors too.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import signal
import sys
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "OneLineArgumentParser",
    "TRACEBACK_ENV",
    "Terminated",
    "exit_on_user_error",
    "is_user_error",
    "one_line",
    "one_line_error_parser",
    "own_warnings_as",
    "own_warnings_in_spawned_process",
    "process_rank",
    "sigterm_raises",
    "traceback_requested",
    "user_error_message",
    "warn_at_caller",
    "warn_at_caller_on_rank_zero",
]

#: Set to ``1`` to get the full traceback of a user error.
TRACEBACK_ENV = "SNAPVIT_TRACEBACK"

#: The command (``PROG``) while :func:`own_warnings_as` is in effect, for :func:`own_warnings_in_spawned_process`.
_WARNINGS_AS_ENV = "SNAPVIT_WARNINGS_AS"

#: Exit status of a user error (as argparse's usage errors).
USER_ERROR_STATUS = 2

_PACKAGE = Path(__file__).resolve().parent
_PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
_RAISED_ON_PURPOSE = (ValueError, TypeError, ImportError)


def traceback_requested() -> bool:
    """Whether ``SNAPVIT_TRACEBACK`` asks for full tracebacks (set, and not ``0`` or empty)."""
    return os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0")


def _raised_by_this_package(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return False
    innermost = frames[-1]
    inside = Path(innermost.filename).resolve().is_relative_to(_PACKAGE)
    return inside and (innermost.line or "").lstrip().startswith("raise")


def _is_misconfiguration(err: BaseException) -> bool:
    module = sys.modules.get("lightning.fabric.utilities.exceptions")
    return module is not None and isinstance(err, module.MisconfigurationException)


def _is_direct_user_error(err: BaseException) -> bool:
    if isinstance(err, _PATH_ERRORS) or _is_misconfiguration(err) or _bad_trainer_setting(err):
        return True
    if isinstance(err, Warning):  # raised only where the user asked warnings to be errors (-W error, PYTHONWARNINGS)
        return True
    if isinstance(err, ModuleNotFoundError) and not (err.name or "").startswith(_PACKAGE.name):
        return True  # an optional dependency that is not installed
    return isinstance(err, _RAISED_ON_PURPOSE) and _raised_by_this_package(err)


def _bad_trainer_setting(err: BaseException) -> bool:
    """A ``ValueError`` of Lightning's checks of the Trainer's accelerator, strategy, devices and precision."""
    frames = traceback.extract_tb(err.__traceback__)
    return isinstance(err, ValueError) and bool(frames) and Path(frames[-1].filename).as_posix().endswith(
        "lightning/pytorch/trainer/connectors/accelerator_connector.py")


def _raised_in_jsonargparse(err: BaseException) -> bool:
    module = sys.modules.get("jsonargparse")
    frames = traceback.extract_tb(err.__traceback__)
    if module is None or module.__file__ is None or not frames:
        return False
    return Path(frames[-1].filename).resolve().is_relative_to(Path(module.__file__).resolve().parent)


def _wrapped_user_error(err: BaseException) -> BaseException | None:
    """The user error that jsonargparse wrapped (its ``__cause__`` chain) while instantiating a class, if any."""
    if not isinstance(err, ValueError) or not _raised_in_jsonargparse(err):
        return None
    cause, seen = err.__cause__, set()
    while cause is not None and id(cause) not in seen:
        if _is_direct_user_error(cause):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__
    return None


def _raising_class(err: BaseException) -> str | None:
    """The class whose ``__init__`` raised ``err`` (the outermost such frame of its traceback), if any."""
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            return type(frame.f_locals["self"]).__name__
        tb = tb.tb_next
    return None


def _spawned_user_error(err: BaseException) -> str | None:
    """The message of a user error a ``ddp_spawn`` rank raised, from torch's ``ProcessRaisedException`` text, if any.

    torch passes on only the rank's formatted traceback: its last line is ``Type: message``, and a
    user error is a path error, or a ``ValueError``/``TypeError``/``ImportError`` whose innermost
    frame is a ``raise`` in this package (as :func:`_raised_by_this_package` reads a live one).
    """
    if type(err).__name__ != "ProcessRaisedException":
        return None
    lines = [line for line in str(err).splitlines() if line.strip()]
    found = re.fullmatch(r"(\w+(?:\.\w+)*): (.*)", lines[-1]) if lines else None
    if found is None:
        return None
    kind, message = found.group(1).rsplit(".", 1)[-1], found.group(2)
    if kind in {e.__name__ for e in _PATH_ERRORS} | {"MisconfigurationException"}:
        return message
    frames = [i for i, line in enumerate(lines) if line.lstrip().startswith('File "')]
    if kind not in {e.__name__ for e in _RAISED_ON_PURPOSE} or not frames or frames[-1] + 1 >= len(lines):
        return None
    where = re.match(r'\s*File "([^"]+)"', lines[frames[-1]])
    inside = where is not None and Path(where.group(1)).resolve().is_relative_to(_PACKAGE)
    return message if inside and lines[frames[-1] + 1].lstrip().startswith("raise") else None


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` was caused by the user's input (see the module docstring) rather than a bug."""
    return _is_direct_user_error(err) or _wrapped_user_error(err) is not None or _spawned_user_error(err) is not None


#: The options that run a GPU config on this machine's CPU instead (advice of the errors about a missing GPU).
ON_THE_CPU = "--trainer.accelerator cpu --trainer.devices 1 --trainer.strategy auto"

#: What to do about Lightning's errors that do not say it (their message's start -> the advice appended).
_ADVICE = {
    "No supported gpu backend found": f"trainer.accelerator asks for GPUs and this machine has none; on its CPU: {ON_THE_CPU}",
    "`CUDAAccelerator` can not run on your system": f"this machine has no CUDA GPU; on its CPU: {ON_THE_CPU}",
}


def user_error_message(err: BaseException) -> str:
    """The one-line message of a user error (:func:`is_user_error`): its own, or the one jsonargparse wrapped."""
    spawned = None if _is_direct_user_error(err) else _spawned_user_error(err)
    if spawned is not None:  # a ddp_spawn rank's, as its traceback's last line gave it
        return one_line(spawned)
    wrapped = None if _is_direct_user_error(err) else _wrapped_user_error(err)
    if isinstance(err, Warning):
        return one_line(f"{err} (a {type(err).__name__} that -W error or PYTHONWARNINGS turned into an error)")
    if wrapped is None:
        advice = next((a for start, a in _ADVICE.items() if str(err).startswith(start)), None)
        return one_line(str(err) if advice is None else f"{err} ({advice})")
    owner = _raising_class(wrapped)
    return one_line(f"{owner}: {wrapped}" if owner else str(wrapped))


def one_line(message: str) -> str:
    """``message`` with its lines joined by single spaces."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def warn_at_caller(message: str) -> None:
    """``warnings.warn(message)`` pointing at the first caller outside this package and Lightning (its line, not ours).

    A warning from deep inside (``subnet(latency_ms=)`` → ``latency_budget`` → the timing) then names
    the user's line whichever way it was reached; one from a callback hook or LightningCLI's set-up
    names the line that called Lightning (a user's ``trainer.fit``), not Lightning's. The package's own
    commands (``snapvit_lightning.cli``, the benchmarks) count as callers, so the CLI still shows it as
    ``snapvit CMD: warning: ...``.
    """
    package = __name__.rsplit(".", 1)[0]
    passed = (package + ".", "lightning.", "pytorch_lightning.", "jsonargparse.", "torch.multiprocessing.", "multiprocessing.")
    frame, level, spawned, own = sys._getframe(1), 2, False, 0  # stacklevel 1 is this function's own line
    while frame is not None:
        module = str(frame.f_globals.get("__name__", ""))
        own = own or (level if module != __name__ else 0)  # the package's line that warned (not this module's)
        if not module.startswith(passed) or module in (f"{package}.cli", f"{package}.quickstart") \
                or module.startswith(f"{package}.benchmarks."):
            break
        spawned = spawned or module.startswith(("multiprocessing.", "torch.multiprocessing."))
        frame, level = frame.f_back, level + 1
    if spawned and frame is not None and frame.f_back is None:  # ddp_spawn's bootstrap: `python -c "...spawn_main..."`
        frame = None
    # no caller of the user's (a rank that ddp_spawn started): the package's own line, not a library's
    warnings.warn(message, stacklevel=level if frame is not None else own or 2)


def warn_at_caller_on_rank_zero(message: str) -> None:
    """:func:`warn_at_caller` in the process of global rank 0 only, as Lightning's ``rank_zero_warn``.

    ``rank_zero_warn`` points at a fixed depth of the stack: from a callback's hook, inside the package
    or Lightning; this names the user's ``trainer.fit`` line as the package's other warnings do.
    """
    from lightning_utilities.core.rank_zero import rank_zero_only  # Lightning sets its rank; light to import

    if getattr(rank_zero_only, "rank", process_rank()) == 0:
        warn_at_caller(message)


def process_rank() -> int:
    """This process's rank in a DDP run that Lightning or torchrun started (``RANK``/``LOCAL_RANK``), else 0."""
    return int(os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or 0)


@contextmanager
def own_warnings_as(prog: str) -> Iterator[None]:
    """This package's warnings as ``PROG: warning: ...`` lines (not ``/path/to/module.py:545: ...``); others as before.

    Replaces ``warnings.showwarning`` (Lightning replaces ``formatwarning`` when it is first imported);
    while warnings are recorded (``catch_warnings(record=True)``, ``pytest.warns``) or shown by a
    replaced ``showwarning``, they go there as before.
    """
    previous = warnings.showwarning
    package = Path(__file__).resolve().parent  # snapvit_lightning/

    def recorded() -> bool:  # catch_warnings(record=True) swaps the writer for its list's append
        return getattr(getattr(warnings, "_showwarnmsg_impl", None), "__name__", "") != "_showwarnmsg_impl"

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202 (warnings' signature)
        if (previous is not warnings._showwarning_orig or recorded()
                or not Path(filename).resolve().is_relative_to(package)):
            return previous(message, category, filename, lineno, file, line)
        try:
            (sys.stderr if file is None else file).write(f"{prog}: warning: {message}\n")
        except OSError:  # as warnings' own: a closed stderr is not an error
            pass

    warnings.showwarning = show
    outer = os.environ.get(_WARNINGS_AS_ENV)
    os.environ[_WARNINGS_AS_ENV] = prog  # read by spawned processes (ddp_spawn), which start with Python's own
    try:
        yield
    finally:
        warnings.showwarning = previous
        if outer is None:
            os.environ.pop(_WARNINGS_AS_ENV, None)
        else:
            os.environ[_WARNINGS_AS_ENV] = outer


def own_warnings_in_spawned_process() -> None:
    """In a process spawned inside :func:`own_warnings_as` (``ddp_spawn``), its warnings as ``PROG: warning: ...`` too.

    A spawned process runs the fit and ends, so the lines stay so for the rest of the process.
    Elsewhere (the command's own process, a user's Trainer, the processes ``ddp`` starts, which
    run the command again) this does nothing.
    """
    import multiprocessing

    prog = os.environ.get(_WARNINGS_AS_ENV)
    if prog and multiprocessing.parent_process() is not None and warnings.showwarning is warnings._showwarning_orig:
        _SPAWNED_PROCESS_WARNINGS.append(own_warnings_as(prog))  # kept: a context collected would be left
        _SPAWNED_PROCESS_WARNINGS[-1].__enter__()  # never left: the process ends with the fit


_SPAWNED_PROCESS_WARNINGS: list = []


@contextmanager
def exit_on_user_error(prog: str) -> Iterator[None]:
    """Turn a user error raised inside the block into ``<prog>: error: <message>`` and exit 2.

    Other exceptions pass unchanged, and so does every exception when :func:`traceback_requested`.
    In the other processes of a DDP run (``RANK``/``LOCAL_RANK`` > 0) the line starts with ``[rank N]``:
    an error every rank raises is then told apart from a second one.

    Args:
        prog: the program as the user typed it, e.g. ``"snapvit slice"``.

    Raises:
        SystemExit: with status 2 after printing the one-line message to stderr.
    """
    try:
        yield
    except Exception as err:
        if traceback_requested() or not is_user_error(err):
            raise
        rank = process_rank()
        sys.stderr.write(f"{f'[rank {rank}] ' if rank > 0 else ''}{prog}: error: {user_error_message(err)}\n")
        raise SystemExit(USER_ERROR_STATUS) from None


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose usage errors are one line: ``snapvit slice: error: ...``.

    argparse prints the whole usage (a dozen lines) before the message; this prints the message
    and where to find the options, and exits with status 2 (its subparsers are of this class too).
    With ``SNAPVIT_TRACEBACK=1`` it behaves as argparse's. A value that starts with a minus and a digit
    (``--budgets -0.1,0``, ``--mlp-ratio -1``) is read as a value, as Python 3.13's argparse does, so
    the option's own check names it; before 3.13 ``-0.1,0`` was taken for an unknown option.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"-\.?\d")

    def error(self, message: str) -> NoReturn:
        if traceback_requested():
            super().error(message)
        sys.stderr.write(f"{self.prog}: error: {one_line(message)} (see `{self.prog} --help`)\n")
        self.exit(USER_ERROR_STATUS)


@functools.cache
def one_line_error_parser() -> type:
    """A ``LightningArgumentParser`` whose parse errors are one line: ``snapvit fit: error: ...``.

    Pass it to LightningCLI as ``parser_class``. jsonargparse's own error prints the whole
    usage (dozens of lines) before the message; this one prints the message and where to find
    the options, and exits with status 2. With ``SNAPVIT_TRACEBACK=1`` (or when the parser is
    used with ``exit_on_error=False``, as jsonargparse does internally) it behaves as jsonargparse's.
    """
    from lightning.pytorch.cli import LightningArgumentParser

    class OneLineErrorParser(LightningArgumentParser):
        def error(self, message: str, ex: Exception | None = None) -> NoReturn:
            if not self.exit_on_error or traceback_requested():
                super().error(message, ex)
            parser: Any = getattr(ex, "subcommand_parser", None) or self
            prog = parser.prog.replace(" [options]", "")
            sys.stderr.write(f"{prog}: error: {_parse_error_text(message)} (see `{prog} --help`)\n")
            self.exit(USER_ERROR_STATUS)

    return OneLineErrorParser


#: What a callback's ``budgets`` takes, said when jsonargparse refused one (its report lists the union's types).
_BUDGET_FORMS = ("each budget is [mlp_ratio, head_ratio], a FLOPs fraction in (0, 1], or {flops: F} / {params: P} "
                 "/ {mlp_ratio: M, head_ratio: H}")

_BASE_CALLBACKS = ("lightning.Callback", "lightning.pytorch.Callback", "lightning.pytorch.callbacks.Callback")


def _parse_error_text(message: str) -> str:
    """The one-line text of a parse error: the callback and option a bad value reached, else jsonargparse's words.

    A callback option's value that its type refuses (``--trainer.callbacks.init_args.budgets '[[0.5]]'``,
    or ``budgets: [[0.5]]`` in a config's callback list) reaches jsonargparse's union of callbacks, whose
    report (1,500 characters on one line) also says that Lightning's base ``Callback`` takes no such option.
    When a named callback class refused a value, only its refusal is said: ``ElasticExport: budgets: [0.5]
    is not a budget (...)``; ``SNAPVIT_TRACEBACK=1`` shows jsonargparse's whole report.
    """
    precision = re.search(r'Parser key "trainer\.precision":.*Given value: (.*)$', one_line(message))
    if precision:  # jsonargparse's report lists 16-mixed and the others Lightning has, which the scoring refuses
        from .precision_state import precision_refusal

        return precision_refusal("trainer.precision", precision.group(1))
    refusal = _callback_value_refusal(message) if 'Parser key "trainer.callbacks"' in message else None
    if refusal is None:
        return f"{_callbacks_hint(message)}{one_line(message)}"
    cls, key, reason = refusal
    if key == "budgets":
        given = re.search(r"Given value: (.*)$", reason)
        not_list = re.search(r"Expected a <class 'collections.abc.Sequence'>. Got value: (.*)$", reason)
        if given or not_list:
            reason = f"{given.group(1)} is not a budget" if given else f"expected a list of budgets, got {not_list.group(1)}"
        reason += f" ({_BUDGET_FORMS})"
    return f"{cls}: {key}: {reason}"


def _callback_value_refusal(message: str) -> tuple[str, str, str] | None:
    """``(class name, option, jsonargparse's reason on one line)`` for the first named callback that refused a value.

    Read from the indentation of jsonargparse's report: the lines under ``- Problem with given
    class_path 'CLS':`` that start with ``Parser key "KEY":``.
    """
    lines = message.splitlines()
    for i, line in enumerate(lines):
        head = re.match(r"(\s*)- Problem with given class_path '([\w.]+)':\s*$", line)
        if not head or head.group(2) in _BASE_CALLBACKS:
            continue
        depth = len(head.group(1))
        block = []
        for below in lines[i + 1:]:
            if below.strip() and len(below) - len(below.lstrip()) <= depth:
                break
            block.append(below)
        key = re.match(r'\s*Parser key "([\w.]+)":\s*(.*)$', block[0]) if block else None
        if key:
            reason = one_line("\n".join([key.group(2), *block[1:]]))
            reason = re.sub(r"\s*Given value type: <class '\w+'>", "", reason)
            return head.group(2).rsplit(".", 1)[-1], key.group(1), reason
    return None


def _callbacks_hint(message: str) -> str:
    """What to do, before jsonargparse's words, when a callback option reached a callback that lacks it.

    jsonargparse tries every member of the callbacks' union and lists each refusal; the first refusal
    by a named callback class (not Lightning's base ``Callback``) says which option was wrong where.
    A dotted command-line option (``--trainer.callbacks.NAME``, a ``NestedArg``) reaches only the last
    callback, which is said too; an option in a config's list was just misspelt or misplaced.
    """
    if 'Parser key "trainer.callbacks"' not in message or "is not accepted" not in message:
        return ""
    refusals = [(cls.rsplit(".", 1)[-1], option) for cls, option in re.findall(
        r"Problem with given class_path '([\w.]+)':\s*Option '([\w.]+)' is not accepted", message)
        if cls not in _BASE_CALLBACKS]
    refused = f"{refusals[0][0]} takes no option '{refusals[0][1]}'" if refusals else "a callback takes no such option"
    if "NestedArg" in message:
        return (f"{refused}: --trainer.callbacks.init_args.NAME reaches only the last callback of the list (in the "
                "configs, ElasticExport); set another callback's options, e.g. the search's max_evals, in a copy of "
                "the config. jsonargparse: ")
    return f"{refused} (a misspelt or misplaced key in trainer.callbacks' init_args). jsonargparse: "


class Terminated(BaseException):
    """A command stopped by SIGTERM (exit status 143, as a shell reports a process it ended).

    ``args[0]``: the last checkpoint a ``ModelCheckpoint`` saved, to resume from (or ``None``);
    ``args[1]``, when given: what the stop left (else a fit's: the export wrote nothing).
    """


@contextmanager
def sigterm_raises(unless_replaced: bool = False) -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in the block, so a file being written is removed on the way out.

    (Python's default ends the process at once, which could leave a staged ``.NAME.RANDOM.partial`` behind.)
    ``unless_replaced``: only while this handler is the installed one, as around a fit: Lightning's
    own handler, installed for the fit, calls the one it found after its own, which then does nothing;
    before the fit (the DDP ranks starting) and after it, SIGTERM stops the command here.
    Outside the main thread, where no handler can be set, the block runs as before.
    """

    def stop(signum: int, frame: object) -> None:
        if unless_replaced and signal.getsignal(signal.SIGTERM) is not stop:
            return
        raise Terminated(None, "files are written under a temporary name and renamed at the end, so none was "
                         "left half-written")

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
