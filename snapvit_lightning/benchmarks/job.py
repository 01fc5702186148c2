"""Benchmark of the whole main job: stage times at its defaults and at the paper's settings.

Runs the main job (:func:`snapvit_lightning.quickstart.run`, ``snapvit fit`` on the real DINOv2
ViT-S/14) once per setting, in this process and on this machine, and reads each run's
``report.json`` ``build_times``:

* ``default``: ``configs/quickstart.yaml`` as it is (its precision probe, balanced start,
  default fitness and weight-corrected export);
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
settings, the machine) and each setting's run (``DIR/<setting>/``)::

    python -m snapvit_lightning.benchmarks.job --data ../shared/data/photos8 --official official_times.json

Other arguments go to ``snapvit fit`` for every setting (e.g. ``--trainer.enable_progress_bar false``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..machine import build_machine
from ..quickstart import CONFIG, DEFAULT_WEIGHTS, run
from ..search import PAPER_RATIO_PAIRS

__all__ = ["SETTINGS", "PAPER_SEARCH", "paper_config", "load_official", "compare", "markdown", "run_job", "main"]

SETTINGS: tuple[str, ...] = ("default", "paper")
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


def paper_config(config: Path, out: Path) -> Path:
    """Write ``config`` with the paper's search settings and precision to ``out/paper.yaml``.

    Raises:
        FileNotFoundError: If ``config`` is missing.
        ValueError: If ``config`` has no ``EvolutionarySearch`` or ``ElasticExport`` callback.
    """
    if not Path(config).is_file():
        raise FileNotFoundError(f"config: no file at {config}")
    settings = yaml.safe_load(Path(config).read_text())
    callbacks = settings.get("trainer", {}).get("callbacks") or []
    found = set()
    for callback in callbacks:
        kind = callback["class_path"].rsplit(".", 1)[-1]
        if kind == "EvolutionarySearch":
            callback.setdefault("init_args", {}).update(PAPER_SEARCH)
        elif kind == "ElasticExport":
            callback.setdefault("init_args", {})["correct"] = "none"
        found.add(kind)
    missing = {"EvolutionarySearch", "ElasticExport"} - found
    if missing:
        raise ValueError(f"config {config} has no {sorted(missing)} callback; trainer.callbacks holds {sorted(found)}")
    settings["trainer"]["precision"] = PAPER_PRECISION
    out.mkdir(parents=True, exist_ok=True)
    path = out / "paper.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


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
        ("search per evaluation (s)", "search_s_per_eval", "search_s_per_eval"),
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
    cells = [_precision(runs[n], n) for n in names] + (["32-true / bfloat16"] if official else [])
    lines.append("| " + " | ".join(["precision (scoring / search)", *cells]) + " |")
    machine = result["machine"]
    lines += ["", f"Machine: {machine['device_name']}, {machine['torch_threads']} torch threads, {machine['platform']}."]
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
    data: Path,
    out: Path,
    settings: Sequence[str] = SETTINGS,
    weights: Path = DEFAULT_WEIGHTS,
    official: Path | None = None,
    search_evals: int | None = None,
    max_samples: int | None = None,
    cli_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the main job once per setting into ``out/<setting>`` and collect the times.

    Returns:
        ``{"runs": {setting: times}, "machine", "settings", "command", and with ``official``:
        "official", "comparison": {setting: ...}, "official_machine_differs"}``; also written to
        ``out/job.json`` and the table to ``out/job.md``.

    Raises:
        ValueError: If ``settings`` is empty, repeats or names an unknown setting, or
            ``search_evals`` / ``max_samples`` is below 1, or a run's times are incomplete.
        FileNotFoundError: If ``data`` or ``official`` is missing.
    """
    unknown = [s for s in settings if s not in SETTINGS]
    if not settings or unknown or len(set(settings)) != len(settings):
        raise ValueError(f"settings must be distinct names from {list(SETTINGS)}, got {list(settings)}")
    for name, value in (("search_evals", search_evals), ("max_samples", max_samples)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
    if not Path(data).exists():
        raise FileNotFoundError(f"data: no folder at {data}")
    official_times = None if official is None else load_official(Path(official))
    out = Path(out)
    args = ["--data.data_dir", str(data), *([] if max_samples is None else ["--data.max_samples", str(max_samples)]), *cli_args]
    runs: dict[str, dict[str, Any]] = {}
    for setting in settings:
        config = CONFIG if setting == "default" else paper_config(CONFIG, out)
        start = time.perf_counter()
        run(out / setting, weights=weights, cli_args=args, config=config, search_evals=search_evals)
        runs[setting] = read_run(out / setting, time.perf_counter() - start)
    result: dict[str, Any] = {
        "runs": runs, "machine": build_machine("cpu"),
        "settings": {"default": str(CONFIG), "paper": {"search": PAPER_SEARCH, "precision": PAPER_PRECISION, "correct": "none"},
                     "data": str(data), "max_samples": max_samples, "search_evals": search_evals, "cli_args": list(cli_args)},
        "command": " ".join(sys.argv),
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
    parser.add_argument("--data", type=Path, required=True, help="calibration (and fitness) image folder")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS), help="which settings to run")
    parser.add_argument("--official", type=Path, default=None, help="time_official.py's JSON, for the comparison")
    parser.add_argument("--search-evals", type=int, default=None, help="xNES evaluations (default: the config's, 50)")
    parser.add_argument("--max-samples", type=int, default=None, help="calibration images (default: all)")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="ViT-S/14 safetensors (built when missing)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_job"), help="output directory")
    args, rest = parser.parse_known_args(argv)
    try:
        result = run_job(args.data, args.out, args.settings, args.weights, args.official, args.search_evals,
                         args.max_samples, rest)
    except (OSError, ImportError, ValueError, RuntimeError) as err:
        parser.exit(2, f"error: {err}\n")
    print(result["table"], end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
