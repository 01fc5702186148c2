"""``snapvit bench``: accuracy and real speed of an elastic checkpoint at a list of budgets.

For each budget ``(mlp_ratio, head_ratio)`` (plus the dense model, row ``0,0``) the subnet is
cut and measured on the images of a folder (plain eval views at the model's input size):

* FLOPs and parameter fractions of the dense model;
* fidelity: mean cosine similarity of its pre-logits features to the dense model's;
* centered fidelity: the same after removing each model's mean feature over the images
  (:func:`~snapvit_lightning.evaluation.centered_fidelity`): what is kept of the image-specific part
  of the features, which the shared direction of ViT features hides in the plain fidelity;
* agreement, for a classifier model (``num_classes > 0``): the share of images whose class from its
  head (unchanged in every subnet) is the dense model's (no labels needed);
* k-NN top-1 (leave-one-out 1-NN and DINO's weighted 20-NN, T=0.07) when the folder has
  ImageFolder class subfolders (at least 2 classes), else ``null``;
* latency (median ms per batch under ``torch.inference_mode``; on the CPU in float32 unless
  ``--device``/``--dtype`` say otherwise: copies cast to ``--dtype`` on ``--device``, as a deployment
  that casts its subnet runs) and the measured speed-up over the dense model's latency measured in
  the same run. Features (fidelity, k-NN) are computed in float32 on the CPU whatever the latency's
  device and dtype.

``--baselines`` adds, after the SnapViT rows (method ``snapvit``), rows at the same (non-dense)
budgets for other unit rankings, each a new elastic model built from the checkpoint's weights:

* ``gradient-only``: the checkpoint's own scores without the search weights (no search);
* ``snip-magnitude``: SNIP saliency ``|w * G|`` of the DINO-loss gradient ``G``, from one
  calibration epoch on ``--data`` with :class:`~snapvit_lightning.data.CalibrationDataModule`'s
  defaults (2 global + 10 local views, batch 16, seed 0) in 32-bit on the CPU (labels ignored);
* ``magnitude`` and ``lamp``: data-free scores of the weights, as ``SnapViTModule`` computes them;
* ``random``: uniform random scores, seeds 0, 1, 2, drawn per *original* unit (the model's
  before the checkpoint permuted it), so every checkpoint of one model draws the same random
  subnets; one row with the mean over seeds (fidelity, k-NN, cost, latency), the seeds'
  ``fidelity_std`` (sample std) and the ``per_seed`` values;
* ``uniform``: the same share pruned in every block at equal FLOPs: the snapvit row's total of
  kept neurons (heads) split evenly over the blocks (``total // B`` each, one more in
  ``total % B`` evenly spaced blocks), each block keeping its best units by the gradient-only
  ranking (the raw scores: the search's head weights, which reorder heads inside a block, are
  not used, so the baseline does not depend on the search).

Under the table a *Build time* section gives the wall time of each stage of building the
elastic model, measured at build time on the build machine (not by this run): ``scoring``
(``on_train_start`` to the end of the calibration epoch, scores included), ``search`` (the
:class:`~snapvit_lightning.search.EvolutionarySearch` hook, with its number of candidate
evaluations) and ``export`` (:func:`~snapvit_lightning.export.export_elastic` up to writing
``report.json``). Scoring and search come from the checkpoint (``build_info`` in its scores
metadata), the export time from the ``report.json`` beside it (only when that report names this
checkpoint); unknown values are ``null`` (older checkpoints, a moved file, a resumed run's
earlier part).

``--correct bias lstsq`` adds, after each pruned row, the budget's weight-corrected subnet
(:mod:`snapvit_lightning.correction`) as method ``<method>+<correction>``. Its statistics come
from ``--calibration`` (a stats file of this checkpoint, or an image folder) or, by default, from
a 2-fold cross-fit on ``--data``: the features of the even-position images come from a subnet
corrected on the odd ones and vice versa, so no image is both calibration and evaluation. The
``snapvit+<correction>`` rows are the subnets :meth:`ElasticViT.subnet` gives by default: their
units are chosen by the corrected path's own ranking, computed on the calibration images as the
export computes it (a stats file: its ranking, when it carries one), so their kept units per block
differ from the plain row's (cross-fit: those of the subnet corrected on the even half are
listed); the FLOPs and parameters are the same. A baseline's corrected rows keep its own units.
An image folder calibrates as the export does (eval views and random crops,
:func:`~snapvit_lightning.data.load_calibration_views`); the cross-fit folds use the eval views of
``--data`` alone.

The table is printed as markdown; ``--out DIR`` also writes ``bench.json`` (rows, settings:
command, hardware, threads, versions; and ``build_times``: ``scoring_s``, ``search_s``,
``search_evaluations``, ``export_s``, their ``sources``, ``build_machine``) and ``bench.md``::

    snapvit bench model.elastic.safetensors --data photos/ --out results/
    python -m snapvit_lightning.benchmarks.bench model.elastic.safetensors --data photos/ --no-latency
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from ..cli_args import LATENCY_DTYPES, budget_arg, device_arg, int_at_least
from ..machine import build_machine, cpu_model
from .bench_correction import check_calibration_options, make_calibrator

__all__ = ["DEFAULT_BUDGETS", "add_bench_parser", "run_bench", "markdown_table", "main"]

DEFAULT_BUDGETS: tuple[tuple[float, float], ...] = (
    (0.15, 0.0), (0.25, 0.1), (0.35, 0.2), (0.45, 0.3), (0.55, 0.4), (0.65, 0.5),
)
KNN_K = 20
_NO_KNN = "labels come from class subfolders alone, at least 2 of them: this folder is flat, mixed or of one class"
DESCRIPTION = ("k-NN, feature fidelity, FLOPs/params and measured latency (CPU or --device, float32 or --dtype) "
               "of an elastic checkpoint at several budgets, as a markdown table (and JSON with --out)")
KNN_TEMPERATURE = 0.07
BASELINES = ("gradient-only", "snip-magnitude", "magnitude", "lamp", "random", "uniform")
RANDOM_SEEDS = (0, 1, 2)


# --------------------------------------------------------------------------- arguments


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("path", metavar="ELASTIC", help="an *.elastic.safetensors checkpoint")
    parser.add_argument(
        "--data", required=True, metavar="FOLDER",
        help="folder of images (class subfolders give k-NN labels; a flat folder gives no k-NN)",
    )
    parser.add_argument(
        "--budgets", nargs="+", type=budget_arg, default=list(DEFAULT_BUDGETS), metavar="MLP,HEAD",
        help="MLP_RATIO,HEAD_RATIO pairs to prune (default: 0.15,0 0.25,0.1 0.35,0.2 0.45,0.3 "
             "0.55,0.4 0.65,0.5); the dense row 0,0 is always added",
    )
    parser.add_argument("--img-size", type=int_at_least(1), default=None, metavar="N",
                        help="measure at N x N px: the images, FLOPs and latency (default: the model's own size; "
                             "the scores and statistics stay the calibration size's)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=32,
                        help="images per forward for features and latency (default: 32)")
    parser.add_argument("--repeats", type=int_at_least(1), default=10,
                        help="timed forwards per model; the median is reported (default: 10)")
    parser.add_argument("--warmup", type=int_at_least(0), default=3,
                        help="untimed forwards before timing each model (default: 3)")
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="torch CPU threads (default: torch's own setting)")
    parser.add_argument("--device", type=device_arg, default="cpu",
                        help="device the latency is measured on, e.g. cuda (default: cpu); features are float32 on the CPU")
    parser.add_argument("--dtype", choices=LATENCY_DTYPES, default="float32",
                        help="time copies cast to this dtype, as a deployment that casts its subnets (default: float32)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write bench.json and bench.md into DIR (created if missing)")
    parser.add_argument("--overwrite", action="store_true", help="replace a bench.json/bench.md already in --out")
    parser.add_argument("--no-latency", action="store_true",
                        help="skip the latency measurement (latency and speed-up are null)")
    parser.add_argument("--baselines", action="store_true",
                        help="also bench other rankings at the same budgets: gradient-only (no search), snip-magnitude "
                             "(one DINO calibration epoch on --data), magnitude, lamp, random (mean of seeds 0,1,2) "
                             "and uniform per-block pruning at equal FLOPs")
    parser.add_argument("--correct", nargs="+", choices=("bias", "lstsq"), default=[], metavar="METHOD",
                        help="also bench weight-corrected subnets (bias and/or lstsq) of every method, as rows "
                             "'<method>+<correction>' (snapvit's: cut by the statistics' ranking, as subnet() cuts them)")
    parser.add_argument("--calibration", default=None, metavar="STATS|FOLDER",
                        help="correction statistics (*.stats.safetensors of this checkpoint; not with --baselines) "
                             "or an image folder or file; default: 2-fold cross-fit on --data (each image's features "
                             "come from a subnet corrected on the other half)")
    parser.set_defaults(func=run_bench)
    return parser


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``bench`` subcommand on an ``argparse`` subparsers object.

    Its handler (``args.func``) is :func:`run_bench`.
    """
    parser = subparsers.add_parser(
        "bench",
        help="k-NN, fidelity, FLOPs and measured latency of an elastic checkpoint at several budgets",
        description=DESCRIPTION,
    )
    return _configure(parser)


