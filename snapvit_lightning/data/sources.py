"""Image sources: where calibration and evaluation images come from, decoded once.

Images are decoded once (PIL → RGB → ``uint8`` tensor, shorter side bounded by ``max_side``)
and kept in memory. An :class:`ImageSource` yields ``(image, label)`` pairs.

One rule for unreadable files inside a folder, for every reader (the calibration data module,
:func:`load_eval_images` and so ``snapvit stats|slice|bench``): each is skipped, one warning
names them (the first 10, then "and N more") and counts them ("skipped K of N images"), and
an error is raised when no readable image remains. A single image file named on its own must
be readable (:class:`UnreadableImageError` names it).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset
from typing_extensions import override

from ..errors import warn_at_caller_on_rank_zero
from ..values import real_number
from .crops import (
    DEFAULT_STATS_VIEWS, eval_transform, float_image_to_uint8, resolve_input_config, stats_crops, stats_views_per_image,
)

__all__ = [
    "IMG_EXTENSIONS",
    "SKIMAGE_PHOTOS",
    "DatasetSource",
    "ImageFolderSource",
    "ImageSource",
    "SkimagePhotosSource",
    "UnreadableImageError",
    "find_images",
    "load_calibration_views",
    "load_eval_images",
    "load_image",
    "to_uint8_image",
]

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

#: Image types a folder may hold that are not read (a warning counts them): animations, camera raw, other codecs.
OTHER_IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".gif", ".jfif", ".jpe", ".avif", ".heic", ".heif", ".jp2", ".j2k", ".ppm", ".pgm", ".pbm", ".tga", ".ico", ".dng",
    ".cr2", ".nef", ".arw",
)


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
    if im.mode.startswith("I;16"):  # 16-bit grayscale: convert("RGB") would clip every value above 255 to white
        im = Image.fromarray((np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8), "L")
    elif im.mode in ("I", "F"):  # 32-bit integer or float pixels: no known range to map to 8 bits
        raise ValueError(f"{im.mode!r} pixels (32-bit {'integers' if im.mode == 'I' else 'floats'}) have no known "
                         "range; save the image with 8 or 16 bits per channel")
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

    Transparent pixels are composited on white, EXIF orientation is applied, 16-bit grayscale is
    scaled to 8 bits, and the image is downscaled (bilinear, antialiased) so that its shorter side
    is at most ``max_side``. 32-bit integer or float images (PIL modes ``I``, ``F``) are refused.

    Args:
        path: the image file.
        max_side: upper bound on the shorter side; ``None`` keeps the full resolution.

    Returns:
        The decoded image.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if ``max_side`` is not ``None`` or an int >= 1.
        UnreadableImageError: (a ``ValueError``) if the file cannot be decoded or its pixels are
            32-bit; the message names the file.
    """
    if max_side is not None:
        number = real_number(max_side)  # numpy and 0-d tensor integers, whole floats (64.0) count
        if number is None or not number.is_integer() or number < 1:
            raise ValueError(f"max_side must be an int >= 1 (pixels of the shorter side) or None, got {max_side!r}")
        max_side = int(number)
    path = Path(path)
    if not path.exists() and path.is_symlink():  # listed in a folder, but nothing to read: skipped by name
        raise UnreadableImageError(f"cannot read image file '{path}': a broken link (to '{os.readlink(path)}')")
    if not path.exists():
        raise FileNotFoundError(f"image file not found: '{path}'")
    try:
        with _open_image(path) as im:
            if max_side is not None and im.format == "JPEG":
                w, h = im.size
                short = min(w, h)
                if short > max_side:  # let libjpeg decode at a reduced scale (>= requested)
                    im.draft("RGB", (math.ceil(w * max_side / short), math.ceil(h * max_side / short)))
            im.load()
            return _pil_to_uint8(im, max_side)
    except _UNREADABLE as err:
        raise UnreadableImageError(f"cannot read image file '{path}': {unreadable_reason(err)}") from err


#: What Pillow raises for a file it cannot decode.
_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def unreadable_reason(error: BaseException) -> str:
    """Why Pillow could not read a file, as a skip or an error says it (with how to read a very large image)."""
    if isinstance(error, Image.DecompressionBombError):
        return (f"{error} (Pillow's check against decompression bombs: from Python, raise PIL.Image.MAX_IMAGE_PIXELS "
                "to read it)")
    return str(error)


