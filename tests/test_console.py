"""Tests for snapvit_lightning.console (the notices the CLI silences, and only those)."""

from __future__ import annotations

import logging
import sys
import warnings

import lightning.pytorch as pl
import pytest
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from snapvit_lightning.console import internal_fit, lightning_cli_args, quiet_lightning

EVAL_MODE = "Found 276 module(s) in eval mode at the start of training. If this is intentional, you can ignore this warning."
LEAF_SPEC = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` instead."
CHECKPOINT = ("Using ModelCheckpoint with manual optimization and every_n_train_steps, but no pre-optimization state was "
              "saved. The checkpoint will contain the model state AFTER optimization.")
TIP = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](https://pypi.org/project/litlogger/)"


def _warned(message: str, category: type[Warning], module: str) -> bool:
    """Whether a warning attributed to ``module`` gets through (inside whatever filters are active)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_lightning():
            warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module)
    return len(caught) == 1


@pytest.mark.parametrize(
    "message, category, module",
    [
        (EVAL_MODE, PossibleUserWarning, "lightning.pytorch.loops.fit_loop"),
        (LEAF_SPEC, FutureWarning, "lightning.pytorch.utilities._pytree"),
        (CHECKPOINT, UserWarning, "lightning.pytorch.callbacks.model_checkpoint"),
        ("No seed found, seed set to 0", UserWarning, "lightning.fabric.utilities.seed"),  # "Seed set to 0" follows
    ],
)
def test_silences_the_lightning_warnings(message: str, category: type[Warning], module: str) -> None:
    assert not _warned(message, category, module)


@pytest.mark.parametrize(
    "message, category, module",
    [
        (EVAL_MODE, PossibleUserWarning, "my_project.train"),  # the same words from user code
        (LEAF_SPEC, FutureWarning, "my_project.trees"),
        (EVAL_MODE, UserWarning, "lightning.pytorch.loops.fit_loop"),  # another category
        ("The number of training batches (2) is smaller than the logging interval", PossibleUserWarning,
         "lightning.pytorch.loops.fit_loop"),  # another Lightning warning
        ("something else", DeprecationWarning, "lightning.pytorch.utilities._pytree"),
        ("No seed found, seed set to 0", UserWarning, "my_project.seeding"),
    ],
)
def test_lets_other_warnings_through(message: str, category: type[Warning], module: str) -> None:
    assert _warned(message, category, module)


def test_filters_end_with_the_context() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_lightning():
            pass
        warnings.warn_explicit(EVAL_MODE, PossibleUserWarning, "fit_loop.py", 1, module="lightning.pytorch.loops.fit_loop")
    assert len(caught) == 1


def test_drops_the_litlogger_tip_only_inside(caplog) -> None:
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        with quiet_lightning():
            log.info(TIP)
            log.info("GPU available: False, used: False")
        log.info(TIP)
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False", TIP]


def test_cli_args_hide_the_consumed_command_line(monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["quickstart", "--out", "runs/x"])
    with lightning_cli_args(("fit", "--config", "c.yaml")) as args:
        assert args == ["fit", "--config", "c.yaml"] and sys.argv == ["quickstart"]
    assert sys.argv == ["quickstart", "--out", "runs/x"]
    with lightning_cli_args(None) as args:  # LightningCLI parses the command line itself
        assert args is None and sys.argv == ["quickstart", "--out", "runs/x"]
    with pytest.raises(RuntimeError, match="boom"), lightning_cli_args(["fit"]):
        raise RuntimeError("boom")
    assert sys.argv == ["quickstart", "--out", "runs/x"]  # restored after an error too


def test_cli_args_refuse_a_string() -> None:
    with pytest.raises(TypeError, match="args must be a sequence of arguments .* got the string 'fit --config c.yaml'"):
        with lightning_cli_args("fit --config c.yaml"):
            pass


def _boring_fit() -> None:
    from lightning.pytorch.demos.boring_classes import BoringModel

    pl.Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(BoringModel())


def test_internal_fit_drops_lightnings_info_lines_only_inside(caplog) -> None:
    # The plug-in's calibration printed "GPU available", "TPU available" and "`Trainer.fit` stopped" after the
    # user's own fit; dropping every info line also dropped the package's (the search's progress, the export's).
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        with internal_fit():
            _boring_fit()
            rank_zero_info("EvolutionarySearch: a line of ours")
            log.warning("a real warning")
        inside = [r.getMessage() for r in caplog.records]
        caplog.clear()
        _boring_fit()
    assert inside == ["EvolutionarySearch: a line of ours", "a real warning"]
    outside = [r.getMessage() for r in caplog.records]
    assert "GPU available: False, used: False" in outside and any("`Trainer.fit` stopped" in m for m in outside)


def _warned_in_child(queue) -> None:
    """Spawned: whether the eval-mode notice gets through after :func:`quiet_spawned_process`."""
    from snapvit_lightning.console import quiet_spawned_process

    quiet_spawned_process()
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit(EVAL_MODE, PossibleUserWarning, "fit_loop.py", 1, module="lightning.pytorch.loops.fit_loop")
    queue.put(len(caught))


@pytest.mark.parametrize("inside", [True, False])
def test_a_process_spawned_inside_is_quiet_too(inside: bool) -> None:
    # ddp_spawn's processes start with Python's default filters: quiet_spawned_process (called from
    # SnapViTModule.setup) adds the filters there, only for a fit started inside quiet_lightning.
    import contextlib
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    with quiet_lightning() if inside else contextlib.nullcontext():
        child = context.Process(target=_warned_in_child, args=(queue,))
        child.start()
        caught = queue.get(timeout=120)
        child.join(timeout=60)
    assert child.exitcode == 0 and caught == (0 if inside else 1)
    with warnings.catch_warnings(record=True) as here:  # this process is not a spawned one: nothing added
        warnings.simplefilter("always")
        from snapvit_lightning.console import quiet_spawned_process

        quiet_spawned_process()
        warnings.warn_explicit(EVAL_MODE, PossibleUserWarning, "fit_loop.py", 1, module="lightning.pytorch.loops.fit_loop")
    assert len(here) == 1
