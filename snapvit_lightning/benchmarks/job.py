"""Benchmark of the whole main job: stage times at its defaults and at the paper's settings.

Runs the main job (:func:`snapvit_lightning.quickstart.run`, ``snapvit fit`` on the real DINOv2
ViT-S/14) once per setting and round, in this process and on this machine, and reads each run's
``report.json`` ``build_times``:

* ``default``: ``configs/quickstart.yaml`` as it is (its precision probe, balanced start,
  default fitness and weight-corrected export);
* ``uncorrected``: the same with ``correct: none`` in the export (no statistics, no ranking, the
  plain cut). Beside ``default`` it measures what the correction adds to the main job: the
  difference of the median wall times over ``--repeats`` rounds, each round running the settings
  one after the other (interleaved, so drifts of a shared machine hit both alike);
* ``paper``: the same model, data and number of evaluations with the paper's search:
  :data:`~snapvit_lightning.search.PAPER_RATIO_PAIRS`, ``space: pca`` (64 components),
  ``guard: 0``, ``balance: null`` (the raw scores, start ``linspace(1.2 -> 0.8)``), and the
  official code's precision: 32-bit scoring, bfloat16 autocast in the fitness forwards;
  the plain cut is exported (``correct: none``). Its config is written to ``OUT/paper.yaml``.

Stages: *scoring* (train start to the search hook), *search* (the search hook: fitness set-up,
start point and the candidate evaluations), *export* (``export_elastic``), *other* (the rest
of the run's wall time: model and data loading, the precision probe, Lightning's set-up) and
*wall* (the whole :func:`~snapvit_lightning.quickstart.run` call; the interpreter's start-up
and imports are not in it). Per evaluation = search seconds / evaluations.

``--official FILE`` adds the official code's times, as printed or written by
``../shared/reference/time_official.py`` (its ``timings``): scoring
(``gradient_scoring_s`` on ``gradient_scoring_images`` images) and search
(``fitness_setup_s + evolutionary_search_s`` over ``search_evals`` evaluations). For each
setting they are also scaled to that run's size: scoring by images, the search as set-up plus
the official per-evaluation loop time times our evaluations, both times our images / the
official images (the official fitness set is its calibration set in its defaults: the 196
photos of photos8). The speed-up is the official scaled scoring + search over ours (above 1:
ours is faster). Run both on the same folder with all its images, the same evaluations, on the
same machine in one sitting: then nothing is scaled and the comparison is direct.

Prints a markdown table; ``--out DIR`` also holds ``job.md``, ``job.json`` (every number, the
settings, the machine) and each run (``DIR/<setting>/``, with ``--repeats`` N > 1
``DIR/<setting>-<round>/``). Without ``--data`` the runs use the main job's built-in photos::

    python -m snapvit_lightning.benchmarks.job --data ../shared/data/photos8 --official official_times.json
    python -m snapvit_lightning.benchmarks.job --settings default uncorrected --repeats 2

Other arguments go to ``snapvit fit`` for every setting (e.g. ``--trainer.enable_progress_bar false``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..data import find_images
from ..machine import build_machine
from ..quickstart import CONFIG, DEFAULT_WEIGHTS, run
from ..search import PAPER_RATIO_PAIRS
from ..file_io import check_writable

__all__ = [
    "SETTINGS", "DEFAULT_SETTINGS", "PAPER_SEARCH", "paper_config", "uncorrected_config", "load_official", "compare",
    "correction_cost", "markdown", "run_job", "main",
]

SETTINGS: tuple[str, ...] = ("default", "uncorrected", "paper")
#: What runs when no settings are named.
DEFAULT_SETTINGS: tuple[str, ...] = ("default", "paper")
#: The paper's search settings (the official code's), as ``EvolutionarySearch`` init args.
PAPER_SEARCH: dict[str, Any] = {
    "ratio_pairs": [list(pair) for pair in PAPER_RATIO_PAIRS], "space": "pca", "pca_components": 64,
    "guard": 0.0, "balance": None, "autocast": True, "fitness_samples": None,
}
#: The official code's scoring precision (its fitness runs under bfloat16 autocast: ``autocast: true``).
PAPER_PRECISION = "32-true"
OFFICIAL_KEYS = ("gradient_scoring_s", "gradient_scoring_images", "fitness_setup_s", "evolutionary_search_s", "search_evals")
MACHINE_KEYS = ("device_name", "cpu", "torch_threads")
CAVEAT = "compare only times taken on the same machine in one sitting"


def _variant_config(config: Path, out: Path, name: str, search: dict[str, Any], correct: str, precision: str | None) -> Path:
    """Write a variant of ``config`` to ``out/<name>.yaml`` and return its path.

    ``search`` is merged into the ``EvolutionarySearch`` init args, ``correct`` set on the
    ``ElasticExport``, and ``precision`` (when given) on the trainer. Errors as :func:`paper_config`.
    """
    if not Path(config).is_file():
        raise FileNotFoundError(f"config: no file at {config}")
    settings = yaml.safe_load(Path(config).read_text())
    callbacks = settings.get("trainer", {}).get("callbacks") or []
    found = set()
    for callback in callbacks:
        kind = callback["class_path"].rsplit(".", 1)[-1]
        if kind == "EvolutionarySearch":
            callback.setdefault("init_args", {}).update(search)
        elif kind == "ElasticExport":
            callback.setdefault("init_args", {})["correct"] = correct
        found.add(kind)
    missing = {"EvolutionarySearch", "ElasticExport"} - found
    if missing:
        raise ValueError(f"config {config} has no {sorted(missing)} callback; trainer.callbacks holds {sorted(found)}")
    if precision is not None:
        settings["trainer"]["precision"] = precision
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def paper_config(config: Path, out: Path) -> Path:
    """Write ``config`` with the paper's search settings and precision to ``out/paper.yaml``.

    Raises:
        FileNotFoundError: If ``config`` is missing.
        ValueError: If ``config`` has no ``EvolutionarySearch`` or ``ElasticExport`` callback.
    """
    return _variant_config(config, out, "paper", PAPER_SEARCH, "none", PAPER_PRECISION)


def uncorrected_config(config: Path, out: Path) -> Path:
    """Write ``config`` with the plain export (``correct: none``), nothing else changed, to ``out/uncorrected.yaml``.

    Raises:
        As :func:`paper_config`.
    """
    return _variant_config(config, out, "uncorrected", {}, "none", None)


def _positive(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: {name} must be a positive number, got {value!r}")
    return float(value)


def load_official(path: Path) -> dict[str, Any]:
    """The official code's stage times from ``time_official.py``'s JSON (printed or ``--out``).

    Returns:
        ``scoring_s``, ``scoring_images``, ``search_setup_s``, ``search_loop_s``,
        ``search_evaluations``, ``search_s`` (set-up + loop), ``search_s_per_eval`` (``search_s``
        over the evaluations), ``loop_s_per_eval`` and ``machine`` (the file's ``machine`` or
        ``meta.machine``, else ``None``), ``threads`` (``meta.threads`` or ``None``).

    Raises:
        FileNotFoundError: If ``path`` is missing.
        ValueError: If it is not JSON with a ``timings`` object holding positive
            ``gradient_scoring_s``, ``gradient_scoring_images``, ``fitness_setup_s``,
            ``evolutionary_search_s`` and ``search_evals``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official: no file at {path}")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"official: {path} is not JSON ({err})") from err
    timings = doc.get("timings") if isinstance(doc, dict) else None
    if not isinstance(timings, dict):
        raise ValueError(f"official: {path} has no 'timings' object (time_official.py's output); top-level keys: "
                         f"{sorted(doc) if isinstance(doc, dict) else type(doc).__name__}")
    missing = [k for k in OFFICIAL_KEYS if k not in timings]
    if missing:
        raise ValueError(f"official: {path} timings lack {missing}; allowed input: time_official.py's JSON with {list(OFFICIAL_KEYS)}")
    where = f"official {path} timings"
    values = {k: _positive(timings[k], k, where) for k in OFFICIAL_KEYS}
    meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else {}
    search_s = values["fitness_setup_s"] + values["evolutionary_search_s"]
    return {
        "file": str(path),
        "scoring_s": values["gradient_scoring_s"],
        "scoring_images": int(values["gradient_scoring_images"]),
        "search_setup_s": values["fitness_setup_s"],
        "search_loop_s": values["evolutionary_search_s"],
        "search_evaluations": int(values["search_evals"]),
        "search_s": search_s,
        "search_s_per_eval": search_s / values["search_evals"],
        "loop_s_per_eval": values["evolutionary_search_s"] / values["search_evals"],
        "machine": doc.get("machine", meta.get("machine")),
        "threads": meta.get("threads"),
    }


