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
