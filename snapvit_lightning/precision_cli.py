"""``trainer.precision: auto`` in the ``snapvit`` CLI: a LightningCLI that resolves it before the Trainer.

The probe (:func:`~snapvit_lightning.precision.resolve_precision`) runs once, in the process the
user started; under DDP the processes Lightning starts apply its choice (:data:`CHOICE_ENV`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, Optional, Union

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.trainer.connectors.accelerator_connector import _PRECISION_INPUT
from typing_extensions import override

from .console import args_from_python
from .errors import process_rank, warn_at_caller_on_rank_zero
from .precision import PROBE_VIEWS, _allowed, _apply_record, cli_device, resolve_precision
from .precision_state import precision_refusal, saved_precision

__all__ = ["CHOICE_ENV", "AutoPrecisionTrainer", "AutoPrecisionCLI", "last_checkpoint", "lightning_cli", "lightning_interrupt"]


def _config_paths(words: list[str]) -> list[tuple[int, str]]:
    """``(position, file)`` of each config in ``words``: ``--config F``, ``--config=F``, ``-c F`` or ``-cF``."""
    found = []
    for i, word in enumerate(words):
        if word in ("--config", "-c"):
            found.append((i, words[i + 1] if i + 1 < len(words) else ""))
        elif word.startswith("--config="):
            found.append((i, word.split("=", 1)[1]))
        elif word.startswith("-c") and not word.startswith("--"):  # argparse's attached form
            found.append((i, word[2:]))
    return found


def _config_sets(path: str, key: str) -> bool:
    """Whether the YAML config at ``path`` sets the dotted ``key`` (``data.batch_size``); ``True`` when unsure.

    Unsure: the file cannot be read as a mapping, or the key goes on inside a list (``trainer.callbacks.X``,
    ``trainer.callbacks+``), which a config's list replaces whatever it holds.
    """
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            node: Any = yaml.safe_load(f)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return True
    for part in key.rstrip("+").split("."):
        if not isinstance(node, dict):
            return node is not None and not isinstance(node, (str, int, float, bool))
        if part not in node:
            return False
        node = node[part]
    return True


class AutoPrecisionTrainer(Trainer):
    """A ``Trainer`` whose ``precision`` type also admits ``"auto"``, so LightningCLI parses it.

    ``"auto"`` itself is resolved by :class:`AutoPrecisionCLI` before the Trainer is built.

    Raises:
        ValueError: If built with ``precision="auto"`` directly.
    """

    def __init__(self, *, precision: Optional[Union[_PRECISION_INPUT, Literal["auto"]]] = None, **kwargs: Any) -> None:
        if precision == "auto":
            raise ValueError(
                "precision='auto' is resolved before the Trainer is built: `snapvit fit` does it; in Python "
                "pass snapvit_lightning.precision.resolve_precision('auto', module, device) as precision"
            )
        super().__init__(precision=precision, **kwargs)


class AutoPrecisionCLI(LightningCLI):
    """LightningCLI that resolves ``trainer.precision: auto`` with :func:`resolve_precision`.

    Use it with ``trainer_class=AutoPrecisionTrainer`` (see :func:`lightning_cli`). The probe
    runs on the device of ``trainer.accelerator`` (:func:`cli_device`) with at most
    :data:`PROBE_VIEWS` of the datamodule's views per image, and prints one line; explicit precisions are passed through untouched,
    and one the scoring does not support (``16-mixed``, ``64-true``, ...) is refused before the Trainer is built.
    """

    last_trainer: Optional[Trainer] = None

    @override
    def before_instantiate_classes(self) -> None:
        """Refuse ``--optimizer``/``--lr_scheduler``: LightningCLI accepts them, and the scoring, which steps no weights, ignored them."""
        config = self.config.get(self.config.get("subcommand") or "", self.config)
        given = [key for key in ("optimizer", "lr_scheduler") if config.get(key) is not None]
        if given:
            raise ValueError(f"{' and '.join(given)}: the scoring computes gradients and steps no weights, so "
                             f"{' and '.join(given)} would be ignored; remove {', '.join(f'--{k}' for k in given)} "
                             "(or the config's key)")

    @override
    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Warn about options given before a ``--config`` that sets them: applied in order, the config replaces them."""
        words = [w for w in (sys.argv[1:] if args is None else args) if isinstance(w, str)]
        configs = _config_paths(words)
        before = [w.split("=", 1)[0] for i, w in enumerate(words) if w.startswith("--")
                  and not w.startswith(("--config", "--print_config", "--help"))
                  and any(_config_sets(path, w.split("=", 1)[0][2:]) for j, path in configs if j > i)]
        if before:
            one = len(before) == 1
            warn_at_caller_on_rank_zero(
                f"{', '.join(before)} come{'s' * one} before --config, whose values replace "
                f"{'it' if one else 'them'}: put --config first"
            )
        super().parse_arguments(parser, args)

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._get(self.config_init, "trainer", default={}) or {}
        requested = kwargs.get("precision", config.get("precision"))
        lightning_alias = {"bf16": "bf16-mixed", "32": "32-true"}  # Lightning's short names of allowed precisions
        if requested is not None and lightning_alias.get(str(requested), str(requested)) not in _allowed():
            # refused here: Lightning would turn 16-mixed into bf16-mixed on a CPU, unseen by the module
            raise ValueError(precision_refusal("trainer.precision", requested))
        check_sources = getattr(getattr(self, "datamodule", None), "check_sources", None)
        if callable(check_sources):  # a bad folder or holdout: before the probe's minute and DDP's start, not after
            check_sources()
        resumed = getattr(self, "_resumed_precision", None)
        if requested != "auto" and resumed is not None and resumed.get("probe") is not None and \
                lightning_alias.get(str(requested), str(requested)) == resumed["trainer_precision"]:
            _apply_record(self.model, resumed["probe"])  # the probe's attention kernel too: the scoring goes on as it began
        if requested == "auto":
            shared = _launched_with_choice()
            if shared is not None:  # a DDP process Lightning started: rank 0's choice, not a probe of its own
                _apply_record(self.model, shared)
                kwargs["precision"] = shared["trainer_precision"]
            elif resumed is not None:  # the scoring goes on as it began (a new probe may choose otherwise)
                kwargs["precision"] = resumed["trainer_precision"]
                if resumed.get("probe") is not None:
                    _apply_record(self.model, resumed["probe"])
                    os.environ[CHOICE_ENV] = json.dumps({"pid": os.getpid(), "record": resumed["probe"]})
                if process_rank() == 0:  # the DDP processes Lightning starts re-run this command
                    print(f"precision: {resumed['trainer_precision']}, as the resumed checkpoint's scoring began "
                          "(trainer.precision auto probes no more on resume)")
            else:
                views = min(PROBE_VIEWS, int(getattr(getattr(self, "datamodule", None), "num_views", PROBE_VIEWS)))
                kwargs["precision"] = resolve_precision(
                    "auto", self.model, cli_device(config.get("accelerator")), views=views)
                # for the processes Lightning's DDP launcher starts from this one (their parent)
                os.environ[CHOICE_ENV] = json.dumps({"pid": os.getpid(), "record": self.model.precision_probe})
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except RuntimeError as err:  # Lightning's words name no option; a traceback with status 1 before
            twice = re.search(r"more than one stateful callback of type `(\w+)`", str(err))
            if twice is None:
                raise
            raise ValueError(
                f"trainer.callbacks holds two {twice.group(1)} callbacks (--trainer.callbacks+= adds one beside the "
                "config's): set the config's own callback options in a copy of the config"
            ) from None
        _check_restartable(trainer)
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path") == "best" and not trainer.checkpoint_callbacks:
            raise ValueError("--ckpt_path best: the trainer has no ModelCheckpoint to find a best checkpoint in; give "
                             "the .ckpt file (or `last` with the ModelCheckpoint that saved it: docs/resume.md)")
        AutoPrecisionCLI.last_trainer = trainer  # the CLI reads its state when the fit ends in sys.exit (Ctrl-C)
        return trainer

    @override
    def _parse_ckpt_path(self) -> None:
        """Refuse a ``--ckpt_path`` that is no readable Lightning checkpoint, and model options that differ
        from the checkpoint's: Lightning would replace them silently (the calibration data's options are
        ``CalibrationDataModule``'s to compare: ``load_state_dict``, ``check_saved_options``).

        LightningCLI reads the model's arguments from the ``--ckpt_path`` checkpoint over the command's,
        so a resume asking for another ``model.accumulation`` (criterion, weights, ...) continued the
        old scoring without a word.
        """
        asked = _plain(self.config.get(self.config.get("subcommand") or "", {}).get("model"))
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        checkpoint = _check_lightning_checkpoint(ckpt_path)  # before Lightning's own reading, which has no words for a bad file
        self._resumed_precision = None if checkpoint is None else saved_precision(checkpoint)
        super()._parse_ckpt_path()
        saved = _plain(self.config[subcommand].get("model")) if ckpt_path else None
        differ = [] if not isinstance(asked, dict) or not isinstance(saved, dict) else [
            f"model.{k}={asked[k]!r} (the checkpoint's: {saved[k]!r})" for k in asked if k in saved and asked[k] != saved[k]]
        if differ:
            raise ValueError(
                f"--ckpt_path {ckpt_path}: a resumed fit continues the checkpoint's scoring, which this command "
                f"changes: {'; '.join(differ)}; resume with the checkpoint's options, or start a new fit without --ckpt_path"
            )

    def before_fit(self) -> None:
        """A resumed fit that runs nothing ends with :meth:`after_fit`'s error instead of the module's warning.

        Lightning reads ``--ckpt_path`` (also ``last``, which it finds itself) with ``weights_only=None``, torch's
        default: under torch < 2.6 that unpickles whatever the file holds. The command reads it with
        ``weights_only=True`` (Lightning >= 2.6's ``fit`` option), and refuses ``--weights_only false``.

        Raises:
            ValueError: ``--weights_only false``.
        """
        config = self.config_init[self.subcommand]
        if "weights_only" in self._subcommand_method_arguments.get(self.subcommand, ()):
            if config["weights_only"] is False:
                raise ValueError("--weights_only false would unpickle what the checkpoint holds (code, not only tensors); "
                                 "this command reads checkpoints of tensors and plain values only (drop the option)")
            config["weights_only"] = True
        if not self._spawned_fit():
            self.model._warn_unfinished_resume = False

    def fit(self, **kwargs: Any) -> None:
        """``trainer.fit``; a checkpoint that holds pickled objects (``--ckpt_path last`` too) is one line, not torch's traceback."""
        import pickle

        try:
            self.trainer.fit(**kwargs)
        except Exception as err:  # torch's refusal; under ddp_spawn wrapped in its ProcessRaisedException
            if "Weights only load failed" not in str(err) or not isinstance(err, pickle.UnpicklingError) \
                    and type(err).__name__ != "ProcessRaisedException":
                raise
            raise ValueError(f"--ckpt_path {kwargs.get('ckpt_path')}: {_PICKLED}") from None

    def after_fit(self) -> None:
        """Refuse a resumed fit that ran nothing: nothing was searched or written."""
        if self._spawned_fit():
            return  # the fit ran in the spawned processes (their module warned); this one's module never trained
        if self.trainer.ckpt_path is not None and getattr(self.model, "_train_started", True) is False:
            trainer = self.trainer
            limit = "fast_dev_run" if trainer.fast_dev_run else (
                f"max_steps={trainer.max_steps}" if 0 <= trainer.max_steps <= trainer.global_step else None)
            if limit is not None:  # the checkpoint is fine: the command's limit stopped the fit at its step
                raise ValueError(f"--ckpt_path {trainer.ckpt_path}: the resumed fit stopped before a step ({limit}, at the "
                                 f"checkpoint's step {trainer.global_step}), so nothing was searched or written; "
                                 f"resume without {limit.split('=')[0]}")
            raise ValueError(
                f"--ckpt_path {self.trainer.ckpt_path}: this checkpoint was saved after the scoring epoch had ended, "
                "so the resumed fit ran no search and wrote nothing; resume from a checkpoint saved during the "
                "scoring (ModelCheckpoint every_n_train_steps with save_on_train_epoch_end false), or start a new fit"
            )

    def _spawned_fit(self) -> bool:
        """Whether the fit runs in processes the strategy spawns (``ddp_spawn``), not in this one."""
        from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

        return isinstance(getattr(self.trainer.strategy, "launcher", None), _MultiProcessingLauncher)


