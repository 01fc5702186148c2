"""``snapvit info``: the budgets of an elastic checkpoint (with ``--latency``, measured) or what a subnet file is."""

from __future__ import annotations

import argparse
import shlex
import warnings
from pathlib import Path

__all__ = ["INFO_BUDGETS", "deployment_size", "measured_at_note", "run_info"]

#: The budgets ``snapvit info`` lists without ``--budgets``.
INFO_BUDGETS = [(0.0, 0.0), (0.15, 0.0), (0.25, 0.1), (0.35, 0.2), (0.45, 0.3), (0.55, 0.4), (0.65, 0.5)]


def run_info(args: argparse.Namespace) -> int:
    from .elastic import ElasticViT, read_metadata

    if not args.latency and ((args.batch_size, args.threads, args.device, args.dtype) != (None,) * 4 or args.onnx):
        raise ValueError("--batch-size/--threads/--device/--dtype/--onnx say how --latency measures; give --latency too")
    if args.onnx and args.dtype not in (None, "float32"):
        raise ValueError(f"--dtype {args.dtype}: --onnx times float32 graphs in ONNX Runtime, as `slice -o X.onnx` "
                         "writes them; leave --dtype out")
    meta = read_metadata(args.path)
    if meta["kind"] != "elastic":
        if args.latency or args.no_correct or args.img_size is not None:
            raise ValueError(f"{args.path} is a subnet: --latency/--no-correct/--img-size apply to elastic checkpoints")
        from .subnet_info import describe_subnet

        print("\n".join(describe_subnet(args.path, meta)))
        return 0
    elastic = ElasticViT.load(args.path)
    own = deployment_size(elastic, args.img_size)
    budgets = list(dict.fromkeys(elastic.resolve_budget(*b) for b in args.budgets or INFO_BUDGETS))  # reachable ratios
    # The cut `slice`/`subnet()` give by default: the statistics' ranking when they carry one.
    ranked = None if args.no_correct else elastic.ranked_view()  # None without statistics or ranking
    source = elastic if ranked is None else ranked
    latencies, how = _info_latencies(args, source, budgets) if args.latency else (None, None)  # bad options fail before any output
    size = "" if args.img_size is None else f" (--img-size {args.img_size}: FLOPs and latency at {args.img_size} px)"
    print(f"{args.path}: {meta['model_name']} {meta['model_kwargs']} input {meta['input_size']}{size} "
          f"(snapvit {meta['snapvit_version']}, timm {meta['timm_version']})")
    if how is not None:
        print(how)
    measured = "" if latencies is None else f" {'ms':>7} {'speed-up':>11}"
    cut = "plain cut" if ranked is None else "corrected cut"
    if args.budgets is None:
        print("budgets: info's own grid of ratios, any of which `slice` cuts (--budgets MLP,HEAD ... for others)")
    print(f"{'mlp_ratio':>9} {'head_ratio':>10} {'params':>12} {'FLOPs':>14} {'flops %':>8}{measured}"
          f"  kept heads / neurons per block ({cut})")
    for row, (mlp_ratio, head_ratio) in enumerate(budgets):
        dims = source.dims(mlp_ratio, head_ratio)
        cost = source.cost(dims)
        kept = " ".join(f"{d.num_heads}/{d.mlp_hidden}" for d in dims)
        ms = "" if latencies is None else f" {latencies[row + 1]:>7.2f} {latencies[0] / latencies[row + 1]:>10.2f}x"
        print(f"{mlp_ratio:>9.2f} {head_ratio:>10.2f} {cost['params']:>12,} {cost['flops']:>14,} "
              f"{100 * cost['flops_fraction']:>7.1f}%{ms}  {kept}")
    _info_correction(args, elastic, own)
    return 0


def deployment_size(elastic: object, img_size: int | None) -> tuple[int, int]:
    """``--img-size``: the elastic model takes ``img_size`` px inputs from here on (None: its own size).

    Returns the input size it had (the size its scores and search were measured at).
    """
    own = elastic.input_size
    if img_size is not None:
        from .deploy_size import set_deployment_size

        set_deployment_size(elastic.model, img_size)
    return own


