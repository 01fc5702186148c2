"""Held-out quality of the whole pipeline: calibrate on one half of a folder, measure on the other.

::

    python -m snapvit_lightning.benchmarks.heldout --data FOLDER --out DIR [--calibrate even odd]
        [--main-seeds 0 1 2] [--search NAME:KEY=VALUE,... ...] [--seeds 0 1 2] [--max-evals 50] [--no-baselines]

For each direction (``--calibrate even``: calibrate on the even-position images of ``FOLDER``,
measure on the odd-position ones; ``odd``: the reverse) this runs what a user runs, on the
calibration half only:

1. the main job (``python -m snapvit_lightning.quickstart``, today's defaults) on a folder of
   links to the calibration half: DINO scores, search, export with correction statistics
   (``DIR/<half>/main``; reused when it exists, delete it to re-run), measured as shipped: its
   statistics and :meth:`~snapvit_lightning.elastic.ElasticViT.subnet`, plain and corrected.
   ``--main-seeds`` runs it once per xNES seed of its search (``main`` is seed 0, ``main-seed<S>``
   seed S; the same scores, the search and what the export ranks after it differ) and reports
   their mean, each seed under ``per_seed``; the references below use the first seed's job;
2. each ``--search`` (``NAME`` and :func:`~snapvit_lightning.search.run_search` keyword
   arguments, e.g. ``lstsq:correct=lstsq`` or ``paper:correct=lstsq,balance=0.5,space=pca,guard=0,
   pairs=paper``) for each seed, on the main job's raw scores with the calibration half as
   fitness images; ``scores=ranking`` searches block/head weights of the corrected path's own
   ranking instead (from ``w = 1``, that ranking, also measured as ``NAME start``), e.g.
   ``obs:scores=ranking,correct=lstsq``;
3. the references without search: ``gradient-only`` (raw scores ranked globally), ``uniform`` (the
   same share of every block), ``random`` (three seeds of ``snapvit bench``'s random scores).

Every method is then measured on the **other** half, which no step above saw: fidelity (mean
cosine similarity of each image's features to the dense model's) of the plain subnet and of the
``lstsq``-corrected one, the correction statistics collected on the calibration half as the
export collects them (eval views and crops, :func:`~snapvit_lightning.data.load_calibration_views`;
the main job's row uses the ones it shipped). Budgets: :data:`BUDGETS`. The table is printed and written, with settings,
per-seed values and times, to ``DIR/heldout.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

#: ``(mlp_ratio, head_ratio)`` budgets measured.
BUDGETS: tuple[tuple[float, float], ...] = ((0.15, 0.0), (0.35, 0.2), (0.45, 0.3), (0.55, 0.4), (0.65, 0.5))

_HALVES = ("even", "odd")


def split_links(data: Path, out: Path) -> dict[str, Path]:
    """Folders of symbolic links to the even- and odd-position images of ``data`` (same layout).

    Positions follow :func:`~snapvit_lightning.data.find_images`' order (sorted relative paths).

    Returns:
        ``{"even": folder, "odd": folder}``.
    """
    from ..data.sources import find_images
    from ..file_io import check_writable

    data = Path(data).resolve()
    files, _, _ = find_images(data, argument="--data")
    if len(files) < 4:
        raise ValueError(f"--data: needs at least 4 images to split in halves, found {len(files)} in {data}")
    check_writable(out, "--out")
    folders = {}
    for parity, half in enumerate(_HALVES):
        folder = out / f"{half}_images"
        for f in files[parity::2]:
            link = folder / f.relative_to(data)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                os.symlink(f, link)
        folders[half] = folder
    return folders


def _value(text: str) -> Any:
    from ..search import PAPER_RATIO_PAIRS

    if text == "paper":
        return [list(p) for p in PAPER_RATIO_PAIRS]
    if text in ("true", "false"):
        return text == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_search(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:KEY=VALUE,...`` → ``(NAME, run_search keyword arguments)``.

    ``pairs=paper`` is the paper's ratio pairs (``ratio_pairs``); ``balance=none`` the raw scores;
    ``true``/``false`` are booleans (e.g. ``autocast=false``: an fp32 fitness; ``run_search``'s default is bf16).
    """
    name, _, spec = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"a search is NAME or NAME:KEY=VALUE,..., got {text!r}")
    kwargs: dict[str, Any] = {}
    for item in filter(None, spec.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"{text!r}: {item!r} is not KEY=VALUE")
        key = {"pairs": "ratio_pairs"}.get(key, key)
        kwargs[key] = None if value == "none" else _value(value)
    return name, kwargs


