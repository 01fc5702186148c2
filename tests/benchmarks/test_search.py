from __future__ import annotations

import pytest
import torch

from snapvit_lightning.benchmarks.search import naive_fitness
from snapvit_lightning.search import Fitness, default_initial_weights

from conftest import random_scores, tiny_model


@pytest.mark.parametrize("space", ["raw", "pca"])
def test_naive_baseline_computes_the_same_fitness(space: str, one_thread) -> None:
    """The copy-per-candidate baseline the benchmark times against must compute the same value."""
    model, name, _ = tiny_model("test_vit")
    model.reset_classifier(0)  # the benchmark rebuilds its subnets with num_classes=0
    scores = random_scores(model)
    images = torch.randn(6, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(3))
    fitness = Fitness(model, scores, images, pca_components=4, batch_size=4, autocast_dtype=None, space=space)
    w0 = default_initial_weights(scores.num_blocks, scores.num_heads)
    w = (w0 + 0.3 * torch.rand(w0.shape, generator=torch.Generator().manual_seed(4))).clamp(0, 2)
    for weights in (w0, w):
        naive = naive_fitness(model, scores, images, weights, fitness, autocast=False, batch_size=4, model_name=name)
        assert naive == pytest.approx(fitness(weights), abs=1e-5)
    assert fitness(w) > 0


def test_the_benchmark_scripts_end_a_user_error_in_one_line(tmp_path) -> None:
    # `python -m snapvit_lightning.benchmarks.<name>` printed tracebacks (and `data_dir` for --data).
    import subprocess
    import sys

    for name in ("search", "scores", "slice"):  # slice timed its subnets first
        run = subprocess.run([sys.executable, "-m", f"snapvit_lightning.benchmarks.{name}", "--data", str(tmp_path / "nope")],
                             capture_output=True, text=True, env={**__import__("os").environ, "SNAPVIT_TRACEBACK": ""})
        assert run.returncode == 2, run.stderr
        assert run.stderr.strip().splitlines() == [
            f"python -m snapvit_lightning.benchmarks.{name}: error: --data: image folder not found: '{tmp_path / 'nope'}' "
            "(give a folder of images or one image file)"]
