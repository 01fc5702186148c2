"""Calibration data: DINO multi-crop views of a small set of unlabeled images.

The SnapViT scores (method step 1) need, for every calibration image, two *global* crops and
``N`` *local* crops, all resized to the model's input size and normalised with the model's
mean/std, with no colour jitter. The search (step 2) needs a separate, fixed set of
"fitness" images, resized and center-cropped the way timm evaluates.

Images are decoded once (PIL → RGB → ``uint8`` tensor, shorter side bounded by ``max_side``)
and kept in memory; crops are cut from those tensors, so an epoch costs no JPEG decoding.

Reproducibility: the crops of calibration image ``i`` are drawn from a ``torch.Generator``
seeded with a hash of ``(seed, epoch, i)`` where ``i`` is the image's position in the
(deterministically ordered) calibration set. The views therefore do not depend on the number
of dataloader workers, on the batch size, on the number of DDP ranks, or on iteration order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image, ImageOps
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, Sampler, SequentialSampler
from typing_extensions import override

__all__ = [
    "IMG_EXTENSIONS",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "SKIMAGE_PHOTOS",
    "CalibrationDataModule",
    "DINOMultiCrop",
    "DatasetSource",
    "ImageFolderSource",
    "ImageSource",
    "MultiCropDataset",
    "ResumableBatchSampler",
    "ResumableDataLoader",
    "SkimagePhotosSource",
    "UnreadableImageError",
    "eval_transform",
    "find_images",
    "load_eval_images",
    "load_image",
    "resolve_input_config",
    "to_uint8_image",
]

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_DEFAULT_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Real photographs shipped inside scikit-image (no download needed). Grayscale ones are
#: stacked to three channels. ``cat`` is the same picture as ``chelsea`` and is left out.
SKIMAGE_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "camera",
    "coins",
    "moon",
    "clock",
    "grass",
    "gravel",
    "brick",
)

_MAX_NAMED_SKIPS = 10


class UnreadableImageError(ValueError):
    """An image file (or dataset item) could not be decoded."""


# --------------------------------------------------------------------------------------
# argument checks


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
    if positive and min(out) <= 0:
        raise ValueError(f"`{name}` values must be > 0, got {value!r}")
    return out  # type: ignore[return-value]


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


# --------------------------------------------------------------------------------------
# model input configuration


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
        ValueError: if the model's input size is not square.
    """
    from timm.data import resolve_data_config

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


# --------------------------------------------------------------------------------------
# image decoding / conversion


def _resize_short_side_uint8(img: Tensor, max_side: int | None) -> Tensor:
    if max_side is None or min(img.shape[-2:]) <= max_side:
        return img.contiguous()
    h, w = img.shape[-2:]
    short = min(h, w)
    new_h = max(1, round(h * max_side / short))
    new_w = max(1, round(w * max_side / short))
    x = img[None].contiguous(memory_format=torch.channels_last)
    out = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    return out[0].contiguous()


