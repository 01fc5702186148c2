"""Held-out fidelity of the corrected path per damping, on the real DINOv2 ViT-S/14::

    python -m snapvit_lightning.benchmarks.damping --data FOLDER [--img-size 112] [--images 12 24 49 98]
        [--damping auto 0.01 0.03 0.1 0.3] [--calibrate even odd] [--seed 0] [--stats-views 256]
        [--weights PATH] [--out FILE]

For each half (``even``: calibrate on the even positions of ``FOLDER``'s images in
:func:`~snapvit_lightning.data.find_images` order, measure on the odd ones; ``odd``: the reverse)
and each N of ``--images``: N images drawn from the calibration half (``randperm`` seeded with
``--seed``), their correction statistics (on their eval views and random crops, as the export
collects them: ``--stats-views``, ``1`` for the eval views alone), then for each ``--damping`` the corrected path as
shipped, with the OBS ranking and the least-squares solve both at that damping (``auto``: the
default, :func:`~snapvit_lightning.correction.auto_damping` of the statistics). Each is measured on
the whole other half: fidelity (mean cosine of the features to the dense model's) at
:data:`BUDGETS` and their mean. The model carries magnitude scores: corrected subnets cut by their
own ranking, so the checkpoint's scores do not enter. How the default was chosen with it:
docs/defaults.md, "Damping of the correction". ``--out`` writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

#: ``(mlp_ratio, head_ratio)`` budgets measured.
BUDGETS: tuple[tuple[float, float], ...] = ((0.35, 0.2), (0.45, 0.3), (0.55, 0.4), (0.65, 0.5))


def parse_damping(text: str) -> float | None:
    """``"auto"`` -> ``None`` (the automatic default), else a damping ``>= 0``."""
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"a damping is 'auto' or a number >= 0, got {text!r}")
    return value


def measure(
    elastic: Any, images: torch.Tensor, half: str, sizes: Sequence[int], dampings: Sequence[float | None], seed: int,
    crops: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """The rows of one calibration half: one per (N, damping), in that order.

    Args:
        elastic: The dense :class:`~snapvit_lightning.elastic.ElasticViT`.
        images: All preprocessed images ``[M, 3, H, W]`` in folder order.
        half: ``"even"`` or ``"odd"``: the positions calibrated on; the others are measured.
        sizes: Calibration set sizes N (each at most the half's size).
        dampings: Dampings (``None``: automatic).
        seed: Seeds the draw of each N's images from the half.
        crops: ``crops(indices, n)``: the statistics' extra views of the images at ``indices`` (into
            ``images``) for a calibration set of ``n`` images, appended to their eval views (as the
            export adds crops); ``None``: the eval views alone.

    Returns:
        Rows with ``half``, ``images``, ``damping`` (the value used), ``automatic``, ``fidelity``
        (per budget), ``mean`` and ``seconds``.
    """
    from ..correction import collect_stats, stats_damping
    from ..evaluation import extract_features, feature_fidelity
    from ..obs import with_ranking

    parity = ("even", "odd").index(half)
    positions = torch.arange(parity, len(images), 2)
    held_out = images[1 - parity::2]
    dense = extract_features(elastic.model, held_out)
    scores, rows = elastic.scores, []
    for n in sizes:
        chosen = positions[torch.randperm(len(positions), generator=torch.Generator().manual_seed(seed))[:n]]
        calibration = images[chosen] if crops is None else torch.cat([images[chosen], crops(chosen, n)])
        stats, energy = collect_stats(elastic.model, calibration, fingerprint=elastic.fingerprint, with_energy=True)
        for damping in dampings:
            start = time.perf_counter()
            ranked = with_ranking(elastic.model, stats, calibration, damping=damping, energy=energy,
                                  min_mlp_keep=scores.min_mlp_keep, min_head_keep=scores.min_head_keep)
            fid = [feature_fidelity(extract_features(elastic.subnet(m, h, calibration=ranked, damping=damping), held_out),
                                    dense) for m, h in BUDGETS]
            row = {"half": half, "images": n, "inputs": stats.num_images, "damping": stats_damping(damping, stats),
                   "automatic": damping is None,
                   "fidelity": fid, "mean": sum(fid) / len(fid), "seconds": time.perf_counter() - start}
            rows.append(row)
            label = f"auto ({row['damping']:.3g})" if damping is None else f"{damping:g}"
            print(f"[{half} -> {'odd' if half == 'even' else 'even'}] N={n:<4d} d={label:<13s} "
                  + " ".join(f"{f:.3f}" for f in fid) + f" | mean {row['mean']:.3f}", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    from ..data.crops import DEFAULT_STATS_VIEWS, resolve_input_config, stats_crops, stats_views_per_image
    from ..data.sources import _decode_all
    from ..data import load_eval_images
    from ..elastic import ElasticViT
    from ..module import SnapViTModule, load_weights
    from ..quickstart import DEFAULT_WEIGHTS, MODEL_NAME, ensure_weights
    from ..file_io import check_writable

    import timm

    parser = argparse.ArgumentParser(prog="python -m snapvit_lightning.benchmarks.damping",
                                     description=__doc__.splitlines()[0].rstrip(":"))
    parser.add_argument("--data", type=Path, required=True, help="image folder, split by position into two halves")
    parser.add_argument("--img-size", type=int, default=112, help="input size in pixels (default: %(default)s)")
    parser.add_argument("--images", type=int, nargs="+", default=[12, 24, 49, 98], help="calibration set sizes N (default: 12 24 49 98)")
    parser.add_argument("--damping", type=parse_damping, nargs="+", default=[None, 0.01, 0.03, 0.1, 0.3],
                        help="dampings: 'auto' or numbers (default: auto 0.01 0.03 0.1 0.3)")
    parser.add_argument("--calibrate", choices=("even", "odd"), nargs="+", default=["even", "odd"],
                        help="the half (or halves, one direction each) to calibrate on (default: both)")
    parser.add_argument("--seed", type=int, default=0, help="seeds each N's draw from the calibration half (default: %(default)s)")
    parser.add_argument("--stats-views", type=int, default=DEFAULT_STATS_VIEWS, metavar="V",
                        help="statistics inputs aimed for, as the export: each image's eval view and random crops, "
                             "V // N views each, 1 to 8 (default: %(default)s; 1: the eval views alone)")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="DINOv2 ViT-S/14 weights, built there when missing (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the rows")
    args = parser.parse_args(argv)
    if args.out is not None:  # before the measurement, not after it
        if args.out.is_dir():
            raise ValueError(f"--out: '{args.out}' is a folder; give the JSON file's name")
        check_writable(args.out.parent, "--out")
    kwargs = {"num_classes": 0, "img_size": args.img_size}
    model = timm.create_model(MODEL_NAME, pretrained=False, **kwargs)
    load_weights(model, ensure_weights(args.weights))
    scores = SnapViTModule(model, criterion="magnitude").compute_scores()
    elastic = ElasticViT(model, scores, model_name=MODEL_NAME, model_kwargs=kwargs)
    images = load_eval_images(args.data, elastic.model, argument="--data")[0]
    half = len(images) // 2
    if min(args.images) < 1 or max(args.images) > half:
        parser.error(f"--images: each N must be in [1, {half}] (the smaller half of {len(images)} images), "
                     f"got {args.images}")
    if args.stats_views < 1:
        parser.error(f"--stats-views must be >= 1, got {args.stats_views}")
    decoded = _decode_all(args.data, elastic.model, "--data")[0] if args.stats_views > 1 else None
    size, mean, std = resolve_input_config(elastic.model)

    def crops(indices: torch.Tensor, n: int) -> torch.Tensor:  # the export's crops of these images, in this order
        views = stats_views_per_image(n, args.stats_views)
        return stats_crops([decoded[int(i)] for i in indices], size, views - 1, mean, std)

    rows = [row for h in args.calibrate
            for row in measure(elastic, images, h, args.images, args.damping, args.seed, crops if decoded else None)]
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.out.write_text(json.dumps({"settings": settings, "budgets": BUDGETS, "rows": rows}, indent=1))
        print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    from . import run_as_script

    run_as_script(main, __spec__.name)