def command_line(args: argparse.Namespace) -> str:
    """The canonical ``snapvit bench ...`` command that reproduces ``args``."""
    words = ["snapvit", "bench", str(args.path), "--data", str(args.data), "--budgets"]
    words += [f"{m:g},{h:g}" for m, h in args.budgets]
    words += ["--batch-size", str(args.batch_size), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    if args.threads is not None:
        words += ["--threads", str(args.threads)]
    if getattr(args, "img_size", None) is not None:
        words += ["--img-size", str(args.img_size)]
    for option, default in (("device", "cpu"), ("dtype", "float32")):
        if getattr(args, option, default) != default:
            words += [f"--{option}", str(getattr(args, option))]
    if args.out is not None:
        words += ["--out", str(args.out)] + (["--overwrite"] if getattr(args, "overwrite", False) else [])
    if args.no_latency:
        words.append("--no-latency")
    if getattr(args, "baselines", False):
        words.append("--baselines")
    if getattr(args, "correct", None):
        words += ["--correct", *args.correct]
    if getattr(args, "calibration", None) is not None:
        words += ["--calibration", str(args.calibration)]
    return shlex.join(words)


# --------------------------------------------------------------------------- data


def _build_times(path: Path, scores: Any) -> dict[str, Any]:
    """Stage wall times recorded at build time: the checkpoint's ``build_info`` and the
    ``report.json`` written beside it by the same export (``export_s``); ``None`` where unknown."""
    info = dict(getattr(scores, "build_info", None) or {})
    report_path, report = path.parent / "report.json", {}
    try:
        loaded = json.loads(report_path.read_text())
        if isinstance(loaded, dict) and (loaded.get("files") or {}).get("elastic") == path.name:
            report = loaded.get("build_times") or {}
    except (OSError, ValueError):
        pass
    out: dict[str, Any] = {}
    sources: dict[str, Any] = {}
    for key in ("scoring_s", "search_s", "search_evaluations", "export_s"):
        if info.get(key) is not None:
            out[key], sources[key] = info[key], "checkpoint"
        elif report.get(key) is not None:
            out[key], sources[key] = report[key], "report.json"
        else:
            out[key], sources[key] = None, None
    out["sources"] = sources
    out["report"] = str(report_path) if report else None
    out["build_machine"] = info.get("machine") or report.get("machine")
    out["export_machine"] = report.get("export_machine")
    out["note"] = ("wall times measured when the elastic model was built, on the build machine "
                   "(not in this bench run)")
    return out


def _build_markdown(times: dict[str, Any]) -> str:
    """The ``Build time`` section: stage and seconds (``–`` where unknown)."""
    evals = times["search_evaluations"]
    rows = [("scoring", times["scoring_s"], ""),
            ("search", times["search_s"], "" if evals is None else f" ({evals} evaluations)"),
            ("export", times["export_s"], "")]
    machine = times.get("build_machine") or {}
    where = (f"{machine.get('device')} ({machine.get('device_name')}), {machine.get('torch_threads')} torch threads"
             if machine else "unknown machine")
    lines = [f"\nBuild time (measured when the elastic model was built, on {where}):\n",
             "| stage | seconds |", "|:---|---:|"]
    lines += [f"| {stage}{extra} | {_fmt(value, '.2f')} |" for stage, value, extra in rows]
    return "\n".join(lines) + "\n"


def _has_labels(labels: Any) -> bool:
    return bool(labels.numel() >= 2 and (labels >= 0).all() and labels.unique().numel() >= 2)


# --------------------------------------------------------------------------- report


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value: Any, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "–" if value is None else f"{value * scale:{spec}}{suffix}"


def markdown_table(rows: Sequence[dict[str, Any]], knn_k: int = KNN_K, batch_size: int | None = None) -> str:
    """The rows of :func:`run_bench` as a markdown table; ``knn_k``: the weighted k-NN's k (column ``knn_weighted``),
    ``batch_size``: the images per timed forward (named in the latency column)."""
    per = "" if batch_size is None else f" / batch of {batch_size}"
    agreement = any(r.get("agreement") is not None for r in rows)  # a classifier model's column
    header = (f"| method | mlp_ratio | head_ratio | params | FLOPs | fidelity | centered | {'agreement | ' * agreement}"
              f"1-NN | {knn_k}-NN | latency (ms{per}) | speed-up | FLOPs speed-up |")
    lines = [header, "|:---|" + "---:|" * (11 + agreement)]
    for r in rows:
        std = r.get("fidelity_std")
        fidelity = f"{r['fidelity']:.4f}" + ("" if std is None else f" ± {std:.4f}")
        lines.append(
            f"| {r.get('method', 'snapvit')} "
            f"| {r['mlp_ratio']:.2f} | {r['head_ratio']:.2f} | {100 * r['params_fraction']:.1f}% "
            f"| {100 * r['flops_fraction']:.1f}% | {fidelity} | {_fmt(r.get('centered_fidelity'), '.4f')} "
            + (f"| {_fmt(r.get('agreement'), '.1f', 100, '%')} " if agreement else "")
            + f"| {_fmt(r['knn_1nn'], '.1f', 100, '%')} | {_fmt(r['knn_weighted'], '.1f', 100, '%')} "
            f"| {_fmt(r['latency_ms'], '.2f')} | {_fmt(r['speedup'], '.2f', suffix='x')} "
            f"| {1 / r['flops_fraction']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def _knn_noise(num_images: int) -> str:
    """How far apart two k-NN accuracies on ``num_images`` images must be to mean anything."""
    se = 100 * (0.25 / num_images) ** 0.5
    return (f"one image is {100 / num_images:.1f} points; the standard error of an accuracy near 50 % is "
            f"{se:.1f} points, so differences under ~{2 * se:.0f} points are noise: read fidelity first")


def _header_lines(settings: dict[str, Any]) -> list[str]:
    """What a table's numbers are: hardware, latency protocol, k-NN protocol and noise, fidelity, correction."""
    hw = settings["hardware"]
    lat = (f"latency: median of {settings['repeats']} forwards after {settings['warmup']} warm-up, "
           f"batch {settings['batch_size']} at {settings['img_size']} x {settings['img_size']} px, {settings['device']}, "
           f"{settings['dtype']}, torch.inference_mode"
           + ("" if settings.get("load_average") is None else f", 1-minute load average {settings['load_average']:.2f} before"
              + (" (busy: above the cores, so the latencies read slow and their ratios shift)" if settings.get("busy") else ""))
           if settings["latency"] else "latency: not measured (--no-latency)")
    knn = (f"k-NN: leave-one-out on {settings['num_images']} images, {settings['num_classes']} classes "
           f"(1-NN; weighted {settings['knn_protocol']['k'][1]}-NN, T={KNN_TEMPERATURE}); "
           + _knn_noise(settings["num_images"]) if settings["knn"] else f"k-NN: none ({_NO_KNN})")
    fidelity = ("fidelity: mean cosine similarity of pre-logits features to the dense model's"
                + (" (random: mean ± std over seeds)" if settings.get("baselines") else "") + " on the "
                f"{settings['num_images']} images of {settings['data']}; centered: the same after subtracting each "
                "model's mean feature over the images (the image-specific part). Held out only if neither the "
                "checkpoint's calibration nor the correction statistics saw these images"
                + ("; agreement: the share of images whose class from the model's classifier head (the argmax of "
                   "its logits) is the dense model's, no labels needed" if settings.get("classifier") else ""))
    lines = [f"hardware: {hw['cpu']} ({hw['machine']}), {hw['torch_threads']} torch threads, {hw['platform']}",
             f"torch {settings['versions']['torch']}, timm {settings['versions']['timm']}, "
             f"snapvit_lightning {settings['versions']['snapvit_lightning']}", lat, knn, fidelity]
    if settings.get("correction"):
        lines.append(f"weight correction ({', '.join(settings['correction']['methods'])}): "
                     f"{settings['correction']['calibration']}")
    return lines


def _markdown_file(rows: Sequence[dict[str, Any]], settings: dict[str, Any]) -> str:
    return (
        f"# snapvit bench: {settings['model_name']} at {settings['img_size']} px\n\n"
        f"```\n{settings['command']}\n```\n\n"
        + "".join(f"- {line}\n" for line in _header_lines(settings)) + "\n"
        + markdown_table(rows, settings['knn_protocol']['k'][1], settings.get("batch_size"))
    )


# --------------------------------------------------------------------------- baselines


def _baseline_scores(elastic: Any, snip_data: Path | None = None) -> list[tuple[str, int | None, Any]]:
    """``(method, seed, ImportanceScores)`` of the score baselines, in the elastic model's unit order.

    The data-free and SNIP scores are computed by :class:`~snapvit_lightning.module.SnapViTModule`
    itself (on a copy of the weights, which it marks as requiring gradients), so their definitions
    are the module's; every baseline keeps the checkpoint's per-block minimums.

    Args:
        elastic: The checkpoint's :class:`~snapvit_lightning.elastic.ElasticViT`.
        snip_data: Image folder for the ``snip-magnitude`` scores (one calibration epoch, see the
            module docstring); ``None`` leaves that baseline out.
    """
    import copy
    import warnings

    import lightning.pytorch as pl

    from ..console import fit, internal_fit
    from ..data import CalibrationDataModule
    from ..module import SnapViTModule

    s = elastic.scores
    keeps = {"min_mlp_keep": s.min_mlp_keep, "min_head_keep": s.min_head_keep}
    out: list[tuple[str, int | None, Any]] = [
        ("gradient-only", None, s.raw()),
    ]
    if snip_data is not None:
        module = SnapViTModule(copy.deepcopy(elastic.model), criterion="snip_magnitude", **keeps)
        with internal_fit(), warnings.catch_warnings():  # the table says what ran; Lightning's set-up lines would not
            # The same folder's unreadable images were named when --data was read; not again as `data_dir`.
            warnings.filterwarnings("ignore", message=r"skipped \d+ of \d+ images in ")
            trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, precision="32-true", logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
            fit(trainer, module, datamodule=CalibrationDataModule(data_dir=snip_data))  # Ctrl-C: KeyboardInterrupt
        out.append(("snip-magnitude", None, module.scores))
    weights = copy.deepcopy(elastic.model)
    for criterion, seeds in (("magnitude", (None,)), ("lamp", (None,)), ("random", RANDOM_SEEDS)):
        for seed in seeds:
            module = SnapViTModule(weights, criterion=criterion, seed=0 if seed is None else seed, **keeps)
            scores = module.compute_scores()
            if criterion == "random":  # drawn for the original units: independent of the checkpoint's order
                scores = scores.permuted(elastic.mlp_order, elastic.head_order)
            out.append((criterion, seed, scores))
    return out


def _even_split(total: int, num_blocks: int) -> list[int]:
    """``total`` units over ``num_blocks``: ``total // B`` each, one more in evenly spaced blocks."""
    base, extra = divmod(total, num_blocks)
    more = {(j * num_blocks) // extra for j in range(extra)} if extra else set()
    return [base + (b in more) for b in range(num_blocks)]


def _uniform_dims(scores: Any, mlp_ratio: float, head_ratio: float) -> list[Any]:
    """The same keep in every block, with the global ranking's total (equal params and FLOPs)."""
    from ..structure import BlockDims

    neurons, heads = scores.keep_counts(mlp_ratio, head_ratio)
    split = zip(_even_split(int(heads.sum()), scores.num_blocks), _even_split(int(neurons.sum()), scores.num_blocks))
    return [BlockDims(h, n) for h, n in split]


def _mean(values: Sequence[Any]) -> Any:
    return None if any(v is None for v in values) else statistics.fmean(values)


def _merge_seeds(rows: list[dict[str, Any]], batch_size: int, dense_latency: float | None) -> list[dict[str, Any]]:
    """Replace the per-seed rows of a method by one row per budget: means, ``fidelity_std``, ``per_seed``."""
    out: list[dict[str, Any]] = []
    groups: dict[tuple[str, float, float], list[dict[str, Any]]] = {}
    for r in rows:
        if r["seed"] is None:
            out.append({k: v for k, v in r.items() if k != "seed"})
            continue
        key = (r["method"], r["mlp_ratio"], r["head_ratio"])
        if key not in groups:
            groups[key] = []
            out.append({"_group": key})
        groups[key].append(r)
    merged: list[dict[str, Any]] = []
    for r in out:
        if "_group" not in r:
            merged.append(r)
            continue
        group = groups[r["_group"]]
        first = group[0]
        fidelities = [g["fidelity"] for g in group]
        latency = _mean([g["latency_ms"] for g in group])
        merged.append({
            **{k: v for k, v in first.items() if k != "seed"},
            "params": int(round(statistics.fmean(g["params"] for g in group))),
            "flops": int(round(statistics.fmean(g["flops"] for g in group))),
            "params_fraction": statistics.fmean(g["params_fraction"] for g in group),
            "flops_fraction": statistics.fmean(g["flops_fraction"] for g in group),
            "fidelity": statistics.fmean(fidelities),
            "centered_fidelity": statistics.fmean(g["centered_fidelity"] for g in group),
            "fidelity_std": statistics.stdev(fidelities) if len(fidelities) > 1 else 0.0,
            "knn_1nn": _mean([g["knn_1nn"] for g in group]),
            "knn_weighted": _mean([g["knn_weighted"] for g in group]),
            "agreement": _mean([g["agreement"] for g in group]),
            "latency_ms": latency,
            "p90_ms": _mean([g["p90_ms"] for g in group]),
            "throughput_img_s": None if not latency else batch_size / (latency / 1e3),
            "speedup": None if not latency or dense_latency is None else dense_latency / latency,
            "quality_wall_s": sum(g["quality_wall_s"] for g in group),
            "seeds": [g["seed"] for g in group],
            "per_seed": [{k: g[k] for k in ("seed", "fidelity", "centered_fidelity", "agreement", "knn_1nn", "knn_weighted", "flops_fraction",
                                            "params_fraction", "latency_ms", "kept_heads", "kept_neurons")}
                         for g in group],
        })
    return merged


# --------------------------------------------------------------------------- run


def run_bench(args: argparse.Namespace) -> int:
    """Run ``snapvit bench`` (see the module docstring); returns the exit status 0.

    Raises:
        FileNotFoundError: The checkpoint or the data folder does not exist.
        ValueError: An unreadable checkpoint or image, a folder without images, a bad budget
            or setting, or ``--out`` naming a file.
    """
    import timm
    import torch

    from .. import __version__
    from ..data import load_eval_images
    from ..correction_stats import stats_path_for
    from ..elastic import ElasticViT
    from ..evaluation import (
        centered_fidelity, extract_features, feature_fidelity, knn_accuracy, measure_latency, prediction_agreement,
    )

    path, data = Path(args.path).expanduser(), Path(args.data).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ELASTIC: elastic checkpoint not found: '{path}'")
    if not data.exists():
        raise FileNotFoundError(f"--data: image folder not found: '{data}'")
    out = None if args.out is None else Path(args.out).expanduser()
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"--out must be a folder, but '{out}' is a file")
    if out is not None:
        from ..file_io import check_writable  # torch and timm: not for `snapvit --help`

        check_writable(out, "--out")  # before the benchmark, not after it
        earlier = next((out / n for n in ("bench.json", "bench.md") if os.path.lexists(out / n)), None)  # a link too
        if earlier is not None and not getattr(args, "overwrite", False):
            raise FileExistsError(f"--out: '{earlier}' exists (an earlier bench?); pass --overwrite to replace it")
    budgets = [(float(m), float(h)) for m, h in args.budgets]
    for m, h in budgets:  # range check when run_bench is called with a hand-made Namespace
        try:
            budget_arg(f"{m},{h}")
        except argparse.ArgumentTypeError as err:
            raise ValueError(str(err)) from None
    from ..latency import _check_device, _check_dtype, dtype_name

    device = _check_device(getattr(args, "device", "cpu"), "torch")  # a hand-made Namespace may lack them
    dtype = _check_dtype(getattr(args, "dtype", "float32"), "torch")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0:
        raise ValueError("--batch-size and --repeats must be >= 1 and --warmup >= 0")
    check_calibration_options(getattr(args, "calibration", None), list(getattr(args, "correct", None) or []),
                              getattr(args, "baselines", False))

    t_start = time.perf_counter()
    elastic = ElasticViT.load(path, stats=False)  # plain rows are plain cuts; --correct adds corrected ones
    if getattr(args, "img_size", None) is not None:  # a hand-made Namespace may lack it
        from ..deploy_size import set_deployment_size

        set_deployment_size(elastic.model, args.img_size)
    build_times = _build_times(path, elastic.scores)
    dense = elastic.model
    images, labels, classes = load_eval_images(data, dense, argument="--data")
    if len(images) < 2:  # the centered fidelity subtracts the images' mean feature
        raise ValueError(f"--data: bench needs at least 2 images, got {len(images)} in '{data}'")
    knn = _has_labels(labels)
    knn_k = min(KNN_K, len(images) - 1)  # leave-one-out: at most the other images vote
    # a classifier's head, float32 on the CPU as the features (the latency casts and moves the models in place)
    classifier = dense.get_classifier() if getattr(dense, "num_classes", 0) else None
    if classifier is not None and not isinstance(classifier, torch.nn.Module):
        print("agreement: none for a distilled model (its two heads read two tokens, whose average the features are)")
        classifier = None
    classifier = None if classifier is None else copy.deepcopy(classifier).float().cpu()

    def quality(model: Any, feats: Any = None) -> dict[str, Any]:
        feats = extract_features(model, images, batch_size=args.batch_size) if feats is None else feats
        return {
            "features": feats,
            "knn_1nn": knn_accuracy(feats, labels, k=1) if knn else None,
            "knn_weighted": knn_accuracy(feats, labels, k=knn_k, temperature=KNN_TEMPERATURE) if knn else None,
        }

    reachable = [elastic.resolve_budget(*b) for b in budgets]  # a ratio beyond the blocks' minimum keep cuts no more
    for given, got in zip(budgets, reachable):
        if tuple(given) != got:
            print(f"--budgets {given[0]:g},{given[1]:g} cuts as {got[0]:.4f},{got[1]:.4f}: every block keeps its minimum")
    todo = [(0.0, 0.0)] + [b for b in dict.fromkeys(reachable) if b != (0.0, 0.0)]
    keep_models = not args.no_latency
    entries: list[dict[str, Any]] = []

    corrections = list(dict.fromkeys(getattr(args, "correct", None) or []))
    beside = stats_path_for(path)
    if not corrections and beside.is_file():  # slice's default is not what these rows measure
        option = ("`--correct lstsq` adds corrected rows (refit on --data, cross-fit: --baselines takes no stats file)"
                  if getattr(args, "baselines", False) else f"`--correct lstsq --calibration "
                  f"{shlex.quote(str(beside))}` adds those rows (held out only if --data holds none of "
                  "their calibration images)")
        print(f"plain cuts only: `snapvit slice` and subnet() cut corrected subnets from {beside.name} by "
              f"default; {option}", file=sys.stderr)
    calibrate = make_calibrator(getattr(args, "calibration", None), images, args.batch_size, corrections)

    def add(method: str, source: Any, ratios: tuple[float, float], dims: Any, seed: int | None = None) -> None:
        t0 = time.perf_counter()
        is_dense = ratios == (0.0, 0.0) and method == "snapvit"
        model = dense if is_dense else source.slice(dims)
        entries.append({"method": method, "seed": seed, "ratios": ratios, "dense": is_dense, "dims": dims,
                        "model": model if keep_models else None, "cost": source.cost(dims), **quality(model),
                        "wall_s": time.perf_counter() - t0})
        for correct in [] if is_dense else corrections:
            t0, stats_s = time.perf_counter(), calibrate.stats_s  # statistics: in settings.correction.stats_s
            model, feats, kept = calibrate.corrected(
                source, ratios, dims, correct, ranking=method == "snapvit",
                label=method if seed is None else f"{method} (seed {seed})")
            entries.append({"method": f"{method}+{correct}", "seed": seed, "ratios": ratios, "dense": False,
                            "dims": kept, "model": model if keep_models else None, "cost": source.cost(kept),
                            **quality(model, feats), "wall_s": time.perf_counter() - t0 - (calibrate.stats_s - stats_s)})

    fixes = (f" and {', '.join(corrections)}-corrected" if corrections else "") + (
        " and baselines" if getattr(args, "baselines", False) else "")
    print(f"bench: the dense model and {len(todo) - 1} budget(s), plain{fixes}, on {images.shape[0]} images"
          f"{'' if args.no_latency else ', then their latency'}", file=sys.stderr, flush=True)
    for ratios in todo:
        add("snapvit", elastic, ratios, elastic.dims(*ratios))
    if getattr(args, "baselines", False):
        pruned = todo[1:]
        for method, seed, scores in _baseline_scores(elastic, snip_data=data):
            other = ElasticViT(dense, scores, model_name=elastic.model_name, model_kwargs=elastic.model_kwargs)
            for ratios in pruned:
                add(method, other, ratios, other.dims(*ratios), seed)
            if method == "gradient-only":
                raw_order = other  # uniform keeps each block's units in this order
            del other
        for ratios in pruned:  # the snapvit rule's totals (equal FLOPs), split evenly
            add("uniform", raw_order, ratios, _uniform_dims(elastic.scores, *ratios))
        del raw_order
    dense_feats = entries[0]["features"]

    # Latency: warm every model up, then time them in interleaved rounds (one forward of each
    # model per round), so that load changes on the machine hit every row alike.
    times: list[list[float]] = [[] for _ in entries]
    from .. import machine
    from ..latency import busy_note

    load_average, busy = None, None
    if not args.no_latency:
        load_average, busy = machine.load_average(), busy_note(device, args.threads)
        if busy is not None:
            warnings.warn(busy, stacklevel=1)
        print(f"bench: timing {len(entries)} models ({args.repeats} interleaved rounds, batch {args.batch_size})",
              file=sys.stderr, flush=True)
        for e in entries:  # the features are taken: the models are cast and moved in place
            e["model"].eval().to(device=device, dtype=dtype)
            measure_latency(e["model"], batch_size=args.batch_size, device=device, warmup=args.warmup, repeats=1)
        for _ in range(args.repeats):
            for e, t in zip(entries, times):
                t.append(measure_latency(e["model"], batch_size=args.batch_size, device=device,
                                         warmup=0, repeats=1)["median_ms"])
    dense_latency = statistics.median(times[0]) if times[0] else None

    rows: list[dict[str, Any]] = []
    for e, t in zip(entries, times):
        latency = statistics.median(t) if t else None
        cost, dims = e["cost"], e["dims"]
        rows.append({
            "method": e["method"],
            "mlp_ratio": e["ratios"][0],
            "head_ratio": e["ratios"][1],
            "dense": e["dense"],
            "params": int(cost["params"]),
            "flops": int(cost["flops"]),
            "params_fraction": float(cost["params_fraction"]),
            "flops_fraction": float(cost["flops_fraction"]),
            "fidelity": feature_fidelity(e["features"], dense_feats),
            "centered_fidelity": centered_fidelity(e["features"], dense_feats),
            "agreement": None if classifier is None else prediction_agreement(e["features"], dense_feats, classifier),
            "knn_1nn": e["knn_1nn"],
            "knn_weighted": e["knn_weighted"],
            "latency_ms": latency,
            "p90_ms": float(torch.quantile(torch.tensor(t, dtype=torch.float64), 0.9)) if t else None,
            "throughput_img_s": None if not latency else args.batch_size / (latency / 1e3),
            "speedup": None if not latency else dense_latency / latency,
            "kept_heads": [d.num_heads for d in dims],
            "kept_neurons": [d.mlp_hidden for d in dims],
            "quality_wall_s": e["wall_s"],
            "seed": e["seed"],
        })
    del entries
    rows = _merge_seeds(rows, args.batch_size, dense_latency)

    settings = {
        "command": command_line(args),
        "elastic": str(path),
        "data": str(data),
        "model_name": elastic.model_name,
        "model_kwargs": elastic.model_kwargs,
        "img_size": int(images.shape[-1]),
        "num_images": int(images.shape[0]),
        "num_classes": len(classes),
        "knn": knn,
        "classifier": classifier is not None,  # the agreement column
        "knn_protocol": {"split": "leave-one-out", "k": [1, knn_k], "temperature": KNN_TEMPERATURE},
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "latency": not args.no_latency,
        "baselines": list(BASELINES) if getattr(args, "baselines", False) else [],
        "correction": None if not corrections else {
            "methods": corrections, "calibration": calibrate.description, "stats_s": calibrate.stats_s,
        },
        "random_seeds": list(RANDOM_SEEDS) if getattr(args, "baselines", False) else [],
        "device": device,
        "device_name": build_machine(device)["device_name"],
        "load_average": load_average,  # the machine's, as the timing began (None: not timed, or no such reading)
        "busy": busy is not None,  # its latencies read slow (the warning said so)
        "dtype": dtype_name(dtype),  # the latency's; features are float32 on the CPU
        "latency_protocol": "per model: --warmup untimed forwards, then --repeats timed forwards in "
                            "interleaved rounds (one per model per round); median and p90 per batch",
        "hardware": {
            "cpu": cpu_model(),
            "processor": platform.processor(),
            "machine": platform.machine(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "snapvit_lightning": __version__},
        "wall_s": time.perf_counter() - t_start,
    }

    table = markdown_table(rows, knn_k, args.batch_size)
    print("".join(f"- {line}\n" for line in _header_lines(settings)))
    if knn and knn_k < KNN_K:
        print(f"k-NN: {len(images)} images, so the weighted k-NN votes over k={knn_k} (every other image), "
              f"not {KNN_K}: few images")
    print(table + _build_markdown(build_times), end="")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        result = {"settings": settings, "build_times": build_times,
                  "rows": [{k: _finite(v) for k, v in r.items()} for r in rows]}
        from ..file_io import write_file_atomic

        write_file_atomic(out / "bench.json", (json.dumps(result, indent=2, allow_nan=False) + "\n").encode())
        write_file_atomic(out / "bench.md", (_markdown_file(rows, settings) + _build_markdown(build_times)).encode())
        print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m snapvit_lightning.benchmarks.bench``), same options as ``snapvit bench``."""
    parser = _configure(argparse.ArgumentParser(prog="snapvit bench", description=DESCRIPTION))
    args = parser.parse_args(argv)
    from ..errors import exit_on_user_error, own_warnings_as

    with exit_on_user_error(parser.prog), own_warnings_as(parser.prog):
        return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