def _pil_to_uint8(im: Image.Image, max_side: int | None) -> Tensor:
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    im = im.convert("RGB")
    if max_side is not None and min(im.size) > max_side:
        w, h = im.size
        short = min(w, h)
        size = (max(1, round(w * max_side / short)), max(1, round(h * max_side / short)))
        im = im.resize(size, Image.Resampling.BILINEAR)
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def load_image(path: str | Path, max_side: int | None = None) -> Tensor:
    """Decode an image file to an RGB ``uint8`` tensor ``[3, H, W]``.

    Transparent pixels are composited on white, EXIF orientation is applied, and the image is
    downscaled (bilinear, antialiased) so that its shorter side is at most ``max_side``.

    Args:
        path: the image file.
        max_side: upper bound on the shorter side; ``None`` keeps the full resolution.

    Returns:
        The decoded image.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        UnreadableImageError: (a ``ValueError``) if the file cannot be decoded; the message
            names the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: '{path}'")
    try:
        with Image.open(path) as im:
            if max_side is not None and im.format == "JPEG":
                w, h = im.size
                short = min(w, h)
                if short > max_side:  # let libjpeg decode at a reduced scale (>= requested)
                    im.draft("RGB", (math.ceil(w * max_side / short), math.ceil(h * max_side / short)))
            im.load()
            return _pil_to_uint8(im, max_side)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UnreadableImageError(f"cannot read image file '{path}': {err}") from err


def to_uint8_image(image: Any, max_side: int | None = None) -> Tensor:
    """Convert an image object to an RGB ``uint8`` tensor ``[3, H, W]``.

    Accepted: a PIL image (any mode); a tensor ``[3, H, W]``, ``[1, H, W]`` or ``[H, W]``
    (``uint8`` in 0..255, or floating point in [0, 1]); a numpy array ``[H, W, C]`` or
    ``[H, W]`` with C in {1, 3, 4} (``uint8``, ``bool`` or float in [0, 1]; alpha dropped).

    Args:
        image: the image.
        max_side: upper bound on the shorter side after conversion; ``None`` keeps it.

    Returns:
        The image as a contiguous ``uint8`` tensor.

    Raises:
        TypeError: for an unsupported type or dtype.
        ValueError: for an unsupported shape, or float values outside [0, 1] (e.g. an image
            that was already normalised).
    """
    if isinstance(image, Image.Image):
        return _pil_to_uint8(image, max_side)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise ValueError(f"numpy images must be [H, W] or [H, W, C] with C in 1/3/4, got shape {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(arr[:, :, :3])).permute(2, 0, 1)
    elif isinstance(image, Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim == 2:
            tensor = tensor[None]
        if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
            raise ValueError(
                f"tensor images must be [3, H, W], [1, H, W] or [H, W], got shape {tuple(image.shape)}"
            )
    else:
        raise TypeError(
            f"unsupported image type {type(image).__name__}: expected a PIL image, a tensor or a numpy array"
        )
    if tensor.dtype == torch.bool:
        tensor = tensor.to(torch.uint8) * 255
    elif tensor.is_floating_point():
        if tensor.numel() and (tensor.min() < -1e-3 or tensor.max() > 1 + 1e-3):
            raise ValueError(
                "floating point images must hold values in [0, 1] (unnormalised); got range "
                f"[{tensor.min().item():.3g}, {tensor.max().item():.3g}]"
            )
        tensor = (tensor.float() * 255).round_().clamp_(0, 255).to(torch.uint8)
    elif tensor.dtype != torch.uint8:
        raise TypeError(f"integer images must be uint8, got {tensor.dtype}")
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return _resize_short_side_uint8(tensor, max_side)


def _as_uint8_chw(img: Tensor) -> Tensor:
    """Validate ``[3, H, W]``; float images in [0, 1] are quantised to uint8."""
    if not isinstance(img, Tensor) or img.ndim != 3 or img.shape[0] != 3:
        shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
        raise ValueError(f"expected an image tensor [3, H, W], got {shape}")
    if img.dtype == torch.uint8:
        return img
    if img.is_floating_point():
        return img.float().mul(255).round_().clamp_(0, 255).to(torch.uint8)
    raise TypeError(f"expected a uint8 or floating point image tensor, got {img.dtype}")


def _normalize_uint8(img: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``[3, H, W]`` or ``[N, 3, H, W]`` → float ``(x / 255 - mean) / std``."""
    out = img.float()
    shape = (3, 1, 1)
    m = torch.tensor(mean, dtype=out.dtype).view(shape).mul(255.0)
    s = torch.tensor(std, dtype=out.dtype).view(shape).mul(255.0)
    return out.sub_(m).div_(s)


def eval_transform(
    img: Tensor,
    size: int,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    crop_pct: float = 224 / 256,
) -> Tensor:
    """timm-style evaluation view: resize the shorter side, center crop, normalise.

    The shorter side is resized (bilinear, antialiased) to ``floor(size / crop_pct)``
    (256 for 224), then the central ``size x size`` square is kept.

    Args:
        img: ``uint8`` ``[3, H, W]`` (or float in [0, 1]).
        size: output side length.
        mean: per-channel mean.
        std: per-channel std.
        crop_pct: fraction of the resized shorter side that is kept.

    Returns:
        Float tensor ``[3, size, size]``.

    Raises:
        ValueError: for a bad image shape or ``crop_pct`` outside (0, 1].
    """
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"`crop_pct` must be in (0, 1], got {crop_pct!r}")
    x = _as_uint8_chw(img)
    h, w = x.shape[-2:]
    scale = max(size, math.floor(size / crop_pct))
    if h <= w:
        new_h, new_w = scale, max(scale, round(w * scale / h))
    else:
        new_h, new_w = max(scale, round(h * scale / w)), scale
    x = x[None].contiguous(memory_format=torch.channels_last)
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]
    top = (new_h - size) // 2
    left = (new_w - size) // 2
    x = x[:, top : top + size, left : left + size].contiguous()
    return _normalize_uint8(x, mean, std)


# --------------------------------------------------------------------------------------
# multi-crop transform


