from __future__ import annotations

import math

import pytest
import timm
import torch

from snapvit_lightning.evaluation import (
    centered_fidelity,
    extract_features,
    feature_fidelity,
    knn_accuracy,
    measure_latency,
    model_cost,
    prediction_agreement,
)
from snapvit_lightning.structure import count_flops, count_params


def _clusters(n_per: int = 25, classes: int = 4, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight clusters around orthogonal centres: perfectly separable by cosine similarity."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:classes] * 10
    labels = torch.arange(classes).repeat_interleave(n_per)
    feats = centres[labels] + 0.3 * torch.randn(labels.numel(), dim, generator=g)
    perm = torch.randperm(labels.numel(), generator=g)
    return feats[perm], labels[perm]


def _angles(degrees: list[float]) -> torch.Tensor:
    rad = torch.tensor(degrees) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False).eval()


# --------------------------------------------------------------------------- k-NN


@pytest.mark.parametrize("k,weighted", [(1, False), (1, True), (20, True), (20, False)])
def test_knn_separable_clusters(k: int, weighted: bool) -> None:
    x, y = _clusters()
    assert knn_accuracy(x, y, k=k, weighted=weighted) == 1.0
    xt, yt = _clusters(n_per=5, seed=1)
    assert knn_accuracy(x, y, k=k, weighted=weighted, test_features=xt, test_labels=yt) == 1.0


def test_knn_loo_known_answer() -> None:
    # Angles 0, 10, 25, 60 degrees with labels 0, 0, 1, 0: nearest neighbours are
    # 0->10 (right), 10->0 (right), 25->10 (wrong), 60->25 (wrong).
    x, y = _angles([0, 10, 25, 60]), torch.tensor([0, 0, 1, 0])
    assert knn_accuracy(x, y, k=1) == 0.5
    # Scale does not matter (cosine similarity on L2-normalised features).
    assert knn_accuracy(x * torch.tensor([[1.0], [5.0], [0.1], [3.0]]), y, k=1) == 0.5


def test_knn_loo_excludes_self() -> None:
    x, y = torch.eye(3), torch.arange(3)  # one sample per class: only itself could be right
    assert knn_accuracy(x, y, k=1) == 0.0
    assert knn_accuracy(x, y, k=1, test_features=x, test_labels=y) == 1.0


def test_knn_weighted_vote_differs_from_majority() -> None:
    # One neighbour at cosine 1 with label 0, two at cosine 0.5 with label 1.
    train = torch.cat([_angles([0]), _angles([60, -60])])
    labels = torch.tensor([0, 1, 1])
    query, truth = _angles([0]), torch.tensor([0])
    assert knn_accuracy(train, labels, k=3, weighted=True, test_features=query, test_labels=truth) == 1.0
    assert knn_accuracy(train, labels, k=3, weighted=False, test_features=query, test_labels=truth) == 0.0
    # A very high temperature flattens the weights back to a majority vote.
    assert knn_accuracy(train, labels, k=3, temperature=1e6, test_features=query, test_labels=truth) == 0.0
    # A tiny temperature does not overflow.
    assert knn_accuracy(train, labels, k=3, temperature=1e-4, test_features=query, test_labels=truth) == 1.0


def test_knn_arbitrary_label_values_and_k_larger_than_n() -> None:
    x, y = _clusters(n_per=3, classes=3)
    assert knn_accuracy(x, y * 7 - 5, k=1) == 1.0
    assert 0.0 <= knn_accuracy(x, y, k=50) <= 1.0  # k clamps to the 8 other samples


