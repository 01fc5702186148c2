"""Where an export's files go, and what an earlier export in the same folder blocks or leaves behind."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl

from .file_io import check_writable

__all__ = ["FIDELITY_PLOT_NAME", "KEPT_UNITS_PLOT_NAME", "REPORT_NAME", "export_targets"]


REPORT_NAME = "report.json"


FIDELITY_PLOT_NAME = "fidelity_vs_flops.png"


KEPT_UNITS_PLOT_NAME = "kept_units.png"


#: The first line of the ``config.yaml`` a ``snapvit fit`` saves beside its export (a user's own LightningCLI
#: dump lacks it): an overwriting export removes only a marked one.
CONFIG_MARK = "# the config of a snapvit fit, saved beside its export"


def export_targets(
    out_dir: str | os.PathLike, name: str, subnet_labels: Sequence[str] = (), stats: bool = False
) -> dict[str, Path]:
    """Final paths of an export (without creating anything)."""
    out = Path(out_dir)
    targets = {
        "elastic": out / f"{name}.elastic.safetensors",
        "report": out / REPORT_NAME,
        "fidelity_plot": out / FIDELITY_PLOT_NAME,
        "kept_units_plot": out / KEPT_UNITS_PLOT_NAME,
    }
    for label in subnet_labels:
        targets[f"subnet:{label}"] = out / f"{name}.{label}.safetensors"
    if stats:
        targets["stats"] = out / f"{name}.stats.safetensors"
    return targets


def _fit_config(path: Path) -> bool:
    """Whether ``path`` is the config a ``snapvit fit`` saved beside its export (its first line), not a user's file."""
    try:
        with path.open(encoding="utf-8") as f:
            return f.readline().rstrip("\n") == CONFIG_MARK
    except (OSError, UnicodeDecodeError):
        return False


def _refuse_existing(targets: dict[str, Path], overwrite: bool) -> None:
    if overwrite:
        return
    for path in targets.values():
        if path.exists():
            name, files = _earlier_files(path.parent) if path.name == REPORT_NAME else (None, set())
            if name is not None:
                raise FileExistsError(f"{path} exists (the export {name!r}); overwrite=True replaces it and removes "
                                      f"its {len(files)} files")
            raise FileExistsError(f"{path} exists (an earlier export?); pass overwrite=True to replace it")


def _earlier_files(out_dir: Path) -> tuple[str | None, set[Path]]:
    """The earlier export in ``out_dir``: its name and files, as its ``report.json`` lists them.

    ``report.json`` and the plots belong to the folder, so an export with ``overwrite`` replaces
    the folder's earlier export whatever its name. Only plain file names of that export
    (``<name>.*.safetensors`` / ``.onnx``: its checkpoint, statistics, subnets and ONNX files)
    count: an unreadable report gives ``(None, set())``.
    """
    try:
        report = json.loads((out_dir / REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, set()
    name = report.get("name") if isinstance(report, dict) else None
    if not isinstance(name, str) or not name:
        return None, set()
    names = list(report["files"].values()) if isinstance(report.get("files"), dict) else []
    for budget in report["budgets"] if isinstance(report.get("budgets"), list) else []:
        if isinstance(budget, dict):
            names += [budget.get("subnet_file"), budget.get("onnx_file")]
    return name, {out_dir / n for n in names if isinstance(n, str) and n.startswith(f"{name}.") and Path(n).name == n
                  and n.endswith((".safetensors", ".onnx"))}


def _refuse_existing_before_fit(
    trainer: pl.Trainer, dirpath: Path, name: str | None, overwrite: bool, owner: str = "ElasticExport"
) -> None:
    """Raise on every rank (no rank hangs) when rank 0 sees an existing export or an unwritable ``dirpath``.

    Under ``fast_dev_run``, which writes nothing, an existing export is no reason to refuse. ``owner``:
    the callback class whose ``overwrite`` the message names.
    """
    existing, unwritable = None, None
    if trainer.is_global_zero:
        if name is not None and not overwrite and not trainer.fast_dev_run:
            existing = next((str(p) for p in export_targets(dirpath, name, stats=True).values() if p.exists()), None)
        try:
            check_writable(dirpath, "dirpath")  # else the export would fail after the fit
        except OSError as err:
            unwritable = err
    existing, unwritable = trainer.strategy.broadcast((existing, unwritable), src=0)
    if unwritable is not None:
        raise unwritable
    if existing is not None:
        cli = ", or --trainer.callbacks.overwrite true when it is the last callback" if owner == "ElasticExport" else ""
        raise FileExistsError(f"{existing} exists (an earlier export?); pass overwrite=True to replace it "
                              f"({owner}(overwrite=True); in a config, `overwrite: true` in {owner}'s init_args"
                              f"{cli})")
