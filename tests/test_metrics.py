from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from snapvit_lightning.evaluation import feature_fidelity, knn_accuracy
from snapvit_lightning.metrics import CenteredFidelity, FeatureFidelity, KNNAccuracy


@pytest.mark.parametrize("k,weighted,split", [(1, True, False), (20, True, False), (20, False, True)])
def test_knn_metric_matches_function(k: int, weighted: bool, split: bool) -> None:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(60, 8, generator=g), torch.randint(0, 4, (60,), generator=g)
    metric = KNNAccuracy(k=k, weighted=weighted)
    for xb, yb in zip(x[:40].split(7), y[:40].split(7)):
        metric.update(xb, yb)
    if split:
        metric.update(x[40:], y[40:], split="test")
        expected = knn_accuracy(x[:40], y[:40], k=k, weighted=weighted, test_features=x[40:], test_labels=y[40:])
    else:
        metric.update(x[40:], y[40:])
        expected = knn_accuracy(x, y, k=k, weighted=weighted)
    assert metric.compute().item() == pytest.approx(expected)


def test_knn_metric_states_merge_like_ddp() -> None:
    """Two 'ranks' with half the data each, merged via the states' reduce fns = one metric."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(6)
    x = torch.eye(16)[y] * 10 + 3 * torch.randn(18, 16, generator=g)  # noisy clusters: 14 of 18 right
    whole, a, b = KNNAccuracy(k=5), KNNAccuracy(k=5), KNNAccuracy(k=5)
    whole.update(x, y)
    a.update(x[:9], y[:9])
    b.update(x[9:], y[9:])
    a.merge_state(b)
    assert a.compute().item() == pytest.approx(whole.compute().item())
    assert whole.compute().item() == pytest.approx(knn_accuracy(x, y, k=5)) == pytest.approx(14 / 18)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_knn_metric_errors() -> None:
    x, y = torch.randn(5, 3), torch.arange(5)
    with pytest.raises(ValueError, match="k must be"):
        KNNAccuracy(k=1.5)
    metric = KNNAccuracy()
    with pytest.raises(ValueError, match="labels has 4 entries"):
        metric.update(x, y[:4])
    with pytest.raises(ValueError, match="split must be"):
        metric.update(x, y, split="val")
    with pytest.raises(ValueError, match="needs training samples"):
        metric.compute()


def test_fidelity_metric_never_above_one() -> None:
    g = torch.Generator().manual_seed(1)  # features whose plain mean cosine with themselves rounds above 1
    x = torch.randn(14, 384, generator=g) * 10 * torch.rand(14, 1, generator=g)
    assert torch.nn.functional.cosine_similarity(x, x, dim=-1).double().mean() > 1.0
    metric = FeatureFidelity()
    metric.update(x, x)
    assert metric.compute().item() <= 1.0


def test_fidelity_metric_chunks_match_function() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(23, 8, generator=g), torch.randn(23, 8, generator=g)
    metric = FeatureFidelity()
    for ca, cb in zip(a.split(5), b.split(5)):
        metric.update(ca, cb)
    assert metric.compute().item() == pytest.approx(feature_fidelity(a, b), abs=1e-9)
    other = FeatureFidelity()
    other.update(a, b)
    metric.merge_state(other)  # sum/count states: merging doubles both, the mean is unchanged
    assert metric.compute().item() == pytest.approx(feature_fidelity(a, b), abs=1e-9)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_fidelity_metric_errors() -> None:
    with pytest.raises(ValueError, match="same shape"):
        FeatureFidelity().update(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="needs data"):
        FeatureFidelity().compute()
    with pytest.raises(ValueError, match=r"must be tensors \[\.\.\., D\], got ndarray and ndarray"):  # was numpy's AttributeError
        FeatureFidelity().update(np.ones((2, 4)), np.ones((2, 4)))


def test_centered_fidelity_metric_sees_the_collapse_the_raw_one_rewards() -> None:
    from snapvit_lightning.evaluation import centered_fidelity

    g = torch.Generator().manual_seed(0)
    shared = 3 * torch.randn(1, 16, generator=g)
    dense = shared + torch.randn(20, 16, generator=g)
    collapsed = shared.expand(20, 16) + 0.05 * torch.randn(20, 16, generator=g)  # only the shared direction kept
    raw, centered = FeatureFidelity(), CenteredFidelity()
    for a, b in zip(collapsed.split(6), dense.split(6)):  # batches: the means are the whole set's
        raw.update(a, b)
        centered.update(a, b)
    assert centered.compute().item() == pytest.approx(centered_fidelity(collapsed, dense), abs=1e-12)
    assert raw.compute().item() > 0.8 and abs(centered.compute().item()) < 0.3
    with pytest.raises(ValueError, match=r"features must be \[B, D\], got \[2, 3, 4\]"):
        CenteredFidelity().update(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="needs data"):
        CenteredFidelity().compute()


def test_latency_and_slicing_do_not_import_torchmetrics() -> None:
    """Importing torchmetrics takes seconds: a first ``subnet(latency_ms=...)`` waited for it."""
    code = (
        "import sys, snapvit_lightning.latency, snapvit_lightning.elastic, snapvit_lightning.evaluation; "
        "print('torchmetrics' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