#: A checkpoint torch's weights-only reading refused, in words (before the fit, and from Lightning's own reading).
_PICKLED = ("the checkpoint holds pickled objects besides tensors and plain values, which are never unpickled here "
            "(e.g. a whole model or a class of its own); resume from a checkpoint a ModelCheckpoint of this command saved")


def _check_lightning_checkpoint(ckpt_path: str | None) -> dict[str, Any] | None:
    """The ``--ckpt_path`` file's checkpoint (``None`` for none or ``last``/``best``: Lightning's to find), or a refusal.

    Raises:
        ValueError: A missing file or a folder, a file torch cannot read (truncated, not a torch file)
            or that is no Lightning checkpoint.
    """
    if not ckpt_path or str(ckpt_path) in ("last", "best", "hpc", "registry"):
        return None
    if not os.path.isfile(ckpt_path):
        what = "a folder" if os.path.isdir(ckpt_path) else "not found"
        raise ValueError(f"--ckpt_path {ckpt_path}: {what}; give a .ckpt file a ModelCheckpoint saved")
    import pickle

    import torch

    try:
        try:
            checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)
        except RuntimeError as err:  # torch's legacy format cannot be mapped (nor is it a Lightning checkpoint's)
            if "mmap" not in str(err):
                raise
            checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, pickle.UnpicklingError) as err:
        with open(ckpt_path, "rb") as f:
            if f.read(64).lstrip()[:1] in (b"{", b"["):
                raise ValueError(f"--ckpt_path {ckpt_path}: a JSON file (a report?), not a Lightning checkpoint: give a .ckpt "
                                 "file a ModelCheckpoint saved") from None
        reason = (re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines() or [""])[0]  # torch's bold
        if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):  # torch's refusal
            raise ValueError(f"--ckpt_path {ckpt_path}: {_PICKLED}") from None
        raise ValueError(f"--ckpt_path {ckpt_path}: not a readable Lightning checkpoint (truncated, corrupt or not "
                         f"a torch file?): torch.load raised {type(err).__name__}: {reason}") from None
    if not isinstance(checkpoint, dict) or "pytorch-lightning_version" not in checkpoint:
        raise ValueError(f"--ckpt_path {ckpt_path}: a torch file, but not a Lightning checkpoint (no "
                         "'pytorch-lightning_version'): give a .ckpt file a ModelCheckpoint saved")
    return checkpoint


