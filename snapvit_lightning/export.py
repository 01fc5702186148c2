"""The export: an elastic ViT, its subnets, report and plots written to a directory.

* :func:`export_elastic` writes an :class:`~snapvit_lightning.elastic.ElasticViT` to a directory: the elastic
  checkpoint, optional sliced subnets, ``report.json`` and two plots. :class:`ElasticExport` calls it at the
  end of a scoring (+ search) ``fit``, :class:`~snapvit_lightning.plugin.SnapViT` (the plug-in) too.

Export directory (``name`` defaults to the timm model name)::

    <name>.elastic.safetensors            ElasticViT.save (load with ElasticViT.load)
    <name>.mlp<a>_head<b>.safetensors     subnets (save_subnets=True; load with load_subnet),
                                          weight-corrected unless correct="none"
    <name>.mlp<a>_head<b>.onnx            the same subnets as ONNX graphs (onnx=True; dynamic batch)
    <name>.stats.safetensors              correction statistics (by default; not with
                                          correct="none") and the corrected path's own ranking:
                                          ElasticViT.load attaches them, so subnet() and snapvit
                                          slice are corrected (and ranked) by default
    report.json                           per-budget kept units, params, FLOPs, fidelity
    fidelity_vs_flops.png                 fidelity (cosine to the dense model) against FLOPs
    kept_units.png                        per-block kept fraction of neurons / heads per budget (of the
                                          corrected subnets when the statistics carry a ranking)

Atomicity: every file is first written to a hidden staging name in the same directory; only
when all of them are complete are they renamed (``os.replace``) to their final names. A
failure before that leaves the directory as it was (an old export included); a failure while
renaming removes the files this export already put in place. Two exports into one directory rename
theirs one after the other (:func:`~snapvit_lightning.file_io.folder_lock`), never interleaved.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from . import __version__
from .checkpoint import resolve_rebuild, subnet_metadata
from .correction import EXPORT_HINT, check_one_shot, collect_stats, stats_damping
from .elastic import ElasticViT, head_share
from .errors import warn_at_caller_on_rank_zero
from .export_files import (  # noqa: F401  (the plug-in imports some of these from here)
    FIDELITY_PLOT_NAME, KEPT_UNITS_PLOT_NAME, REPORT_NAME, _earlier_files, _fit_config, _refuse_existing, _refuse_existing_before_fit,
    export_targets,
)
from .export_options import (  # noqa: F401  (the plug-in imports some of these from here)
    DEFAULT_STATS_VIEWS, _calibration_images, _check_bool, _check_budgets, _check_correct, _check_device,
    _check_dirpath, _check_image_source, _check_images, _check_model_kwargs, _check_model_name, _check_name, _check_reachable,
    _check_stats_views, _default_name, _read_image_source, _rebuild_info,
)
from .machine import build_machine
from .obs import with_ranking
from .onnx_export import ONNX_OPSET, _check_fixed_grid, checked_onnx
from .ranks import (
    collective_safe_sigterm, files_placed, finish_on_every_rank, stop_if_terminated, stops_on_sigterm, uninterrupted,
)
from .report import _features, _fidelity, _fidelity_figure, _kept_units_figure, measured_on, stage_times
from .scores import HEAD_SHARE_KNEE, ImportanceScores
from .search import EvolutionarySearch, scored_model
from .structure import check_model_images
from .values import non_float32
from .file_io import folder_lock, staging_path

__all__ = [
    "DEFAULT_BUDGETS",
    "ExportCheck",
    "REPORT_NAME",
    "FIDELITY_PLOT_NAME",
    "KEPT_UNITS_PLOT_NAME",
    "Budget",
    "export_elastic",
    "export_targets",
    "ElasticExport",
]

#: A budget: ``(mlp_ratio, head_ratio)``, a FLOPs fraction in ``(0, 1]``, or a dict
#: ``{"mlp_ratio": a, "head_ratio": b}`` / ``{"flops": f}`` / ``{"params": p}`` (handy in YAML configs).
Budget = Union[tuple[float, float], float, dict]


#: Budgets reported by default: the dense model and the reference fitness budgets.
DEFAULT_BUDGETS: tuple[tuple[float, float], ...] = ((0.0, 0.0), (0.15, 0.0), (0.35, 0.2), (0.55, 0.4), (0.65, 0.5))


REPORT_FORMAT = "snapvit-export"


REPORT_VERSION = 1


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def subnet_label(mlp_ratio: float, head_ratio: float) -> str:
    """The file-name label of a budget: ``mlp<a>_head<b>`` (4 significant digits)."""
    return f"mlp{_fmt(mlp_ratio)}_head{_fmt(head_ratio)}"


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, allow_nan=False)
        f.write("\n")


def _write_figure(path: Path, fig: Any) -> None:
    fig.savefig(path, format="png")


def _write_subnet(path: Path, elastic: ElasticViT, sub: nn.Module, budget: dict[str, Any]) -> None:
    elastic.save_subnet(path, sub, budget=budget)


def export_elastic(
    elastic: ElasticViT,
    out_dir: str | os.PathLike,
    *,
    budgets: Sequence[Budget] = DEFAULT_BUDGETS,
    fitness_images: Tensor | None = None,
    save_subnets: bool = False,
    overwrite: bool = False,
    name: str | None = None,
    batch_size: int = 64,
    correct: str = "lstsq",
    calibration_images: Tensor | None = None,
    device: str | torch.device = "cpu",
    onnx: bool = False,
    views_per_image: int = 1,
) -> dict[str, Any]:
    """Write an elastic model, optional subnets, ``report.json`` and two plots to ``out_dir``.

    For every budget the report holds the resolved ``mlp_ratio``/``head_ratio``, the per-block
    kept neurons and heads, parameters and FLOPs (absolute and as fractions of the dense
    model) and, when ``fitness_images`` are given, the *fidelity*: the mean cosine similarity
    between the subnet's and the dense model's pre-logits features
    (``forward_head(forward_features(x), pre_logits=True)``) on those images, computed on
    ``device`` in float32. See the module docstring for the file names and the atomic write. Its
    ``build_times`` holds the stage wall times: ``scoring_s``, ``search_s``,
    ``search_evaluations``, ``machine`` and ``precision`` (the probe of ``precision: auto``,
    :mod:`snapvit_lightning.precision`) from ``elastic.scores.build_info`` (``null`` when
    unknown), ``ranking_s`` (the corrected path's ranking, ``null`` when not computed here) and
    ``export_s``, this call's time up to writing ``report.json`` (the report last).

    By default (``correct="lstsq"``; also ``"bias"``, see :mod:`snapvit_lightning.correction`)
    the correction statistics are collected on ``calibration_images`` (or, without them, the
    statistics attached to ``elastic`` are used) and written beside the checkpoint
    (``<name>.stats.safetensors``, where :meth:`ElasticViT.load` finds them), the saved subnets
    are corrected, and every budget gets ``fidelity_corrected`` beside the plain cut's
    ``fidelity``; ``report["correction"]`` says how, and whether the fidelity images were also
    the calibration images (then the corrected fidelity is optimistic). ``correct="none"``
    writes the paper's plain cut and no statistics (with ``overwrite``, a statistics file of an
    earlier export is removed: it would not fit the new checkpoint). Statistics collected here carry the
    corrected path's own ranking (:func:`~snapvit_lightning.obs.with_ranking`, on the same
    images): the corrected subnets (``fidelity_corrected``, saved, ONNX) are
    ``subnet(mlp_ratio, head_ratio, correct=correct)``, whose units that ranking chooses; a
    budget whose per-block counts then differ from the plain cut's also gets
    ``kept_neurons_corrected`` and ``kept_heads_corrected`` (both, when either differs).

    Args:
        elastic: The elastic model (left unchanged).
        out_dir: Output directory (created when missing).
        budgets: ``(mlp_ratio, head_ratio)`` pairs, FLOPs fractions in ``(0, 1]`` (resolved with
            :meth:`ElasticViT.resolve_budget`), or dicts ``{"mlp_ratio", "head_ratio"}`` /
            ``{"flops"}`` / ``{"params"}`` (a fraction of the dense parameters).
        fitness_images: Float ``[M, 3, S, S]`` images, normalised for the model, or ``None``
            (the fidelity is then ``null``).
        save_subnets: Also write each budget's sliced subnet.
        overwrite: Replace the earlier export in ``out_dir`` (its ``report.json`` and plots are the
            folder's, whatever ``name`` it had): its files are replaced, and those its
            ``report.json`` lists that this export does not write (subnets of other budgets, ONNX
            files, statistics, or all of them for another ``name``) are removed once the new files
            are in place.
        name: File-name stem; default the elastic model's timm name.
        batch_size: Images per forward pass for the fidelity.
        correct: ``"lstsq"`` (default), ``"bias"`` or ``"none"``.
        calibration_images: Float ``[N, 3, S, S]`` images for the correction statistics
            (required when ``correct`` is not ``"none"``, unless ``elastic.stats`` is set).
        device: Where the fidelity and the correction statistics are computed (a copy of the
            model is moved there; the written files are the same on any device). On a GPU run
            pass the model's device: on CPU these forward passes can take longer than the search.
        onnx: Also write each budget's subnet (corrected like the saved subnets) as ONNX, with
            ``onnx_max_abs_diff`` from :func:`~snapvit_lightning.onnx_export.checked_onnx`.
        views_per_image: How many rows of ``calibration_images`` are views of one image (their
            eval views first, as :meth:`CalibrationDataModule.calibration_views` gives them); for
            the report's ``calibration_images`` and the statistics' ``views_per_image`` only (1 without
            ``calibration_images``).

    Returns:
        ``{"paths": {role: Path}, "report": dict}``; roles ``elastic``, ``report``,
        ``fidelity_plot``, ``kept_units_plot``, ``subnet:<label>``/``onnx:<label>`` per file, ``stats``.

    Raises:
        FileExistsError: If a target file exists and ``overwrite`` is false (checked before
            any work).
        TypeError: If ``elastic`` is not an ElasticViT or a flag is not a bool.
        ValueError: A model that is not float32; invalid budgets, images, name, batch size or device; two budgets that resolve
            to the same subnet file name; a correction without calibration images or
            attached statistics.
    """
    if not isinstance(elastic, ElasticViT):
        raise TypeError(f"elastic must be an ElasticViT, got {type(elastic).__name__}")
    dtypes = non_float32(elastic.model)
    if dtypes:  # its fidelity, statistics and files are float32 (ElasticExport and SnapViT pass float32 copies)
        raise ValueError(f"export_elastic needs a float32 model, this one has {', '.join(dtypes)} weights; "
                         "export ElasticViT(model.float(), scores, ...) and cast a subnet back to deploy it")
    out_dir = _check_dirpath(out_dir, "out_dir")
    entries_in = _check_budgets(budgets)
    images = _check_images(fitness_images)
    save_subnets = _check_bool("save_subnets", save_subnets)
    onnx = _check_bool("onnx", onnx)
    overwrite = _check_bool("overwrite", overwrite)
    name = _check_name(name) or elastic.model_name
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    correct = _check_correct(correct)
    if correct != "none":
        check_one_shot(elastic.model, f"export_elastic(correct={correct!r})", EXPORT_HINT)
    calibration = _check_images(calibration_images, "calibration_images")
    if correct == "none" and calibration is not None:  # as slice() refuses them: they would be ignored
        raise ValueError("calibration_images are only used with correct='lstsq' or 'bias', got correct='none'")
    if isinstance(views_per_image, bool) or not isinstance(views_per_image, int) or views_per_image < 1 or (
            calibration is not None and len(calibration) % views_per_image):
        raise ValueError(f"views_per_image must be an int >= 1 that divides the number of calibration_images, "
                         f"got {views_per_image!r}")
    if calibration is None and views_per_image != 1:  # it describes calibration_images: ignored without them
        raise ValueError(f"views_per_image describes calibration_images, which were not given (got views_per_image="
                         f"{views_per_image}); leave it at 1")
    if correct != "none" and calibration is None and elastic.stats is None:
        raise ValueError(
            f"correct={correct!r} needs calibration_images [N, 3, S, S] (or statistics attached to the elastic "
            "model with attach_stats); pass correct='none' for the plain cut without statistics"
        )
    device = _check_device(device)
    if onnx:  # the graphs are traced last: a model the exporter cannot write is refused before the work
        _check_fixed_grid(elastic.model, ONNX_OPSET)
    for given, what in ((images, "fitness_images"), (calibration, "calibration_images")):
        if given is not None:  # the sizes and values the model takes, before any work
            check_model_images(elastic.model, given, what)

    export_start = time.perf_counter()
    # 1. Refuse to overwrite, before any work.
    # The statistics' name belongs to the export whether it writes them or not: a file left by an
    # earlier export would be attached to (and refused by) the new checkpoint.
    _refuse_existing(export_targets(out_dir, name, stats=True), overwrite)
    resolved: list[tuple[Any, float, float]] = []
    for kind, values in entries_in:
        if kind in ("flops", "params"):  # the head share of the cut the export ships (its plain fidelity: the same ratios)
            a, b = elastic.resolve_budget(**{kind: values[0]}, head_ratio_scale=head_share(None, correct != "none"))
            resolved.append(({kind: values[0]}, a, b))
        else:  # as subnet() reads them: a ratio beyond the blocks' minimum keep is named by the cut it gives
            resolved.append(({"mlp_ratio": values[0], "head_ratio": values[1]}, *elastic.resolve_budget(*values)))
            if resolved[-1][1:] != values:
                rank_zero_info(f"export: budget ({values[0]:g}, {values[1]:g}) cuts as ({resolved[-1][1]:.4g}, "
                               f"{resolved[-1][2]:.4g}): every block at its minimum keep (report.json: 'requested')")
    labels = [subnet_label(a, b) for _, a, b in resolved]
    seen: dict[str, tuple[float, float]] = {}
    for label, (_, a, b) in zip(labels, resolved):
        if label in seen and elastic.dims(*seen[label]) != elastic.dims(a, b):  # the same cut may share a file
            raise ValueError(f"budgets resolve to ratios {seen[label]} and {(a, b)}, other cuts with the same file label {label!r}")
        seen[label] = (a, b)
    subnet_labels = list(dict.fromkeys(labels)) if save_subnets else []
    targets = export_targets(out_dir, name, subnet_labels, stats=correct != "none")
    stale_stats = None if correct != "none" else export_targets(out_dir, name, stats=True)["stats"]
    targets.update({f"onnx:{label}": out_dir / f"{name}.{label}.onnx" for label in (labels if onnx else ())})
    _refuse_existing(targets, overwrite)
    steps = [f"correction statistics and the corrected ranking from {len(calibration)} inputs"] if (
        correct != "none" and calibration is not None) else []
    steps.append(f"{len(resolved)} budget{'s' * (len(resolved) != 1)}" + ("" if images is None else f" and their fidelity on {len(images)} images"))
    rank_zero_info(f"export: {', then '.join(steps)} ({device.type})")  # the statistics: the export's longest part

    # 2. Measure.
    structure = elastic.structure
    num_blocks = structure.num_blocks
    mlp_hidden, num_heads = structure.blocks[0].mlp_hidden, structure.blocks[0].num_heads
    dense_cost = elastic.cost(elastic.dims(0.0, 0.0))
    dense_features = None
    measured = elastic.model if device.type == "cpu" else copy.deepcopy(elastic.model).to(device)
    if images is not None:
        images = images.detach().to(device, torch.float32)
        dense_features = _features(measured, images, batch_size)
    stats, ranking_s, view = None, None, None
    if correct != "none" and calibration is None:
        stats = elastic.stats
    elif correct != "none":
        calibration = calibration.detach().to(device, torch.float32)
        stats, energy = collect_stats(measured, calibration, batch_size=batch_size, fingerprint=elastic.fingerprint,
                                      with_energy=True)
        ranking_start = time.perf_counter()  # the corrected path's own ranking, on the same images
        keep = {"min_mlp_keep": elastic.scores.min_mlp_keep, "min_head_keep": elastic.scores.min_head_keep}
        stats = with_ranking(measured, stats, calibration, batch_size=batch_size, energy=energy, **keep)
        stats = dataclasses.replace(stats, views_per_image=views_per_image)
        ranking_s = time.perf_counter() - ranking_start
    del measured
    corrector = None
    if stats is not None:  # shares elastic's model; its own attached statistics (prepared once for every budget)
        corrector = copy.copy(elastic)
        corrector.attach_stats(stats)
        view = corrector.ranked_view()  # None without a ranking
    entries: list[dict[str, Any]] = []
    subnets: dict[str, tuple[nn.Module, dict[str, Any]]] = {}  # label -> subnet, how it was cut (its file's metadata)
    graphs: dict[str, tuple[bytes, float]] = {}
    for (requested, a, b), label in zip(resolved, labels):
        dims = elastic.dims(a, b)
        cost = elastic.cost(dims)
        neurons = [d.mlp_hidden for d in dims]
        heads = [d.num_heads for d in dims]
        sub = elastic.slice(dims, correct="none") if (images is not None or save_subnets or onnx) else None
        fidelity = None if sub is None or images is None else _fidelity(sub, dense_features, images, batch_size)
        fidelity_corrected = None
        ranked = {} if view is None or view.dims(a, b) == dims else {
            "kept_neurons_corrected": [d.mlp_hidden for d in view.dims(a, b)],
            "kept_heads_corrected": [d.num_heads for d in view.dims(a, b)]}
        if sub is not None and stats is not None:
            sub = corrector.subnet(a, b, correct=correct)
            if images is not None:
                fidelity_corrected = _fidelity(sub, dense_features, images, batch_size)
        cut = {"mlp_ratio": a, "head_ratio": b, "correction": "none" if stats is None else correct,
               "elastic": targets["elastic"].name, "requested": requested}  # a subnet file's (and ONNX graph's) metadata
        if "flops" in requested or "params" in requested:  # how the fraction was split, as `snapvit slice` records it
            cut.update(head_ratio_scale=head_share(None, correct != "none"), head_share_knee=HEAD_SHARE_KNEE)
        if stats is not None and stats.image_size is not None and tuple(stats.image_size) != elastic.input_size:
            cut["calibration_size"] = list(stats.image_size)  # statistics of another size than the subnet's inputs
        if save_subnets and label not in subnets:
            subnets[label] = (sub, cut)
        if onnx and label not in graphs:
            graphs[label] = checked_onnx(sub, None if images is None else images[:8].cpu(),
                                         metadata=subnet_metadata(sub, elastic.model_name, elastic.model_kwargs, cut))
        entries.append(
            {
                "label": label,
                "requested": requested,
                "mlp_ratio": a,
                "head_ratio": b,
                "kept_neurons": neurons,
                "kept_heads": heads,
                **ranked,
                "kept_neurons_fraction": sum(neurons) / (num_blocks * mlp_hidden),
                "kept_heads_fraction": sum(heads) / (num_blocks * num_heads),
                "params": int(cost["params"]),
                "flops": int(cost["flops"]),
                "params_fraction": float(cost["params_fraction"]),
                "flops_fraction": float(cost["flops_fraction"]),
                "fidelity": fidelity,
                "fidelity_corrected": fidelity_corrected,
                "subnet_file": targets[f"subnet:{label}"].name if save_subnets else None,
                "onnx_file": targets[f"onnx:{label}"].name if onnx else None,
                "onnx_max_abs_diff": graphs[label][1] if onnx else None,
            }
        )
    scores = elastic.scores
    report = {
        "format": REPORT_FORMAT,
        "format_version": REPORT_VERSION,
        "snapvit_version": __version__,
        "name": name,
        "model_name": elastic.model_name,
        "model_kwargs": elastic.model_kwargs,
        "weights": (scores.build_info or {}).get("weights"),  # where the scored weights came from (SnapViTModule)
        "input_size": list(elastic.input_size),
        "num_blocks": num_blocks,
        "num_heads": num_heads,
        "mlp_hidden": mlp_hidden,
        "dense": {"params": int(dense_cost["params"]), "flops": int(dense_cost["flops"])},
        "scores": {**scores.metadata(), "searched": scores.block_weights is not None},
        "fidelity_images": None if images is None else int(images.shape[0]),
        "fidelity_definition": "mean cosine similarity of forward_head(forward_features(x), pre_logits=True) "
        "of the subnet vs the dense model",
        "files": {role: path.name for role, path in targets.items() if not role.startswith(("subnet:", "onnx:"))},
        "budgets": entries,
        "correction": None if stats is None else {
            "method": correct,
            "stats_file": targets["stats"].name,
            "stats_bytes": stats.stored_bytes,
            "stats_digest": stats.digest,  # CorrectionStats.digest: which statistics the corrected fidelity used
            "calibration_images": None if stats.views_per_image is None else stats.num_images // stats.views_per_image,
            "calibration_views": stats.num_images,  # the statistics' inputs: eval views and crops
            "views_per_image": stats.views_per_image,  # None: attached statistics that do not record it
            "calibration_size": None if stats.image_size is None else list(stats.image_size),  # [H, W] px
            "damping": stats_damping(None, stats) if correct == "lstsq" else None,  # automatic, from the statistics
            "ranking": stats.has_ranking,
            "fidelity_images_are_calibration_images": None if calibration is None  # attached statistics: unknown
            else images is not None and images.shape[1:] == calibration.shape[1:]
            and len(images) <= len(calibration) and bool(torch.equal(images, calibration[: len(images)])),
        },
        "build_times": {  # scoring/search from the scores' build_info; export_s set just before writing
            **{k: (scores.build_info or {}).get(k) for k in ("scoring_s", "search_s", "search_evaluations", "machine", "precision")},
            "ranking_s": ranking_s,
            "export_s": None,
            "export_s_covers": "export_elastic from its start to just before writing report.json: correction "
            "statistics and ranking (ranking_s), fidelity, slicing, the elastic checkpoint, subnets and plots (not "
            "report.json itself nor the final renames)",
            "export_machine": build_machine(device),
        },
    }
    title = name if name == elastic.model_name else f"{name} ({elastic.model_name})"

    # 3. Stage every file under a hidden name, then rename them all into place.
    out_dir.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    placed: list[Path] = []
    try:
        staged["elastic"] = staging_path(targets["elastic"])
        elastic._save(staged["elastic"], None if stats is None else targets["stats"].name)  # they are staged on their own
        if stats is not None:
            staged["stats"] = staging_path(targets["stats"])
            stats.save(staged["stats"])
        for label, (sub, budget) in subnets.items():
            _write_subnet(staged.setdefault(f"subnet:{label}", staging_path(targets[f"subnet:{label}"])), elastic, sub, budget)
        for label, (graph, _) in graphs.items():
            staged.setdefault(f"onnx:{label}", staging_path(targets[f"onnx:{label}"])).write_bytes(graph)
        staged["fidelity_plot"] = staging_path(targets["fidelity_plot"])
        _write_figure(staged["fidelity_plot"], _fidelity_figure(entries, title, measured_on(report)))
        staged["kept_units_plot"] = staging_path(targets["kept_units_plot"])
        _write_figure(staged["kept_units_plot"], _kept_units_figure(entries, mlp_hidden, num_heads, title, corrected=view is not None))
        staged["report"] = staging_path(targets["report"])
        report["build_times"]["export_s"] = time.perf_counter() - export_start
        _write_json(staged["report"], report)
        with folder_lock(out_dir):  # another export into out_dir places its files before or after, not between
            _refuse_existing(targets, overwrite)  # again: they may have appeared during this export
            if stale_stats is not None:  # overwrite=True (checked above): an earlier export's statistics
                stale_stats.unlink(missing_ok=True)
            earlier_name, earlier = _earlier_files(out_dir) if overwrite else (None, set())
            earlier -= set(targets.values())
            if earlier_name is not None and _fit_config(out_dir / "config.yaml"):  # that fit's: not this export's
                earlier.add(out_dir / "config.yaml")  # (a `snapvit fit` writes its own after the export)
            with uninterrupted():  # under DDP a SIGTERM stops the export before the renames or after them all
                for role in [r for r in staged if r != "report"] + ["report"]:  # the report last: it marks completion
                    os.replace(staged[role], targets[role])
                    placed.append(targets[role])
            files_placed()  # under DDP a SIGTERM from here on stops nothing: the export is complete
            removed: list[str] = []
            for path in sorted(earlier):  # the replaced export's files, which the new report does not list
                with contextlib.suppress(OSError):  # the new export is in place: a folder by that name is left alone
                    path.unlink()
                    removed.append(path.name)
    except BaseException:
        for path in placed:
            path.unlink(missing_ok=True)
        raise
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    times = stage_times(report["build_times"])  # the console's only word on where the minutes went
    rank_zero_info(f"export: wrote {len(targets)} files to {out_dir} {times}")  # ElasticExport's, the plug-in's or a call's
    if earlier_name is not None and earlier_name != name:
        rank_zero_info(f"export: replaced the export {earlier_name!r} in {out_dir} (overwrite) and removed its "
                       f"{len(removed)} files: {', '.join(removed) or 'none left'}")
    return {"paths": dict(targets), "report": report}


def _set_export_options(
    owner: Any, budgets: Any, save_subnets: Any, overwrite: Any, model_name: Any, model_kwargs: Any, name: Any,
    correct: Any = "lstsq", stats_views: Any = DEFAULT_STATS_VIEWS,
) -> None:
    """Validate the export options shared by ElasticExport and SnapViT and set them on ``owner``."""
    owner.correct = _check_correct(correct)
    owner.stats_views = _check_stats_views(stats_views)
    _check_budgets(budgets)
    owner.budgets = list(budgets)
    owner.save_subnets = _check_bool("save_subnets", save_subnets)
    owner.overwrite = _check_bool("overwrite", overwrite)
    owner.model_name = _check_model_name(model_name)
    owner.model_kwargs = _check_model_kwargs(model_kwargs)
    owner.name = _check_name(name)


class ElasticExport(Callback):
    """Write the elastic checkpoint, subnets, report and plots at the end of a scoring fit.

    Runs in ``on_train_end``, after the scores are final. **Order matters**: Lightning calls
    the callbacks' hooks in list order, so put it *after* :class:`EvolutionarySearch`
    (``callbacks=[EvolutionarySearch(...), ElasticExport(...)]``), or the export would hold the
    unsearched scores; the wrong order is refused in ``setup`` (before the fit) and again in
    ``on_train_end``.

    The LightningModule must expose ``student`` (the timm ViT) and ``scores``
    (:class:`ImportanceScores`), as :class:`SnapViTModule` does. The export works on a CPU
    copy of the student (the user's model is never changed); the fidelity and correction
    statistics are computed on the student's device (``export_elastic(device=...)``). Only
    global rank 0 writes; every rank then meets at ``trainer.strategy.barrier()`` (no
    collective is called inside the rank-0-only part), and an error of rank 0 is raised after
    the barrier. Existing files are checked in ``setup`` (rank 0's view, broadcast) so a run
    fails before, not after, the work.

    Fidelity images: ``images`` if given, else ``trainer.datamodule.fitness_images()`` when the
    datamodule has it (e.g. :class:`~snapvit_lightning.data.CalibrationDataModule`), else none.

    Args:
        dirpath: Output directory.
        budgets: See :func:`export_elastic`.
        save_subnets: Also write the sliced subnet of every budget.
        overwrite: Replace an earlier export in ``dirpath`` (with the files of it this export does
            not write, :func:`export_elastic`).
        model_name: timm name to rebuild the model. Default: ``pl_module.model_name``, else the
            ``model`` hyper-parameter when the model was given by name, else inferred by
            :class:`ElasticViT` from ``pretrained_cfg``.
        model_kwargs: ``timm.create_model`` kwargs to rebuild it (same fallbacks:
            ``pl_module.model_kwargs``, the ``model_kwargs`` hyper-parameter, inferred).
        name: File-name stem (default: the model name).
        images: Fitness images ``[M, 3, S, S]`` for the fidelity, or a ``DataLoader`` of them (read in ``setup``).
        batch_size: Images per forward pass for the fidelity.
        correct: Weight correction of the exported subnets, ``"lstsq"`` (default), ``"bias"``
            or ``"none"`` (the plain cut, no statistics; see :func:`export_elastic`); its
            statistics are collected on ``trainer.datamodule.calibration_views(...)`` (each
            calibration image's eval view and random crops) when the datamodule has it, else
            on its ``calibration_images_eval()``, else on the fitness images (checked in ``setup``).
        stats_views: How many inputs the statistics aim for: each calibration image gives
            ``stats_views // N`` views (its eval view and random crops), at least 1 and at most
            8 (:func:`~snapvit_lightning.export_options.stats_views_per_image`); ``1``: the eval
            views alone. Crops let a few photos stand for more (docs/defaults.md).

    Attributes:
        elastic: The :class:`ElasticViT` exported (rank 0, after the fit).
        export_paths: ``{role: Path}`` of the written files (rank 0).
        report: The report written to ``report.json`` (rank 0).

    Raises:
        TypeError: A wrong argument type.
        ValueError: Invalid budgets, name or images; or (at ``setup``) the wrong callback order,
            another ElasticExport writing into ``dirpath``, or, for a correction, no source of
            calibration images.
        FileExistsError: (At ``setup`` / export) an export exists and ``overwrite`` is false.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike,
        budgets: Sequence[Budget] = DEFAULT_BUDGETS,
        save_subnets: bool = False,
        overwrite: bool = False,
        model_name: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        name: str | None = None,
        images: Tensor | Iterable[Any] | None = None,
        batch_size: int = 64,
        correct: str = "lstsq",
        stats_views: int = DEFAULT_STATS_VIEWS,
    ) -> None:
        super().__init__()
        self.dirpath = _check_dirpath(dirpath)
        _set_export_options(self, budgets, save_subnets, overwrite, model_name, model_kwargs, name, correct, stats_views)
        self.images = _check_image_source(images, "images")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self.elastic: ElasticViT | None = None
        self.export_paths: dict[str, Path] | None = None
        self.report: dict[str, Any] | None = None

    def _check_order(self, trainer: pl.Trainer) -> None:
        callbacks = list(trainer.callbacks)
        mine = next((i for i, c in enumerate(callbacks) if c is self), None)
        if mine is None:
            return
        late = [type(c).__name__ for c in callbacks[mine + 1 :] if isinstance(c, EvolutionarySearch)]
        if late:
            order = [type(c).__name__ for c in callbacks]
            raise ValueError(
                "ElasticExport must come after EvolutionarySearch in Trainer(callbacks=[...]) "
                f"(hooks run in list order; the export would miss the search), got {order}"
            )

    def _targets_name(self, pl_module: pl.LightningModule) -> str | None:
        model_name, _ = _rebuild_info(pl_module, self.model_name, self.model_kwargs)
        return self.name or _default_name(model_name, getattr(pl_module, "student", None))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse the wrong callback order, an existing export and a correction without images before the fit."""
        if stage != "fit":
            return
        self._check_order(trainer)
        self.images = _read_image_source(self.images, "images")
        if any(c is not self and isinstance(c, ElasticExport) and c.dirpath.resolve() == self.dirpath.resolve()
               for c in trainer.callbacks):  # both write report.json there: the second failed only at its export
            raise ValueError(f"two ElasticExport callbacks write into dirpath={str(self.dirpath)!r}: give each its own")
        _refuse_existing_before_fit(trainer, self.dirpath, self._targets_name(pl_module), self.overwrite)
        student = getattr(pl_module, "student", None)
        if isinstance(student, nn.Module):  # a model its checkpoint would not rebuild fails here, not after the fit
            resolve_rebuild(student, *_rebuild_info(pl_module, self.model_name, self.model_kwargs))
            if self.correct != "none":  # nor one its statistics could not correct
                check_one_shot(student, f"ElasticExport(correct={self.correct!r})", EXPORT_HINT)
            keeps = [getattr(pl_module, k, None) for k in ("min_mlp_keep", "min_head_keep")]
            if all(isinstance(k, float) for k in keeps):  # nor a budget below every block's minimum keep
                _check_reachable(student, self.budgets, *keeps, "ElasticExport(budgets=...)")
        dm = getattr(trainer, "datamodule", None)
        if self.correct != "none" and self.images is None and not (
            hasattr(dm, "calibration_images_eval") or hasattr(dm, "fitness_images")
        ):
            raise ValueError(
                f"ElasticExport(correct={self.correct!r}) needs calibration images: pass images=, or a datamodule "
                f"with calibration_images_eval() (e.g. CalibrationDataModule); got {type(dm).__name__}. "
                "correct='none' exports the plain cut without statistics"
            )

    def _images(self, trainer: pl.Trainer) -> Tensor | None:
        if self.images is not None:
            return self.images
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "fitness_images"):
            return dm.fitness_images()
        return None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Note when the scoring epoch starts (for ``scoring_s`` when no search recorded it)."""
        self._train_start = time.perf_counter()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Export from rank 0, then wait on every rank (see the class docstring); SIGTERM stops rank 0's export."""
        with collective_safe_sigterm(trainer):
            self._export(trainer, pl_module)

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_order(trainer)
        stop_if_terminated(trainer)  # a SIGTERM during the search: write nothing
        if trainer.fast_dev_run:  # a smoke test writes nothing, as Lightning's checkpoints (the set-up was checked)
            return rank_zero_info(f"ElasticExport: fast_dev_run, so nothing is written to {self.dirpath}")
        student, scores = scored_model(pl_module, "ElasticExport")
        start_at = getattr(self, "_train_start", None)
        if start_at is not None:
            scores = with_scoring_time(scores, start_at, next(student.parameters()).device, int(trainer.world_size))
        error: BaseException | None = None
        if trainer.is_global_zero:  # no collectives in here
            try:
                with stops_on_sigterm():  # rank 0's work only: a SIGTERM may stop it anywhere
                    model_name, model_kwargs = _rebuild_info(pl_module, self.model_name, self.model_kwargs)
                    device = next(student.parameters()).device
                    model = copy.deepcopy(student).cpu()
                    if non_float32(model):  # e.g. precision="bf16-true"
                        model.float()  # the fidelity and statistics run float32, as the plug-in's copy
                        rank_zero_info("ElasticExport: the scored model's weights are not float32; the export writes a "
                                       "float32 copy (cast a subnet back to deploy it in that precision)")
                    self.elastic = ElasticViT(model, scores, model_name=model_name, model_kwargs=model_kwargs)
                    calibration = None if self.correct == "none" else _calibration_images(
                        getattr(trainer, "datamodule", None), self._images(trainer), self.stats_views)
                    result = export_elastic(
                        self.elastic,
                        self.dirpath,
                        budgets=self.budgets,
                        fitness_images=self._images(trainer),
                        save_subnets=self.save_subnets,
                        overwrite=self.overwrite,
                        name=self.name,
                        batch_size=self.batch_size,
                        correct=self.correct,
                        calibration_images=None if calibration is None else calibration[0],
                        views_per_image=1 if calibration is None else calibration[1],
                        device=device,
                    )
                    self.export_paths, self.report = result["paths"], result["report"]
            except BaseException as err:  # raised after the barrier, so no rank waits forever
                error = err
        finish_on_every_rank(trainer, error, "ElasticExport")


def with_scoring_time(scores: ImportanceScores, start_at: float, device: torch.device, world_size: int) -> ImportanceScores:
    """``scores`` with ``build_info["scoring_s"]`` (since ``start_at``, a ``perf_counter``) and its machine, unless a
    search recorded them (no search ran: ``ElasticExport`` right after the scoring, the plug-in with ``search_evals=0``)."""
    if (scores.build_info or {}).get("scoring_s") is not None:
        return scores
    return dataclasses.replace(scores, build_info={
        **(scores.build_info or {}), "scoring_s": time.perf_counter() - start_at,
        "machine": {**build_machine(device), "world_size": world_size}})


class ExportCheck(Callback):
    """Warns when a fit has no :class:`ElasticExport` (its scores would be computed, then dropped), or several.

    ``snapvit fit`` adds it to every Trainer it builds: ``snapvit fit --model.model NAME --data.data_dir
    DIR`` without a config that lists the export writes nothing, which is easy to miss.
    """

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        exports = [str(cb.dirpath) for cb in trainer.callbacks if isinstance(cb, ElasticExport)]
        if len(exports) > 1:  # --trainer.callbacks+=ElasticExport beside a config's: both ran, without a word
            warn_at_caller_on_rank_zero(
                f"this fit has {len(exports)} ElasticExport callbacks, so it exports {len(exports)} times "
                f"({', '.join(exports)}); --trainer.callbacks.dirpath DIR moves the config's own export"
            )
        if not exports:
            warn_at_caller_on_rank_zero(
                "this fit has no ElasticExport callback, so it writes no elastic model (the scores are computed and dropped); "
                "run it with --config configs/quickstart.yaml (a later --config that lists trainer.callbacks replaces the "
                "whole list), or add --trainer.callbacks+=snapvit_lightning.export.ElasticExport --trainer.callbacks.dirpath DIR"
            )