class DINOMultiCrop:
    """DINO multi-crop views, all at the model's input size, without colour jitter.

    Each call returns ``2 + num_local_crops`` independently drawn crops of one image: two
    *global* crops (area fraction in ``global_scale``) followed by ``num_local_crops``
    *local* crops (area fraction in ``local_scale``). Each crop has an aspect ratio drawn
    log-uniformly from ``ratio`` (as ``RandomResizedCrop``), is resized to ``size x size``
    (bilinear, antialiased), flipped horizontally with probability 0.5 (if ``flip``) and
    normalised with ``mean``/``std``. Cropping and resizing run on ``uint8`` tensors (as
    torchvision's v2 transforms do; far faster on CPU than float), so views are quantised to
    8 bits before normalisation.

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
        # Work in uint8, channels-last: torch's antialiased bilinear kernel is ~100x faster
        # there than on strided float crops; the only float pass is the final normalisation.
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
            crop = x[:, :, top : top + h, left : left + w]
            view = F.interpolate(crop, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
            if self.flip and bool(torch.rand(1, generator=gen) < 0.5):
                view = view.flip(-1)
            out[k] = view[0]
        return _normalize_uint8(out, self.mean, self.std)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, num_local_crops={self.num_local_crops}, "
            f"global_scale={self.global_scale}, local_scale={self.local_scale}, ratio={self.ratio}, "
            f"mean={self.mean}, std={self.std}, flip={self.flip}, seed={self.seed}, "
            f"independent_views={self.independent_views})"
        )


# --------------------------------------------------------------------------------------
# image sources


def find_images(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """List the images under ``root`` in a deterministic order.

    ImageFolder layout (no images directly in ``root``, images in its subfolders): every
    non-hidden subfolder that contains images (at any depth) is a class; classes are sorted
    by name and labels are their indices. Otherwise (flat or mixed folder) every image found
    recursively gets label -1. Files are matched by extension (``IMG_EXTENSIONS``, case
    insensitive); hidden files and folders (name starting with ``.``) are ignored. ``root``
    may also be a single image file (label -1).

    Args:
        root: a folder, or one image file.

    Returns:
        ``(files, labels, classes)``; files sorted by relative path.

    Raises:
        FileNotFoundError: if ``root`` does not exist.
        ValueError: if ``root`` holds no image files.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: '{root}'")
    if root.is_file():
        return [root], [-1], []

    def visible(p: Path) -> bool:
        return not any(part.startswith(".") for part in p.relative_to(root).parts)

    def is_image(p: Path) -> bool:
        return p.suffix.lower() in IMG_EXTENSIONS and p.is_file() and visible(p)

    files = sorted((p for p in root.rglob("*") if is_image(p)), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ValueError(f"no image files ({', '.join(IMG_EXTENSIONS)}) found in '{root}'")
    top_level = [p for p in files if p.parent == root]
    if top_level:
        return files, [-1] * len(files), []
    classes = sorted({p.relative_to(root).parts[0] for p in files})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[p.relative_to(root).parts[0]] for p in files]
    return files, labels, classes


def load_eval_images(folder: str | Path, model: nn.Module) -> tuple[Tensor, Tensor, list[str]]:
    """Eval views ``[N, 3, S, S]`` of every image under ``folder`` at ``model``'s input config.

    Returns the views, the ImageFolder labels ``[N]`` (``-1`` for a flat folder, see
    :func:`find_images`) and the class names.

    Raises:
        FileNotFoundError, ValueError: See :func:`find_images` and :func:`load_image`.
    """
    size, mean, std = resolve_input_config(model)
    files, labels, classes = find_images(folder)
    views = [eval_transform(load_image(f, max_side=2 * size), size, mean, std) for f in files]
    return torch.stack(views), torch.tensor(labels, dtype=torch.long), classes


class ImageSource:
    """A finite, indexable collection of images that are decoded on demand.

    Subclasses implement ``__len__``, ``load`` and ``name``.
    """

    #: class names (index = label), empty when unlabeled.
    classes: list[str]
    #: a human-readable description used in error messages.
    description: str
    #: whether a decoding failure of single items may be skipped with a warning.
    skippable: bool = False

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int, max_side: int | None = None) -> tuple[Tensor, int]:
        """Decode item ``index`` → (``uint8`` ``[3, H, W]``, label)."""
        raise NotImplementedError

    def name(self, index: int) -> str:
        """A name for item ``index`` in messages."""
        return f"{self.description}[{index}]"


class ImageFolderSource(ImageSource):
    """Images in a folder (ImageFolder layout or flat), or one image file.

    See :func:`find_images` for the layout rules and labels.

    Args:
        root: the folder, or one image file.

    Raises:
        FileNotFoundError: if ``root`` does not exist.
        ValueError: if ``root`` holds no image files.
    """

    skippable = True

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.files, self.labels, self.classes = find_images(self.root)
        self.description = f"'{self.root}'"
        # an explicitly named single file must be readable: no skipping
        self.skippable = not self.root.is_file()

    def __len__(self) -> int:
        return len(self.files)

    @override
    def load(self, index: int, max_side: int | None = None) -> tuple[Tensor, int]:
        return load_image(self.files[index], max_side), self.labels[index]

    @override
    def name(self, index: int) -> str:
        return str(self.files[index])


def _label_to_int(label: Any, where: str) -> int:
    if isinstance(label, Tensor):
        if label.numel() != 1:
            raise TypeError(f"{where}: label must be a scalar, got a tensor of shape {tuple(label.shape)}")
        label = label.item()
    if isinstance(label, (bool, float)) or not isinstance(label, (int, np.integer)):
        raise TypeError(f"{where}: label must be an int, got {label!r}")
    return int(label)


