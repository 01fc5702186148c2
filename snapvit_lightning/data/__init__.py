"""Calibration data: DINO multi-crop views of a small set of unlabeled images.

* :mod:`.sources`: where images come from (folders, datasets, scikit-image photos), decoded once.
* :mod:`.crops`: the DINO multi-crop views and the timm-style evaluation transform.
* :mod:`.datamodule`: :class:`CalibrationDataModule` and its resumable loader.
"""

from .crops import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, DINOMultiCrop, eval_transform, resolve_input_config
from .datamodule import CalibrationDataModule, MultiCropDataset, PaddedShards, ResumableDataLoader
from .sources import (
    IMG_EXTENSIONS,
    SKIMAGE_PHOTOS,
    DatasetSource,
    ImageFolderSource,
    ImageSource,
    SkimagePhotosSource,
    UnreadableImageError,
    find_images,
    load_calibration_views,
    load_eval_images,
    load_image,
    to_uint8_image,
)

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
    "PaddedShards",
    "ResumableDataLoader",
    "SkimagePhotosSource",
    "UnreadableImageError",
    "eval_transform",
    "find_images",
    "load_calibration_views",
    "load_eval_images",
    "load_image",
    "to_uint8_image",
]
