"""The calibration data module: multi-crop dataset, resumable loader, Lightning data module.

Reproducibility: the crops of calibration image ``i`` are drawn from a ``torch.Generator``
seeded with a hash of ``(seed, epoch, i)`` where ``i`` is the image's position in the
(deterministically ordered) calibration set. The views therefore do not depend on the number
of dataloader workers, on the batch size, on the number of DDP ranks, or on iteration order.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from typing_extensions import override

from ..errors import warn_at_caller_on_rank_zero
from ..structure import check_input_size
from .crops import (
    DINOMultiCrop,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    _check_int,
    _check_scale,
    _check_triple,
    _mix_seed,
    eval_transform,
    resolve_input_config,
    stats_crops,
)
from .sources import (
    DatasetSource,
    ImageFolderSource,
    ImageSource,
    SkimagePhotosSource,
    _decode,
    _no_readable,
    _report_skips,
    _sorted_by_index,
    check_exists,
)

__all__ = [
    "CalibrationDataModule",
    "MultiCropDataset",
    "PaddedShards",
    "ResumableDataLoader",
]

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

    def __getitem__(self, index: int | tuple[int, bool]) -> tuple[Tensor, int] | tuple[Tensor, int, bool]:
        """``(views, label)``; for an ``(index, keep)`` pair of :class:`PaddedShards`, ``(views, label, keep)``."""
        if isinstance(index, tuple):
            i, keep = index
            return (*self[i], keep)
        return self.transform(self.images[index], index=index, epoch=self.epoch), self.labels[index]


class PaddedShards(DistributedSampler):
    """Lightning's distributed share of the images, in order, with its padding marked.

    ``DistributedSampler`` evens out the ranks' shares by repeating the first images when their
    number is not a multiple of the world size (every rank must run as many steps), which would
    count those images twice in the summed scores. This one yields ``(index, keep)`` pairs
    (rank ``r`` of ``W`` takes positions ``r, r + W, ...`` of the padded list, no shuffling),
    ``keep`` false for a repeated image, and the scoring step drops those: the ranks run equal
    steps and every image counts once, as in one process.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[tuple[int, bool]]:  # type: ignore[override]
        n = len(self.dataset)  # type: ignore[arg-type]
        positions = range(self.rank, self.total_size, self.num_replicas)
        return iter((p % n, p < n) for p in positions)