class DatasetSource(ImageSource):
    """A map-style dataset yielding images or ``(image, label)`` pairs.

    Images may be PIL images, tensors or numpy arrays (see :func:`to_uint8_image`). Items
    without a label get -1.

    Args:
        dataset: a map-style ``torch.utils.data.Dataset`` (or any sequence) with ``__len__``.

    Raises:
        TypeError: if ``dataset`` is iterable-only or has no ``__len__``/``__getitem__``.
    """

    def __init__(self, dataset: Dataset | Sequence[Any]) -> None:
        if isinstance(dataset, IterableDataset) or not (
            hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
        ):
            raise TypeError(
                f"`dataset` must be a map-style Dataset with __len__ and __getitem__, got {type(dataset).__name__}"
            )
        self.dataset = dataset
        self.classes = list(getattr(dataset, "classes", []) or [])
        self.description = f"dataset {type(dataset).__name__}"

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    @override
    def load(self, index: int, max_side: int | None = None) -> tuple[Tensor, int]:
        item = self.dataset[index]
        where = f"{self.description} item {index}"
        label = -1
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise TypeError(f"{where}: expected an image or an (image, label) pair, got {len(item)} values")
            item, label = item[0], _label_to_int(item[1], where)
        try:
            return to_uint8_image(item, max_side), label
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from err


class SkimagePhotosSource(ImageSource):
    """The real photographs shipped with scikit-image (label -1); the default source.

    Args:
        names: ``skimage.data`` function names; photos missing from the installed version
            are left out.

    Raises:
        ImportError: if scikit-image is not installed.
        ValueError: if none of the photos is available.
    """

    skippable = True

    def __init__(self, names: Sequence[str] = SKIMAGE_PHOTOS) -> None:
        try:
            import skimage.data as skdata
        except ImportError as err:
            raise ImportError(
                "the built-in calibration images come from scikit-image: `pip install scikit-image`, "
                "or pass `data_dir=` (a folder of images) or `dataset=`"
            ) from err
        self._skdata = skdata
        self.names = [n for n in names if callable(getattr(skdata, n, None))]
        if not self.names:
            raise ValueError(f"none of the scikit-image photos {tuple(names)} is available")
        self.classes = []
        self.description = "scikit-image photos"

    def __len__(self) -> int:
        return len(self.names)

    @override
    def load(self, index: int, max_side: int | None = None) -> tuple[Tensor, int]:
        try:
            arr = getattr(self._skdata, self.names[index])()
        except Exception as err:  # e.g. a file that needs pooch to download
            raise UnreadableImageError(f"cannot load skimage.data.{self.names[index]}(): {err}") from err
        return to_uint8_image(arr, max_side), -1

    @override
    def name(self, index: int) -> str:
        return f"skimage.data.{self.names[index]}"


def _decode(
    source: ImageSource,
    order: Sequence[int],
    want: int | None,
    max_side: int | None,
    skipped: list[tuple[str, str]],
) -> tuple[list[int], list[Tensor], list[int], int]:
    """Decode items of ``source`` in ``order`` until ``want`` succeeded (all if None).

    Returns:
        (indices, images, labels, number of positions of ``order`` consumed)
    """
    indices: list[int] = []
    images: list[Tensor] = []
    labels: list[int] = []
    pos = 0
    for pos_, i in enumerate(order):
        pos = pos_ + 1
        try:
            img, label = source.load(i, max_side)
        except UnreadableImageError as err:
            if not source.skippable:
                raise
            skipped.append((source.name(i), str(err.__cause__ or err)))
            continue
        indices.append(i)
        images.append(img)
        labels.append(label)
        if want is not None and len(indices) >= want:
            break
    return indices, images, labels, pos


def _sorted_by_index(indices: list[int], images: list[Tensor], labels: list[int]) -> tuple[list[Tensor], list[int]]:
    order = sorted(range(len(indices)), key=indices.__getitem__)
    return [images[k] for k in order], [labels[k] for k in order]


def _report_skips(source: ImageSource, skipped: list[tuple[str, str]], attempted: int) -> None:
    if not skipped:
        return
    for name, reason in skipped[:_MAX_NAMED_SKIPS]:
        rank_zero_warn(f"skipping unreadable image '{name}': {reason}", category=UserWarning)
    more = len(skipped) - _MAX_NAMED_SKIPS
    tail = f" (and {more} more)" if more > 0 else ""
    rank_zero_warn(
        f"skipped {len(skipped)} of {attempted} files in {source.description} that could not be read{tail}",
        category=UserWarning,
    )


def _no_readable(source: ImageSource, skipped: list[tuple[str, str]]) -> ValueError:
    first = f" (e.g. '{skipped[0][0]}': {skipped[0][1]})" if skipped else ""
    return ValueError(f"no readable images in {source.description}{first}")