def _open_image(path: Path) -> Image.Image:
    """``Image.open``, with Pillow's decompression-bomb warning said as this package's, naming the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except Image.DecompressionBombWarning as big:
            warn_at_caller_on_rank_zero(f"'{path}': {str(big).rstrip('.')}; read all the same (Pillow refuses "
                                        "images twice that size; from Python PIL.Image.MAX_IMAGE_PIXELS sets its limit)")
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)


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
        tensor = float_image_to_uint8(tensor)
    elif tensor.dtype != torch.uint8:
        raise TypeError(f"integer images must be uint8, got {tensor.dtype}")
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return _resize_short_side_uint8(tensor, max_side)


def check_exists(root: str | Path, argument: str = "") -> Path:
    """``root`` as a path, after checking it exists (what :func:`find_images` checks first, without listing it).

    Raises:
        FileNotFoundError: if ``root`` does not exist; the message names ``argument``.
    """
    root = Path(root).expanduser()
    if not root.exists():
        named = f"{argument}: " if argument else ""
        raise FileNotFoundError(f"{named}image folder not found: '{root}' (give a folder of images or one image file)")
    return root


def _listing(root: Path) -> tuple[list[Path], list[Path]]:
    """Every visible file under ``root``, and the links to folders that were not followed.

    Subfolders are visited by name, linked folders are followed and each real folder is read
    once (no cycles), except that a link to a visible folder under ``root`` itself is not
    followed: that folder is read under its own path (a link to a hidden one, e.g. a ``.store``
    the classes link into, is followed), nor is a link to ``root`` or a folder enclosing it. A
    folder outside reached by two links is read under the first link's path in name order, on
    every machine. Hidden files and folders (names starting with ``.``) are left out.

    Returns:
        ``(files, unfollowed)``: the files in walk order; the links not followed.
    """
    own: set[str] = set()  # the visible folders read under their own paths
    for folder, dirs, _ in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        own.add(os.path.realpath(folder))
    files: list[Path] = []
    unfollowed: list[Path] = []
    seen: set[str] = set()
    top = os.path.realpath(root)
    enclosing = {top, *map(str, Path(top).parents)}  # a link up (`up -> ..`) would read the folders beside ``root``
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        kept = []
        for d in sorted(d for d in dirs if not d.startswith(".")):  # by name: os.walk's order is the file system's
            path = os.path.join(folder, d)
            if os.path.islink(path) and (os.path.realpath(path) in own or os.path.realpath(path) in enclosing):
                unfollowed.append(Path(path))
            else:
                kept.append(d)
        dirs[:] = kept
        files.extend(Path(folder) / name for name in sorted(names) if not name.startswith("."))
    return files, unfollowed


def _read_elsewhere(folder: Path, files: Sequence[Path]) -> bool:
    """Whether a linked ``folder``'s images were listed under another path (a second link to one folder)."""
    real = os.path.realpath(folder)
    return folder.is_symlink() and any(os.path.realpath(f).startswith(real + os.sep) for f in files)


def layout_notes(root: Path, files: Sequence[Path], classes: Sequence[str],
                 listing: tuple[list[Path], list[Path]] | None = None) -> list[str]:
    """What a user may not expect of how :func:`find_images` read the folder ``root`` (its ``files``, ``classes``).

    Images directly in ``root`` beside class folders (every image is unlabelled then), subfolders
    without images (no class: the classes after them take lower indices than a count of folders
    gives), links in ``root`` to folders read under their own path (not classes of their own) and
    files of image types that are not read. ``listing`` is the folder's walk, if already made.
    """
    notes = []
    if root.is_file():
        return notes
    listed, unfollowed = _listing(root) if listing is None else listing
    top = [p for p in files if p.parent == root]
    below = sorted({p.relative_to(root).parts[0] for p in files if p.parent != root})
    if top and below:
        names = ", ".join(f"'{p.name}'" for p in top[:3]) + (f" and {len(top) - 3} more" if len(top) > 3 else "")
        notes.append(f"{len(top)} image(s) directly in '{root}' ({names}) beside {len(below)} subfolders of images: "
                     "the folder is read as unlabelled (no classes); move them into a class folder for labels")
    links = [p for p in unfollowed if p.parent == root]
    if classes and links:
        shown = ", ".join(f"'{p.name}' -> '{_inside_name(root, p)}'" for p in links[:5]) + (
            f" and {len(links) - 5} more" if len(links) > 5 else "")
        notes.append(f"link(s) {shown} in '{root}' lead to folders read under their own path there, or enclosing "
                     "it, so they are not classes of their own; for classes made of links keep the folders they lead "
                     "to outside it or in a hidden folder (a name starting with '.')")
    if classes:
        unread = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in classes
                         and d not in links), key=lambda d: d.name)
        twice = [d.name for d in unread if _read_elsewhere(d, files)]
        if twice:
            notes.append(f"link(s) {', '.join(repr(d) for d in twice[:5])} in '{root}' lead to folders already read "
                         "under another link's name (each folder is read once): not classes of their own")
        empty = [d.name for d in unread if d.name not in twice]
        if empty:
            notes.append(f"subfolder(s) {', '.join(repr(d) for d in empty[:5])} of '{root}' hold no images: not "
                         f"classes, so the {len(classes)} classes are indexed without them")
    other: dict[str, int] = {}
    for p in listed:
        ext = p.suffix.lower()
        if ext in OTHER_IMAGE_EXTENSIONS:
            other[ext] = other.get(ext, 0) + 1
    if other:
        counts = ", ".join(f"{n} {ext}" for ext, n in sorted(other.items()))
        notes.append(f"{sum(other.values())} file(s) in '{root}' of image types that are not read ({counts}); "
                     f"read: {', '.join(IMG_EXTENSIONS)} (convert them to include them)")
    return notes