def test_knn_errors() -> None:
    x, y = torch.randn(5, 3), torch.arange(5)
    with pytest.raises(ValueError, match="labels has 4 entries"):
        knn_accuracy(x, y[:4])
    with pytest.raises(ValueError, match=r"features must be a floating-point 2-D tensor"):
        knn_accuracy(x[0], y)
    with pytest.raises(ValueError, match="labels must be an integer 1-D tensor"):
        knn_accuracy(x, y.float())
    with pytest.raises(ValueError, match="test_labels has 2 entries"):
        knn_accuracy(x, y, test_features=x[:3], test_labels=y[:2])
    with pytest.raises(ValueError, match="test_features has width 4"):
        knn_accuracy(x, y, test_features=torch.randn(2, 4), test_labels=y[:2])
    with pytest.raises(ValueError, match="given together"):
        knn_accuracy(x, y, test_features=x)
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        knn_accuracy(x, y, k=0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got -1"):
        knn_accuracy(x, y, temperature=-1)
    with pytest.raises(ValueError, match="at least 2 samples"):
        knn_accuracy(x[:1], y[:1])
    with pytest.raises(ValueError, match="features hold NaN or infinite values"):  # as fidelity refuses them (gave 0.5)
        knn_accuracy(torch.full((5, 3), float("nan")), y)
    with pytest.raises(ValueError, match="test_features hold NaN or infinite values"):
        knn_accuracy(x, y, test_features=torch.full((2, 3), float("inf")), test_labels=y[:2])
    with pytest.raises(ValueError, match="weighted must be a bool, got 'yes'"):
        knn_accuracy(x, y, weighted="yes")


def test_images_and_sizes_the_model_cannot_take_are_named(vit: torch.nn.Module) -> None:
    """Were timm's assertions mid-forward, or (model_cost on a dynamic-size ViT) numbers for sizes no forward takes."""
    with pytest.raises(ValueError, match=r"images must be a non-empty float tensor \[N, 3, H, W\] for this model, got \[2, 32, 32, 3\]"):
        extract_features(vit, torch.randn(2, 32, 32, 3))  # HWC
    with pytest.raises(ValueError, match="images: 40 x 40 px images do not cut into this model's 16 x 16 px patches"):
        extract_features(vit, torch.randn(2, 3, 40, 40))
    with pytest.raises(ValueError, match=r"images hold non-finite values"):
        extract_features(vit, torch.full((2, 3, 32, 32), float("nan")))
    for bad in (0, -16, (3, 32, 32), "32", 32.0):
        with pytest.raises(ValueError, match="img_size must be None, a positive int or a pair of positive ints"):
            model_cost(vit, bad)
    with pytest.raises(ValueError, match="img_size=40: 40 x 40 px images do not cut into this model's 16 x 16 px patches"):
        model_cost(vit, 40)
    with pytest.raises(ValueError, match="img_size=40: 40 x 40 px images do not cut"):
        measure_latency(vit, img_size=40)
    assert model_cost(vit, 32)["flops"] == count_flops(vit, 32)["total"]


# --------------------------------------------------------------------------- fidelity


def test_fidelity_known_answers() -> None:
    x = torch.randn(10, 6)
    assert feature_fidelity(x, x) == pytest.approx(1.0)
    assert feature_fidelity(x, 3 * x) == pytest.approx(1.0)
    assert feature_fidelity(-x, x) == pytest.approx(-1.0)
    assert feature_fidelity(torch.eye(4)[:2], torch.eye(4)[2:]) == pytest.approx(0.0)
    assert feature_fidelity(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == 0.5


def test_fidelity_never_above_one() -> None:
    # Rounding puts the mean cosine of these features with themselves above 1 (the
    # preconditions); a fidelity stays within [-1, 1] (report.json once read 1.0000000000000004).
    g = torch.Generator().manual_seed(1)
    x = torch.randn(14, 384, generator=g) * 10 * torch.rand(14, 1, generator=g)
    xc = (x - x.mean(0)).double()
    assert torch.nn.functional.cosine_similarity(x, x, dim=-1).double().mean() > 1.0
    assert torch.nn.functional.cosine_similarity(xc, xc, dim=-1).mean() > 1.0
    assert feature_fidelity(x, x) <= 1.0 and feature_fidelity(-x, x) >= -1.0
    assert centered_fidelity(x, x) <= 1.0


def test_centered_fidelity_known_answers() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 6, generator=g)
    shared = 20 * torch.randn(6, generator=g)  # a large common direction, as ViT features have
    assert centered_fidelity(x, x) == pytest.approx(1.0)
    assert centered_fidelity(x + shared, x) == pytest.approx(1.0)  # one common shift is not image-specific
    assert feature_fidelity(x + shared, x) < 0.5
    # keeping only the shared direction: the plain fidelity is high, the centered one is that of
    # unrelated noise (about 0)
    noise = torch.randn(12, 6, generator=g)
    assert feature_fidelity(shared + 0.1 * noise, shared + x) > 0.9
    assert centered_fidelity(shared + 0.1 * noise, shared + x) == pytest.approx(centered_fidelity(noise, x), abs=1e-5)
    assert abs(centered_fidelity(noise, x)) < 0.3
    expected = torch.nn.functional.cosine_similarity(noise - noise.mean(0), x - x.mean(0), dim=-1).mean()
    assert centered_fidelity(noise, x) == pytest.approx(float(expected), abs=1e-6)
    with pytest.raises(ValueError, match="N >= 2"):
        centered_fidelity(x[:1], x[:1])
    with pytest.raises(ValueError, match="same shape"):
        centered_fidelity(x, x[:, :5])


def test_fidelity_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        feature_fidelity(torch.randn(3, 4), torch.randn(3, 5))


# --------------------------------------------------------------------------- cost, latency, features


def test_model_cost_matches_structure(vit: torch.nn.Module) -> None:
    cost = model_cost(vit)
    assert cost == {"params": count_params(vit)["total"], "flops": count_flops(vit)["total"]}
    assert cost["params"] == sum(p.numel() for p in vit.parameters())
    assert cost["flops"] > 0


def test_measure_latency(vit: torch.nn.Module) -> None:
    vit.train()
    out = measure_latency(vit, batch_size=2, warmup=1, repeats=2)
    assert vit.training  # mode restored
    vit.eval()
    assert out["repeats"] == 2 and out["batch_size"] == 2 and out["device"] == "cpu"
    assert out["median_ms"] > 0 and out["p90_ms"] >= out["median_ms"] and out["throughput_img_s"] > 0
    assert out["throughput_img_s"] == pytest.approx(2 / (out["median_ms"] / 1e3))
    out = measure_latency(vit, batch_size=1, img_size=160, warmup=0, repeats=1, dtype=torch.bfloat16)
    assert out["repeats"] == 1 and out["median_ms"] > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
        (dict(repeats=0), "repeats must be an int >= 1, got 0"),
        (dict(warmup=-1), "warmup must be an int >= 0, got -1"),
        (dict(repeats=2.5), "repeats must be an int >= 1, got 2.5"),
        (dict(img_size=-3), "img_size must be None, a positive int"),
        (dict(dtype=torch.int8), "dtype must be None or a floating-point torch.dtype"),
        (dict(device="nonsense"), "device must name a torch device, got 'nonsense'"),
    ],
)
def test_measure_latency_bad_args(vit: torch.nn.Module, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        measure_latency(vit, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_measure_latency_cuda_unavailable(vit: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        measure_latency(vit, device="cuda", repeats=1)


def test_extract_features(vit: torch.nn.Module) -> None:
    images = torch.randn(5, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    feats = extract_features(vit, images, batch_size=2)
    assert feats.shape == (5, vit.num_features) and feats.dtype == torch.float32
    with torch.no_grad():
        ref = vit.forward_head(vit.forward_features(images), pre_logits=True)
    torch.testing.assert_close(feats, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="images must be a floating-point 4-D tensor"):
        extract_features(vit, images[0])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        extract_features(vit, images, batch_size=0)


def test_knn_refuses_unlabeled_images() -> None:
    # load_eval_images labels a flat folder's images -1; k-NN over them scored a perfect 1.0.
    features = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"labels must hold at least 2 classes, got only -1 \(-1 marks an unlabeled image"):
        knn_accuracy(features, torch.full((6,), -1), k=2)


def test_fidelity_refuses_features_that_are_not_finite() -> None:
    x = torch.randn(4, 8)
    broken = x.clone()
    broken[1, 2] = float("nan")
    with pytest.raises(ValueError, match="features hold NaN or infinite values"):
        feature_fidelity(broken, x)
    with pytest.raises(ValueError, match="reference hold NaN or infinite values"):
        centered_fidelity(x, broken)


def test_prediction_agreement_counts_the_images_whose_class_is_kept() -> None:
    head = torch.nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    reference = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5)  # classes 0 x5, 1 x5
    features = reference.clone()
    features[[0, 1, 9]] = features[[0, 1, 9]].flip(-1)  # three images change class
    assert prediction_agreement(features, reference, head) == pytest.approx(0.7)
    assert prediction_agreement(2.0 * reference, reference, head) == 1.0  # the class, not the logits
    with pytest.raises(ValueError, match="head must be the model's classifier"):
        prediction_agreement(reference, reference, None)
    with pytest.raises(ValueError, match=r"features must be \[N, D\] with N >= 1"):
        prediction_agreement(reference[0], reference[0], head)