def read_run(out: Path, wall_s: float) -> dict[str, Any]:
    """One run's stage times from ``out/report.json`` (``build_times``) and its wall time.

    Raises:
        FileNotFoundError: If the run wrote no ``report.json``.
        ValueError: If its ``scoring_s``, ``search_s``, ``search_evaluations`` or ``export_s`` is
            missing or not positive (a run without a search, or a resumed one).
    """
    report_path = Path(out) / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"no report.json in {out}: the run did not finish its export")
    report = json.loads(report_path.read_text())
    times = report.get("build_times") or {}
    where = f"{report_path} build_times"
    stages = {k: _positive(times.get(k), k, where) for k in ("scoring_s", "search_s", "export_s")}
    evaluations = int(_positive(times.get("search_evaluations"), "search_evaluations", where))
    images = report.get("fidelity_images")
    return {
        **stages,
        "search_evaluations": evaluations,
        "search_s_per_eval": stages["search_s"] / evaluations,
        "other_s": wall_s - sum(stages.values()),
        "wall_s": wall_s,
        "images": None if images is None else int(images),
        "precision": times.get("precision"),
        "machine": times.get("machine"),
        "run_dir": str(out),
    }


def compare(ours: dict[str, Any], official: dict[str, Any]) -> dict[str, Any]:
    """The official times scaled to one of our runs, and the speed-up of ours (official s / our s).

    Scoring scales with images; the search is the official set-up plus its per-evaluation loop
    time times our evaluations, both times our images over the official images.

    Raises:
        ValueError: If our run's ``images`` is unknown.
    """
    if ours["images"] is None:
        raise ValueError(f"run {ours['run_dir']}: report.json has no fidelity_images, so the official times cannot be scaled")
    factor = ours["images"] / official["scoring_images"]
    scoring = official["scoring_s"] * factor
    search = (official["search_setup_s"] + official["loop_s_per_eval"] * ours["search_evaluations"]) * factor
    ours_total = ours["scoring_s"] + ours["search_s"]
    return {
        "image_factor": factor,
        "official_scoring_s": scoring,
        "official_search_s": search,
        "official_total_s": scoring + search,
        "ours_total_s": ours_total,
        "speedup": (scoring + search) / ours_total,
    }


