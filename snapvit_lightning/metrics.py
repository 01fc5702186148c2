"""torchmetrics ``Metric`` s of :mod:`snapvit_lightning.evaluation`'s k-NN accuracy and feature fidelity.

They keep their states so that they reduce correctly under DDP: :class:`KNNAccuracy` gathers features
and labels (``dist_reduce_fx="cat"``) and classifies once at ``compute()``; :class:`FeatureFidelity`
sums cosine similarities and counts (``dist_reduce_fx="sum"``); :class:`CenteredFidelity` gathers the
features (it needs the whole set's means).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from typing_extensions import override

from .evaluation import (
    _check_features_labels,
    _check_int,
    _check_positive_float,
    _cosines,
    centered_fidelity,
    knn_accuracy,
)

__all__ = ["KNNAccuracy", "FeatureFidelity", "CenteredFidelity"]


class KNNAccuracy(Metric):
    """k-NN top-1 accuracy as a torchmetrics ``Metric`` (same result as :func:`knn_accuracy`).

    ``update(features, labels)`` adds reference samples; ``update(..., split="test")`` adds
    query samples. At ``compute()`` the accuracy is train/test when any test samples were
    added, leave-one-out over the reference samples otherwise. The states are lists gathered
    with ``dist_reduce_fx="cat"``, so under DDP every rank sees all samples.

    Args:
        k: Number of neighbours.
        temperature: Temperature of the weighted vote.
        weighted: Weight votes by ``exp(sim / temperature)``.
        **kwargs: Passed to ``torchmetrics.Metric``.

    Raises:
        ValueError: If ``k`` or ``temperature`` is invalid.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, k: int = 20, temperature: float = 0.07, weighted: bool = True, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.k = _check_int("k", k, 1)
        self.temperature = _check_positive_float("temperature", temperature)
        self.weighted = bool(weighted)
        self.add_state("train_features", default=[], dist_reduce_fx="cat")
        self.add_state("train_labels", default=[], dist_reduce_fx="cat")
        self.add_state("test_features", default=[], dist_reduce_fx="cat")
        self.add_state("test_labels", default=[], dist_reduce_fx="cat")

    @override
    def update(self, features: Tensor, labels: Tensor, split: str = "train") -> None:
        """Add a batch of ``[B, D]`` features with ``[B]`` integer labels.

        Args:
            features: ``[B, D]`` features.
            labels: ``[B]`` integer labels.
            split: ``"train"`` (reference samples) or ``"test"`` (queries).

        Raises:
            ValueError: If shapes or dtypes are invalid or ``split`` is unknown.
        """
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        features, labels = _check_features_labels(features, labels, "features", "labels")
        getattr(self, f"{split}_features").append(features.detach().float())
        getattr(self, f"{split}_labels").append(labels.detach().long())

    @override
    def compute(self) -> Tensor:
        """Accuracy over everything added so far (a 0-d float tensor).

        Raises:
            ValueError: If no training samples were added (or fewer than 2 for leave-one-out).
        """
        if not _nonempty(self.train_features):
            raise ValueError("KNNAccuracy.compute() needs training samples: call update(features, labels) first")
        train_x, train_y = dim_zero_cat(self.train_features), dim_zero_cat(self.train_labels)
        test_x = test_y = None
        if _nonempty(self.test_features):
            test_x, test_y = dim_zero_cat(self.test_features), dim_zero_cat(self.test_labels)
        acc = knn_accuracy(train_x, train_y, self.k, self.temperature, self.weighted, test_x, test_y)
        return torch.tensor(acc, device=self.device)


def _nonempty(state: list[Tensor] | Tensor) -> bool:
    return (len(state) > 0) if isinstance(state, list) else state.numel() > 0


class FeatureFidelity(Metric):
    """Mean cosine similarity of features to reference (dense-model) features.

    States are a float64 sum of cosines and a count, both ``dist_reduce_fx="sum"``, so the
    result is exact under DDP and over any batching. Same value as :func:`feature_fidelity`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @override
    def update(self, features: Tensor, reference: Tensor) -> None:
        """Add a batch of features and their reference features (same shape ``[..., D]``).

        Raises:
            ValueError: If either is not a tensor (a numpy array: ``torch.from_numpy``) or the shapes differ.
        """
        cos = _cosines(features, reference).detach().double()
        self.total += cos.sum().to(self.total.device)
        self.count += cos.numel()

    @override
    def compute(self) -> Tensor:
        """Mean cosine similarity so far (0-d float64 tensor).

        Raises:
            ValueError: If nothing was added.
        """
        if int(self.count) == 0:
            raise ValueError("FeatureFidelity.compute() needs data: call update(features, reference) first")
        return self.total / self.count


class CenteredFidelity(Metric):
    """:func:`~snapvit_lightning.evaluation.centered_fidelity` as a torchmetrics ``Metric``: the image-specific part.

    :class:`FeatureFidelity` rewards what all features share: a subnet fine-tuned towards the dense
    model can raise it while collapsing onto that shared direction (a new user's distillation: raw
    .793 → .810, centered .440 → .111). The states are lists gathered with ``dist_reduce_fx="cat"``
    (the means need every image), so under DDP every rank computes over all images; every rank must
    have added a batch (torchmetrics cannot gather an empty list state).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("reference", default=[], dist_reduce_fx="cat")

    @override
    def update(self, features: Tensor, reference: Tensor) -> None:
        """Add a batch of ``[B, D]`` features and their reference features.

        Raises:
            ValueError: If either is not a tensor or the shapes differ.
        """
        _cosines(features, reference)  # the same checks as FeatureFidelity's
        if features.ndim != 2:
            raise ValueError(f"features must be [B, D], got {list(features.shape)}")
        self.features.append(features.detach().double())
        self.reference.append(reference.detach().double())

    @override
    def compute(self) -> Tensor:
        """Centered fidelity over everything added so far (0-d float64 tensor).

        Raises:
            ValueError: If fewer than 2 feature vectors were added.
        """
        if not _nonempty(self.features):
            raise ValueError("CenteredFidelity.compute() needs data: call update(features, reference) first")
        features, reference = dim_zero_cat(self.features), dim_zero_cat(self.reference)
        return torch.tensor(centered_fidelity(features, reference), dtype=torch.float64)
