"""How a FLOPs budget should split between heads and MLP neurons, chosen in-sample and measured held out.

Usage::

    python -m snapvit_lightning.benchmarks.head_share --heldout DIR --data FOLDER
        [--fractions 0.8 0.7 0.6 0.5 0.4] [--scales 1 0.75 0.5 0.25]

``subnet(flops=f, head_ratio_scale=s)`` prunes a share ``r`` of the MLP neurons and ``s · r`` of
the heads, with the smallest ``r`` whose FLOPs fit ``f``. This measures each ``s`` on the main
jobs that ``python -m snapvit_lightning.benchmarks.heldout --data FOLDER --out DIR`` ran on each
half of ``FOLDER`` (``DIR/<half>/main``, as shipped: their statistics and ``subnet()``, corrected
and plain), on both halves: the calibration half (in-sample: where a default is chosen) and the
other one (held out: what the choice is judged by). Fidelity is the mean cosine of each image's
features to the dense model's. The table is printed and written to ``DIR/head_share.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

FRACTIONS = (0.8, 0.7, 0.6, 0.5, 0.4)
SCALES = (1.0, 0.75, 0.5, 0.25)


def run_direction(heldout: Path, data_halves: dict[str, Path], calibrate: str, fractions: Sequence[float],
                  scales: Sequence[float]) -> dict[str, Any]:
    """``{"in_sample"|"held_out": {"plain"|"lstsq": {scale: [fidelity per fraction]}}, "ratios": ...}``."""
    from .. import quickstart
    from ..data import load_eval_images
    from ..elastic import ElasticViT
    from ..evaluation import extract_features, feature_fidelity
    from .heldout import _HALVES, main_job_dir

    other = _HALVES[1 - _HALVES.index(calibrate)]
    checkpoint = main_job_dir(heldout, calibrate, 0) / f"{quickstart.MODEL_NAME}.elastic.safetensors"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"--heldout: no main job at {checkpoint}; run benchmarks.heldout --out {heldout} first")
    elastic = ElasticViT.load(checkpoint)
    if elastic.stats is None:
        raise ValueError(f"--heldout: {checkpoint} has no statistics beside it")
    halves = {"in_sample": calibrate, "held_out": other}
    images = {k: load_eval_images(data_halves[h], elastic.model, argument="--data")[0] for k, h in halves.items()}
    dense = {k: extract_features(elastic.model, x) for k, x in images.items()}
    out: dict[str, Any] = {k: {"plain": {}, "lstsq": {}} for k in halves}
    out["ratios"] = {}
    for scale in scales:
        out["ratios"][str(scale)] = [list(elastic.resolve_budget(flops=f, head_ratio_scale=scale)) for f in fractions]
        for correct, key in (("none", "plain"), ("lstsq", "lstsq")):
            cells = {k: [] for k in halves}
            for f in fractions:
                subnet = elastic.subnet(flops=f, head_ratio_scale=scale, correct=correct)
                for k in halves:
                    cells[k].append(feature_fidelity(extract_features(subnet, images[k]), dense[k]))
            for k in halves:
                out[k][key][str(scale)] = cells[k]
    return out


def _print(direction: str, result: dict[str, Any], fractions: Sequence[float]) -> str:
    """The direction's table, and the scale that in-sample corrected fidelity chooses."""
    header = f"{'':>24}" + "".join(f"{f'f={f:g}':>8}" for f in fractions) + f"{'mean':>8}"
    print(f"\n{direction}\n{header}")
    for where in ("in_sample", "held_out"):
        for key in ("lstsq", "plain"):
            for scale, cells in result[where][key].items():
                label = f"{where} {key} s={scale}"
                print(f"{label:>24}" + "".join(f"{c:8.3f}" for c in cells) + f"{statistics.fmean(cells):8.3f}")
    chosen = max(result["in_sample"]["lstsq"], key=lambda s: statistics.fmean(result["in_sample"]["lstsq"][s]))
    print(f"in-sample corrected mean chooses s={chosen}; held out: "
          f"{statistics.fmean(result['held_out']['lstsq'][chosen]):.3f} (s=1.0: "
          f"{statistics.fmean(result['held_out']['lstsq']['1.0']):.3f})")
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snapvit_lightning.benchmarks.head_share",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--heldout", required=True, type=Path, help="benchmarks.heldout's --out folder (its main jobs)")
    parser.add_argument("--data", required=True, type=Path, help="the folder benchmarks.heldout split (--data there)")
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS), help="FLOPs fractions (default: %(default)s)")
    parser.add_argument("--scales", type=float, nargs="+", default=list(SCALES), help="head_ratio_scale values, 1 among them (default: %(default)s)")
    args = parser.parse_args(argv)
    if 1.0 not in args.scales:
        parser.error("--scales must include 1 (today's default, the reference)")
    from .heldout import split_links

    halves = split_links(args.data, args.heldout)
    t0 = time.perf_counter()
    results = {}
    for calibrate in ("even", "odd"):
        results[calibrate] = run_direction(args.heldout, halves, calibrate, args.fractions, args.scales)
        results[calibrate]["chosen"] = _print(f"calibrated on {calibrate}", results[calibrate], args.fractions)
    report = {"fractions": args.fractions, "scales": args.scales, "seconds": time.perf_counter() - t0, **results}
    (args.heldout / "head_share.json").write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.heldout / 'head_share.json'} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    from . import run_as_script

    run_as_script(main, __spec__.name)