def machine_differs(ours: dict[str, Any], official: dict[str, Any]) -> list[str]:
    """Fields of ``build_machine`` (or the thread count) in which the official file's machine differs."""
    theirs = official.get("machine")
    if isinstance(theirs, dict):
        return [k for k in MACHINE_KEYS if k in theirs and theirs[k] != ours.get(k)]
    if official.get("threads") is not None and official["threads"] != ours.get("torch_threads"):
        return ["torch_threads"]
    return []


def _setting_of(key: str) -> str:
    """The setting of a run key: ``default`` or ``default-2`` → ``default``."""
    return key.rsplit("-", 1)[0] if key.rsplit("-", 1)[-1].isdigit() else key


def correction_cost(runs: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """What the correction adds to the main job: ``default`` against ``uncorrected`` runs.

    Returns:
        ``None`` unless both settings ran; else their wall and export times per run, and
        ``added_s`` / ``added_fraction`` (median wall of ``default`` minus that of
        ``uncorrected``, and over it), ``export_added_s`` (the same for the export) and
        ``export_added_fraction`` (that over the median ``uncorrected`` wall: steadier than the
        walls' difference, which carries the search's run-to-run variation).
    """
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for key, times in runs.items():
        by_setting.setdefault(_setting_of(key), []).append(times)
    if "default" not in by_setting or "uncorrected" not in by_setting:
        return None
    walls = {name: [r["wall_s"] for r in by_setting[name]] for name in ("default", "uncorrected")}
    exports = {name: [r["export_s"] for r in by_setting[name]] for name in ("default", "uncorrected")}
    base = statistics.median(walls["uncorrected"])
    added = statistics.median(walls["default"]) - base
    export_added = statistics.median(exports["default"]) - statistics.median(exports["uncorrected"])
    return {
        "wall_s": walls,
        "export_s": exports,
        "added_s": added,
        "added_fraction": added / base,
        "export_added_s": export_added,
        "export_added_fraction": export_added / base,
    }


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _precision(run_: dict[str, Any], setting: str) -> str:
    record = run_.get("precision")
    if isinstance(record, dict):
        scoring = record.get("trainer_precision") or "not probed"
        return f"{scoring} / {record.get('search_autocast') or 'fp32'} (probe)"
    if setting == "paper":
        return f"{PAPER_PRECISION} / bfloat16"
    return "–"


def markdown(result: dict[str, Any]) -> str:
    """The stage × setting table, and with official times the comparison and its caveat."""
    runs, official = result["runs"], result.get("official")
    names = list(runs)
    head = ["stage", *names] + (["official (measured)"] if official else [])
    rows = [
        ("scoring (s)", "scoring_s", "scoring_s"),
        ("search (s)", "search_s", "search_s"),
        ("search evaluations", "search_evaluations", "search_evaluations"),
        ("search per evaluation (s, set-up included)", "search_s_per_eval", "search_s_per_eval"),
        ("export (s)", "export_s", None),
        ("other (s)", "other_s", None),
        ("whole job, wall (s)", "wall_s", None),
        ("images", "images", "scoring_images"),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, key, official_key in rows:
        digits = 2 if "per evaluation" in label else 1
        cells = [_fmt(runs[n][key], digits) for n in names]
        if official:
            cells.append(_fmt(official[official_key], digits) if official_key else "–")
        lines.append("| " + " | ".join([label, *cells]) + " |")
    cells = [_precision(runs[n], _setting_of(n)) for n in names] + (["32-true / bfloat16"] if official else [])
    lines.append("| " + " | ".join(["precision (scoring / search)", *cells]) + " |")
    machine = result["machine"]
    lines += ["", f"Machine: {machine['device_name']}, {machine['torch_threads']} torch threads, {machine['platform']}."]
    cost = result.get("correction")
    if cost is not None:
        rounds = len(cost["wall_s"]["default"])
        lines += ["", f"The correction adds {cost['added_s']:+.1f} s ({100 * cost['added_fraction']:+.1f} %) to the main "
                  f"job, its export {cost['export_added_s']:+.1f} s ({100 * cost['export_added_fraction']:+.1f} % of the "
                  f"uncorrected job): default minus uncorrected, medians of {rounds} interleaved "
                  f"round{'s' if rounds > 1 else ''} ({CAVEAT})."]
    if official:
        comparisons = result["comparison"]
        lines += ["", "Against the official code, scaled to each run's evaluations and images:", "",
                  "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for label, key, digits in (("official scoring, scaled (s)", "official_scoring_s", 1),
                                   ("official search, scaled (s)", "official_search_s", 1),
                                   ("official scoring + search (s)", "official_total_s", 1),
                                   ("ours scoring + search (s)", "ours_total_s", 1),
                                   ("speed-up (official s / our s)", "speedup", 2)):
            lines.append("| " + " | ".join([label, *(_fmt(comparisons[n][key], digits) for n in names)]) + " |")
        differs = result["official_machine_differs"]
        lines.append("")
        factors = sorted({round(c["image_factor"], 4) for c in comparisons.values()})
        if factors != [1.0] or any(r["search_evaluations"] != official["search_evaluations"] for r in runs.values()):
            lines.append(f"Scaled linearly (image factors {factors}): fixed costs make this rough, the more so the "
                         "further from 1; for a direct comparison run both on the same folder with the same evaluations.")
        if differs:
            lines.append(f"WARNING: the official times come from another machine ({', '.join(differs)} differ): {CAVEAT}.")
        elif official.get("machine") is None:
            lines.append(f"The official file records no machine: {CAVEAT}.")
        else:
            lines.append(f"Same machine fields ({', '.join(MACHINE_KEYS)}); still, {CAVEAT}.")
    return "\n".join(lines) + "\n"


def run_job(
    data: Path | None,
    out: Path,
    settings: Sequence[str] = DEFAULT_SETTINGS,
    weights: Path = DEFAULT_WEIGHTS,
    official: Path | None = None,
    search_evals: int | None = None,
    max_samples: int | None = None,
    cli_args: Sequence[str] = (),
    repeats: int = 1,
) -> dict[str, Any]:
    """Run the main job per setting and round into ``out/<key>`` and collect the times.

    Each of the ``repeats`` rounds runs every setting once, in the order given; a run's key is
    its setting, or ``<setting>-<round>`` when ``repeats`` > 1. ``data`` ``None``: the main job's
    built-in photos.

    Returns:
        ``{"runs": {key: times}, "machine", "settings", "command", "correction"`` (see
        :func:`correction_cost`), and with ``official``: ``"official", "comparison": {key: ...},
        "official_machine_differs"}``; also written to ``out/job.json`` and the table to ``out/job.md``.

    Raises:
        ValueError: If ``settings`` is empty, repeats or names an unknown setting, or
            ``search_evals`` / ``max_samples`` / ``repeats`` is below 1, or a run's times are incomplete.
        FileNotFoundError: If ``data`` or ``official`` is missing.
    """
    unknown = [s for s in settings if s not in SETTINGS]
    if not settings or unknown or len(set(settings)) != len(settings):
        raise ValueError(f"settings must be distinct names from {list(SETTINGS)}, got {list(settings)}")
    for name, value in (("search_evals", search_evals), ("max_samples", max_samples), ("repeats", repeats)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an int >= 1{'' if name == 'repeats' else ' or None'}, got {value!r}")
    if data is not None:  # before any run, named as the user gave them (a run would say data_dir / dirpath)
        find_images(Path(data), argument="--data")
    official_times = None if official is None else load_official(Path(official))
    out = Path(out)
    check_writable(out, "--out")
    args = [*([] if data is None else ["--data.data_dir", str(data)]),
            *([] if max_samples is None else ["--data.max_samples", str(max_samples)]), *cli_args]
    writers = {"default": None, "uncorrected": uncorrected_config, "paper": paper_config}
    configs = {setting: CONFIG if writers[setting] is None else writers[setting](CONFIG, out) for setting in settings}
    runs: dict[str, dict[str, Any]] = {}
    for round_ in range(1, repeats + 1):
        for setting in settings:
            key = setting if repeats == 1 else f"{setting}-{round_}"
            start = time.perf_counter()
            run(out / key, weights=weights, cli_args=args, config=configs[setting], search_evals=search_evals)
            runs[key] = read_run(out / key, time.perf_counter() - start)
    result: dict[str, Any] = {
        "runs": runs, "machine": build_machine("cpu"),
        "settings": {"default": str(CONFIG), "uncorrected": {"correct": "none"},
                     "paper": {"search": PAPER_SEARCH, "precision": PAPER_PRECISION, "correct": "none"},
                     "data": None if data is None else str(data), "max_samples": max_samples,
                     "search_evals": search_evals, "repeats": repeats, "cli_args": list(cli_args)},
        "command": " ".join(sys.argv),
        "correction": correction_cost(runs),
    }
    if official_times is not None:
        result["official"] = official_times
        result["comparison"] = {name: compare(times, official_times) for name, times in runs.items()}
        result["official_machine_differs"] = machine_differs(result["machine"], official_times)
    result["table"] = markdown(result)
    (out / "job.json").write_text(json.dumps(result, indent=1))
    (out / "job.md").write_text(result["table"])
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m snapvit_lightning.benchmarks.job", description=__doc__.splitlines()[0],
        epilog="Other arguments go to `snapvit fit` for every setting, e.g. --trainer.enable_progress_bar false.",
    )
    parser.add_argument("--data", type=Path, default=None,
                        help="calibration (and fitness) image folder (default: the main job's built-in photos)")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(DEFAULT_SETTINGS),
                        help=f"which settings to run (default: {' '.join(DEFAULT_SETTINGS)})")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all settings, interleaved (default: 1)")
    parser.add_argument("--official", type=Path, default=None, help="time_official.py's JSON, for the comparison")
    parser.add_argument("--search-evals", type=int, default=None, help="xNES evaluations (default: the config's, 50)")
    parser.add_argument("--max-samples", type=int, default=None, help="calibration images (default: all)")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="DINOv2 ViT-S/14 weights, built there when missing (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_job"), help="output directory (default: runs/bench_job)")
    args, rest = parser.parse_known_args(argv)
    try:
        result = run_job(args.data, args.out, args.settings, args.weights, args.official, args.search_evals,
                         args.max_samples, rest, args.repeats)
    except (OSError, ImportError, ValueError, RuntimeError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(result["table"], end="")
    return 0


if __name__ == "__main__":
    from . import run_as_script

    run_as_script(main, __spec__.name)
