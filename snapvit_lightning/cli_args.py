"""Argument types shared by the ``snapvit`` subcommands (light: no torch import)."""

from __future__ import annotations

import argparse
import math

__all__ = ["budget_arg"]


def budget_arg(text: str) -> tuple[float, float]:
    """``MLP_RATIO,HEAD_RATIO`` (each in ``[0, 1)``) of ``info --budgets`` and ``bench --budgets``."""
    try:
        mlp, head = (float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"budget must be MLP_RATIO,HEAD_RATIO such as 0.35,0.2, got {text!r}") from err
    for name, value in (("MLP_RATIO", mlp), ("HEAD_RATIO", head)):
        if not (math.isfinite(value) and 0.0 <= value < 1.0):
            raise argparse.ArgumentTypeError(f"{name} must be in [0, 1), got {value!r} in {text!r}")
    return mlp, head
