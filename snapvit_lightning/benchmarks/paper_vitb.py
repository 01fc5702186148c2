"""The paper's ViT-B/16 run as one whole ``snapvit fit``, timed (the GPU target of the speed issue).

Runs ``configs/dino_vitb16.yaml`` (ViT-B/16 at 224 px, 1000 calibration + 1000 fitness images,
12 crops, batch 16, 192 PCA components, 50 evaluations, the paper's search) end to end in this
process: scoring, search and the export with its defaults (weight-correction statistics, the
corrected ranking, the fidelity of every budget), all on ``--accelerator``. The weights are
random (``checkpoint_path: null``; nothing is downloaded here, and the run time does not depend
on the weights' values). The images are copies of ``--data`` (symbolic links in
``OUT/images``, cycled until ``calibration + fitness`` files exist). Prints the stage times
(``report.json`` ``build_times``) and the whole run's wall time, and writes them to
``OUT/paper_vitb.json``::

    python -m snapvit_lightning.benchmarks.paper_vitb --data ../shared/data/photos8 --out runs/paper_vitb

A small run that checks the script on a CPU in a minute or two::

    python -m snapvit_lightning.benchmarks.paper_vitb --data ../shared/data/photos8 --out /tmp/vitb \\
        --calibration 16 --fitness 16 --evals 4 --img-size 64 --pca 8 --accelerator cpu

Other arguments go to ``snapvit fit`` (e.g. ``--trainer.precision bf16-mixed``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from ..machine import build_machine
from .job import read_run

__all__ = ["CONFIG", "copy_images", "paper_config", "run_paper_vitb", "main"]

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "dino_vitb16.yaml"


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def copy_images(data: Path, out: Path, count: int) -> Path:
    """A flat folder ``out`` of ``count`` symbolic links to the images of ``data``, cycled class by class.

    The images are taken in turn from each subfolder (class) of ``data``, so any ``count`` draws from
    every class (in folder order, one class's images would fill a small count).

    Raises:
        ValueError: If ``count < 1``, ``data`` holds no images or ``out`` exists and is not empty.
        FileNotFoundError: If ``data`` is missing.
    """
    from ..data.sources import find_images

    count = _positive_int(count, "count")
    files, _, _ = find_images(Path(data).resolve(), argument="--data")
    seen: dict[Path, int] = {}
    turns = []
    for f in files:  # the i-th image of every class before the (i+1)-th of any
        turns.append((seen.get(f.parent, 0), str(f.parent), f))
        seen[f.parent] = seen.get(f.parent, 0) + 1
    files = [f for *_, f in sorted(turns, key=lambda t: t[:2])]
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out: {out} exists and is not empty; give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        source = files[i % len(files)]
        os.symlink(source, out / f"{i:05d}_{source.name}")
    return out


def paper_config(
    out: Path,
    images: Path,
    calibration: int,
    fitness: int,
    evals: int,
    pca: int,
    img_size: int | None,
    accelerator: str,
    num_workers: int,
) -> Path:
    """``configs/dino_vitb16.yaml`` with random weights, ``images`` and these sizes, written to ``out/config.yaml``."""
    settings = yaml.safe_load(CONFIG.read_text())
    settings["model"]["checkpoint_path"] = None
    if img_size is not None:
        settings["model"].setdefault("model_kwargs", {})["img_size"] = img_size
    settings["data"].update(data_dir=str(images), max_samples=calibration, holdout=fitness, num_workers=num_workers)
    settings["trainer"]["accelerator"] = accelerator
    for callback in settings["trainer"]["callbacks"]:
        args = callback.setdefault("init_args", {})
        if callback["class_path"].endswith("EvolutionarySearch"):
            args.update(max_evals=evals, pca_components=pca)
        elif callback["class_path"].endswith("ElasticExport"):
            args.update(dirpath=str(out), overwrite=True)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def run_paper_vitb(
    data: Path,
    out: Path,
    calibration: int = 1000,
    fitness: int = 1000,
    evals: int = 50,
    pca: int = 192,
    img_size: int | None = None,
    accelerator: str = "auto",
    num_workers: int | None = None,
    cli_args: Sequence[str] = (),
) -> dict[str, Any]:
    """Build the image folder and the config, run ``snapvit fit``, return (and write) its times.

    Raises:
        ValueError: Bad sizes, an empty ``data`` or a non-empty ``out/images``.
        FileNotFoundError: A missing ``data``.
    """
    from ..cli import SnapViTCLI

    for name, value in (("calibration", calibration), ("fitness", fitness), ("evals", evals), ("pca", pca)):
        _positive_int(value, name)
    if img_size is not None:
        _positive_int(img_size, "img_size")
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if accelerator != "cpu" else 0
    out = Path(out)
    images = copy_images(data, out / "images", calibration + fitness)
    config = paper_config(out, images, calibration, fitness, evals, pca, img_size, accelerator, num_workers)
    start = time.perf_counter()
    SnapViTCLI.run(["fit", "--config", str(config), *cli_args])
    times = read_run(out, time.perf_counter() - start)
    result = {
        "times": times,
        "settings": {"config": str(CONFIG), "calibration": calibration, "fitness": fitness, "evals": evals, "pca": pca,
                     "img_size": img_size, "accelerator": accelerator, "num_workers": num_workers, "cli_args": list(cli_args)},
        "machine": times.get("machine") or build_machine("cpu"),
        "command": " ".join(sys.argv),
    }
    (out / "paper_vitb.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m snapvit_lightning.benchmarks.paper_vitb", description=__doc__.splitlines()[0],
        epilog="Other arguments go to `snapvit fit`, e.g. --trainer.precision bf16-mixed.",
    )
    parser.add_argument("--data", type=Path, required=True, help="image folder the copies are made from")
    parser.add_argument("--out", type=Path, required=True, help="output directory (images/, the export, paper_vitb.json)")
    parser.add_argument("--calibration", type=int, default=1000, help="calibration images (scoring; default: %(default)s)")
    parser.add_argument("--fitness", type=int, default=1000, help="fitness images (search), held out of calibration (default: %(default)s)")
    parser.add_argument("--evals", type=int, default=50, help="xNES evaluations (default: %(default)s)")
    parser.add_argument("--pca", type=int, default=192, help="PCA components of the fitness (default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: the model's, 224)")
    parser.add_argument("--accelerator", default="auto",
                        help="Lightning accelerator: auto (default; refused without a GPU), gpu, cpu")
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: up to 8 off CPU, 0 on CPU)")
    args, rest = parser.parse_known_args(argv)
    if args.accelerator == "auto" and not torch.cuda.is_available():  # else a ViT-B run of hours starts on the CPU
        parser.exit(2, f"{parser.prog}: error: --accelerator auto found no GPU; this benchmark times the paper's "
                       "ViT-B/16 run on one (docs/gpu.md). --accelerator cpu runs it here: give it small sizes "
                       "(docs/benchmarks.md: --calibration 16 --fitness 16 --evals 4 --img-size 64 --pca 8)\n")
    try:
        result = run_paper_vitb(args.data, args.out, args.calibration, args.fitness, args.evals, args.pca,
                                args.img_size, args.accelerator, args.num_workers, rest)
    except (OSError, ImportError, ValueError, RuntimeError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    t = result["times"]
    print(f"ViT-B/16 paper run on {result['machine'].get('device_name')}: whole run {t['wall_s']:.1f} s "
          f"(scoring {t['scoring_s']:.1f} s, search {t['search_s']:.1f} s: set-up, start point and "
          f"{t['search_evaluations']} evaluations, {t['search_s_per_eval']:.2f} s per evaluation all in (the search's "
          f"own s/eval line counts the evaluations alone), export {t['export_s']:.1f} s, other {t['other_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    from . import run_as_script

    run_as_script(main, __spec__.name)