def measured_at_note(
    img_size: int | None, own: tuple[int, int], stats: object, command: str, calibration: str = "STATS",
    method: str = "lstsq",
) -> str | None:
    """What a cut was not measured at: the model's own size (``--img-size``) and the statistics' (None: nothing to say).

    ``command`` and ``calibration`` (quoted) complete the ``snapvit bench`` command it suggests.
    """
    size = own if img_size is None else (img_size, img_size)
    at = getattr(stats, "image_size", None)
    at = None if at is None else tuple(at)
    moved = size != own  # --img-size other than the elastic model's own
    if not moved and at in (None, size):
        return None
    px = f"{size[0]} px" if size[0] == size[1] else f"{size[0]} x {size[1]} px"
    said = [f"the elastic model was built for {own[0]} x {own[1]} px inputs (its scores and search ran at its "
            "calibration size)" if moved else f"the subnet takes {px} inputs, as the elastic model"]
    if at is not None:
        said.append("its correction statistics were collected at " + (f"{px} too" if at == size else f"{at[0]} x {at[1]} px"))
    return (f"{'' if img_size is None else f'--img-size {img_size}: '}{'; '.join(said)}; "
            f"{_bench_command(command, img_size, stats, calibration, method)} measures what its cuts keep at {px}")


def _bench_command(command: str, img_size: int | None, stats: object, calibration: str, method: str = "lstsq") -> str:
    """The ``snapvit bench`` command (quoted ``command`` and ``calibration``) that measures cuts at ``img_size``."""
    corrected = "" if stats is None else f" --correct {method} --calibration {calibration}"
    return f"`snapvit bench {command} --data FOLDER{'' if img_size is None else f' --img-size {img_size}'}{corrected}`"


def _info_latencies(
    args: argparse.Namespace, elastic: object, budgets: list[tuple[float, float]]
) -> tuple[list[float], str]:
    """Measured ms per batch of the dense model, then of each ``--budgets`` row (interleaved), and how.

    ``elastic`` is the model whose cut the table shows (the ranked view for corrected subnets): a
    correction changes weights, not shapes, so its plain slices time as the corrected subnets.
    """
    from .latency import DTYPES, _input_size, _where, measure_models, pixels, torch_threads

    batch_size = 1 if args.batch_size is None else args.batch_size
    device = args.device or "cpu"
    dense, rows = tuple(elastic.dims(0.0, 0.0)), [tuple(elastic.dims(*b)) for b in budgets]
    unique = list(dict.fromkeys([dense, *rows]))  # a budget that equals another is timed once
    models = [elastic.model if d == dense else elastic.slice(d, correct="none") for d in unique]
    dtype = DTYPES[args.dtype or "float32"]
    backend = "onnx" if args.onnx else "torch"
    measured = dict(zip(unique, measure_models(models, batch_size=batch_size, device=device, threads=args.threads,
                                               dtype=dtype, backend=backend)))
    latencies = [measured[dense], *(measured[d] for d in rows)]
    flops = {d: elastic.cost(list(d))["flops"] for d in unique}
    # Latency falls with the FLOPs; a fixed overhead (a small model, a GPU at batch 1) flattens it, noise is a few %.
    slower = [(a, b) for a in unique for b in unique if flops[a] < 0.9 * flops[b] and measured[a] > 1.1 * measured[b]]
    if slower:  # so the load changed while they were timed
        a, b = max(slower, key=lambda p: measured[p[0]] / measured[p[1]])
        warnings.warn(f"a budget of {100 * flops[a] / flops[dense]:.1f}% FLOPs measured {measured[a]:.2f} ms, slower "
                      f"than one of {100 * flops[b] / flops[dense]:.1f}% at {measured[b]:.2f} ms: the machine's load "
                      "changed while they were timed; measure again on a quiet machine", stacklevel=2)
    with torch_threads(args.threads):
        where = _where(backend, device, args.threads)
    return latencies, (f"latency: median of 10 interleaved runs, ms per batch of {batch_size}"
                       f"{pixels(_input_size(elastic.model))} on {where}, "
                       f"{args.dtype or 'float32'}; dense model {latencies[0]:.2f} ms")


