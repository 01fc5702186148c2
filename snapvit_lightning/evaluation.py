"""Evaluation: k-NN top-1 and feature fidelity, the centered fidelity, parameters and FLOPs,
measured latency/throughput, and feature extraction.

Their torchmetrics ``Metric`` s, :class:`~snapvit_lightning.metrics.KNNAccuracy` and
:class:`~snapvit_lightning.metrics.FeatureFidelity`, live in :mod:`snapvit_lightning.metrics` (importing
torchmetrics takes seconds, which the latency search and the export do not need).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snapvit_lightning.forward import embed
from snapvit_lightning.structure import check_input_size, check_model_images, count_flops, count_params
from snapvit_lightning.values import all_finite, real_number

__all__ = [
    "knn_accuracy",
    "feature_fidelity",
    "centered_fidelity",
    "prediction_agreement",
    "model_cost",
    "measure_latency",
    "extract_features",
]

_CHUNK = 1024  # query rows per similarity matmul: bounds memory at _CHUNK x N


# --------------------------------------------------------------------------- validation


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_positive_float(name: str, value: object) -> float:
    number = real_number(value)
    if number is None or not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def _check_float_dtype(name: str, value: object) -> torch.dtype | None:
    if value is None:
        return None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"{name} must be None or a floating-point torch.dtype, got {value!r}")
    return value


def _shape(t: object) -> str:
    return f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__


def _check_features_labels(features: object, labels: object, fname: str, lname: str) -> tuple[Tensor, Tensor]:
    if not isinstance(features, Tensor) or features.ndim != 2 or not features.is_floating_point():
        raise ValueError(f"{fname} must be a floating-point 2-D tensor [N, D], got {_shape(features)}")
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{lname} must be an integer 1-D tensor [N], got {_shape(labels)}")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"{lname} has {labels.shape[0]} entries but {fname} has {features.shape[0]} rows; they must match"
        )
    if not all_finite(features):
        raise ValueError(f"{fname} hold NaN or infinite values")
    return features, labels


# --------------------------------------------------------------------------- k-NN


def knn_accuracy(
    features: Tensor,
    labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    weighted: bool = True,
    test_features: Tensor | None = None,
    test_labels: Tensor | None = None,
) -> float:
    """k-NN top-1 accuracy on features (Caron et al. 2021, DINO's weighted k-NN).

    Features are L2-normalised and compared by cosine similarity. Each query takes its ``k``
    most similar reference samples; each neighbour votes for its label with weight
    ``exp(sim / temperature)`` (``weighted=True``) or 1 (``weighted=False``), and the label with
    the largest vote wins (ties go to the smallest label). ``k=1`` is plain 1-NN either way.

    Without a test set the accuracy is leave-one-out over ``features``: every sample is
    classified by all the others (never by itself). With ``test_features``/``test_labels``
    the test samples are classified by ``features``/``labels``. When fewer than ``k``
    reference samples exist, all of them are used.

    Args:
        features: ``[N, D]`` reference (training) features.
        labels: ``[N]`` integer labels of ``features``.
        k: Number of neighbours (1 for 1-NN, 20 for DINO's weighted 20-NN).
        temperature: Softmax temperature of the weighted vote.
        weighted: Weight votes by ``exp(sim / temperature)``; otherwise a majority vote.
        test_features: ``[M, D]`` query features, or ``None`` for leave-one-out.
        test_labels: ``[M]`` integer labels of ``test_features``.

    Returns:
        Top-1 accuracy in ``[0, 1]``.

    Raises:
        ValueError: If shapes, dtypes, ``k`` or ``temperature`` are invalid, only one of
            ``test_features``/``test_labels`` is given, feature widths differ, or leave-one-out
            is asked of fewer than 2 samples, or the labels hold a single class (e.g. all ``-1``).
    """
    k = _check_int("k", k, 1)
    temperature = _check_positive_float("temperature", temperature)
    if not isinstance(weighted, bool):
        raise ValueError(f"weighted must be a bool, got {weighted!r}")
    features, labels = _check_features_labels(features, labels, "features", "labels")
    if (test_features is None) != (test_labels is None):
        raise ValueError(
            "test_features and test_labels must be given together, got "
            f"test_features={_shape(test_features)} and test_labels={_shape(test_labels)}"
        )
    loo = test_features is None
    if loo:
        if features.shape[0] < 2:
            raise ValueError(f"leave-one-out k-NN needs at least 2 samples, got features {_shape(features)}")
        queries, query_labels = features, labels
    else:
        queries, query_labels = _check_features_labels(test_features, test_labels, "test_features", "test_labels")
        if queries.shape[1] != features.shape[1]:
            raise ValueError(
                f"test_features has width {queries.shape[1]} but features has {features.shape[1]}; they must match"
            )
        if features.shape[0] < 1:
            raise ValueError(f"features must hold at least 1 sample, got {_shape(features)}")
        if queries.shape[0] == 0:
            raise ValueError(f"test_features must hold at least 1 sample, got {_shape(queries)}")

    if torch.cat([labels.flatten().cpu(), query_labels.flatten().cpu()]).unique().numel() < 2:  # all -1 scored 1.0
        raise ValueError(f"labels must hold at least 2 classes, got only {labels[0].item()} (-1 marks an unlabeled "
                         "image, e.g. from a folder without class subfolders): k-NN needs class labels")
    ref = F.normalize(features.float(), dim=1)
    qry = ref if loo else F.normalize(queries.float().to(ref.device), dim=1)
    classes, ref_idx = torch.unique(labels.to(ref.device), return_inverse=True)
    query_labels = query_labels.to(ref.device)
    kk = min(k, ref.shape[0] - 1 if loo else ref.shape[0])

    correct = 0
    for start in range(0, qry.shape[0], _CHUNK):
        sim = qry[start:start + _CHUNK] @ ref.T  # [c, N]
        if loo:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, rows + start] = -math.inf  # a sample never votes for itself
        top_sim, top_idx = sim.topk(kk, dim=1)
        # exp(sim / T) up to a per-query factor exp(-max / T), which leaves the vote unchanged
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp() if weighted else torch.ones_like(top_sim)
        votes = torch.zeros(sim.shape[0], classes.numel(), device=sim.device)
        votes.scatter_add_(1, ref_idx[top_idx], weights)
        pred = classes[votes.argmax(dim=1)]
        correct += int((pred == query_labels[start:start + _CHUNK]).sum())
    return correct / qry.shape[0]


# --------------------------------------------------------------------------- fidelity


def _cosines(features: object, reference: object) -> Tensor:
    _check_pair(features, reference)
    # Rounding can put the cosine of (near-)equal vectors just above 1.
    return F.cosine_similarity(features.float(), reference.float().to(features.device), dim=-1).clamp(-1.0, 1.0)


def _check_pair(features: object, reference: object) -> None:
    if not isinstance(features, Tensor) or not isinstance(reference, Tensor) or features.ndim < 1:
        raise ValueError(
            f"features and reference must be tensors [..., D], got {_shape(features)} and {_shape(reference)}"
        )
    if features.shape != reference.shape:
        raise ValueError(
            f"features {_shape(features)} and reference {_shape(reference)} must have the same shape"
        )
    for name, t in (("features", features), ("reference", reference)):  # NaN gave a fidelity of nan, not an error
        if not all_finite(t):
            raise ValueError(f"{name} hold NaN or infinite values (a broken model or precision?)")


def feature_fidelity(features: Tensor, reference: Tensor) -> float:
    """Mean cosine similarity of ``features`` to ``reference`` (e.g. pruned vs dense model).

    Args:
        features: ``[..., D]`` features (the cosine is taken over the last dimension).
        reference: Reference features of the same shape.

    Returns:
        Mean cosine similarity in ``[-1, 1]`` (1: same directions).

    Raises:
        ValueError: If the shapes differ or there are no feature vectors.
    """
    cos = _cosines(features, reference)
    if cos.numel() == 0:
        raise ValueError(f"features must hold at least one vector, got {_shape(features)}")
    return float(cos.double().mean())


def centered_fidelity(features: Tensor, reference: Tensor) -> float:
    """Mean cosine similarity after removing each set's mean vector: the image-specific part.

    ``features - features.mean(0)`` against ``reference - reference.mean(0)``, per vector. Pre-logits
    features of a ViT share a large common direction (for DINOv2 ViT-S/14 on photos8 the mean
    feature has 0.82x the norm of a typical feature), so :func:`feature_fidelity` stays well above
    0 for a model that keeps only that direction and nothing that tells images apart; this one is
    about 0 for it, and 1 for features equal to the reference up to one common shift. It needs
    the whole set (the means): its ``Metric``, :class:`~snapvit_lightning.metrics.CenteredFidelity`, gathers it.

    Args:
        features: ``[N, D]`` features, ``N >= 2``.
        reference: Reference features ``[N, D]``.

    Returns:
        Mean cosine similarity in ``[-1, 1]``.

    Raises:
        ValueError: If the shapes differ or are not ``[N, D]`` with ``N >= 2``.
    """
    _check_pair(features, reference)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2 (the means), got {_shape(features)}")
    f, r = features.double(), reference.double().to(features.device)
    return float(F.cosine_similarity(f - f.mean(0), r - r.mean(0), dim=-1).clamp(-1.0, 1.0).mean())


@torch.inference_mode()
def prediction_agreement(features: Tensor, reference: Tensor, head: nn.Module) -> float:
    """Share of images whose class from ``head`` (argmax of its logits) is the same for both feature sets.

    For a classifier model: ``head`` is its classifier (``model.get_classifier()``), ``features`` a
    subnet's pre-logits features and ``reference`` the dense model's. The subnets keep the head
    unchanged, so this is how often the subnet predicts what the dense model predicts; no labels needed.

    Raises:
        ValueError: If the shapes differ, are not ``[N, D]`` with ``N >= 1``, or ``head`` is not a module.
    """
    _check_pair(features, reference)
    if features.ndim != 2 or features.shape[0] < 1:
        raise ValueError(f"features must be [N, D] with N >= 1, got {_shape(features)}")
    if not isinstance(head, nn.Module):
        raise ValueError(f"head must be the model's classifier (an nn.Module), got {type(head).__name__}")
    dtype = next(head.parameters(), reference).dtype
    same = head(features.to(dtype)).argmax(-1) == head(reference.to(features.device, dtype)).argmax(-1)
    return float(same.double().mean())


# --------------------------------------------------------------------------- cost


def model_cost(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> dict[str, int]:
    """Parameters and matmul FLOPs (per image) of a timm ViT as it is now.

    Thin wrapper over :func:`snapvit_lightning.structure.count_params` and
    :func:`snapvit_lightning.structure.count_flops`.

    Args:
        model: A timm VisionTransformer (sliced or not).
        img_size: Input size for the FLOPs; the model's own by default.

    Returns:
        ``{"params": int, "flops": int}``.

    Raises:
        ValueError: If ``img_size`` is not accepted by the model (see ``count_flops``).
    """
    if img_size is not None:
        img_size = _input_size(model, img_size)
        check_input_size(model, img_size, f"img_size={img_size[0] if img_size[0] == img_size[1] else list(img_size)}")
    return {
        "params": int(count_params(model)["total"]),
        "flops": int(count_flops(model, img_size)["total"]),
    }


# --------------------------------------------------------------------------- latency


def _input_size(model: nn.Module, img_size: int | tuple[int, int] | None) -> tuple[int, int]:
    if img_size is None:
        pe = getattr(model, "patch_embed", None)
        size = getattr(pe, "img_size", None)
        if size is None:
            raise ValueError("img_size must be given: the model has no patch_embed.img_size")
        return int(size[0]), int(size[1])
    if isinstance(img_size, int) and not isinstance(img_size, bool) and img_size > 0:
        return img_size, img_size
    if (
        isinstance(img_size, (tuple, list)) and len(img_size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in img_size)
    ):
        return int(img_size[0]), int(img_size[1])
    raise ValueError(f"img_size must be None, a positive int or a pair of positive ints, got {img_size!r}")


def _in_chans(model: nn.Module) -> int:
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    return int(getattr(proj, "in_channels", 3))


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device_available(dev: torch.device) -> bool:
    if dev.type == "cpu":
        return True
    if dev.type == "mps":
        return torch.backends.mps.is_available()
    backend = getattr(torch, dev.type, None)  # torch.cuda, torch.xpu, ...
    return callable(getattr(backend, "is_available", None)) and bool(backend.is_available())


def _check_device(device: object) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must name a torch device, got {device!r}") from err
    if dev.type == "meta":  # moving a model there would drop its weights
        raise ValueError(f"device {device!r} holds no values; use cpu or an accelerator of this machine")
    if not _device_available(dev):
        name = "CUDA" if dev.type == "cuda" else dev.type
        raise ValueError(f"device {device!r} asked for, but {name} is not available")
    return dev


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def measure_latency(
    model: nn.Module,
    batch_size: int = 32,
    img_size: int | tuple[int, int] | None = None,
    device: str | torch.device = "cpu",
    warmup: int = 3,
    repeats: int = 10,
    dtype: torch.dtype | None = None,
) -> dict[str, object]:
    """Measured forward latency and throughput of ``model`` on random images.

    Runs ``warmup`` untimed forwards, then ``repeats`` timed ones, in eval mode under
    ``torch.inference_mode`` (synchronising CUDA around each). The model is moved to
    ``device`` for the measurement and moved back (and its train/eval mode restored) after.

    Args:
        model: The model (any module taking ``[B, C, H, W]`` images).
        batch_size: Images per forward.
        img_size: Input size; ``model.patch_embed.img_size`` by default.
        device: Device to measure on (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        warmup: Untimed forwards before measuring.
        repeats: Timed forwards.
        dtype: If given, forwards run under ``torch.autocast`` with this dtype (e.g.
            ``torch.bfloat16``); otherwise in the model's own precision.

    Returns:
        ``{"median_ms", "p90_ms"}`` (per batch), ``"throughput_img_s"`` (from the median),
        ``"batch_size"``, ``"device"`` (str), ``"repeats"``.

    Raises:
        ValueError: If an argument is invalid or the device is not available.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    warmup = _check_int("warmup", warmup, 0)
    repeats = _check_int("repeats", repeats, 1)
    dtype = _check_float_dtype("dtype", dtype)
    size = _input_size(model, img_size)
    if img_size is not None:
        check_input_size(model, size, f"img_size={img_size!r}")
    dev = _check_device(device)

    home = _model_device(model)
    times: list[float] = []
    try:
        model.to(dev)
        param = next(model.parameters(), None)
        in_dtype = param.dtype if param is not None and dtype is None else torch.float32
        x = torch.randn(batch_size, _in_chans(model), *size, device=dev, dtype=in_dtype)
        with _eval_mode(model), torch.inference_mode(), _autocast(dev, dtype):
            for _ in range(warmup):
                model(x)
            _sync(dev)
            for _ in range(repeats):
                _sync(dev)
                t0 = time.perf_counter()
                model(x)
                _sync(dev)
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        model.to(home)

    median = statistics.median(times)
    p90 = float(torch.quantile(torch.tensor(times, dtype=torch.float64), 0.9))
    return {
        "median_ms": median,
        "p90_ms": p90,
        "throughput_img_s": batch_size / (median / 1e3) if median > 0 else math.inf,
        "batch_size": batch_size,
        "device": str(dev),
        "repeats": repeats,
    }


# --------------------------------------------------------------------------- features


def extract_features(
    model: nn.Module,
    images: Tensor,
    batch_size: int = 64,
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """Pre-logits features ``model.forward_head(model.forward_features(x), pre_logits=True)``.

    Runs in eval mode (restored after) under ``torch.inference_mode``, in batches on the
    model's device, through :func:`~snapvit_lightning.forward.embed` (the same values, without
    the last block's unused patch-token outputs).

    Args:
        model: A timm model with ``forward_features`` and ``forward_head``.
        images: ``[M, C, H, W]`` images.
        batch_size: Images per forward.
        autocast_dtype: If given, forwards run under ``torch.autocast`` with this dtype.

    Returns:
        ``[M, D]`` float32 features on ``images``' device.

    Raises:
        ValueError: If ``images`` is not a 4-D floating-point tensor the model takes (its channels,
            its input size or multiples of its patch size, finite values), or ``batch_size`` or
            ``autocast_dtype`` is invalid.
        TypeError: If the model lacks ``forward_features``/``forward_head``.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a floating-point 4-D tensor [M, C, H, W], got {_shape(images)}")
    batch_size = _check_int("batch_size", batch_size, 1)
    autocast_dtype = _check_float_dtype("autocast_dtype", autocast_dtype)
    if not (callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))):
        raise TypeError(f"model must have forward_features and forward_head (a timm model), got {type(model).__name__}")
    check_model_images(model, images)  # the layout, size and values the model takes (not timm's assertion mid-way)
    dev = _model_device(model)
    param = next(model.parameters(), None)
    in_dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    out: list[Tensor] = []
    with _eval_mode(model), torch.inference_mode(), _autocast(dev, autocast_dtype):
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(dev, in_dtype)
            feats = embed(model, x)
            out.append(feats.float().to(images.device))
    if not out:
        raise ValueError(f"images must hold at least one image, got {_shape(images)}")
    return torch.cat(out)

