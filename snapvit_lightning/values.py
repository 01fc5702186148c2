"""What the argument checks count as a real number (Python, NumPy and 0-d tensor scalars, never a
bool), and whether a tensor holds finite values only.

Imports neither torch nor NumPy (the CLI's ``--help`` imports no torch).
"""

from __future__ import annotations

import math
import numbers

__all__ = ["all_finite", "non_float32", "real_number"]


def real_number(value: object) -> float | None:
    """``value`` as a Python float when it is a real number, else ``None``.

    Python ints and floats, NumPy scalars (``np.float32(0.3)``) and 0-d tensors or arrays of a
    real dtype (``torch.tensor(0.5)``) count; bools (Python, NumPy or a bool tensor) and complex
    numbers do not. NaN and infinities are returned as they are: the caller checks the range.
    """
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)) \
            and not isinstance(value, numbers.Number):
        try:
            value = value.item()  # a 0-d tensor or array: its Python scalar (a bool tensor gives a bool)
        except (RuntimeError, ValueError):  # e.g. a tensor on the meta device: no value
            return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None  # numpy.bool_ is not a numbers.Real
    return float(value)


def integer(value: object) -> int | None:
    """``value`` as a Python int when it is an integer, else ``None``.

    Python ints, NumPy integers and 0-d integer tensors or arrays count; bools (Python, NumPy or a
    bool tensor), floats and strings do not.
    """
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)) \
            and not isinstance(value, numbers.Number):
        try:
            value = value.item()  # a 0-d tensor or array: its Python scalar (a bool tensor gives a bool)
        except (RuntimeError, ValueError):
            return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None  # numpy.bool_ is not a numbers.Integral
    return int(value)


def all_finite(tensor: object) -> bool:
    """Whether a tensor holds no NaN and no infinity (integer and empty tensors always do).

    Reads its smallest and largest values (``aminmax``, which NaN propagates to): one pass without
    a ``bool`` tensor of its size, several times faster than ``torch.isfinite(t).all()`` on
    model-sized tensors on some CPUs.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    return all(math.isfinite(float(v)) for v in tensor.aminmax())


def non_float32(module: object) -> list[str]:
    """The dtypes of ``module``'s parameters other than float32, by name (``["bfloat16"]``; ``[]``: all float32).

    The exports write float32 files: a bf16 model (a ``precision="bf16-true"`` fit's) is cast first.
    """
    return sorted({str(p.dtype).replace("torch.", "") for p in module.parameters()} - {"float32"})
