"""Benchmark of the scoring stage on the real DINOv2 ViT-S/14 (CPU, or ``--accelerator gpu``).

Scores the photos with the DINO criterion (both accumulations), prints the wall time, and
prints the fidelity (mean cosine similarity of the pruned model's CLS features to the dense
model's, on the plain resized photos) of gradient-only pruning against uniform random scores::

    python -m snapvit_lightning.benchmarks.scores --data ../shared/data/photos8
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Sequence

import torch

from ..forward import embed

BUDGETS = ((0.35, 0.2), (0.45, 0.3), (0.55, 0.4), (0.65, 0.5))


def fidelity(model: torch.nn.Module, dense: torch.Tensor, images: torch.Tensor, batch_size: int = 64) -> float:
    """Mean cosine similarity of ``model``'s pre-logits features to ``dense`` features."""
    feats = []
    with torch.inference_mode():
        for chunk in images.split(batch_size):
            feats.append(embed(model, chunk).float())
    return torch.nn.functional.cosine_similarity(torch.cat(feats), dense, dim=-1).mean().item()


def main(argv: Sequence[str] | None = None) -> int:
    import lightning as pl

    from ..data import CalibrationDataModule, find_images
    from ..elastic import ElasticViT
    from ..module import SnapViTModule
    from ..quickstart import DEFAULT_WEIGHTS, MODEL_NAME, ensure_weights
    from ..scores import ImportanceScores

    parser = argparse.ArgumentParser(prog="python -m snapvit_lightning.benchmarks.scores", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder of photos (e.g. ../shared/data/photos8)")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="DINOv2 ViT-S/14 weights, built there when missing (default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=112, help="input size in pixels (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per scoring step (default: %(default)s)")
    parser.add_argument("--random-seeds", type=int, default=3,
                        help="random-score baselines, one seed each (default: %(default)s)")
    parser.add_argument("--accumulations", nargs="+", default=["sum_then_square", "fisher"],
                        help="gradient accumulations to score with (default: sum_then_square fisher)")
    parser.add_argument("--identical-views", action="store_true",
                        help="repeat one global and one local crop, as the official code does")
    parser.add_argument("--search-evals", type=int, default=0,
                        help="also run the default xNES search (balanced scores, on the same photos) and add w_init (its start) / w_searched rows (default: 0, no search)")
    parser.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed"),
                        help="Trainer precision (default: %(default)s)")
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"),
                        help="Trainer accelerator; the fidelity is measured on the same device (default: %(default)s)")
    args = parser.parse_args(argv)
    find_images(Path(args.data), argument="--data")  # before the weights and the model, as --data
    kwargs = {"num_classes": 0, "img_size": args.img_size}
    weights = str(ensure_weights(args.weights))
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    print(f"torch threads: {torch.get_num_threads()}, device: {device}")

    rows: dict[str, list[float]] = {}
    dense_model = images = dense = None
    for accumulation in args.accumulations:
        module = SnapViTModule(MODEL_NAME, checkpoint_path=weights, model_kwargs=kwargs, accumulation=accumulation)
        dm = CalibrationDataModule(data_dir=args.data, batch_size=args.batch_size,
                                   independent_views=not args.identical_views)
        trainer = pl.Trainer(accelerator=args.accelerator, devices=1, max_epochs=1, precision=args.precision, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        start = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        print(f"scoring [{accumulation}, {args.precision}]: {module.num_samples} images x {dm.num_views} views, "
              f"batch {args.batch_size}: {time.perf_counter() - start:.1f} s (incl. decoding)")
        if images is None:
            dense_model = module.student.eval().to(device)
            images = dm.calibration_images_eval().to(device)
            with torch.inference_mode():
                dense = torch.cat([embed(dense_model, c) for c in images.split(64)])
        elastic = ElasticViT(module.student.to(device), module.scores, model_name=MODEL_NAME, model_kwargs=kwargs)
        views = "identical" if args.identical_views else "independent"
        rows[f"dino ({accumulation}, {args.precision}, {views} views)"] = [fidelity(elastic.subnet(*b), dense, images) for b in BUDGETS]
        if args.search_evals:
            from ..search import DEFAULT_BALANCE, run_search

            scores = module.scores.balanced(DEFAULT_BALANCE)  # what the search ranks by default; it starts at w = 1
            w0 = torch.ones(scores.num_weights, dtype=torch.float64)
            start = time.perf_counter()
            best, cov, history = run_search(dense_model, module.scores, images, max_evals=args.search_evals)
            print(f"search: {args.search_evals} evaluations in {time.perf_counter() - start:.1f} s; "
                  f"best fitness {min(f for f in history if not math.isnan(f)):.4f}")
            for name, w in (("w_init", w0), ("w_searched", best)):
                searched = ElasticViT(dense_model, scores.with_weights(w), model_name=MODEL_NAME, model_kwargs=kwargs)
                rows[f"dino + {name}"] = [fidelity(searched.subnet(*b), dense, images) for b in BUDGETS]

    shape = (module.scores.mlp.shape, module.scores.heads.shape)
    random_rows = []
    for seed in range(args.random_seeds):
        g = torch.Generator().manual_seed(seed)
        scores = ImportanceScores(torch.rand(*shape[0], generator=g), torch.rand(*shape[1], generator=g), criterion="random")
        elastic = ElasticViT(dense_model, scores, model_name=MODEL_NAME, model_kwargs=kwargs)
        random_rows.append([fidelity(elastic.subnet(*b), dense, images) for b in BUDGETS])
    if random_rows:
        rows[f"random (mean of {args.random_seeds} seeds)"] = torch.tensor(random_rows).mean(0).tolist()
    if len(random_rows) > 1:
        rows["random (std)"] = torch.tensor(random_rows).std(0).tolist()

    print(f"\nfidelity (mean cosine of CLS features to the dense model, {images.shape[0]} photos, {args.img_size} px)")
    print(f"{'scores':<52}" + "".join(f"{str(b):>14}" for b in BUDGETS))
    for name, values in rows.items():
        print(f"{name:<52}" + "".join(f"{v:>14.3f}" for v in values))
    return 0


if __name__ == "__main__":
    from . import run_as_script

    run_as_script(main, __spec__.name)
