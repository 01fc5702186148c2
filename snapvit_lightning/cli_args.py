"""Argument types shared by the ``snapvit`` subcommands (light: no torch import)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["budget_arg", "device_arg", "int_at_least", "keep_fraction", "non_negative_number", "positive_number", "prune_ratio"]


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


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def keep_fraction(text: str) -> float:
    """A fraction to keep, in ``(0, 1]`` (``slice --flops``)."""
    value = _number(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text!r}")
    return value


def prune_ratio(text: str) -> float:
    """A fraction to prune, in ``[0, 1)`` (``slice --mlp-ratio``/``--head-ratio``)."""
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def share(text: str) -> float:
    """A share in ``[0, 1]`` (``slice --head-ratio-scale``)."""
    value = _number(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def positive_number(text: str) -> float:
    """A finite number ``> 0`` (``slice --latency-ms``)."""
    value = _number(text)
    if value <= 0.0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argument type: an integer ``>= minimum`` (``--batch-size``, ``--threads``, ``--repeats``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def non_negative_number(text: str) -> float:
    """A finite number ``>= 0`` (``slice --damping``)."""
    value = _number(text)
    if value < 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def device_arg(text: str) -> str:
    """A torch device of this machine (``--device``), checked when the command line is read."""
    from .evaluation import _check_device  # torch: imported when the option is given

    try:
        _check_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


#: ``--dtype`` of the latency options (``snapvit_lightning.latency.DTYPES``, named without importing torch).
LATENCY_DTYPES = ("float32", "bfloat16", "float16")