def _inside_name(root: Path, link: Path) -> str:
    """Where ``link`` leads: a path under ``root``, or the enclosing folder's own path."""
    target = Path(os.path.realpath(link))
    return target.relative_to(root.resolve()).as_posix() if target.is_relative_to(root.resolve()) else str(target)


def find_images(root: str | Path, argument: str | None = None) -> tuple[list[Path], list[int], list[str]]:
    """List the images under ``root`` in a deterministic order.

    ImageFolder layout (no images directly in ``root``, images in its subfolders): every
    non-hidden subfolder that contains images (at any depth) is a class; classes are sorted
    by name and labels are their indices. Otherwise (flat or mixed folder) every image found
    recursively gets label -1. Files are matched by extension (``IMG_EXTENSIONS``, case
    insensitive); hidden files and folders (name starting with ``.``) are ignored; linked folders
    are followed (a folder reached twice is listed once), but for a link to a visible folder
    inside ``root``, which is read under its own path. ``root`` may also be a single image file
    (label -1).

    Args:
        root: a folder, or one image file.
        argument: the name the user gave ``root`` under (e.g. ``"data_dir"``, ``"--data"``);
            errors name it.

    Returns:
        ``(files, labels, classes)``; files sorted by relative path.

    Raises:
        FileNotFoundError: if ``root`` does not exist.
        ValueError: if ``root`` holds no image files.
    """
    files, labels, classes, _ = _find(root, argument)
    return files, labels, classes


def _find(root: str | Path, argument: str | None
          ) -> tuple[list[Path], list[int], list[str], tuple[list[Path], list[Path]] | None]:
    """:func:`find_images`, and the folder's walk (:func:`_listing`; ``None`` for one file)."""
    root = check_exists(root, argument)
    if root.is_file():
        return [root], [-1], [], None
    listing = _listing(root)
    files = sorted((p for p in listing[0] if p.suffix.lower() in IMG_EXTENSIONS and (p.is_file() or p.is_symlink())),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        named = f"{argument}: " if argument else ""
        raise ValueError(f"{named}no image files ({', '.join(IMG_EXTENSIONS)}) found in '{root}' (hidden files and "
                         "folders, whose names start with '.', are not read)")
    top_level = [p for p in files if p.parent == root]
    if top_level:
        return files, [-1] * len(files), [], listing
    classes = sorted({p.relative_to(root).parts[0] for p in files})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[p.relative_to(root).parts[0]] for p in files]
    return files, labels, classes, listing


def load_eval_images(
    folder: str | Path | None, model: nn.Module, argument: str | None = None
) -> tuple[Tensor, Tensor, list[str]]:
    """Eval views ``[N, 3, S, S]`` of every readable image under ``folder`` at ``model``'s input config.

    Unreadable files in a folder are skipped with one warning that names them and counts them
    (the same rule as :class:`CalibrationDataModule`).

    Args:
        folder: a folder of images (ImageFolder layout or flat), or one image file; ``None``
            for the photos that ship with scikit-image (:class:`SkimagePhotosSource`, label
            ``-1``), the built-in images :class:`CalibrationDataModule` uses by default.
        model: the timm model whose input size and normalisation the views get.
        argument: the name the user gave ``folder`` under (e.g. ``"--data"``); errors name it.

    Returns:
        The views, the ImageFolder labels ``[N]`` (``-1`` for a flat folder, see
        :func:`find_images`) and the class names.

    Raises:
        FileNotFoundError: if ``folder`` does not exist.
        ValueError: if ``folder`` holds no image files, or none of them can be read.
        UnreadableImageError: (a ``ValueError``) if ``folder`` is one image file that cannot be read.
    """
    images, labels, classes, (size, mean, std) = _decode_all(folder, model, argument)
    views = [eval_transform(image, size, mean, std) for image in images]
    return torch.stack(views), torch.tensor(labels, dtype=torch.long), classes