# --------------------------------------------------------------------------------------
# datasets


class MultiCropDataset(Dataset):
    """Decoded images → ``(views [2+N, 3, S, S], label)``.

    The crops of item ``i`` are seeded by ``(transform.seed, epoch, i)``; set ``epoch`` (or
    :meth:`CalibrationDataModule.set_epoch`) to get new crops in a later epoch.

    Args:
        images: ``uint8`` ``[3, H, W]`` tensors.
        labels: one int per image (-1 = unlabeled).
        transform: the multi-crop transform.

    Raises:
        ValueError: if ``images`` and ``labels`` differ in length.
    """

    def __init__(self, images: Sequence[Tensor], labels: Sequence[int], transform: DINOMultiCrop) -> None:
        if len(images) != len(labels):
            raise ValueError(f"got {len(images)} images but {len(labels)} labels")
        self.images = list(images)
        self.labels = [int(v) for v in labels]
        self.transform = transform
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(self.images[index], index=index, epoch=self.epoch), self.labels[index]


# --------------------------------------------------------------------------------------
# resumable loading


class ResumableBatchSampler(BatchSampler):
    """A :class:`~torch.utils.data.BatchSampler` whose next pass can start after ``skip`` batches.

    Skipping happens on indices only (no image is loaded or cropped for a skipped batch) and
    applies to one pass: ``skip`` is reset to 0 when the pass starts. Lightning re-creates it
    around a ``DistributedSampler`` under DDP (same ``(sampler, batch_size, drop_last)``
    arguments), so the skip then counts the rank's own batches.

    Args:
        sampler: the index sampler.
        batch_size: indices per batch.
        drop_last: drop the last incomplete batch.
    """

    def __init__(self, sampler: Sampler[int] | Iterable[int], batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield batch


class ResumableDataLoader(DataLoader):
    """A :class:`~torch.utils.data.DataLoader` that Lightning can resume in the middle of an epoch.

    Lightning (2.x) stores ``state_dict()`` of every train dataloader that has
    ``state_dict``/``load_state_dict`` in the checkpoint's loop state and, on
    ``trainer.fit(..., ckpt_path=...)``, calls ``load_state_dict`` before the first ``iter()``;
    its batch progress continues from the restored ``batch_idx``. The state is the number of
    batches this loader has yielded in the current pass (counted in the main process, after
    worker prefetching, so it equals the steps Lightning has taken for a sized loader). After
    ``load_state_dict`` the next pass starts after those batches: at the index level with a
    :class:`ResumableBatchSampler`, otherwise by loading and dropping them. ``len()`` stays the
    full length, as Lightning expects.
    """

    _served: int = 0
    _resume_at: int = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        start, self._resume_at = self._resume_at, 0
        skip_here = start
        if start and isinstance(self.batch_sampler, ResumableBatchSampler):
            self.batch_sampler.skip, skip_here = start, 0
        self._served = start
        for i, batch in enumerate(super().__iter__()):
            if i < skip_here:
                continue
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"batches": yielded in this pass, "num_samples": dataset length}`` (plain ints)."""
        return {"batches": int(self._served), "num_samples": len(self.dataset)}  # type: ignore[arg-type]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Start the next pass after ``state_dict["batches"]`` batches.

        Raises:
            ValueError: if the saved dataset length differs from this loader's, or the batch
                count is negative or beyond the loader's length.
        """
        batches = int(state_dict.get("batches", 0))
        saved = state_dict.get("num_samples")
        current = len(self.dataset)  # type: ignore[arg-type]
        if saved is not None and int(saved) != current:
            raise ValueError(
                f"the checkpoint's dataloader state was saved with num_samples={int(saved)}, but this "
                f"loader's dataset has {current} samples: resume with the same calibration data"
            )
        if not 0 <= batches <= len(self):
            raise ValueError(f"dataloader state batches={batches} is outside [0, {len(self)}]")
        self._resume_at = batches


# --------------------------------------------------------------------------------------
# data module