def measure(
    elastic: Any, calibration: torch.Tensor | None, images: torch.Tensor, dense: torch.Tensor,
    dims_fn: Callable[[float, float], Any] | None = None,
) -> dict[str, list[float]]:
    """Plain and ``lstsq``-corrected fidelity on ``images`` at :data:`BUDGETS`.

    ``calibration`` images: statistics collected on them, each budget cut by ``dims_fn`` (default
    ``elastic.dims``). ``None``: ``elastic``'s attached statistics (as the export ships them) and
    :meth:`~snapvit_lightning.elastic.ElasticViT.subnet`, exactly what a user slices.
    """
    from ..evaluation import extract_features, feature_fidelity

    out: dict[str, list[float]] = {"plain": [], "lstsq": [], "flops": []}
    dense_flops = elastic.cost(elastic.dims(0.0, 0.0))["flops"]
    if calibration is not None:
        elastic.attach_stats(elastic.collect_stats(calibration))
    elif elastic.stats is None:
        raise ValueError("measure(calibration=None) needs statistics attached to the elastic model")
    for budget in BUDGETS:
        dims = (dims_fn or elastic.dims)(*budget)
        out["flops"].append(elastic.cost(dims)["flops"] / dense_flops)
        for correct in ("none", "lstsq"):
            if calibration is None:
                subnet = elastic.subnet(*budget, correct=correct)
            else:
                subnet = elastic.slice(dims, correct=correct)
            features = extract_features(subnet, images)
            out["plain" if correct == "none" else "lstsq"].append(feature_fidelity(features, dense))
    if calibration is not None:
        elastic.attach_stats(None)
    return out


def _mean_rows(rows: list[dict[str, list[float]]]) -> dict[str, Any]:
    keys = ("plain", "lstsq", "flops")
    mean = {k: [statistics.fmean(v) for v in zip(*(r[k] for r in rows))] for k in keys}
    if len(rows) > 1:
        mean["per_seed"] = rows
    return mean


def _search_scores(kwargs: dict[str, Any], raw: Any, checkpoint: Path) -> Any:
    """The scores a ``--search`` weights, popping its ``scores`` key from ``kwargs``.

    ``scores=dino`` (default): the main job's raw DINO scores. ``scores=ranking``: the corrected
    path's own ranking, shipped in the main job's statistics (OBS removal costs relative to the
    residual stream, comparable across blocks); unless ``balance`` is given it is searched
    unbalanced from ``w = 1``, which is exactly that ranking.
    """
    from ..elastic import ElasticViT

    source = kwargs.pop("scores", "dino")
    if source == "dino":
        return raw
    if source != "ranking":
        raise ValueError(f"--search scores must be dino or ranking, got {source!r}")
    ranking = ElasticViT.load(checkpoint).ranking_scores()
    if ranking is None:
        raise ValueError(f"--search scores=ranking needs the main job's statistics with a ranking beside {checkpoint}")
    if "balance" not in kwargs:
        kwargs["balance"] = None
        kwargs.setdefault("initial_weights", torch.ones(ranking.num_weights, dtype=torch.float64))
    return ranking


def main_job_dir(out: Path, calibrate: str, seed: int) -> Path:
    """Where the main job calibrated on ``calibrate`` with search seed ``seed`` is written (or reused)."""
    return out / calibrate / ("main" if seed == 0 else f"main-seed{seed}")


