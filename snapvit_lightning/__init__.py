"""SnapViT for PyTorch Lightning: elastic, retraining-free structured pruning of timm ViTs.

The main classes and functions are importable from here (``from snapvit_lightning import
ElasticViT, load_subnet``); each is imported on first use, so ``import snapvit_lightning`` stays
light (``snapvit --help`` needs neither torch nor timm).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: ``{name: module}`` of what the package itself offers, each the module's own object.
_API = {
    "ElasticViT": "elastic", "load_subnet": "elastic", "save_subnet": "elastic", "read_metadata": "elastic",
    "export_elastic": "export", "ElasticExport": "export", "SnapViT": "plugin", "SnapViTModule": "module",
    "EvolutionarySearch": "search", "run_search": "search", "CalibrationDataModule": "data",
    "ImportanceScores": "scores", "CorrectionStats": "correction", "save_onnx": "onnx_export",
}

__all__ = ["__version__", *_API]

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports on first use
    from .correction import CorrectionStats
    from .data import CalibrationDataModule
    from .elastic import ElasticViT, load_subnet, read_metadata, save_subnet
    from .export import ElasticExport, export_elastic
    from .module import SnapViTModule
    from .onnx_export import save_onnx
    from .plugin import SnapViT
    from .scores import ImportanceScores
    from .search import EvolutionarySearch, run_search


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