class CalibrationDataModule(LightningDataModule):
    """Unlabeled calibration images as DINO multi-crops, plus fixed fitness images.

    Sources (at most one of ``data_dir``/``dataset``): a folder (ImageFolder layout →
    labels from class folders, flat → -1) or a single image file; a map-style ``Dataset``
    of images or ``(image, label)`` pairs; or, when neither is given, the photos shipped with
    scikit-image (needs ``scikit-image``).

    Every image is decoded once and cached in memory as ``uint8`` with its shorter side at
    most ``max_side`` (default ``2 * img_size``). Unreadable files inside a folder are skipped
    with a warning naming each (and a final "skipped K of N files" warning); another image is
    decoded in its place when ``max_samples`` leaves some unused.

    Selection (deterministic from ``seed``): the pool is shuffled with ``seed``; the first
    ``holdout`` readable images are the fitness images, the next ``max_samples`` (or all)
    readable ones are the calibration images. Both sets keep the source's order.

    Fitness images (for the search) are, by priority: ``fitness_data_dir`` (all its images),
    else the ``holdout`` images, else (``holdout=0``) **the calibration images themselves**.
    They are returned by :meth:`fitness_images` as timm-style eval views (shorter side to
    ``floor(S * 256 / 224)``, center crop ``S``, normalised).

    Size and normalisation come from the model via :meth:`configure_from_model` (the
    LightningModule or callback calls it) unless ``img_size``/``mean``/``std`` are given
    (explicit values win). Images are decoded lazily, at the first :meth:`train_dataloader`
    / :meth:`fitness_images` call, because ``setup`` runs before the LightningModule's.

    Batches are ``(views [B, 2+N, 3, S, S], labels [B])``. The loader does not shuffle and
    keeps Lightning's default distributed sampler, so under DDP each rank sees a disjoint
    share (``DistributedSampler`` repeats a few images to even out the shares when the set
    size is not a multiple of the world size).

    Args:
        data_dir: folder (or image file) of calibration images.
        dataset: map-style dataset of calibration images.
        max_samples: number of calibration images to use (a seeded subset); ``None`` = all.
        batch_size: images per batch.
        num_workers: dataloader workers.
        num_local_crops: local views per image (the reference uses 10).
        global_scale: area-fraction range of the 2 global crops.
        local_scale: area-fraction range of the local crops.
        img_size: view size; ``None`` = the model's input size.
        seed: seeds the selection and the crops.
        holdout: images held out of calibration for the fitness set: a count (int >= 0) or a
            fraction of the pool (float in [0, 1)).
        fitness_data_dir: a separate folder of fitness images (excludes ``holdout``).
        mean: normalisation mean; ``None`` = the model's (ImageNet's without a model).
        std: normalisation std; ``None`` = the model's (ImageNet's without a model).
        max_side: bound on the cached images' shorter side; ``None`` = ``2 * img_size``.
        flip: random horizontal flips of the views.
        independent_views: every view its own crop (default); ``False`` repeats one global and
            one local crop as the official code does (see :class:`DINOMultiCrop`).

    Raises:
        ValueError: if both ``data_dir`` and ``dataset`` (or both ``holdout`` and
            ``fitness_data_dir``) are given, or an argument is out of range.
        TypeError: if an argument has the wrong type.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        dataset: Dataset | None = None,
        max_samples: int | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        num_local_crops: int = 10,
        global_scale: tuple[float, float] = (0.25, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.25),
        img_size: int | None = None,
        seed: int = 0,
        holdout: int | float = 0,
        fitness_data_dir: str | Path | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        max_side: int | None = None,
        flip: bool = True,
        independent_views: bool = True,
    ) -> None:
        super().__init__()
        if data_dir is not None and dataset is not None:
            raise ValueError(
                f"pass either `data_dir` or `dataset`, not both (got data_dir={str(data_dir)!r} "
                f"and dataset={type(dataset).__name__})"
            )
        if data_dir is not None and not isinstance(data_dir, (str, Path)):
            raise TypeError(f"`data_dir` must be a path, got {data_dir!r}")
        if fitness_data_dir is not None and not isinstance(fitness_data_dir, (str, Path)):
            raise TypeError(f"`fitness_data_dir` must be a path, got {fitness_data_dir!r}")
        if dataset is not None:
            DatasetSource(dataset)  # type check only
        self.max_samples = None if max_samples is None else _check_int("max_samples", max_samples, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.num_workers = _check_int("num_workers", num_workers, 0)
        self.num_local_crops = _check_int("num_local_crops", num_local_crops, 0)
        self.global_scale = _check_scale("global_scale", global_scale)
        self.local_scale = _check_scale("local_scale", local_scale)
        self.img_size = None if img_size is None else _check_int("img_size", img_size, 1)
        self.seed = _check_int("seed", seed, -(2**63))
        if isinstance(holdout, bool) or not isinstance(holdout, (int, float, np.integer, np.floating)):
            raise TypeError(f"`holdout` must be an int (count) or a float (fraction), got {holdout!r}")
        if isinstance(holdout, (float, np.floating)):
            if not 0.0 <= holdout < 1.0:
                raise ValueError(f"`holdout` as a fraction must be in [0, 1), got {holdout!r}")
            holdout = float(holdout)
        elif holdout < 0:
            raise ValueError(f"`holdout` as a count must be >= 0, got {holdout!r}")
        else:
            holdout = int(holdout)
        if holdout and fitness_data_dir is not None:
            raise ValueError(
                f"pass either `holdout` or `fitness_data_dir`, not both (got holdout={holdout!r} "
                f"and fitness_data_dir={str(fitness_data_dir)!r})"
            )
        self.holdout = holdout
        self.mean = None if mean is None else _check_triple("mean", mean)
        self.std = None if std is None else _check_triple("std", std, positive=True)
        self.max_side = None if max_side is None else _check_int("max_side", max_side, 1)
        if not isinstance(flip, bool):
            raise TypeError(f"`flip` must be a bool, got {flip!r}")
        self.flip = flip
        if not isinstance(independent_views, bool):
            raise TypeError(f"`independent_views` must be a bool, got {independent_views!r}")
        self.independent_views = independent_views
        self.data_dir = None if data_dir is None else Path(data_dir)
        self.fitness_data_dir = None if fitness_data_dir is None else Path(fitness_data_dir)
        self.dataset = dataset
        self.save_hyperparameters(ignore=["dataset"])

        self._model_cfg: tuple[int, tuple[float, ...], tuple[float, ...]] | None = None
        self._source: ImageSource | None = None
        self._fitness_source: ImageSource | None = None
        self._decoded_side: int | None = None
        self._cal_images: list[Tensor] = []
        self._cal_labels: list[int] = []
        self._fit_images: list[Tensor] | None = None  # None: use the calibration images
        self._fit_labels: list[int] | None = None
        self._train_dataset: MultiCropDataset | None = None
        self._eval_cache: dict[str, tuple[tuple[Any, ...], Tensor]] = {}
        self._epoch = 0

    # ---------------------------------------------------------------- configuration

    def configure_from_model(self, model: nn.Module) -> None:
        """Take the view size and mean/std from a timm model (explicit arguments win).

        Args:
            model: the timm model to be pruned.

        Raises:
            ValueError: if the model's input size is not square.
        """
        self._model_cfg = resolve_input_config(model)
        self._train_dataset = None
        self._eval_cache.clear()

    @property
    def size(self) -> int:
        """The view size ``S``.

        Raises:
            RuntimeError: if neither ``img_size`` nor a model configuration is known.
        """
        if self.img_size is not None:
            return self.img_size
        if self._model_cfg is None:
            raise RuntimeError(
                "the image size is unknown: pass `img_size=` or call `configure_from_model(model)` first"
            )
        return self._model_cfg[0]

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` in use."""
        cfg_mean, cfg_std = (self._model_cfg[1], self._model_cfg[2]) if self._model_cfg else (None, None)
        mean = self.mean or cfg_mean or IMAGENET_DEFAULT_MEAN
        std = self.std or cfg_std or IMAGENET_DEFAULT_STD
        return tuple(mean), tuple(std)

    @property
    def num_views(self) -> int:
        """Views per image, ``2 + num_local_crops``."""
        return 2 + self.num_local_crops

    def set_epoch(self, epoch: int) -> None:
        """Draw the crops of ``epoch`` (default 0) from now on."""
        self._epoch = _check_int("epoch", epoch, 0)
        if self._train_dataset is not None:
            self._train_dataset.epoch = self._epoch

    # ---------------------------------------------------------------- setup / decoding

    @override
    def setup(self, stage: str | None = None) -> None:
        """List the sources (fails early on bad paths); decode if the size is known.

        Raises:
            FileNotFoundError: if a folder does not exist.
            ValueError: if a folder has no images, or ``holdout`` leaves no calibration images.
            ImportError: if no source is given and scikit-image is missing.
        """
        if self._source is None:
            if self.data_dir is not None:
                self._source = ImageFolderSource(self.data_dir)
            elif self.dataset is not None:
                self._source = DatasetSource(self.dataset)
            else:
                self._source = SkimagePhotosSource()
            n = len(self._source)
            if n == 0:
                raise ValueError(f"{self._source.description} is empty")
            if self._holdout_count(n) >= n:
                raise ValueError(
                    f"`holdout`={self.holdout!r} leaves no calibration images out of {n} in {self._source.description}"
                )
        if self._fitness_source is None and self.fitness_data_dir is not None:
            self._fitness_source = ImageFolderSource(self.fitness_data_dir)
        if self.img_size is not None or self.max_side is not None or self._model_cfg is not None:
            self._ensure_decoded()

    def _holdout_count(self, n: int) -> int:
        if isinstance(self.holdout, float):
            return max(1, round(self.holdout * n)) if self.holdout > 0 else 0
        return self.holdout

    def _target_side(self) -> int:
        return self.max_side if self.max_side is not None else 2 * self.size

    def _ensure_decoded(self) -> None:
        if self._source is None:
            self.setup("fit")
        side = self._target_side()
        if self._decoded_side == side:
            return
        source = self._source
        if source is None:  # pragma: no cover - setup() always sets it
            raise RuntimeError("no image source: call setup() first")
        n = len(source)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_mix_seed(self.seed, n))).tolist()
        n_hold = self._holdout_count(n)
        skipped: list[tuple[str, str]] = []
        fit_idx, fit_imgs, fit_lbls, used = _decode(source, order, n_hold, side, skipped) if n_hold else ([], [], [], 0)
        cal_idx, cal_imgs, cal_lbls, used2 = _decode(source, order[used:], self.max_samples, side, skipped)
        _report_skips(source, skipped, used + used2)
        if not cal_idx:
            if not fit_idx:
                raise _no_readable(source, skipped)
            raise ValueError(
                f"`holdout`={self.holdout!r} leaves no readable calibration images in {source.description}"
            )
        if n_hold and len(fit_idx) < n_hold:
            rank_zero_warn(f"only {len(fit_idx)} of the requested {n_hold} holdout images could be read")
        self._cal_images, self._cal_labels = _sorted_by_index(cal_idx, cal_imgs, cal_lbls)
        if n_hold:
            self._fit_images, self._fit_labels = _sorted_by_index(fit_idx, fit_imgs, fit_lbls)
        elif self._fitness_source is not None:
            fsrc = self._fitness_source
            fskipped: list[tuple[str, str]] = []
            f_idx, f_imgs, f_lbls, f_used = _decode(fsrc, range(len(fsrc)), None, side, fskipped)
            _report_skips(fsrc, fskipped, f_used)
            if not f_idx:
                raise _no_readable(fsrc, fskipped)
            self._fit_images, self._fit_labels = f_imgs, f_lbls
        else:
            self._fit_images = self._fit_labels = None
        self._decoded_side = side
        self._train_dataset = None
        self._eval_cache.clear()

    # ---------------------------------------------------------------- outputs

    @property
    def classes(self) -> list[str]:
        """Class names of the calibration source (empty when unlabeled)."""
        if self._source is None:
            self.setup("fit")
        return list(self._source.classes)  # type: ignore[union-attr]

    def multicrop(self) -> DINOMultiCrop:
        """The transform used for the calibration views."""
        mean, std = self.normalization
        return DINOMultiCrop(
            size=self.size,
            num_local_crops=self.num_local_crops,
            global_scale=self.global_scale,
            local_scale=self.local_scale,
            mean=mean,
            std=std,
            flip=self.flip,
            independent_views=self.independent_views,
            seed=self.seed,
        )

    def train_dataset(self) -> MultiCropDataset:
        """The calibration dataset (decodes the images on first use)."""
        self._ensure_decoded()
        transform = self.multicrop()
        if self._train_dataset is None or repr(self._train_dataset.transform) != repr(transform):
            self._train_dataset = MultiCropDataset(self._cal_images, self._cal_labels, transform)
            self._train_dataset.epoch = self._epoch
        return self._train_dataset

    @override
    def train_dataloader(self) -> ResumableDataLoader:
        """Batches ``(views [B, 2+N, 3, S, S], labels [B])`` in a fixed order.

        The loader is a :class:`ResumableDataLoader`: a Lightning checkpoint saved in the
        middle of the epoch records how many batches were served, and
        ``trainer.fit(..., ckpt_path=...)`` continues with the remaining ones. The views of
        an image depend only on ``(seed, epoch, index)``, so they are the same after a resume.
        """
        dataset = self.train_dataset()
        return ResumableDataLoader(
            dataset,
            batch_sampler=ResumableBatchSampler(SequentialSampler(dataset), self.batch_size, drop_last=False),
            num_workers=self.num_workers,
        )

    def _eval_stack(self, key: str, images: list[Tensor]) -> Tensor:
        mean, std = self.normalization
        config = (self.size, mean, std, self._decoded_side)
        cached = self._eval_cache.get(key)
        if cached is not None and cached[0] == config:
            return cached[1]
        out = torch.stack([eval_transform(img, self.size, mean, std) for img in images])
        self._eval_cache[key] = (config, out)
        return out

    def calibration_images_eval(self) -> Tensor:
        """Calibration images as eval views, float ``[N, 3, S, S]`` (cached)."""
        self._ensure_decoded()
        return self._eval_stack("calibration", self._cal_images)

    def calibration_labels(self) -> Tensor:
        """Labels of the calibration images, ``int64 [N]`` (-1 = unlabeled)."""
        self._ensure_decoded()
        return torch.tensor(self._cal_labels, dtype=torch.long)

    def fitness_images(self) -> Tensor:
        """Fitness images as eval views, float ``[M, 3, S, S]`` (cached).

        From ``fitness_data_dir``, else the holdout, else the calibration images themselves.
        """
        self._ensure_decoded()
        if self._fit_images is None:
            return self.calibration_images_eval()
        return self._eval_stack("fitness", self._fit_images)

    def fitness_labels(self) -> Tensor:
        """Labels of :meth:`fitness_images`, ``int64 [M]`` (-1 = unlabeled)."""
        self._ensure_decoded()
        if self._fit_labels is None:
            return self.calibration_labels()
        return torch.tensor(self._fit_labels, dtype=torch.long)

    @property
    def num_calibration_images(self) -> int:
        """Number of (readable) calibration images."""
        self._ensure_decoded()
        return len(self._cal_images)