def run_direction(
    data_halves: dict[str, Path], calibrate: str, out: Path, searches: list[tuple[str, dict[str, Any]]],
    seeds: Sequence[int], max_evals: int, baselines: bool, log: Callable[[str], None] = print,
    save: Callable[[dict[str, Any]], None] = lambda result: None, main_seeds: Sequence[int] = (0,),
) -> dict[str, Any]:
    """Everything for one direction: ``{"main_job_s", "methods": {name: {plain, lstsq, flops, ...}}}``.

    ``save(result)`` is called after each method (a long run keeps what it measured). ``main_seeds``:
    the main job's search seeds (module docstring); ``main_job_s`` maps each seed run here to its time.
    """
    from .bench import RANDOM_SEEDS, _baseline_scores, _uniform_dims
    from .. import quickstart
    from ..data import load_calibration_views, load_eval_images
    from ..elastic import ElasticViT
    from ..evaluation import extract_features
    from ..search import DEFAULT_BALANCE, run_search

    measured_half = _HALVES[1 - _HALVES.index(calibrate)]
    result: dict[str, Any] = {"calibrate": calibrate, "measure": measured_half, "methods": {}, "main_job_s": {}}
    checkpoints = []
    for main_seed in main_seeds:
        main_dir = main_job_dir(out, calibrate, main_seed)
        checkpoints.append(main_dir / f"{quickstart.MODEL_NAME}.elastic.safetensors")
        if not checkpoints[-1].is_file():
            t0 = time.perf_counter()
            quickstart.run(main_dir, cli_args=["--data.data_dir", str(data_halves[calibrate])], search_seed=main_seed)
            result["main_job_s"][str(main_seed)] = time.perf_counter() - t0
            log(f"[{calibrate}] main job, search seed {main_seed}: {result['main_job_s'][str(main_seed)]:.0f} s")
    checkpoint = checkpoints[0]
    elastic = ElasticViT.load(checkpoint, stats=False)
    stats_inputs, views = load_calibration_views(data_halves[calibrate], elastic.model, argument="--data")  # as the export
    calibration = stats_inputs[: len(stats_inputs) // views]  # their eval views come first: the fitness images
    images = load_eval_images(data_halves[measured_half], elastic.model, argument="--data")[0]
    dense = extract_features(elastic.model, images)
    raw = elastic.scores.raw()

    def rebuilt(scores: Any) -> ElasticViT:
        return ElasticViT(elastic.model, scores, model_name=elastic.model_name, model_kwargs=elastic.model_kwargs)

    def record(name: str, rows: list[dict[str, list[float]]], **extra: Any) -> None:
        entry = {**_mean_rows(rows), **extra}
        result["methods"][name] = entry
        save(result)
        log(f"[{calibrate}->{measured_half}] {name:>18}: plain " + " ".join(f"{v:.3f}" for v in entry["plain"])
            + " | lstsq " + " ".join(f"{v:.3f}" for v in entry["lstsq"]))

    record("main job (default)", [measure(ElasticViT.load(path), None, images, dense) for path in checkpoints],  # as shipped
           seeds=list(main_seeds))
    if baselines:
        record("gradient-only", [measure(rebuilt(raw), stats_inputs, images, dense)])
        record("uniform", [measure(rebuilt(raw), stats_inputs, images, dense, lambda m, h: _uniform_dims(raw, m, h))])
        randoms = [scores for method, _, scores in _baseline_scores(elastic) if method == "random"]
        record(f"random (x{len(RANDOM_SEEDS)})", [measure(rebuilt(s), stats_inputs, images, dense) for s in randoms])
    for name, settings in searches:
        kwargs = dict(settings)
        base = _search_scores(kwargs, raw, checkpoint)
        if base is not raw:
            record(f"{name} start", [measure(rebuilt(base), stats_inputs, images, dense)])
        rows, times = [], []
        for seed in seeds:
            t0 = time.perf_counter()
            best, _, history = run_search(elastic.model, base, calibration, max_evals=max_evals, seed=seed, **kwargs)
            times.append(time.perf_counter() - t0)
            balance = kwargs.get("balance", "default")
            scores = base if balance is None else base.balanced(DEFAULT_BALANCE if balance == "default" else balance)
            rows.append(measure(rebuilt(scores.with_weights(best)), stats_inputs, images, dense))
            log(f"[{calibrate}] search {name} seed {seed}: {times[-1]:.0f} s, best fitness {min(f for f in history if not math.isnan(f)):.4f}")
        record(name, rows, settings=dict(settings), seeds=list(seeds), search_s=times)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snapvit_lightning.benchmarks.heldout", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="an image folder (ImageFolder or flat), split in halves")
    parser.add_argument("--out", required=True, type=Path, help="output folder (links, main jobs, heldout.json)")
    parser.add_argument("--calibrate", nargs="+", choices=_HALVES, default=list(_HALVES),
                        help="the half (or halves, one direction each) to calibrate on (default: both)")
    parser.add_argument("--search", nargs="*", action="extend", type=parse_search, default=[], metavar="NAME:KEY=VALUE,...",
                        help="extra searches (repeatable) on the main job's raw scores, e.g. lstsq:correct=lstsq, "
                             "or on its statistics' ranking: obs:scores=ranking,correct=lstsq (default: none)")
    parser.add_argument("--main-seeds", nargs="+", type=int, default=[0],
                        help="the main job's search seeds, one main job each (default: 0)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="xNES seeds of each --search (default: 0 1 2)")
    parser.add_argument("--max-evals", type=int, default=50, help="evaluations of each --search (default: 50)")
    parser.add_argument("--no-baselines", action="store_true", help="leave out gradient-only, uniform and random")
    args = parser.parse_args(argv)
    if len(set(args.main_seeds)) != len(args.main_seeds):
        parser.error(f"--main-seeds: each seed once, got {args.main_seeds}")
    from ..errors import Terminated, own_warnings_as, traceback_requested

    try:
        with own_warnings_as(parser.prog):
            return _run(parser.prog, args)
    except (KeyboardInterrupt, Terminated) as stop:  # a stopped main job raises one of them (not a traceback)
        if traceback_requested():
            raise
        how = "interrupted" if isinstance(stop, KeyboardInterrupt) else "terminated (SIGTERM)"
        sys.stderr.write(f"\n{parser.prog}: {how}; {args.out / 'heldout.json'} keeps the methods measured so far "
                         "(if any); the same command again reuses the finished main jobs\n")
        return 130 if isinstance(stop, KeyboardInterrupt) else 143


def _run(prog: str, args: argparse.Namespace) -> int:
    from ..errors import exit_on_user_error

    with exit_on_user_error(prog):
        halves = split_links(args.data, args.out)  # checks --data before it creates --out
        report_path = args.out / "heldout.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        report.update(data=str(args.data), budgets=[list(b) for b in BUDGETS])
        for calibrate in args.calibrate:
            previous = report.get(calibrate, {})

            def save(result: dict[str, Any], previous: dict[str, Any] = previous, calibrate: str = calibrate) -> None:
                methods = {**previous.get("methods", {}), **result["methods"]}  # re-runs add or replace methods
                report[calibrate] = {**previous, **result, "methods": methods}
                report_path.write_text(json.dumps(report, indent=1))

            save(run_direction(halves, calibrate, args.out, args.search, args.seeds, args.max_evals,
                               not args.no_baselines, save=save, main_seeds=args.main_seeds))
        print(f"written {report_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
