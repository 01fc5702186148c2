"""Argument checks of the export (:func:`~snapvit_lightning.export.export_elastic`,
:class:`~snapvit_lightning.export.ElasticExport` and the :class:`~snapvit_lightning.plugin.SnapViT`
plug-in): each returns the normalised value or raises an error that names the argument, the
bad value and what is allowed; and where a run's correction statistics come from
(:func:`_calibration_images`) and how to rebuild its model (:func:`_rebuild_info`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import check_model_kwargs
from .correction import CORRECTIONS
from .data.crops import DEFAULT_STATS_VIEWS, MAX_VIEWS_PER_IMAGE, stats_views_per_image
from .image_batches import check_image_batches, collect_images
from .scores import ImportanceScores, ceil4, check_ratio
from .structure import BlockDims, count_flops, count_params, inspect_vit
from .values import real_number

__all__ = ["DEFAULT_STATS_VIEWS", "MAX_VIEWS_PER_IMAGE", "stats_views_per_image"]  # re-exported from data.crops


def _check_stats_views(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"stats_views must be an int >= 1 (1: the eval views alone), got {value!r}")
    return value


def _check_budgets(budgets: Any, name: str = "budgets") -> tuple[tuple[str, tuple[float, ...]], ...]:
    """Normalise budgets to ``("ratios", (a, b))`` / ``("flops", (f,))`` / ``("params", (p,))`` entries.

    Raises:
        ValueError: No budgets, or a budget that is not a ratio pair in ``[0, 1)`` or a fraction in ``(0, 1]``.
    """
    if isinstance(budgets, (str, bytes, dict)) or not isinstance(budgets, Sequence) or not budgets:
        raise ValueError(f"{name} must be a non-empty sequence of (mlp_ratio, head_ratio) pairs or FLOPs fractions, "
                         f"got {budgets!r}")
    out: list[tuple[str, tuple[float, ...]]] = []
    for budget in budgets:
        try:
            kind, value = "flops", budget  # a bare number is a FLOPs fraction
            if isinstance(budget, dict):
                if set(budget) in ({"flops"}, {"params"}):
                    (kind, value), = budget.items()
                    value = value if isinstance(value, bool) else float(value)  # a YAML string too, as before
                elif set(budget) <= {"mlp_ratio", "head_ratio"} and budget:
                    value = (budget.get("mlp_ratio", 0.0), budget.get("head_ratio", 0.0))
                else:
                    raise ValueError("a dict budget needs keys mlp_ratio/head_ratio, flops or params")
            if isinstance(value, bool):
                raise ValueError("not a number")
            if real_number(value) is not None:
                f = real_number(value)
                if not (math.isfinite(f) and 0.0 < f <= 1.0):
                    raise ValueError(f"a {'FLOPs' if kind == 'flops' else 'parameter'} fraction must be in (0, 1]")
                out.append((kind, (f,)))
            elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
                out.append(("ratios", (check_ratio(value[0], "mlp_ratio"), check_ratio(value[1], "head_ratio"))))
            else:
                raise ValueError("expected an (mlp_ratio, head_ratio) pair or a FLOPs fraction")
        except (ValueError, TypeError) as err:
            raise ValueError(f"{name}: invalid budget {budget!r}: {err}") from None
    twice = [budget for i, budget in enumerate(budgets) if out[i] in out[:i]]
    if twice:
        raise ValueError(f"{name} holds {twice[0]!r} more than once (each budget is one row of the report); got {budgets!r}")
    return tuple(out)


def _check_reachable(model: nn.Module, budgets: Any, min_mlp_keep: float, min_head_keep: float, name: str) -> None:
    """Refuse a FLOPs or parameter fraction below every block's minimum keep: before the fit, not at the export.

    The smallest reachable fraction depends on the model's sizes and the minimum keeps only, so a
    budget the export would refuse (:meth:`~snapvit_lightning.elastic.ElasticViT.resolve_budget`)
    is refused before the scoring.

    Raises:
        ValueError: A fraction below the smallest reachable one, naming ``name`` (e.g. the callback's argument).
    """
    fractions = [(kind, values[0]) for kind, values in _check_budgets(budgets, name) if kind != "ratios"]
    if not fractions:
        return
    structure = inspect_vit(model)
    if not structure.is_uniform:  # not a dense model: the export refuses it for that
        return
    dims = structure.blocks[0]
    floor = ImportanceScores(torch.zeros(1, dims.mlp_hidden), torch.zeros(1, dims.num_heads), min_mlp_keep=min_mlp_keep,
                             min_head_keep=min_head_keep)
    smallest = [BlockDims(floor.min_heads, floor.min_neurons)] * structure.num_blocks
    dense_flops = count_flops(model)
    lowest = {"flops": count_flops(model, dims=smallest, head_flops=dense_flops["head"])["total"] / dense_flops["total"],
              "params": count_params(model, dims=smallest)["total"] / count_params(model)["total"]}
    for kind, fraction in fractions:
        if fraction < lowest[kind]:
            raise ValueError(f"{name}: {kind}={fraction} is below the smallest reachable fraction {ceil4(lowest[kind]):.4f} "
                             f"(every block at its minimum keep: min_mlp_keep={min_mlp_keep}, min_head_keep={min_head_keep})")


#: What the export appends to its ``name`` (a name ending so would double it).
_SUFFIXES = (".safetensors", ".onnx", ".elastic", ".stats")


def _check_name(name: Any) -> str | None:
    if name is None:
        return None
    if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or os.sep in name:
        raise ValueError(f"name must be a non-empty file-name stem without path separators or a leading dot, got {name!r}")
    stem = name
    while stem.endswith(_SUFFIXES):  # the files get '<name>.elastic.safetensors' and the like
        stem = stem[: stem.rindex(".")]
    if stem != name:
        raise ValueError(f"name is the files' stem, without a suffix: got {name!r}, which would write "
                         f"'{name}.elastic.safetensors'; give {stem!r}")
    return name


def _check_correct(value: Any) -> str:
    if value not in CORRECTIONS:
        raise ValueError(f"correct must be one of {CORRECTIONS}, got {value!r}")
    return str(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _check_model_kwargs(value: Any) -> dict[str, Any] | None:
    return None if value is None else check_model_kwargs(value)


def _check_model_name(value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise TypeError(f"model_name must be a non-empty str or None, got {value!r}")
    return value


def _check_dirpath(value: Any, argument: str = "dirpath") -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise TypeError(f"{argument} must be a str or os.PathLike, got {value!r}")
    path = Path(value).expanduser()  # as the data paths are
    if path.exists() and not path.is_dir():  # else mkdir fails only at the export, after the fit
        raise ValueError(f"{argument} must be a folder, but '{value}' is a file")
    return path


def _check_images(images: Any, name: str = "fitness_images") -> Tensor | None:
    if images is None:
        return None
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        shape = f"{list(images.shape)} {images.dtype}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a float tensor [M, 3, S, S] or None, got {shape}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one image")
    return images


def _check_image_source(images: Any, name: str) -> Tensor | Iterable[Any] | None:
    """``None``, checked images ``[M, 3, S, S]``, or an iterable of such batches (a ``DataLoader``), kept to read in setup."""
    if images is None or isinstance(images, Tensor):
        return _check_images(images, name)
    check_image_batches(images, name)
    return images


def _read_image_source(images: Tensor | Iterable[Any] | None, name: str) -> Tensor | None:
    """The images of :func:`_check_image_source`'s result as one checked tensor (an iterable's batches read once)."""
    if images is None or isinstance(images, Tensor):
        return images
    return _check_images(collect_images(images, name), name)


def _rebuild_info(pl_module: Any, model_name: str | None, model_kwargs: dict | None) -> tuple[str | None, dict | None]:
    """Model name/kwargs: explicit > module attributes > hparams (model given by name) > None (inferred)."""
    if model_name is None:
        name = getattr(pl_module, "model_name", None)
        if isinstance(name, str):
            model_name = name
            if model_kwargs is None and isinstance(getattr(pl_module, "model_kwargs", None), dict):
                model_kwargs = dict(pl_module.model_kwargs)
        else:
            hparams = getattr(pl_module, "hparams", {}) or {}
            if isinstance(hparams.get("model"), str):
                model_name = hparams["model"]
                if model_kwargs is None:
                    model_kwargs = dict(hparams.get("model_kwargs") or {})
    return model_name, model_kwargs


def _default_name(model_name: str | None, model: torch.nn.Module | None) -> str | None:
    if model_name is not None:
        return model_name
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") if model is not None else None


def _check_device(device: Any) -> torch.device:
    from .evaluation import _check_device as check  # also that this machine has it: else torch's driver error

    return check(device)


def _calibration_images(
    source: Any, fallback: Tensor | None, stats_views: int = DEFAULT_STATS_VIEWS
) -> tuple[Tensor, int] | None:
    """``(inputs, views per image)`` of the correction statistics: a datamodule's, else ``fallback``'s.

    With ``calibration_views`` (:class:`~snapvit_lightning.data.CalibrationDataModule`): each image's
    eval view and random crops, :func:`~snapvit_lightning.export_options.stats_views_per_image` views
    each; with only ``calibration_images_eval``: the eval views; tensors (``fallback``, the fitness
    images) as they are. ``None`` when there is no source.
    """
    if hasattr(source, "calibration_views"):
        views = stats_views_per_image(source.num_calibration_images, stats_views)
        return source.calibration_views(views), views
    if hasattr(source, "calibration_images_eval"):
        return source.calibration_images_eval(), 1
    return None if fallback is None else (fallback, 1)
