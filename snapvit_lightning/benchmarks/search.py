"""Benchmark of the evolutionary search on the real DINOv2 ViT-S/14 (CPU, or ``--device cuda``).

Run ``python -m snapvit_lightning.benchmarks.search`` (see ``--help``). Defaults reproduce the
setting in which the official code was timed: DINOv2 ViT-S/14 at 112 px, the 196 photos of
``../shared/data/photos8`` as fitness images, the paper's 4 ratio pairs
(:data:`~snapvit_lightning.search.PAPER_RATIO_PAIRS`; the search's default adds a fifth, 1.12x
the time per evaluation in the main job), 50 evaluations, no guard; the fitness takes its cosine of the raw
embeddings, the package's default (``--space pca --pca 64``: the official code's PCA fitness). Scores are magnitude-style (mean
squared ``fc1`` rows per neuron, mean squared V rows per head): timing does not depend on
the scores' quality.

Prints the setup time, evaluations per second, time per evaluation and total search time,
the fitness of the start point and of the best weights, and per ratio pair the mean cosine
similarity to the dense model with and without the PCA projection (the fitness-set fidelity).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import timm
import torch

from ..data import CalibrationDataModule, find_images
from ..module import load_weights
from ..quickstart import DEFAULT_WEIGHTS, ensure_weights
from ..scores import ImportanceScores
from ..search import DEFAULT_SIGMA, DEFAULT_SPACE, FITNESS_SPACES, PAPER_RATIO_PAIRS, Fitness, default_initial_weights
from ..search.loop import _best, _make_xnes, _search_loop
from ..structure import get_blocks

REPO = Path(__file__).resolve().parents[2]


def magnitude_scores(model: torch.nn.Module) -> ImportanceScores:
    """Mean squared ``fc1`` row weight per neuron and mean squared V-row weight per head."""
    mlp, heads = [], []
    for block in get_blocks(model):
        mlp.append(block.mlp.fc1.weight.detach().pow(2).mean(1))
        attn = block.attn
        v = attn.qkv.weight.detach()[2 * attn.attn_dim :].reshape(attn.num_heads, -1)
        heads.append(v.pow(2).mean(1))
    return ImportanceScores(torch.stack(mlp), torch.stack(heads), criterion="magnitude")


def naive_fitness(
    model, scores, images, w, fitness: Fitness, autocast: bool, batch_size: int, model_name: str = "vit_small_patch14_dinov2"
) -> float:
    """The copy-per-candidate approach (as in the official code, minus its second teacher copy).

    Builds ``ElasticViT(model, scores.with_weights(w))`` (a deep copy, permuted) and cuts a
    subnet (another deep copy) per ratio pair; compares in ``fitness``'s space (its PCA when
    ``fitness.space == "pca"``) with its teacher embeddings, so its value equals ``fitness(w)``
    up to bf16 rounding.
    """
    from ..elastic import ElasticViT

    el = ElasticViT(model, scores.with_weights(w), model_name=model_name,
                    model_kwargs={"num_classes": 0, "img_size": list(model.patch_embed.img_size)})
    losses = []
    for pair in fitness.ratio_pairs:
        sub = el.subnet(*pair)
        outs = []
        with torch.inference_mode(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
            for i in range(0, images.shape[0], batch_size):
                outs.append(sub.forward_head(sub.forward_features(images[i : i + batch_size]), pre_logits=True).float())
        p = torch.cat(outs).double().cpu()
        t = fitness.teacher
        if fitness.space == "pca":
            p, t = fitness._project(p), fitness.teacher_projected
        losses.append(1 - float(((p * t).sum(1) / (p.norm(dim=1) * t.norm(dim=1))).mean()))
    return sum(losses) / len(losses)


def peak_rss_gb() -> float | None:
    """This process's peak resident memory in GB (Linux), ``None`` where it cannot be read."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6 if sys.platform.startswith("linux") else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m snapvit_lightning.benchmarks.search", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS),
                        help="DINOv2 ViT-S/14 weights, built there when missing (default: %(default)s)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "photos8"),
                        help="image folder of the fitness images, all of them used (default: %(default)s)")
    parser.add_argument("--img-size", type=int, default=112, help="input size in pixels (default: %(default)s)")
    parser.add_argument("--max-evals", type=int, default=50, help="timed evaluations of the search (default: %(default)s)")
    parser.add_argument("--pca", type=int, default=64,
                        help="PCA components of the fitness (--space pca; default: %(default)s)")
    parser.add_argument("--sigma", type=float, default=DEFAULT_SIGMA, help="xNES initial step size (default: %(default)s)")
    parser.add_argument("--popsize", type=int, default=None,
                        help="xNES samples per generation (default: 4 + floor(3 ln d), 17 for ViT-S)")
    parser.add_argument("--batch-size", type=int, default=64, help="fitness images per forward (default: %(default)s)")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0, help="xNES seed (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device of the model and fitness images: cpu, cuda (default: %(default)s)")
    parser.add_argument("--correct", choices=("none", "bias", "lstsq"), default="none",
                        help="weight correction inside the fitness (Fitness(correct=...); default: %(default)s)")
    parser.add_argument("--space", choices=FITNESS_SPACES, default=DEFAULT_SPACE,
                        help=f"where the fitness takes the cosine (Fitness(space=...), default {DEFAULT_SPACE})")
    parser.add_argument("--width-multiple", type=int, default=None,
                        help="MLP widths the fitness runs (Fitness(width_multiple=...); default: its own, 32 on a CPU, 1 elsewhere)")
    parser.add_argument(
        "--baseline-evals", type=int, default=2,
        help="also time this many evaluations of the copy-per-candidate approach (0: skip; default: %(default)s)",
    )
    args = parser.parse_args(argv)
    find_images(Path(args.data), argument="--data")  # before the model, as --data
    if args.threads:
        torch.set_num_threads(args.threads)

    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=args.img_size)
    load_weights(model, ensure_weights(args.weights), argument="--weights")
    model.eval().to(args.device)
    dm = CalibrationDataModule(data_dir=args.data, img_size=args.img_size)
    dm.configure_from_model(model)
    images = dm.fitness_images().to(args.device)
    scores = magnitude_scores(model)
    print(
        f"model vit_small_patch14_dinov2 @ {args.img_size}px, {images.shape[0]} fitness images, "
        f"{scores.num_weights} weights, pca {args.pca}, pairs {list(PAPER_RATIO_PAIRS)}, "
        f"autocast {'off (fp32)' if args.fp32 else 'bf16'}, batch {args.batch_size}, fitness correction {args.correct}, space {args.space}, "
        f"threads {torch.get_num_threads()}, device {images.device}"
    )

    t0 = time.perf_counter()
    fitness = Fitness(
        model, scores, images, PAPER_RATIO_PAIRS, args.pca, args.batch_size, None if args.fp32 else torch.bfloat16,
        correct=args.correct, space=args.space, width_multiple=args.width_multiple,
    )
    setup = time.perf_counter() - t0
    print(f"setup (working copy + teacher embeddings + PCA {fitness.num_components}): {setup:.2f} s; "
          f"MLP widths in multiples of {fitness.width_multiple}")

    xnes, w0 = _make_xnes(
        scores.num_weights, scores.num_blocks, scores.num_heads, args.sigma, args.popsize, args.seed, None, None
    )
    assert torch.equal(w0, default_initial_weights(scores.num_blocks, scores.num_heads))
    t0 = time.perf_counter()
    f0 = fitness(w0)
    history: list[float] = []
    _search_loop(xnes, fitness, args.max_evals, history)
    total = time.perf_counter() - t0
    best_w, best_f = _best(xnes, w0, f0)
    n = fitness.num_evals
    times = torch.tensor(fitness.eval_times)
    print(
        f"search: {n} evaluations ({args.max_evals} candidates + start) in {total:.1f} s total "
        f"({setup + total:.1f} s with setup); {n / total:.3f} evals/s; per evaluation "
        f"mean {times.mean():.3f} s, median {times.median():.3f} s, min {times.min():.3f} s"
    )
    rss = peak_rss_gb()
    print(f"peak resident memory of this process so far: {rss:.2f} GB" if rss is not None else "peak resident memory: not available here")
    print(f"popsize {xnes.popsize}, generations {xnes.generation}, sigma {args.sigma} -> {xnes.sigma:.4f}")
    better = sum(f < f0 for f in history)
    print(f"fitness: w_init {f0:.6f}  best {best_f:.6f}  ({better}/{len(history)} candidates beat w_init)")
    pca0, pca1 = fitness.pair_cosines(w0, pca=True), fitness.pair_cosines(best_w, pca=True)
    raw0, raw1 = fitness.pair_cosines(w0, pca=False), fitness.pair_cosines(best_w, pca=False)
    print("pair (mlp, head) | cos PCA w_init -> best | cos raw embedding w_init -> best")
    for i, pair in enumerate(PAPER_RATIO_PAIRS):
        print(f"  {pair!s:12} | {pca0[i]:.4f} -> {pca1[i]:.4f} | {raw0[i]:.4f} -> {raw1[i]:.4f}")
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    print(f"  {'mean':12} | {mean(pca0):.4f} -> {mean(pca1):.4f} | {mean(raw0):.4f} -> {mean(raw1):.4f}")

    if args.baseline_evals:
        t0 = time.perf_counter()
        for i in range(args.baseline_evals):
            f_naive = naive_fitness(model, scores, images, w0, fitness, not args.fp32, args.batch_size)
        per = (time.perf_counter() - t0) / args.baseline_evals
        print(
            f"baseline (deep copy + ElasticViT subnet per candidate, same process): {per:.3f} s/eval "
            f"(fitness of w_init {f_naive:.6f}); fast path {times.mean():.3f} s/eval -> {per / float(times.mean()):.2f}x"
        )


if __name__ == "__main__":
    from . import run_as_script

    run_as_script(main, __spec__.name)
