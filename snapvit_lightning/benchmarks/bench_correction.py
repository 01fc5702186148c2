"""The corrected rows of ``snapvit bench --correct``: statistics from a calibration source, cross-fitted by default."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any


class Calibrator:
    """Corrected subnets and their features on the bench images, from one calibration source.

    Without ``--calibration`` the images are split into two folds (even / odd positions); the
    features of each fold come from a subnet corrected on the other fold, so no image is both
    calibration and evaluation. Statistics are collected once per elastic model (cached).
    """

    def __init__(self, source: str | None, images: Any, batch_size: int) -> None:
        import torch

        self.images, self.batch_size = images, batch_size
        self.path = None if source is None else Path(source).expanduser()
        self.stats_file = is_stats_file(source)
        self.stats_s = 0.0
        self._announced = False
        self._cache: dict[str, list[tuple[Any, Any]]] = {}
        n = int(images.shape[0])
        if self.path is None:
            if n < 2:
                raise ValueError(f"cross-fitted correction needs >= 2 images in --data, got {n}")
            even, odd = torch.arange(0, n, 2), torch.arange(1, n, 2)
            self._folds = [(images[even], odd), (images[odd], even)]  # (calibrate on, evaluate on)
            self.description = "2-fold cross-fit on --data: features of even/odd images from subnets corrected on the other half"
        elif self.stats_file:
            if not self.path.is_file():
                raise FileNotFoundError(f"correction statistics not found: '{self.path}'")
            self.description = f"stored statistics {self.path}"
        else:
            self.description = f"images in {self.path} (features of all --data images)"

    def _sources(self, elastic: Any, ranking: bool, label: str) -> list[tuple[Any, Any]]:
        """``[(CorrectionStats, evaluation index or None)]`` for ``elastic`` (collected ones with a ranking if asked).

        ``label``: what ``elastic`` is (the rows' method), named when its statistics are collected.
        """
        from ..correction import CorrectionStats
        from ..data import load_calibration_views

        key = (elastic.fingerprint, ranking)
        if key not in self._cache:
            t0 = time.perf_counter()
            if not self.stats_file:  # minutes for a ViT-B: say so before the silence; the source once
                where = "" if self._announced else f" ({self.description})"
                print(f"collecting correction statistics for {label}{where} ...", file=sys.stderr, flush=True)
                self._announced = True
            if self.path is None:
                sources = [(elastic.collect_stats(cal, self.batch_size, ranking=ranking), idx) for cal, idx in self._folds]
            elif self.stats_file:
                sources = [(CorrectionStats.load(self.path), None)]
            else:
                inputs = load_calibration_views(self.path, elastic.model, argument="--calibration")[0]  # as the export
                sources = [(elastic.collect_stats(inputs, self.batch_size, ranking=ranking), None)]
            self.stats_s += time.perf_counter() - t0
            # Keep the first model's (the checkpoint's) statistics and the current one's only.
            self._cache = dict(list(self._cache.items())[:1])
            self._cache[key] = sources
        return self._cache[key]

    def corrected(
        self, elastic: Any, ratios: tuple[float, float], dims: Any, method: str, ranking: bool, label: str = "snapvit"
    ) -> tuple[Any, Any, Any]:
        """A corrected subnet (for latency), the features of every bench image, and its kept dims.

        ``ranking``: cut as :meth:`ElasticViT.subnet` does by default, i.e. the units of the
        statistics' ranking at ``ratios`` (computed on each calibration source like the export
        computes it; stored statistics without one, and ``ranking=False``: ``dims``, this model's
        own cut). With two folds the dims returned are the first fold's subnet's. ``label``: what
        ``elastic`` is (the rows' method), named when its statistics are collected.
        """
        from ..evaluation import extract_features

        model, feats, kept = None, None, None
        for stats, index in self._sources(elastic, ranking, label):
            view = elastic.ranked_view(stats) if ranking else None
            if view is not None:
                cut = view.dims(*ratios)
                sub = view.slice(cut, correct=method)  # the view carries the statistics, in its unit order
            else:
                cut, sub = dims, elastic.slice(dims, correct=method, calibration=stats)
            x = self.images if index is None else self.images[index]
            f = extract_features(sub, x, batch_size=self.batch_size)
            if index is None:
                feats = f
            else:
                feats = f.new_empty(self.images.shape[0], f.shape[1]) if feats is None else feats
                feats[index] = f
            model, kept = (sub, cut) if model is None else (model, kept)
        return model, feats, kept


def is_stats_file(source: str | None) -> bool:
    """Whether ``--calibration`` names a statistics file (not a folder or an image; ``None``: no)."""
    from ..data import IMG_EXTENSIONS

    path = None if source is None else Path(source).expanduser()
    return path is not None and not path.is_dir() and path.suffix.lower() not in IMG_EXTENSIONS


def check_calibration_options(source: str | None, corrections: list[str], baselines: bool) -> None:
    """Refuse ``--calibration`` without ``--correct``, and statistics with ``--baselines`` (before any work)."""
    if source is not None and not corrections:
        raise ValueError("--calibration needs --correct bias|lstsq")
    if corrections and baselines and is_stats_file(source):
        raise ValueError("--calibration STATS fits only this checkpoint's units; with --baselines give an image "
                         "folder or leave --calibration out (cross-fit)")


def make_calibrator(source: str | None, images: Any, batch_size: int, corrections: list[str]) -> Calibrator | None:
    """The calibrator of ``--calibration`` for ``--correct`` (``None`` without corrections)."""
    return Calibrator(source, images, batch_size) if corrections else None
