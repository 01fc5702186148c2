"""Compare search starts and fitnesses on an elastic checkpoint's own scores: fidelity with and without correction.

::

    python -m snapvit_lightning.benchmarks.balance ELASTIC --data FOLDER [--balance 0.5,0.65] [--max-evals 50]
        [--starts paper balance] [--fitness-correct none|bias|lstsq] [--fitness-space raw|pca] [--seed 0] [--uniform]
        [--gradient-only] [--random] [--magnitude-lamp] [--pairs 0.35,0.2 0.45,0.3 ...] [--holdout [even|odd]]
        [--sigma 0.08]

Runs :func:`~snapvit_lightning.search.run_search` on the checkpoint's dense model and its raw
scores (its search weights dropped) with the images of ``FOLDER`` as fitness images: once from the
paper's start (raw scores, ``linspace(1.2 -> 0.8)``) and once from ``balance`` (``M,H``: MLP and head
quantiles, one number for both, or ``rank``; default the search's). For
the start point and the searched weights of each it prints the fidelity (mean cosine similarity
of pre-logits features to the dense model, on the same images) at the budgets, uncorrected and
with ``lstsq`` weight correction, cross-fitted as in ``snapvit bench --correct``: the features of
the even-position images come from a subnet corrected on the odd ones and vice versa.
``--fitness-correct lstsq`` searches with weight correction inside the fitness
(:class:`~snapvit_lightning.search.Fitness` ``correct=``), ``--fitness-space pca`` with the paper's
PCA-projected cosine instead of the raw one (``space=``), ``--guard 0`` with the plain mean over
the fitness pairs (``guard=``); ``--uniform`` adds the uniform
per-block split (the ``uniform`` baseline of ``snapvit bench``) as a reference row,
``--gradient-only`` the raw scores without search weights, ``--random`` the mean over seeds 0, 1,
2 of ``snapvit bench``'s random baseline, ``--magnitude-lamp`` its ``magnitude`` and ``lamp``
baselines (``--starts`` with no value runs no search). ``--sigma`` sets the search's step size. ``--pairs``
replaces the fitness's (mlp_ratio, head_ratio) pairs (default: the search's). ``--holdout``
(``--holdout even``) searches on the even-position images only and measures every row on the
odd-position ones (the correction is then cross-fitted inside the odd half), so no evaluated image
was seen by the search; ``--holdout odd`` swaps the halves.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

BUDGETS = ((0.35, 0.2), (0.45, 0.3), (0.55, 0.4), (0.65, 0.5))


def fidelities(
    elastic: object, images: torch.Tensor, dense: torch.Tensor, dims_fn: Callable[..., Any] | None = None
) -> tuple[list[float], list[float]]:
    """Uncorrected and cross-fitted ``lstsq`` fidelity of ``elastic``'s own cut at :data:`BUDGETS`.

    ``dims_fn(mlp_ratio, head_ratio)`` gives each budget's block sizes (default ``elastic.dims``).
    """
    from .bench_correction import Calibrator
    from ..evaluation import extract_features, feature_fidelity

    calibrate = Calibrator(None, images, batch_size=32)  # the 2-fold cross-fit of `snapvit bench --correct`
    plain, corrected = [], []
    for budget in BUDGETS:
        dims = (dims_fn or elastic.dims)(*budget)
        plain.append(feature_fidelity(extract_features(elastic.slice(dims), images), dense))
        corrected.append(feature_fidelity(calibrate.corrected(elastic, budget, dims, "lstsq", ranking=False)[1], dense))
    return plain, corrected


def _balance(text: str) -> float | tuple[float, float] | str:
    if text == "rank":
        return text
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"a balance is Q, MLP_Q,HEAD_Q or rank (e.g. 0.5,0.65), got {text!r}")
    return values[0] if len(values) == 1 else values


def _label(balance: float | tuple[float, float] | str) -> str:
    return "balance=" + (",".join(f"{v:g}" for v in balance) if isinstance(balance, tuple) else f"{balance}")


def _pair(text: str) -> tuple[float, float]:
    try:
        mlp_ratio, head_ratio = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a pair is MLP_RATIO,HEAD_RATIO (e.g. 0.35,0.2), got {text!r}") from None
    return mlp_ratio, head_ratio


def main(argv: Sequence[str] | None = None) -> int:
    from .bench import _baseline_scores, _uniform_dims
    from ..correction import CORRECTIONS
    from ..data import load_eval_images
    from ..elastic import ElasticViT
    from ..evaluation import extract_features
    from ..scores import ImportanceScores
    from ..search import DEFAULT_BALANCE, DEFAULT_GUARD, DEFAULT_RATIO_PAIRS, DEFAULT_SIGMA, DEFAULT_SPACE, FITNESS_SPACES, default_initial_weights, run_search

    parser = argparse.ArgumentParser(prog="python -m snapvit_lightning.benchmarks.balance", description=__doc__.splitlines()[0])
    parser.add_argument("path", metavar="ELASTIC", help="an *.elastic.safetensors checkpoint")
    parser.add_argument("--data", required=True, type=Path, help="fitness and evaluation images")
    parser.add_argument("--balance", type=_balance, default=DEFAULT_BALANCE,
                        help="quantiles of the balanced start: Q, MLP_Q,HEAD_Q or 'rank' (default: the search's, "
                             + ",".join(f"{v:g}" for v in DEFAULT_BALANCE) + ")")
    parser.add_argument("--max-evals", type=int, default=50, help="search evaluations (default: 50)")
    parser.add_argument("--seed", type=int, default=0, help="xNES seed (default: 0)")
    parser.add_argument("--starts", nargs="*", choices=("paper", "balance"), default=["paper", "balance"],
                        help="search starts to run (default: both)")
    parser.add_argument("--fitness-correct", choices=CORRECTIONS, default="none",
                        help="weight correction inside the search's fitness (default: none, the paper's)")
    parser.add_argument("--fitness-space", choices=FITNESS_SPACES, default=DEFAULT_SPACE,
                        help=f"where the fitness compares embeddings (default: {DEFAULT_SPACE}; pca is the paper's)")
    parser.add_argument("--guard", type=float, default=DEFAULT_GUARD,
                        help=f"penalty per unit of cosine a fitness pair loses against the start (default: {DEFAULT_GUARD}; 0 is the paper's mean)")
    parser.add_argument("--uniform", action="store_true", help="add the uniform per-block split as a reference")
    parser.add_argument("--gradient-only", action="store_true", help="add the raw scores (w = 1) as a reference")
    parser.add_argument("--random", action="store_true",
                        help="add the random baseline of `snapvit bench` (mean of its seeds) as a reference")
    parser.add_argument("--magnitude-lamp", action="store_true",
                        help="add the magnitude and LAMP baselines of `snapvit bench` as references")
    parser.add_argument("--sigma", type=float, default=DEFAULT_SIGMA, help=f"xNES step size (default: {DEFAULT_SIGMA})")
    parser.add_argument("--holdout", nargs="?", const="even", choices=("even", "odd"), default=None,
                        help="search on the even-position (or odd-position) images, measure on the others")
    parser.add_argument("--pairs", nargs="+", type=_pair, default=list(DEFAULT_RATIO_PAIRS), metavar="M,H",
                        help="the fitness's (mlp_ratio, head_ratio) pairs (default: the search's)")
    args = parser.parse_args(argv)
    if not args.starts and not (args.uniform or args.gradient_only or args.random or args.magnitude_lamp):
        parser.exit(2, f"{parser.prog}: error: nothing to measure: --starts names no start and no reference "
                       "(--uniform, --gradient-only, --random, --magnitude-lamp) is asked for\n")

    elastic = ElasticViT.load(args.path, stats=False)  # plain cuts (the correction is measured explicitly)
    raw = elastic.scores.raw()
    images = load_eval_images(args.data, elastic.model, argument="--data")[0]
    fitness_images = images
    if args.holdout:
        if images.shape[0] < 4:
            raise SystemExit(f"--holdout needs at least 4 images in --data, got {images.shape[0]}")
        search, measure = (0, 1) if args.holdout == "even" else (1, 0)
        fitness_images, images = images[search::2], images[measure::2]
    dense = extract_features(elastic.model, images)
    print(f"{elastic.model_name}: {fitness_images.shape[0]} fitness images, {images.shape[0]} evaluation images"
          f"{f' (held out: search on the {args.holdout}-position ones)' if args.holdout else ' (the same)'}, {args.max_evals} evaluations, seed {args.seed}, sigma {args.sigma}; "
          f"fitness correction {args.fitness_correct}, space {args.fitness_space}, guard {args.guard}, pairs {args.pairs}; fidelity at {list(BUDGETS)}: uncorrected | lstsq (cross-fitted)")
    def rebuilt(scores: ImportanceScores) -> ElasticViT:
        return ElasticViT(elastic.model, scores, model_name=elastic.model_name, model_kwargs=elastic.model_kwargs)

    references = []  # (label, elastic models whose fidelities are averaged, dims_fn)
    raw_order = rebuilt(raw) if args.uniform or args.gradient_only else None
    if args.uniform:
        references.append(("uniform", [raw_order], lambda m, h: _uniform_dims(raw, m, h)))
    if args.gradient_only:
        references.append(("gradient-only", [raw_order], None))
    baselines = _baseline_scores(elastic) if args.random or args.magnitude_lamp else []
    if args.random:
        randoms = [rebuilt(scores) for method, _, scores in baselines if method == "random"]
        references.append((f"random (x{len(randoms)})", randoms, None))
    if args.magnitude_lamp:
        references += [(method, [rebuilt(scores)], None) for method, _, scores in baselines if method in ("magnitude", "lamp")]
    for label, candidates, dims_fn in references:
        runs = [fidelities(c, images, dense, dims_fn) for c in candidates]
        plain = [statistics.fmean(v) for v in zip(*(run[0] for run in runs))]
        corrected = [statistics.fmean(v) for v in zip(*(run[1] for run in runs))]
        print(f"{label:>14} {'':>8}: " + " ".join(f"{v:.3f}" for v in plain) + " | "
              + " ".join(f"{v:.3f}" for v in corrected), flush=True)
    ones = torch.ones(raw.num_weights, dtype=torch.float64)
    starts = {
        "paper": ("paper", None, default_initial_weights(raw.num_blocks, raw.num_heads)),
        "balance": (_label(args.balance), args.balance, ones),
    }
    for name, balance, start in (starts[key] for key in args.starts):
        t0 = time.perf_counter()
        best, _, history = run_search(elastic.model, raw, fitness_images, max_evals=args.max_evals, seed=args.seed, sigma=args.sigma,
                                      balance=balance, correct=args.fitness_correct, ratio_pairs=args.pairs,
                                      space=args.fitness_space, guard=args.guard)
        searched_s = time.perf_counter() - t0
        scores = raw if balance is None else raw.balanced(balance)
        for label, w in (("start", start), ("searched", best)):
            candidate = ElasticViT(elastic.model, scores.with_weights(w), model_name=elastic.model_name,
                                   model_kwargs=elastic.model_kwargs)
            plain, corrected = fidelities(candidate, images, dense)
            print(f"{name:>14} {label:>8}: " + " ".join(f"{v:.3f}" for v in plain) + " | "
                  + " ".join(f"{v:.3f}" for v in corrected), flush=True)
        print(f"{name:>14} search: {searched_s:.0f} s, best fitness {min(f for f in history if not math.isnan(f)):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    from . import run_as_script

    run_as_script(main, __spec__.name)
