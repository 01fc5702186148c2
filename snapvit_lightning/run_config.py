"""The config a ``snapvit fit`` ran with, written beside its export once the export is done (``config.yaml``)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback
from typing_extensions import override

from .export_files import CONFIG_MARK
from .file_io import staging_path

__all__ = ["CONFIG_MARK", "SaveConfigAfterFit"]


class SaveConfigAfterFit(SaveConfigCallback):
    """Writes LightningCLI's full config of the fit to ``path`` at the end of a fit that succeeded.

    ``path=None``: ``config.yaml`` in the folder of the fit's :class:`~snapvit_lightning.export.ElasticExport`
    (nothing without one, or under ``fast_dev_run``, where the export writes nothing either).

    The config file, the command-line arguments and every default, as ``snapvit fit --config PATH``
    re-runs it. Unlike Lightning's ``SaveConfigCallback`` (at the start, into the log folder) it is
    written after the callbacks before it (the export) finished, so a failed fit leaves no config
    beside files it did not write; it replaces an earlier one. LightningCLI adds it after every other
    callback. Rank 0 writes it, under a temporary name renamed into place.

    Args:
        parser: The fit's parser (LightningCLI passes it).
        config: The fit's parsed config (LightningCLI passes it).
        path: Where to write it (its folder is created if the fit did not); ``None``: beside the export.
    """

    def __init__(self, parser: LightningArgumentParser, config: Namespace, path: str | os.PathLike | None = None) -> None:
        super().__init__(parser, config, save_to_log_dir=False)
        self.path = None if path is None else Path(path)
        self.text = f"{CONFIG_MARK}\n{parser.dump(config, skip_none=False)}"  # the mark: an overwriting export's cue

    def __getstate__(self) -> dict:
        # ddp_spawn pickles the Trainer's callbacks; the parser (a class made at run time) does not pickle
        return {**self.__dict__, "parser": None}

    def _path(self, trainer: pl.Trainer) -> Path | None:
        from .export import ElasticExport

        if self.path is not None or trainer.fast_dev_run:
            return self.path
        return next((Path(cb.dirpath) / "config.yaml" for cb in trainer.callbacks if isinstance(cb, ElasticExport)), None)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse a ``config.yaml`` beside the export unless the export overwrites (the base class writes here)."""
        from .export import ElasticExport

        path = self._path(trainer)
        exports = [cb for cb in trainer.callbacks if isinstance(cb, ElasticExport)]
        if path is not None and path.exists() and exports and not exports[0].overwrite:
            raise FileExistsError(f"{path} exists (a config of yours, or an earlier fit's?); the fit writes the config it "
                                  "ran there: pass overwrite=True to replace it (in a config, `overwrite: true` in "
                                  "ElasticExport's init_args, or --trainer.callbacks.overwrite true)")

    @override
    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Not used: the config is written in :meth:`on_train_end`."""

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = self._path(trainer)
        if not trainer.is_global_zero or path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = staging_path(path)
        try:
            staged.write_text(self.text + _resolved_precision(trainer, pl_module), encoding="utf-8")
            os.replace(staged, path)
        finally:
            staged.unlink(missing_ok=True)


def _resolved_precision(trainer: pl.Trainer, module: pl.LightningModule) -> str:
    """A comment naming what ``precision: auto`` chose for this fit ("" when the precision was given)."""
    from .search import EvolutionarySearch

    probe = getattr(module, "precision_probe", None)
    if not isinstance(probe, dict) or "trainer_precision" not in probe:
        return ""
    searches = [cb for cb in trainer.callbacks if isinstance(cb, EvolutionarySearch) and cb.autocast == "auto"]
    search = f" and the search's autocast {probe.get('search_autocast') or 'false'}" if searches else ""
    return (f"# precision: auto chose trainer.precision {probe['trainer_precision']}{search} on this machine "
            "(report.json: build_times.precision); running this config again probes again: give them to repeat "
            "this run's choice\n")