def load_calibration_views(
    folder: str | Path | None,
    model: nn.Module,
    stats_views: int = DEFAULT_STATS_VIEWS,
    argument: str | None = None,
    seed: int = 0,
) -> tuple[Tensor, int]:
    """The inputs of the correction statistics from ``folder``, as the export takes them.

    Every readable image's eval view (:func:`load_eval_images`), then ``views - 1`` random crops
    of each (:func:`~snapvit_lightning.data.crops.stats_crops`, seeded with ``seed``), where
    ``views`` is :func:`~snapvit_lightning.data.crops.stats_views_per_image` of the number of
    images: the views :meth:`CalibrationDataModule.calibration_views` makes (``snapvit stats``).

    Returns:
        ``(inputs [N * views, 3, S, S], views)``.

    Raises:
        See :func:`load_eval_images`; ``ValueError`` for ``stats_views`` < 1.
    """
    images, _, _, (size, mean, std) = _decode_all(folder, model, argument)
    views = stats_views_per_image(len(images), stats_views)
    plain = torch.stack([eval_transform(image, size, mean, std) for image in images])
    return torch.cat([plain, stats_crops(images, size, views - 1, mean, std, seed)]), views


def _decode_all(
    folder: str | Path | None, model: nn.Module, argument: str | None
) -> tuple[list[Tensor], list[int], list[str], tuple[int, tuple[float, ...], tuple[float, ...]]]:
    """Every readable image of ``folder`` (``None``: the built-in photos), decoded at twice the input size."""
    size, mean, std = resolve_input_config(model)
    source = SkimagePhotosSource() if folder is None else ImageFolderSource(folder, argument=argument)
    skipped: list[tuple[str, str]] = []
    _, images, labels, attempted = _decode(source, range(len(source)), None, 2 * size, skipped)
    _report_skips(source, skipped, attempted)
    if not images:
        raise _no_readable(source, skipped)
    return images, labels, list(source.classes), (size, mean, std)


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
        argument: the name the user gave ``root`` under (e.g. ``"data_dir"``); messages name it.

    Raises:
        FileNotFoundError: if ``root`` does not exist.
        ValueError: if ``root`` holds no image files.
        UnreadableImageError: (a ``ValueError``) if ``root`` is one file that does not decode as an image.
    """

    skippable = True

    def __init__(self, root: str | Path, argument: str | None = None) -> None:
        self.root = Path(root).expanduser()
        self.files, self.labels, self.classes, listing = _find(self.root, argument)
        self.description = f"{argument}='{self.root}'" if argument else f"'{self.root}'"
        for note in layout_notes(self.root, self.files, self.classes, listing):
            warn_at_caller_on_rank_zero(f"{argument + ': ' if argument else ''}{note}")
        # an explicitly named single file must be readable: no skipping, and it is decoded now (before a probe's minute)
        self.skippable = not self.root.is_file()
        if not self.skippable:
            try:
                with _open_image(self.root) as image:
                    image.load()
            except _UNREADABLE as err:
                raise UnreadableImageError(f"cannot read image file '{self.root}' ({self.description}): "
                                           f"{unreadable_reason(err)}") from err

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
        elif isinstance(item, dict):
            raise TypeError(f"{where}: expected an image or an (image, label) pair, got a dict with keys "
                            f"{sorted(map(str, item))}: give a dataset whose items are (item['image'], item['label'])")
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
            skipped.append((source.name(i), str(err) if err.__cause__ is None else unreadable_reason(err.__cause__)))
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
    """One warning: how many of the ``attempted`` images were skipped, naming the first 10."""
    if not skipped:
        return
    named = "; ".join(f"'{name}' ({reason})" for name, reason in skipped[:_MAX_NAMED_SKIPS])
    more = len(skipped) - _MAX_NAMED_SKIPS
    tail = f"; and {more} more" if more > 0 else ""
    warn_at_caller_on_rank_zero(
        f"skipped {len(skipped)} of {attempted} images in {source.description} that could not be read: {named}{tail}",
    )


def _no_readable(source: ImageSource, skipped: list[tuple[str, str]]) -> ValueError:
    first = f" (e.g. '{skipped[0][0]}': {skipped[0][1]})" if skipped else ""
    return ValueError(f"no readable images in {source.description}{first}")
