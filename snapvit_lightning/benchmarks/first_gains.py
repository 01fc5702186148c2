"""When does the default search first beat its start point? Generation by generation, per seed.

Loads an elastic checkpoint (its model and raw DINO scores, e.g. the main job's), takes the eval
views of ``--data`` as the fitness images (the main job's fitness images are its calibration
images) and runs the default search of :func:`~snapvit_lightning.search.run_search` (balanced
start, guard, the default ratio pairs, raw-embedding cosine, exact early stop, ``--fitness-samples``)
once per seed for ``--generations`` generations. Prints per seed the start point's fitness, the best fitness after
each generation and the first generation whose best beats the start; and how many seeds beat it
within each number of generations. Writes ``OUT/first_gains.json`` with ``--out``::

    python -m snapvit_lightning.benchmarks.first_gains runs/quickstart/vit_small_patch14_dinov2.elastic.safetensors \\
        --data ../shared/data/photos8 --seeds 0 1 2 3 4 --generations 2

Fitness values are in-sample (the search's own images): this measures the search's progress on
its objective, not held-out quality (``benchmarks.heldout`` does that).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

from ..search.fitness import DEFAULT_FITNESS_SAMPLES
from ..file_io import check_writable

__all__ = ["first_gains", "main"]


def first_gains(
    checkpoint: Path,
    data: Path,
    seeds: Sequence[int],
    generations: int,
    autocast: bool = False,
    fitness_samples: int | None = DEFAULT_FITNESS_SAMPLES,
) -> dict[str, Any]:
    """Run the default search (:func:`~snapvit_lightning.search.run_search`) per seed for ``generations``.

    Each seed gets its own fitness (its ``fitness_samples`` subset is drawn with the seed) and
    its own start fitness. ``autocast``: bfloat16 in the fitness (default: the model's fp32).

    Returns:
        ``{"images", "fitness_samples", "popsize", "seeds": {seed: {"start", "best_after": [...],
        "first_gain": g | None, "seconds"}}, "beat_within": [seeds that beat their start within
        1..generations generations]}``.

    Raises:
        ValueError: If ``generations < 1``, ``seeds`` is empty or ``fitness_samples`` is bad.
    """
    from ..data import load_eval_images
    from ..elastic import ElasticViT
    from ..search import run_search
    from ..xnes import default_popsize

    if isinstance(generations, bool) or not isinstance(generations, int) or generations < 1:
        raise ValueError(f"generations must be an int >= 1, got {generations!r}")
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    elastic = ElasticViT.load(checkpoint, stats=False)
    images = load_eval_images(data, elastic.model, argument="--data")[0]
    raw = elastic.scores.raw()
    popsize = default_popsize(raw.num_weights)
    result: dict[str, Any] = {"images": int(images.shape[0]), "fitness_samples": fitness_samples, "popsize": popsize,
                              "seeds": {}}
    for seed in seeds:
        t0 = time.perf_counter()
        starts: list[float] = []
        _, _, history = run_search(elastic.model, raw, images, max_evals=generations * popsize, seed=seed,
                                   autocast=autocast, fitness_samples=fitness_samples, on_start=starts.append)
        (start,) = starts
        best_after = []
        for g in range(1, generations + 1):
            done = [f for f in history[: g * popsize] if not math.isnan(f)]
            best_after.append(min(done, default=math.inf))
        first = next((g + 1 for g, best in enumerate(best_after) if best < start), None)
        result["seeds"][int(seed)] = {
            "start": start, "best_after": best_after, "first_gain": first, "seconds": time.perf_counter() - t0,
        }
    result["beat_within"] = [
        sum(1 for s in result["seeds"].values() if s["first_gain"] is not None and s["first_gain"] <= g)
        for g in range(1, generations + 1)
    ]
    return result


def _samples(text: str) -> int | None:
    return None if text == "none" else int(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m snapvit_lightning.benchmarks.first_gains", description=__doc__.splitlines()[0],
    )
    parser.add_argument("checkpoint", type=Path, help="elastic checkpoint (*.elastic.safetensors)")
    parser.add_argument("--data", type=Path, required=True, help="fitness image folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="xNES seeds, one search each (default: 0 1 2 3 4)")
    parser.add_argument("--generations", type=int, default=2, help="generations per search (default: 2)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast in the fitness (default: the model's fp32)")
    parser.add_argument("--fitness-samples", type=_samples, default=DEFAULT_FITNESS_SAMPLES,
                        help=f"the search's fitness_samples, or none for all images (default: {DEFAULT_FITNESS_SAMPLES})")
    parser.add_argument("--out", type=Path, default=None, help="folder for first_gains.json")
    args = parser.parse_args(argv)
    if args.out is not None:  # before the searches, not after them
        check_writable(args.out, "--out")
    try:
        result = first_gains(args.checkpoint, args.data, args.seeds, args.generations, args.bf16, args.fitness_samples)
    except (OSError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(f"{result['images']} images (fitness_samples {result['fitness_samples']}), popsize {result['popsize']}")
    for seed, row in result["seeds"].items():
        bests = " ".join(f"{b:.5f}" for b in row["best_after"])
        print(f"seed {seed}: start {row['start']:.5f}, best after each generation {bests}; first gain in generation {row['first_gain']} "
              f"({row['seconds']:.0f} s)")
    n = len(result["seeds"])
    for g, count in enumerate(result["beat_within"], 1):
        print(f"beat the start within {g} generation(s): {count} of {n} seeds")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "first_gains.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    from . import run_as_script

    run_as_script(main, __spec__.name)