def _plain(value: Any) -> Any:
    """Namespaces as dicts and tuples as lists, to compare a config's values with a checkpoint's."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


#: Environment variable holding rank 0's probe record (JSON) for the processes that Lightning's
#: DDP launcher starts: they inherit rank 0's environment and apply its choice instead of timing
#: their own (two probes on one machine, at the same time, can choose differently).
CHOICE_ENV = "SNAPVIT_PRECISION_CHOICE"


def _launched_with_choice() -> dict[str, Any] | None:
    """Rank 0's probe record in a process Lightning's launcher started from it (``LOCAL_RANK`` > 0), else ``None``.

    Raises:
        ValueError: In a multi-process run started by another launcher (``WORLD_SIZE`` > 1 without
            rank 0's record, e.g. torchrun): each process would run a probe of its own.
    """
    shared = json.loads(os.environ.get(CHOICE_ENV) or "{}")
    # Only from this process's parent: a value inherited from further up (a test run, a shell) is stale.
    record = shared.get("record") if shared.get("pid") == os.getppid() else None
    if int(os.environ.get("LOCAL_RANK") or 0) > 0 and record:
        return record
    if int(os.environ.get("WORLD_SIZE") or 1) > 1 and not record:
        raise ValueError(
            f"trainer.precision 'auto' in a run of WORLD_SIZE={os.environ['WORLD_SIZE']} processes started "
            "outside Lightning: each process would time a probe of its own and could choose differently; "
            "give an explicit trainer.precision (32-true or bf16-mixed)"
        )
    return None


def _check_restartable(trainer: Trainer) -> None:
    """Refuse a DDP fit whose processes Lightning would start by re-running a command line that lacks its arguments."""
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if (args_from_python() and isinstance(launcher, _SubprocessScriptLauncher) and launcher.num_processes > 1
            and not launcher.cluster_environment.creates_processes_externally):
        raise ValueError(
            f"trainer.strategy {type(trainer.strategy).__name__} starts its other {launcher.num_processes - 1} "
            "process(es) by re-running the command line, which does not hold this run's arguments (they came from "
            "Python: the main job or cli.main([...])); run `snapvit fit ...` from a shell, or use "
            "--trainer.strategy ddp_spawn"
        )


def lightning_cli(*args: Any, **kwargs: Any) -> AutoPrecisionCLI:
    """``AutoPrecisionCLI(*args, trainer_class=AutoPrecisionTrainer, **kwargs)``."""
    return AutoPrecisionCLI(*args, trainer_class=AutoPrecisionTrainer, **kwargs)


@contextmanager
def lightning_interrupt() -> Iterator[None]:
    """Lightning's end of a fit stopped by Ctrl-C (``sys.exit(1)``, the Trainer interrupted) as a KeyboardInterrupt.

    A fit stopped by SIGTERM (Lightning's ``SIGTERMException``) becomes :class:`~.errors.Terminated`.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from .console import raise_interrupt_of
    from .errors import Terminated
    from .ranks import stop_started_ranks

    AutoPrecisionCLI.last_trainer = None
    try:
        yield
    except SIGTERMException:  # a SystemExit without a status: the process would end with status 0
        stop_started_ranks(AutoPrecisionCLI.last_trainer)
        raise Terminated(last_checkpoint(AutoPrecisionCLI.last_trainer)) from None
    except SystemExit as exit_:
        stop_started_ranks(AutoPrecisionCLI.last_trainer)
        try:
            raise_interrupt_of(AutoPrecisionCLI.last_trainer, exit_)
        except KeyboardInterrupt as interrupt:
            interrupt.resume_from = last_checkpoint(AutoPrecisionCLI.last_trainer)
            raise
        raise
    except BaseException:
        stop_started_ranks(AutoPrecisionCLI.last_trainer)
        raise
    finally:
        AutoPrecisionCLI.last_trainer = None


def last_checkpoint(trainer: Any) -> str | None:
    """The checkpoint a ``ModelCheckpoint`` of ``trainer`` saved last (to resume from), or ``None``."""
    paths = [getattr(c, "_last_checkpoint_saved", "") or c.last_model_path or c.best_model_path
             for c in getattr(trainer, "checkpoint_callbacks", None) or ()]
    existing = [p for p in paths if p and os.path.isfile(p)]
    return max(existing, key=os.path.getmtime) if existing else None