def _info_correction(args: argparse.Namespace, elastic: object, own: tuple[int, int]) -> None:
    """The statistics beside the checkpoint, and each budget's fidelity from ``report.json`` beside it.

    ``own``: the model's size before ``--img-size``, at which the report measured its fidelity.
    """
    import json

    from .correction import stats_damping, stats_path_for

    stats = elastic.stats
    beside = stats_path_for(args.path)
    if stats is None:
        print(f"correction statistics: none at {beside} (subnets are plain cuts; `snapvit stats` writes them)")
    else:
        from .latency import pixels

        print(f"correction statistics: {beside} ({stats.num_images} inputs{pixels(stats.image_size)}, "
              f"{stats.stored_bytes / 1e6:.1f} MB): "
              "subnet() and `snapvit slice` are lstsq-corrected by default (--no-correct: plain cut), "
              f"damping {stats_damping(None, stats):.3g} (automatic, from {stats.num_images} inputs, {stats.num_tokens} tokens)")
        if stats.has_ranking:
            shown = ("the table shows the plain cut (--no-correct); corrected subnets keep other units per block, "
                     "as many in all" if args.no_correct else
                     "the table shows the units it keeps (--no-correct: the plain cut, other units per block, as many in all)")
            print(f"ranking: the statistics carry the corrected path's own ranking; {shown}")
        else:
            print("ranking: none in the statistics; corrected subnets keep the checkpoint's units "
                  "(`snapvit stats --overwrite` adds one)")
    report_path = Path(args.path).with_name("report.json")
    if not report_path.is_file():
        return
    report = json.loads(report_path.read_text())
    if report.get("files", {}).get("elastic") != Path(args.path).name:
        return
    if own != elastic.input_size:  # its numbers are of the model's own size, not of the table's
        bench = _bench_command(shlex.quote(args.path), args.img_size, None if args.no_correct else stats,
                               shlex.quote(str(beside)))
        print(f"fidelity: {report_path.name} measured it at {own[0]} x {own[1]} px; {bench} measures it at {args.img_size} px")
        return
    rows = [b for b in report.get("budgets", []) if b.get("fidelity") is not None or b.get("fidelity_corrected") is not None]
    if args.budgets is not None:  # those of the asked budgets the report measured (by their cut's ratios, or as asked)
        asked = {(round(a, 4), round(h, 4)) for a, h in [*args.budgets, *(elastic.resolve_budget(*b) for b in args.budgets)]}
        measured = [b for b in rows if any((round(r.get("mlp_ratio", -1), 4), round(r.get("head_ratio", -1), 4)) in asked
                                           for r in (b, b.get("requested") or {}))]
        if rows and not measured:
            its = ", ".join(f"{b['mlp_ratio']:g},{b['head_ratio']:g}" for b in rows)
            print(f"fidelity: {report_path.name} measured none of --budgets (its budgets: {its})")
        rows = measured
    rows = list({(b["mlp_ratio"], b["head_ratio"]): b for b in reversed(rows)}.values())[::-1]  # a cut once
    if not rows:
        return
    correction = report.get("correction") or {}
    method = correction.get("method", "none")
    stale = _stale_correction(correction, stats)
    in_sample = correction.get("fidelity_images_are_calibration_images") is True
    print(f"fidelity (mean cosine to the dense features, {report_path.name}, {report.get('fidelity_images')} images"
          f"{'; in-sample: the images the run calibrated on, so it flatters' if in_sample else ''}):")
    if stale:
        print(f"corrected: not shown, {stale}; `snapvit bench {shlex.quote(args.path)} --data FOLDER --correct lstsq` measures "
              f"{'the subnets corrected with them' if stats is not None else 'subnets corrected with statistics fit on FOLDER'}")
    print(f"{'mlp_ratio':>9} {'head_ratio':>10} {'flops %':>8} {'plain':>7} {'corrected':>9}  ({method})")
    for b in rows:
        cells = [f"{b[k]:.4f}" if b.get(k) is not None and not (stale and k == "fidelity_corrected") else "-"
                 for k in ("fidelity", "fidelity_corrected")]
        print(f"{b['mlp_ratio']:>9.2f} {b['head_ratio']:>10.2f} {100 * b['flops_fraction']:>7.1f}% {cells[0]:>7} {cells[1]:>9}")
    if in_sample:
        calibration = f" --calibration {shlex.quote(str(beside))}" if stats is not None else ""
        print(f"held out: `snapvit bench {shlex.quote(args.path)} --data TEST_DIR --correct lstsq{calibration}` "
              "on photos the run never saw (or hold some out in the fit: `--data.holdout N`, CalibrationDataModule(holdout=N))")


def _stale_correction(correction: dict, stats: object) -> str | None:
    """Why a report's corrected fidelity does not describe the statistics now attached, or ``None``."""
    if not correction or correction.get("method") in (None, "none"):
        return None
    if stats is None:
        return "the report's statistics are no longer beside the checkpoint"
    digest = correction.get("stats_digest")
    if digest is not None and digest != stats.digest or (
            digest is None and correction.get("calibration_views") not in (None, stats.num_images)):
        return (f"the statistics now beside the checkpoint ({stats.num_images} inputs) are not those the report "
                f"measured it with ({correction.get('calibration_views')} inputs)")
    return None
