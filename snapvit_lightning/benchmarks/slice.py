"""Time ``ElasticViT.subnet()``, plain and weight-corrected, on the real DINOv2 ViT-S/14 (CPU)::

    python -m snapvit_lightning.benchmarks.slice [--weights PATH] [--img-size 112] [--data FOLDER]

With ``--data`` it also collects the correction statistics on those images (timed, with their
size) and times ``subnet(..., correct="bias"|"lstsq")`` per budget from them, attached as
``ElasticViT.load`` attaches the file beside a checkpoint: the "correction from stored statistics"
cost (slicing included; the first call also prepares the budget-independent targets, timed apart).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

BUDGETS = ((0.15, 0.0), (0.35, 0.2), (0.55, 0.4), (0.65, 0.5))


def main(argv: Sequence[str] | None = None) -> int:
    from ..data import find_images
    from ..elastic import ElasticViT
    from ..module import load_weights
    from ..quickstart import DEFAULT_WEIGHTS, MODEL_NAME, ensure_weights
    from ..scores import ImportanceScores

    import timm

    parser = argparse.ArgumentParser(prog="python -m snapvit_lightning.benchmarks.slice", description=__doc__.splitlines()[0].rstrip(":"))
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="DINOv2 ViT-S/14 weights, built there when missing (default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=112, help="input size in pixels (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per budget (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=None, help="image folder for the correction statistics (default: none, plain slicing only)")
    args = parser.parse_args(argv)
    if args.img_size < 14 or args.img_size % 14:  # the ViT-S/14's patches
        parser.error(f"--img-size must be a positive multiple of 14, got {args.img_size}")
    if args.data is not None:  # before the timings, not after them
        find_images(args.data, argument="--data")
    kwargs = {"num_classes": 0, "img_size": args.img_size}
    model = timm.create_model(MODEL_NAME, pretrained=False, **kwargs)
    load_weights(model, ensure_weights(args.weights), argument="--weights")
    g = torch.Generator().manual_seed(0)
    scores = ImportanceScores(torch.rand(12, 1536, generator=g), torch.rand(12, 6, generator=g))
    start = time.perf_counter()
    elastic = ElasticViT(model, scores, model_name=MODEL_NAME, model_kwargs=kwargs)
    print(f"ElasticViT(): {time.perf_counter() - start:.3f} s; torch threads {torch.get_num_threads()}")
    for budget in BUDGETS:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            elastic.subnet(*budget, correct="none")
            times.append(time.perf_counter() - start)
        print(f"subnet{budget}: median {statistics.median(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms")
    start = time.perf_counter()
    elastic.subnet(flops=0.5)
    print(f"subnet(flops=0.5) incl. bisection: {(time.perf_counter() - start) * 1000:.1f} ms")
    if args.data is not None:
        from ..data import load_eval_images

        images = load_eval_images(args.data, elastic.model, argument="--data")[0]
        start = time.perf_counter()
        stats = elastic.collect_stats(images)
        print(f"collect_stats({len(images)} images): {time.perf_counter() - start:.2f} s, {stats.stored_bytes / 1e6:.1f} MB on disk")
        elastic.attach_stats(stats)
        start = time.perf_counter()
        elastic.subnet(*BUDGETS[0])
        print(f"first corrected subnet{BUDGETS[0]} (prepares the targets): {time.perf_counter() - start:.3f} s")
        for method in ("bias", "lstsq"):
            for budget in BUDGETS:
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    elastic.subnet(*budget, correct=method)
                    times.append(time.perf_counter() - start)
                print(f"subnet{budget}, correct={method!r} from stats: median {statistics.median(times):.3f} s, "
                      f"max {max(times):.3f} s")
    return 0


if __name__ == "__main__":
    from . import run_as_script

    run_as_script(main, __spec__.name)