class ResumableDataLoader(StatefulDataLoader):
    """torchdata's :class:`~torchdata.stateful_dataloader.StatefulDataLoader`, its state checked.

    Lightning (2.x) stores ``state_dict()`` of every train dataloader that has
    ``state_dict``/``load_state_dict`` in the checkpoint's loop state and, on
    ``trainer.fit(..., ckpt_path=...)``, calls ``load_state_dict`` before the first ``iter()``;
    its batch progress continues from the restored ``batch_idx``. ``StatefulDataLoader`` records
    how many batches the current pass has yielded (after worker prefetching) and, once a state is
    loaded, starts its next pass after them, skipping them on the index sampler (no image of a
    skipped batch is loaded). This subclass adds the dataset length and the number of DDP shards to
    the state and refuses a state saved with others, so a resume with other calibration data or
    another number of processes fails instead of silently skipping the wrong images. ``len()``
    stays the full length, as Lightning expects.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            # torchdata 0.11 calls torch.set_vital, which this torch deprecates: not the user's to act on.
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            super().__init__(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """``StatefulDataLoader``'s state (plain values) plus the dataset length and the number of shards."""
        return {**super().state_dict(), "num_samples": len(self.dataset), "world_size": self._world_size()}  # type: ignore[arg-type]

    def _world_size(self) -> int:
        return int(self.sampler.num_replicas) if isinstance(self.sampler, DistributedSampler) else 1

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Start the next pass after the batches ``state_dict`` records as yielded.

        Raises:
            ValueError: if the state was saved with another dataset length or number of DDP
                processes, or by a version of this package before the ``StatefulDataLoader`` (its
                ``{"batches", "num_samples"}`` state).
        """
        state = dict(state_dict)
        saved = state.pop("num_samples", None)
        current = len(self.dataset)  # type: ignore[arg-type]
        if saved is not None and int(saved) != current:
            raise ValueError(
                f"the checkpoint's dataloader state was saved with num_samples={int(saved)}, but this "
                f"loader's dataset has {current} samples: resume with the same calibration data"
            )
        saved_world = state.pop("world_size", None)  # states before it was recorded: not checked
        if saved_world is not None and int(saved_world) != self._world_size():
            raise ValueError(
                f"the checkpoint was saved by a fit of {int(saved_world)} process(es), this one runs "
                f"{self._world_size()}: each process's share of the images differs, so the images the "
                "checkpoint has scored are not the ones it would skip; resume with the same number of processes"
            )
        if "batches" in state:
            raise ValueError(
                f"the checkpoint's dataloader state {sorted(state_dict)} was written by snapvit_lightning's own "
                "loader before it used torchdata's StatefulDataLoader: restart the fit without --ckpt_path"
            )
        super().load_state_dict(state)


def _refuse_resume(differ: list[str], about: str = "") -> None:
    """The error of a resume whose calibration data options (``differ``: ``name=value (the checkpoint's: ...)``) changed."""
    raise ValueError("a resumed fit continues the checkpoint's scoring, whose calibration data this one changes: data."
                     + "; data.".join(differ) + f"{about}; resume with the checkpoint's data options, or start a new "
                     "fit without the checkpoint")


class CalibrationDataModule(LightningDataModule):
    """Unlabeled calibration images as DINO multi-crops, plus fixed fitness images.

    Sources (at most one of ``data_dir``/``dataset``): a folder (ImageFolder layout →
    labels from class folders, flat → -1) or a single image file; a map-style ``Dataset``
    of images or ``(image, label)`` pairs; or, when neither is given, the photos shipped with
    scikit-image (needs ``scikit-image``).

    Every image is decoded once and cached in memory as ``uint8`` with its shorter side at
    most ``max_side`` (default ``2 * img_size``). Unreadable files inside a folder are skipped
    with one warning that names them and counts them ("skipped K of N images"); another image
    is decoded in its place when ``max_samples`` leaves some unused.

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

    Batches are ``(views [B, 2+N, 3, S, S], labels [B])``. The loader does not shuffle. Under
    DDP each rank sees a disjoint share (:class:`PaddedShards`: rank ``r`` of ``W`` takes images
    ``r, r + W, ...``), its batches ``(views, labels, keep [B])``: where the image count is not a
    multiple of ``W``, repeated images even out the shares and ``keep`` marks them for the
    scoring to drop, so every image counts once.

    Args:
        data_dir: folder (or image file) of calibration images; with neither ``data_dir`` nor
            ``dataset``, the 14 photos that ship with scikit-image (the main job's; said when set up).
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
        # A missing folder is refused here, before a Trainer (and its precision probe) is built.
        self.data_dir = None if data_dir is None else check_exists(data_dir, "data_dir")
        self.fitness_data_dir = None if fitness_data_dir is None else check_exists(fitness_data_dir, "fitness_data_dir")
        self.dataset = dataset
        self.save_hyperparameters(ignore=["dataset"])

        self._model_cfg: tuple[int, tuple[float, ...], tuple[float, ...]] | None = None
        self._source: ImageSource | None = None
        self._digest: str | None = None  # of the calibration images, once listed (a checkpoint's state)
        self._fitness_source: ImageSource | None = None
        self._decoded_side: int | None = None
        self._cal_images: list[Tensor] = []
        self._cal_labels: list[int] = []
        self._fit_images: list[Tensor] | None = None  # None: use the calibration images
        self._fit_labels: list[int] | None = None
        self._train_dataset: MultiCropDataset | None = None
        self._eval_cache: dict[str, tuple[tuple[Any, ...], Tensor]] = {}
        self._epoch = 0

    # ---------------------------------------------------------------- resuming

    def state_dict(self) -> dict[str, Any]:
        """What the scored crops depend on, saved in a Lightning checkpoint (:meth:`load_state_dict` compares)."""
        mean, std = self.normalization
        return {"scoring_options": {
            "images": self._images_digest(), "images_about": None if self._source is None else
            f"{len(self._source)} images: {self._source.description}",  # said when the digests differ, not compared
            "batch_size": self.batch_size, "num_workers": self.num_workers, "num_local_crops": self.num_local_crops,
            "global_scale": list(self.global_scale), "local_scale": list(self.local_scale),
            "img_size": self.size if self.img_size is not None or self._model_cfg is not None else None,
            "seed": self.seed, "holdout": self.holdout, "mean": list(mean), "std": list(std),
            "max_side": self.max_side, "flip": self.flip, "independent_views": self.independent_views}}

    def _images_digest(self) -> str | None:
        """The calibration images by content, not path (a copied or re-mounted folder resumes): each file's
        path below the folder and size; the built-in photos and a dataset by their kind and length."""
        if self._digest is None and self._source is not None:
            source, digest = self._source, hashlib.sha256()
            if isinstance(source, ImageFolderSource):
                for f in source.files:
                    digest.update(f"{os.path.relpath(f, source.root) if source.root.is_dir() else Path(f).name}\0"
                                  f"{os.path.getsize(f)}\n".encode())
            else:  # the user's dataset class (or the built-in photos) and its length
                kind = type(self.dataset).__name__ if self.dataset is not None else type(source).__name__
                digest.update(f"{kind}:{len(source)}".encode())
            self._digest = digest.hexdigest()[:16]
        return self._digest

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to resume a fit whose checkpoint scored other crops (other images, seed, batch size, ...).

        A resumed fit skips the batches already scored by their index, so with other options it
        would score other images or crops after them (``num_workers``: torchdata's loader state of
        one count does not load into another). The images are compared by their files' names (below
        the folder) and sizes, so a copied or re-mounted folder resumes. (Checkpoints before 2026-12-07
        hold no such state: :meth:`check_saved_options` compares their saved options.)

        Raises:
            ValueError: Naming each option that differs and the checkpoint's value.
        """
        saved, now = state_dict.get("scoring_options"), self.state_dict()["scoring_options"]
        differ = [f"{k}={now[k]!r} (the checkpoint's: {saved[k]!r})" for k in now
                  if isinstance(saved, dict) and k in saved and k != "images_about" and now[k] != saved[k]]
        if differ:
            images = (f" (images: a digest of the calibration files' names and sizes, or of a dataset's class and "
                      f"length; the checkpoint's {saved.get('images_about')}, this fit's {now['images_about']})"
                      if any(d.startswith("images=") for d in differ) else "")
            _refuse_resume(differ, images)

    def check_saved_options(self, checkpoint: dict[str, Any]) -> None:
        """Compare a checkpoint saved before :meth:`state_dict` existed (its datamodule's hyperparameters, as
        given; the folders by their resolved paths) with this datamodule; a newer one is :meth:`load_state_dict`'s.

        Raises:
            ValueError: As :meth:`load_state_dict`, naming each option that differs.
        """
        saved = checkpoint.get("datamodule_hyper_parameters")
        if type(self).__qualname__ in checkpoint or not isinstance(saved, dict) or not set(saved) <= set(self.hparams) | {
                "_instantiator"}:  # a newer checkpoint (load_state_dict's), or another datamodule's options
            return

        def plain(key: str, value: Any) -> Any:
            if key.endswith("data_dir") and isinstance(value, (str, Path)):
                return os.path.realpath(value)
            return list(value) if isinstance(value, tuple) else value

        differ = [f"{k}={plain(k, v)!r} (the checkpoint's: {plain(k, saved[k])!r})" for k, v in self.hparams.items()
                  if k in saved and k not in ("dataset", "fitness_data_dir", "_instantiator")
                  and plain(k, v) != plain(k, saved[k])]
        if differ:
            _refuse_resume(differ)

    # ---------------------------------------------------------------- configuration

    def configure_from_model(self, model: nn.Module) -> None:
        """Take the view size and mean/std from a timm model (explicit arguments win).

        Args:
            model: the timm model to be pruned.

        Raises:
            ValueError: if the model's input size is not square, or the view size is not one a
                dynamic-size model can cut into patches.
        """
        cfg = resolve_input_config(model)
        size = self.img_size or cfg[0]
        # "data.img_size" as a config names it: the model's model_kwargs img_size is the other size a run has
        check_input_size(model, (size, size), f"data.img_size={self.img_size}" if self.img_size else
                         f"data.img_size (not given: the model's {size})")
        self._model_cfg = cfg
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
            ValueError: if a folder has no images (or, once decoded, no readable ones), or
                ``holdout`` leaves no calibration images.
            ImportError: if no source is given and scikit-image is missing.
        """
        self.check_sources()
        if self.img_size is not None or self.max_side is not None or self._model_cfg is not None:
            self._ensure_decoded()

    def check_sources(self) -> None:
        """List the calibration (and fitness) images and check ``holdout`` against their number (no image is decoded).

        What :meth:`setup` does first; ``snapvit fit`` calls it before the Trainer (its probe, its DDP ranks), so a bad
        folder or ``holdout`` is reported before a minute of probing or a DDP start.

        Raises:
            FileNotFoundError, ValueError, ImportError: As :meth:`setup`.
        """
        if self._source is None:
            if self.data_dir is not None:
                self._source = ImageFolderSource(self.data_dir, argument="data_dir")
            elif self.dataset is not None:
                self._source = DatasetSource(self.dataset)
            else:
                self._source = SkimagePhotosSource()
                rank_zero_info(f"data: no data_dir, so the calibration images are the {len(self._source)} "
                               f"{self._source.description} (the main job's; --data.data_dir FOLDER for yours)")
            n = len(self._source)
            if n == 0:
                raise ValueError(f"{self._source.description} is empty")
            if self._holdout_count(n) >= n:
                raise ValueError(
                    f"`holdout`={self.holdout!r} leaves no calibration images out of {n} in {self._source.description}: "
                    f"give a holdout below {n} (a count or a fraction, 0: none; `--data.holdout N` in a config run)"
                )
            left = n - self._holdout_count(n)
            if self.max_samples is not None and left < self.max_samples:  # the holdout is taken first
                warn_at_caller_on_rank_zero(
                    f"max_samples={self.max_samples} asks for more calibration images than the {left} "
                    f"that `holdout`={self.holdout!r} leaves of the {n} in {self._source.description}: "
                    f"the fit calibrates on {left} (it needs holdout + max_samples images)"
                )
        if self._fitness_source is None and self.fitness_data_dir is not None:
            self._fitness_source = ImageFolderSource(self.fitness_data_dir, argument="fitness_data_dir")

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
            warn_at_caller_on_rank_zero(
                f"only {len(fit_idx)} of the requested {n_hold} holdout images could be read"
            )
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
        shards = getattr(self.trainer, "distributed_sampler_kwargs", None) if self.trainer is not None else None
        sampler = None if not shards or shards["num_replicas"] <= 1 else PaddedShards(
            dataset, num_replicas=shards["num_replicas"], rank=shards["rank"])
        return ResumableDataLoader(dataset, batch_size=self.batch_size, sampler=sampler, shuffle=False,
                                   num_workers=self.num_workers)

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

    def calibration_views(self, views_per_image: int = 1) -> Tensor:
        """Calibration images as ``views_per_image`` views each, float ``[N * views, 3, S, S]``.

        The first ``N`` are :meth:`calibration_images_eval`; each further view of image ``i`` is a
        random resized crop (area in :data:`~snapvit_lightning.data.crops.STATS_CROP_SCALE`,
        aspect ratio in [3/4, 4/3], flipped with probability 0.5) of the decoded image, drawn from
        ``(seed, i)`` only, so the views do not depend on the order or number of calls. These are
        what the correction statistics are collected on: crops make a few photos cover more of
        the inputs the model will see (docs/defaults.md, "Crops for the correction statistics").

        Raises:
            ValueError: ``views_per_image`` is not an int >= 1.
        """
        views = _check_int("views_per_image", views_per_image, 1)
        plain = self.calibration_images_eval()
        if views == 1:
            return plain
        mean, std = self.normalization
        crops = stats_crops(self._cal_images, self.size, views - 1, mean, std, self.seed, self.flip)
        return torch.cat([plain, crops])

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

    @property
    def num_fitness_images(self) -> int:
        """Number of :meth:`fitness_images` (without building them)."""
        self._ensure_decoded()
        return len(self._cal_images if self._fit_images is None else self._fit_images)
