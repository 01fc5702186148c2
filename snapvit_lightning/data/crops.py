"""Crops and normalisation: DINO multi-crop views and the timm-style evaluation transform.

The SnapViT scores (method step 1) need, for every calibration image, two *global* crops and
``N`` *local* crops, all resized to the model's input size and normalised with the model's
mean/std, with no colour jitter. The search (step 2) needs a separate, fixed set of
"fitness" images, resized and center-cropped the way timm evaluates.

Crops are cut from in-memory ``uint8`` tensors, so an epoch costs no JPEG decoding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "DINOMultiCrop",
    "DEFAULT_STATS_VIEWS",
    "MAX_VIEWS_PER_IMAGE",
    "STATS_CROP_SCALE",
    "eval_transform",
    "resolve_input_config",
    "stats_crops",
    "stats_views_per_image",
]

IMAGENET_DEFAULT_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)


IMAGENET_DEFAULT_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Area fraction of the crops the correction statistics add to each calibration image's eval view.
STATS_CROP_SCALE: tuple[float, float] = (0.35, 1.0)

#: Inputs the correction statistics aim for: small calibration sets add random crops of each image.
DEFAULT_STATS_VIEWS = 256

#: Most views per calibration image (its eval view and up to 7 crops).
MAX_VIEWS_PER_IMAGE = 8


def stats_views_per_image(num_images: int, stats_views: int = DEFAULT_STATS_VIEWS) -> int:
    """Views per calibration image for the statistics: ``stats_views // num_images`` in ``[1, 8]``.

    The first view of every image is its eval view, the others random crops
    (:meth:`~snapvit_lightning.data.CalibrationDataModule.calibration_views`,
    :func:`~snapvit_lightning.data.load_calibration_views`); ``stats_views=1``
    gives the eval views alone.

    Raises:
        ValueError: ``num_images`` or ``stats_views`` is not an int >= 1.
    """
    for name, value in (("num_images", num_images), ("stats_views", stats_views)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return max(1, min(MAX_VIEWS_PER_IMAGE, stats_views // num_images))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}")
    return int(value)


def _check_scale(name: str, value: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a pair of floats (lo, hi), got {value!r}") from None
    if not (0.0 < lo <= hi <= 1.0):
        raise ValueError(f"`{name}` must satisfy 0 < lo <= hi <= 1, got {value!r}")
    return lo, hi


def _check_ratio(name: str, value: Any) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a pair of floats (lo, hi), got {value!r}") from None
    if not (0.0 < lo <= hi):
        raise ValueError(f"`{name}` must satisfy 0 < lo <= hi, got {value!r}")
    return lo, hi


def _check_triple(name: str, value: Any, positive: bool = False) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be 3 floats (one per RGB channel), got {value!r}") from None
    if len(out) != 3:
        raise ValueError(f"`{name}` must have 3 values (one per RGB channel), got {value!r}")
    if positive and not min(out) > 0:
        raise ValueError(f"`{name}` values must be > 0, got {value!r}")
    if not all(0.0 <= v <= 1.0 for v in out):  # NaN fails too
        raise ValueError(f"`{name}` is on the [0, 1] scale of the images (ImageNet's: "
                         f"{IMAGENET_DEFAULT_MEAN if name == 'mean' else IMAGENET_DEFAULT_STD}), got {value!r}"
                         + (": divide 0..255 values by 255" if max(out) > 1 else ""))
    return out  # type: ignore[return-value]


def float_image_to_uint8(img: Tensor) -> Tensor:
    """A float image with values in [0, 1] as ``uint8`` (rounded).

    Raises:
        ValueError: for values outside [0, 1] (beyond rounding), or NaN/inf: e.g. an image already
            normalised, or on the 0..255 scale, which would be clamped to almost black or white.
    """
    if img.numel() and not (bool(torch.isfinite(img).all()) and img.min() >= -1e-3 and img.max() <= 1 + 1e-3):
        finite = img[torch.isfinite(img)]
        got = f"range [{finite.min().item():.3g}, {finite.max().item():.3g}]" if finite.numel() else "only NaN/inf"
        raise ValueError(f"floating point images must hold values in [0, 1] (unnormalised); got {got}"
                         + ("" if finite.numel() in (0, img.numel()) else " and NaN/inf"))
    return img.float().mul(255).round_().clamp_(0, 255).to(torch.uint8)


def _mix_seed(*values: int) -> int:
    """Hash integers into a 63-bit seed (splitmix64 finaliser), stable across processes."""
    mask = (1 << 64) - 1
    state = 0x9E3779B97F4A7C15
    for v in values:
        state = (state ^ (int(v) & mask)) * 0xBF58476D1CE4E5B9 & mask
        state ^= state >> 31
        state = (state * 0x94D049BB133111EB) & mask
        state ^= state >> 29
        state = (state + 0x9E3779B97F4A7C15) & mask
    return state >> 1


def resolve_input_config(model: nn.Module) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """Input size and normalisation of a timm model.

    Mean and std come from ``timm.data.resolve_data_config({}, model=model)``. The size is
    the one the model was *built* for: ``model.patch_embed.img_size`` when the model has it
    (``create_model(..., img_size=112)`` changes that but not the pretrained config), else
    the config's ``input_size``.

    Args:
        model: a timm model (anything with a ``pretrained_cfg``; other modules get timm's
            defaults: 224 px, ImageNet mean/std).

    Returns:
        ``(size, mean, std)`` with ``size`` an int and ``mean``/``std`` 3-tuples of floats.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` (a model name, ``None``, an ElasticViT).
        ValueError: if the model's input size is not square.
    """
    from timm.data import resolve_data_config

    if not isinstance(model, nn.Module):
        given = repr(model) if isinstance(model, (str, int, float, type(None))) else type(model).__name__
        hint = ("pass its .model" if isinstance(getattr(model, "model", None), nn.Module)
                else "build one with timm.create_model")
        raise TypeError(f"model must be the timm model (an nn.Module) whose input size and normalisation the "
                        f"images get, got {given}: {hint}")
    cfg = resolve_data_config({}, model=model)
    _, height, width = cfg["input_size"]
    patch_embed = getattr(model, "patch_embed", None)
    built = getattr(patch_embed, "img_size", None)
    if isinstance(built, (tuple, list)) and len(built) == 2 and all(isinstance(v, int) for v in built):
        height, width = built
    elif isinstance(built, int):
        height = width = built
    if height != width:
        raise ValueError(
            f"only square input sizes are supported, the model's input size is {height}x{width}"
        )
    mean = tuple(float(v) for v in cfg["mean"])
    std = tuple(float(v) for v in cfg["std"])
    return int(height), mean, std


def _as_uint8_chw(img: Tensor) -> Tensor:
    """Validate ``[3, H, W]``; float images in [0, 1] are quantised to uint8."""
    if not isinstance(img, Tensor) or img.ndim != 3 or img.shape[0] != 3:
        shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
        raise ValueError(f"expected an image tensor [3, H, W], got {shape}")
    if img.dtype == torch.uint8:
        return img
    if img.is_floating_point():
        return float_image_to_uint8(img)
    raise TypeError(f"expected a uint8 or floating point image tensor, got {img.dtype}")


def _normalize_uint8(img: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``[3, H, W]`` or ``[N, 3, H, W]`` → float ``(x / 255 - mean) / std``."""
    out = img.float()
    shape = (3, 1, 1)
    m = torch.tensor(mean, dtype=out.dtype).view(shape).mul(255.0)
    s = torch.tensor(std, dtype=out.dtype).view(shape).mul(255.0)
    return out.sub_(m).div_(s)


#: Longest aspect ratio :func:`eval_transform` resizes whole (longer ones are cut to their centre first).
_MAX_EVAL_ASPECT = 8


def eval_transform(
    img: Tensor,
    size: int,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    crop_pct: float = 224 / 256,
) -> Tensor:
    """timm-style evaluation view: resize the shorter side, center crop, normalise.

    The shorter side is resized (bilinear, antialiased, torchvision's v2 ``resize`` on ``uint8``)
    to ``floor(size / crop_pct)`` (256 for 224), the longer side rounded to keep the aspect
    ratio, then the central ``size x size`` square is kept (offsets rounded down). An image more
    than :data:`_MAX_EVAL_ASPECT` times longer than wide (or wide than high) is first cut to its
    central part of that aspect ratio, which holds the crop: resizing a 2 x 30000 strip whole would
    take gigabytes.

    Args:
        img: ``uint8`` ``[3, H, W]`` (or float in [0, 1]).
        size: output side length.
        mean: per-channel mean.
        std: per-channel std.
        crop_pct: fraction of the resized shorter side that is kept.

    Returns:
        Float tensor ``[3, size, size]``.

    Raises:
        ValueError: for a bad image shape or values (float outside [0, 1]), ``size`` < 1, ``mean``/``std``
            off the [0, 1] scale or ``crop_pct`` outside (0, 1].
        TypeError: for a non-int ``size`` or an image dtype other than uint8/float.
    """
    size = _check_int("size", size, 1)
    mean, std = _check_triple("mean", mean), _check_triple("std", std, positive=True)
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"`crop_pct` must be in (0, 1], got {crop_pct!r}")
    x = _as_uint8_chw(img)
    h, w = x.shape[-2:]
    if max(h, w) > _MAX_EVAL_ASPECT * min(h, w):  # a long strip: keep its centre, or the resize below takes GBs
        keep = _MAX_EVAL_ASPECT * min(h, w)
        x = x[:, (h - keep) // 2:(h - keep) // 2 + keep, :] if h > w else x[:, :, (w - keep) // 2:(w - keep) // 2 + keep]
        h, w = x.shape[-2:]
    scale = max(size, math.floor(size / crop_pct))
    if h <= w:
        new_h, new_w = scale, max(scale, round(w * scale / h))
    else:
        new_h, new_w = max(scale, round(h * scale / w)), scale
    x = TF.resize(x[None].contiguous(memory_format=torch.channels_last), [new_h, new_w], antialias=True)
    x = TF.crop(x[0], (new_h - size) // 2, (new_w - size) // 2, size, size).contiguous()
    return _normalize_uint8(x, mean, std)


class DINOMultiCrop:
    """DINO multi-crop views, all at the model's input size, without colour jitter.

    Each call returns ``2 + num_local_crops`` independently drawn crops of one image: two
    *global* crops (area fraction in ``global_scale``) followed by ``num_local_crops``
    *local* crops (area fraction in ``local_scale``). Each crop has an aspect ratio drawn
    log-uniformly from ``ratio`` (as ``RandomResizedCrop``), is resized to ``size x size``
    (bilinear, antialiased), flipped horizontally with probability 0.5 (if ``flip``) and
    normalised with ``mean``/``std``. Cropping, resizing and flipping are torchvision's v2
    functional transforms on ``uint8`` tensors (far faster on CPU than float), so views are
    quantised to 8 bits before normalisation; the crop boxes are drawn here, from a seeded
    generator (torchvision's ``RandomResizedCrop`` draws from the global RNG).

    Randomness: a ``torch.Generator`` seeded with a hash of ``(seed, epoch, index)``, so the
    views of an image depend only on those three numbers (not on worker count or order).
    Pass ``generator=`` to ``__call__`` to drive it yourself instead.

    Args:
        size: side length of every view (the model's input size).
        num_local_crops: number of local views.
        global_scale: (lo, hi) area fraction of the global crops.
        local_scale: (lo, hi) area fraction of the local crops.
        ratio: (lo, hi) aspect-ratio range of the crops.
        mean: per-channel mean for normalisation.
        std: per-channel std for normalisation.
        flip: random horizontal flips (p=0.5).
        seed: base seed.
        independent_views: ``True`` (default, the method as described): every view is its own
            crop. ``False`` reproduces the official code, which transforms stacked copies in
            one batch: both global views are the same crop and all local views are one crop.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if an argument is out of range.

    Example:
        >>> t = DINOMultiCrop(size=32, num_local_crops=4)
        >>> t(torch.zeros(3, 64, 80, dtype=torch.uint8), index=0).shape
        torch.Size([6, 3, 32, 32])
    """

    def __init__(
        self,
        size: int,
        num_local_crops: int = 10,
        global_scale: tuple[float, float] = (0.25, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.25),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        flip: bool = True,
        seed: int = 0,
        independent_views: bool = True,
    ) -> None:
        self.size = _check_int("size", size, 1)
        self.num_local_crops = _check_int("num_local_crops", num_local_crops, 0)
        self.global_scale = _check_scale("global_scale", global_scale)
        self.local_scale = _check_scale("local_scale", local_scale)
        self.ratio = _check_ratio("ratio", ratio)
        self.mean = _check_triple("mean", mean)
        self.std = _check_triple("std", std, positive=True)
        if not isinstance(flip, bool):
            raise TypeError(f"`flip` must be a bool, got {flip!r}")
        self.flip = flip
        self.seed = _check_int("seed", seed, -(2**63))
        if not isinstance(independent_views, bool):
            raise TypeError(f"`independent_views` must be a bool, got {independent_views!r}")
        self.independent_views = independent_views

    @property
    def num_views(self) -> int:
        """``2 + num_local_crops``."""
        return 2 + self.num_local_crops

    def generator(self, index: int = 0, epoch: int = 0) -> torch.Generator:
        """The generator used for image ``index`` in ``epoch``."""
        return torch.Generator().manual_seed(_mix_seed(self.seed, epoch, index))

    def crop_params(
        self, height: int, width: int, scale: tuple[float, float], generator: torch.Generator
    ) -> tuple[int, int, int, int]:
        """Draw a crop box like ``RandomResizedCrop.get_params``.

        Returns:
            ``(top, left, h, w)``.
        """
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
            target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
            aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                return top, left, h, w
        # fallback: central crop with the aspect ratio clamped to the range
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        h, w = max(1, min(h, height)), max(1, min(w, width))
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(
        self, img: Tensor, index: int = 0, epoch: int = 0, generator: torch.Generator | None = None
    ) -> Tensor:
        """Build the views of one image.

        Args:
            img: ``uint8`` ``[3, H, W]`` (or float in [0, 1]).
            index: the image's index in the calibration set (seeds the crops).
            epoch: the epoch (seeds the crops).
            generator: if given, used instead of the ``(seed, epoch, index)`` generator.

        Returns:
            Float tensor ``[2 + num_local_crops, 3, size, size]``: global views first.

        Raises:
            ValueError: if ``img`` is not ``[3, H, W]``.
            TypeError: if ``img`` has an unsupported dtype.
        """
        # Work in uint8, channels-last: the antialiased bilinear kernel torchvision calls is
        # ~100x faster there than on strided float crops; the only float pass is the normalisation.
        x = _as_uint8_chw(img)[None].contiguous(memory_format=torch.channels_last)
        gen = generator if generator is not None else self.generator(index, epoch)
        height, width = x.shape[-2:]
        scales = [self.global_scale] * 2 + [self.local_scale] * self.num_local_crops
        out = torch.empty(len(scales), 3, self.size, self.size, dtype=torch.uint8)
        for k, scale in enumerate(scales):
            if not self.independent_views and k not in (0, 2):
                out[k] = out[0] if k < 2 else out[2]  # official behaviour: repeated crops
                continue
            top, left, h, w = self.crop_params(height, width, scale, gen)
            view = TF.resized_crop(x, top, left, h, w, [self.size, self.size], antialias=True)
            if self.flip and bool(torch.rand(1, generator=gen) < 0.5):
                view = TF.horizontal_flip(view)
            out[k] = view[0]
        return _normalize_uint8(out, self.mean, self.std)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, num_local_crops={self.num_local_crops}, "
            f"global_scale={self.global_scale}, local_scale={self.local_scale}, ratio={self.ratio}, "
            f"mean={self.mean}, std={self.std}, flip={self.flip}, seed={self.seed}, "
            f"independent_views={self.independent_views})"
        )


def stats_crops(
    images: Sequence[Tensor],
    size: int,
    count: int,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    seed: int = 0,
    flip: bool = True,
) -> Tensor:
    """``count`` random resized crops of every image, for the correction statistics.

    Each crop covers an area fraction in :data:`STATS_CROP_SCALE` with an aspect ratio in
    [3/4, 4/3], is resized to ``size x size``, flipped with probability 0.5 (if ``flip``) and
    normalised: :class:`DINOMultiCrop`'s global crops at that scale. The crops of image ``i``
    come from a generator seeded with ``(seed, i)`` alone.

    Args:
        images: ``uint8`` ``[3, H, W]`` images (or float in [0, 1]).
        size: Side length of every crop.
        count: Crops per image (``>= 0``).
        mean: Per-channel mean for normalisation.
        std: Per-channel std for normalisation.
        seed: Base seed.
        flip: Random horizontal flips.

    Returns:
        Float ``[len(images) * count, 3, size, size]``: image 0's crops first.
    """
    count = _check_int("count", count, 0)
    crop = DINOMultiCrop(size, num_local_crops=max(0, count - 2), global_scale=STATS_CROP_SCALE,
                         local_scale=STATS_CROP_SCALE, mean=mean, std=std, flip=flip, seed=seed)
    if not count or not len(images):
        return torch.empty(0, 3, size, size)
    # One multi-crop call per image: its global and local scales are the same, so its views are
    # count independent crops at STATS_CROP_SCALE (two at least; the extra one is dropped).
    return torch.cat([crop(img, generator=torch.Generator().manual_seed(_mix_seed(seed, i, 0x5747)))[:count]
                      for i, img in enumerate(images)])
