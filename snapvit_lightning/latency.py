"""Measured latency: interleaved timing of models, and the largest budget that meets a latency target.

Latency falls as the budget shrinks, so the largest subnet whose latency on *this* device is at
most a target is found by bisection on the FLOPs fraction (:func:`find_latency_budget`). Every
candidate is timed in interleaved rounds with the dense model (one forward of each per round,
after a warm-up; the median of each), and its latency is read relative to the dense model's in
the same rounds, so that load changes on a shared machine shift both alike.

This module knows nothing of elastic checkpoints: it takes a function that builds the subnet for
a FLOPs fraction (:meth:`ElasticViT.latency_budget` passes its own).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import statistics
import time
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .errors import warn_at_caller
from . import machine
from .evaluation import _check_device as _check_torch_device
from .evaluation import _check_int, _check_positive_float, _model_device, measure_latency
from .structure import count_flops

__all__ = [
    "BACKENDS",
    "LOAD_DRIFT_WARN",
    "LatencyTargetError",
    "LatencyTrial",
    "LatencyBudget",
    "torch_threads",
    "busy_note",
    "DTYPES",
    "dtype_name",
    "measure_interleaved",
    "measure_models",
    "find_latency_budget",
]

BACKENDS = ("torch", "onnx")

Timer = Callable[[Sequence[nn.Module]], Sequence[float]]


LOAD_DRIFT_WARN = 1.3
"""The dense model's slowest over fastest latency across trials above which a result is flagged."""

RETIMES = 2
"""Times a trial is timed again while the dense model beside it reads more than :data:`LOAD_DRIFT_WARN` off its first time."""


def _off(ms: float, reference: float) -> float:
    """How far apart two times are, as the larger over the smaller (1.0: equal)."""
    return max(ms, reference) / max(min(ms, reference), 1e-12)


def busy_note(device: str, threads: int | None = None) -> str | None:
    """Why a CPU timing now would read slow (else ``None``).

    The machine's 1-minute load average exceeds its cores, or ``threads`` (the timing's intra-op
    threads) exceed the cores this process may use. Latencies taken so are longer than a quiet
    machine's, so a latency budget chosen now is smaller than needed and the models' ratios shift too.
    """
    if not str(device).startswith("cpu"):
        return None
    load, over = machine.busy_load(), None if threads is None else machine.oversubscribed(threads)
    if load is None and over is None:
        return None
    said = [f"the machine is busy ({load})"] * (load is not None) + [f"the timing runs {over}"] * (over is not None)
    return (f"{' and '.join(said)}: models time slower than on a quiet machine, and their ratios shift (a latency "
            "budget chosen now is smaller than a quiet machine allows); measure where nothing else runs"
            + (", with at most as many threads as cores" if over else ""))


class LatencyTargetError(ValueError):
    """A latency target outside what the budgets reach: below the smallest, or met by the dense model."""


@dataclasses.dataclass(frozen=True)
class LatencyTrial:
    """One timed candidate of the search.

    Attributes:
        flops: Requested FLOPs fraction (what the builder was called with).
        flops_fraction: The built subnet's FLOPs as a fraction of the dense model's.
        latency_ms: ``raw_ms`` scaled by the dense model's reference latency over its latency
            in the same rounds (the number compared with the target).
        raw_ms: Median of the candidate's timed forwards (ms per batch).
        dense_alongside_ms: Median of the dense model's forwards in the same rounds.
        meets: ``latency_ms <= target``.
    """

    flops: float
    flops_fraction: float
    latency_ms: float
    raw_ms: float
    dense_alongside_ms: float
    meets: bool


@dataclasses.dataclass(frozen=True)
class LatencyBudget:
    """The result of :func:`find_latency_budget`.

    Attributes:
        target_ms: The latency target (ms per batch).
        flops: The FLOPs fraction to build (``ElasticViT.subnet(flops=...)``): the largest
            candidate that met the target.
        flops_fraction: That subnet's actual FLOPs fraction.
        latency_ms: Its latency (see :class:`LatencyTrial`).
        dense_ms: The dense model's reference latency (first rounds).
        smallest_ms: The smallest budget's latency.
        step: Width of the last bisection interval: no budget more than ``step`` (FLOPs
            fraction) above ``flops`` was left untested.
        trials: Every timed candidate, in order (smallest budget first).
        batch_size, device, backend, threads, input_size: How it was measured (``input_size``: ``(H, W)`` px).
        seconds: Wall time of the search.
        chosen: The trial whose timing chose ``flops`` (its raw times; a cached trial of the same
            FLOPs may have been asked for at another fraction).
    """

    target_ms: float
    flops: float
    flops_fraction: float
    latency_ms: float
    dense_ms: float
    smallest_ms: float
    step: float
    trials: tuple[LatencyTrial, ...]
    batch_size: int
    device: str
    backend: str
    threads: int | None
    seconds: float
    load_average: float | None = None
    dtype: str = "float32"
    chosen: LatencyTrial | None = None
    input_size: tuple[int, int] | None = None

    @property
    def load_drift(self) -> float:
        """The dense model's slowest over its fastest latency across the trials (1.0: steady).

        Each trial is read relative to the dense model timed alongside it, which corrects for a
        load that slows every model alike; above :data:`LOAD_DRIFT_WARN` the machine's load changed
        enough during the search that the choice should be measured again on a quiet machine.
        """
        dense = [t.dense_alongside_ms for t in self.trials]
        return max(dense) / min(dense) if dense and min(dense) > 0 else 1.0

    def record(self) -> dict[str, Any]:
        """How the choice was measured, as plain values (a subnet file's ``budget["latency"]``).

        ``target_ms``, ``measured_ms`` (the chosen budget's latency, scaled as every trial's), ``raw_ms`` and
        ``dense_alongside_ms`` (what its timing read: the scaled figure holds only while the load slowed
        both alike), ``dense_ms``, ``batch_size``, ``device``, ``device_name`` (the GPU or CPU model),
        ``backend``, ``threads`` (``None``: torch's setting, ``torch_threads``), ``load_drift``,
        ``load_average`` (the machine's 1-minute load average as the search began), ``dtype`` (what
        the models were timed in) and ``input_size``: a latency means nothing without them.
        """
        from .machine import build_machine

        machine = build_machine(self.device)
        chosen = self._chosen_trial()
        return {"target_ms": self.target_ms, "measured_ms": self.latency_ms,
                "raw_ms": None if chosen is None else chosen.raw_ms,
                "dense_alongside_ms": None if chosen is None else chosen.dense_alongside_ms, "dense_ms": self.dense_ms,
                "batch_size": self.batch_size, "device": self.device, "device_name": machine["device_name"],
                "backend": self.backend, "threads": self.threads, "torch_threads": machine["torch_threads"],
                "load_drift": self.load_drift, "load_average": self.load_average, "dtype": self.dtype,
                "input_size": None if self.input_size is None else list(self.input_size)}

    def describe(self, warn: bool = True) -> str:
        """What was measured and chosen, as lines of text (``warn``: and a ``warning:`` line if the load drifted)."""
        where = _where(self.backend, self.device, self.threads)
        lines = [f"latency target {self.target_ms:g} ms per batch of {self.batch_size}{pixels(self.input_size)} on {where}, {self.dtype}: "
                 f"dense {self.dense_ms:.2f} ms, smallest budget {self.smallest_ms:.2f} ms (each trial's ms: its raw time "
                 "scaled by the dense model's first time over its time alongside the trial, so load drift cancels; "
                 f"timed again, up to {RETIMES} times, where that time was over {LOAD_DRIFT_WARN}x off)"]
        for t in self.trials:
            lines.append(f"  FLOPs {100 * t.flops_fraction:5.1f}%: {t.latency_ms:8.2f} ms "
                         f"(raw {t.raw_ms:.2f} ms, dense alongside {t.dense_alongside_ms:.2f} ms)  "
                         f"{'meets' if t.meets else 'too slow'}")
        chosen = self._chosen_trial()
        raw = "" if chosen is None else f"raw {chosen.raw_ms:.2f} ms beside the dense model's {chosen.dense_alongside_ms:.2f}; "
        lines.append(f"chose FLOPs {100 * self.flops_fraction:.1f}% at {self.latency_ms:.2f} ms "
                     f"({raw}{100 * self.latency_ms / self.target_ms:.0f}% of the target; bisection step "
                     f"{100 * self.step:.1f} FLOPs points), search {self.seconds:.1f} s")
        if warn and self.drift_warning() is not None:
            lines.append(f"warning: {self.drift_warning()}")
        return "\n".join(lines)

    def drift_warning(self) -> str | None:
        """What the load's drift during the search means, when the dense model's times spread beyond ``LOAD_DRIFT_WARN``."""
        return _drift_note(self) if self.load_drift > LOAD_DRIFT_WARN else None

    def _chosen_trial(self) -> Any:
        """The trial that timed the chosen budget (``None`` when none is known)."""
        return self.chosen if self.chosen is not None else next(
            (t for t in self.trials if t.flops == self.flops and t.meets), None)


def _drift_note(budget: LatencyBudget) -> str:
    dense = [t.dense_alongside_ms for t in budget.trials]
    chosen = budget._chosen_trial()
    over = "" if chosen is None or chosen.raw_ms <= budget.target_ms else (  # "meets" only as read relative to the dense
        f"; the chosen budget's own timing read {chosen.raw_ms:.2f} ms, over the {budget.target_ms:g} ms target")
    return (f"the dense model measured {min(dense):.2f}-{max(dense):.2f} ms across the trials "
            f"({budget.load_drift:.1f}x): the machine's load changed during the search; each trial is read "
            f"relative to the dense model timed alongside it, which holds only while the load slows both alike{over}: "
            "measure again on a quiet machine")


def _where(backend: str, device: str, threads: int | None) -> str:
    """``cpu (torch, 2 threads)``: on a CPU the thread count timed with (torch's setting when ``threads`` is ``None``;
    ONNX Runtime's own default is not named)."""
    if threads is None and backend == "torch" and str(device).startswith("cpu"):
        threads = torch.get_num_threads()
    return f"{device} ({backend}{'' if threads is None else f', {threads} thread' + 's' * (threads != 1)})"


# --------------------------------------------------------------------------- validation


def _check_device(device: object, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    dev = _check_torch_device(device)
    if backend == "onnx" and dev.type not in ("cpu", "cuda"):
        raise ValueError(f"ONNX Runtime runs on cpu or cuda, got device {device!r}")
    return str(dev)


# --------------------------------------------------------------------------- measuring


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (restored after); ``None``: as is."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(_check_int("threads", threads, 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_interleaved(
    models: Sequence[nn.Module],
    *,
    batch_size: int = 1,
    img_size: int | tuple[int, int] | None = None,
    device: str | torch.device = "cpu",
    warmup: int = 2,
    repeats: int = 10,
) -> list[float]:
    """Median latency (ms per batch) of each model, timed in interleaved rounds.

    Each model is warmed up, then every round runs one timed forward of each model in turn
    (:func:`~snapvit_lightning.evaluation.measure_latency` with one repeat), so a load change on
    the machine hits all of them alike.

    Args:
        models: Modules taking ``[B, C, H, W]`` images (torch models or :class:`OnnxModel`).
        batch_size: Images per forward.
        img_size: Input size; each model's ``patch_embed.img_size`` by default.
        device: Where to time (see ``measure_latency``).
        warmup: Untimed forwards of each model first.
        repeats: Rounds; the result is each model's median over them.

    Raises:
        ValueError: A bad argument (see ``measure_latency``).
    """
    warmup = _check_int("warmup", warmup, 0)
    repeats = _check_int("repeats", repeats, 1)
    options = dict(batch_size=batch_size, img_size=img_size, device=device)
    if warmup:
        for model in models:
            measure_latency(model, warmup=warmup - 1, repeats=1, **options)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for model, t in zip(models, times):
            t.append(measure_latency(model, warmup=0, repeats=1, **options)["median_ms"])
    return [statistics.median(t) for t in times]


#: What the latency tools can time a model in: its files' float32, or a copy cast for deployment.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_dtype(dtype: object, backend: str) -> torch.dtype:
    if isinstance(dtype, str) and dtype in DTYPES:  # the CLI's names
        dtype = DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of torch.{', torch.'.join(DTYPES)} (or its name), got {dtype!r}")
    if backend != "torch" and dtype != torch.float32:
        raise ValueError(f"dtype={dtype} needs backend='torch': the ONNX graphs are float32")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``: how labels and records name a timing's dtype."""
    return str(dtype).removeprefix("torch.")


def _prepare(model: nn.Module, backend: str, device: str, threads: int | None,
             dtype: torch.dtype = torch.float32) -> nn.Module:
    """The module to time: the torch model on ``device`` (a copy cast to ``dtype`` unless float32), or its
    ONNX graph in ONNX Runtime."""
    if backend == "torch":
        return model.eval().to(device) if dtype == torch.float32 else copy.deepcopy(model).eval().to(device, dtype)
    from .onnx_export import OnnxModel, onnx_bytes

    return OnnxModel(onnx_bytes(model), threads=threads, device=torch.device(device).type)


def pixels(size: Any) -> str:
    """`` at H x W px`` for a latency line (``""`` when unknown, e.g. a record written before it was kept)."""
    return f" at {size[0]} x {size[1]} px" if isinstance(size, (list, tuple)) and len(size) == 2 else ""


def _input_size(model: nn.Module) -> tuple[int, int]:
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        raise TypeError(f"the latency tools time timm ViTs (with a patch_embed.img_size), got {type(model).__name__}")
    return int(size[0]), int(size[1])


def _timer(size: tuple[int, int], batch_size: int, device: str, backend: str, warmup: int, repeats: int) -> Timer:
    """:func:`measure_interleaved` with these settings (ONNX Runtime graphs take CPU tensors)."""
    return functools.partial(
        measure_interleaved, batch_size=batch_size, img_size=size, device=device if backend == "torch" else "cpu",
        warmup=warmup, repeats=repeats,
    )


def measure_models(
    models: Sequence[nn.Module],
    *,
    batch_size: int = 1,
    device: str = "cpu",
    threads: int | None = None,
    backend: str = "torch",
    warmup: int = 2,
    repeats: int = 10,
    dtype: torch.dtype = torch.float32,
) -> list[float]:
    """Median latency (ms per batch) of each timm ViT, timed interleaved on ``device``.

    Args:
        models: timm ViTs (for ``backend="torch"`` moved to ``device`` and back after, left in
            eval mode; for ``"onnx"`` exported and run by ONNX Runtime).
        batch_size: Images per forward.
        device: ``"cpu"``, ``"cuda"``, ...
        threads: Intra-op threads of torch (or ONNX Runtime); ``None``: the current setting.
        backend: ``"torch"`` or ``"onnx"`` (ONNX Runtime; needs the ``onnx`` extra).
        warmup: Untimed forwards of each model first.
        repeats: Interleaved rounds.
        dtype: ``torch.float32`` (the models as they are), ``torch.bfloat16`` or ``torch.float16``:
            copies cast to it are timed, as a deployment that casts its subnet runs (torch only).

    Raises:
        ValueError: A bad argument or an unavailable device.
    """
    device = _check_device(device, backend)
    dtype = _check_dtype(dtype, backend)
    if isinstance(models, nn.Module) or not all(isinstance(m, nn.Module) for m in models):
        raise TypeError(f"models must be a sequence of timm ViTs, got {type(models).__name__}"
                        + (": pass [model]" if isinstance(models, nn.Module) else ""))
    batch_size, warmup, repeats = (_check_int(k, v, low) for k, v, low in
                                   (("batch_size", batch_size, 1), ("warmup", warmup, 0), ("repeats", repeats, 1)))
    if not models:
        return []
    busy = busy_note(device, threads)
    if busy is not None:
        warn_at_caller(busy)
    timer = _timer(_input_size(models[0]), batch_size, device, backend, warmup, repeats)
    homes = [_model_device(m) for m in models]
    with torch_threads(threads):
        try:
            return list(timer([_prepare(m, backend, device, threads, dtype) for m in models]))
        finally:
            for model, home in zip(models, homes):
                model.to(home)


# --------------------------------------------------------------------------- search


def find_latency_budget(
    build: Callable[[float], nn.Module],
    latency_ms: float,
    *,
    min_flops: float,
    batch_size: int = 1,
    device: str = "cpu",
    threads: int | None = None,
    backend: str = "torch",
    warmup: int = 2,
    repeats: int = 10,
    resolution: float = 0.02,
    timer: Timer | None = None,
    dtype: torch.dtype = torch.float32,
) -> LatencyBudget:
    """The largest budget whose measured latency is at most ``latency_ms``, by bisection on FLOPs.

    ``build(f)`` must return the subnet (a timm ViT) for FLOPs fraction ``f`` in
    ``[min_flops, 1]``, ``build(1.0)`` the dense model, with FLOPs not decreasing in ``f``.
    The dense model and the smallest budget are timed first; a target the dense model already
    meets, or one below the smallest budget's latency, is refused. Then ``[min_flops, 1]`` is
    halved until it is at most ``resolution`` wide, timing each new subnet interleaved with the
    dense model (subnets that equal one already timed are not timed again; one whose dense model
    read more than :data:`LOAD_DRIFT_WARN` off its first time, a load spike, is timed again, up to
    :data:`RETIMES` times, keeping the timing closest to it). Latency is assumed
    to fall with the budget; the result is the lower end, a budget that met the target, at most
    ``resolution`` below the largest tested budget boundary that did not.

    Args:
        build: FLOPs fraction → subnet (a new model; it is moved to ``device``).
        latency_ms: Target latency, ms per batch of ``batch_size``.
        min_flops: The smallest fraction ``build`` accepts.
        batch_size: Images per timed forward.
        device: Where to time (torch device; ``cpu``/``cuda`` for ONNX Runtime).
        threads: Intra-op threads (torch and ONNX Runtime); ``None``: the current setting.
        backend: ``"torch"`` or ``"onnx"`` (each candidate exported and run by ONNX Runtime).
        warmup: Untimed forwards of each model before a measurement.
        repeats: Interleaved rounds per measurement (median; at least 10 recommended).
        resolution: Stop when the bisection interval is this narrow (FLOPs fraction).
        timer: Replaces the timing: models → latencies (ms), e.g. a deterministic model of
            latency for tests. Default: :func:`measure_interleaved`.
        dtype: Time copies cast to ``torch.bfloat16``/``torch.float16`` (a deployment that casts
            its subnet; torch only) instead of the float32 models ``build`` returns.

    Raises:
        LatencyTargetError: (a ``ValueError``) The dense model meets the target, or the target
            is below the smallest budget's latency; the message says what was measured.
        ValueError: A bad argument.
    """
    latency_ms = _check_positive_float("latency_ms", latency_ms)
    min_flops = _check_positive_float("min_flops", min_flops)
    if min_flops > 1.0:
        raise ValueError(f"min_flops must be in (0, 1], got {min_flops!r}")
    resolution = _check_positive_float("resolution", resolution)
    if resolution >= 1.0:  # the FLOPs line is (0, 1]: a step of 1 or more bisects nothing
        raise ValueError(f"resolution must be in (0, 1), got {resolution!r}")
    batch_size = _check_int("batch_size", batch_size, 1)
    warmup = _check_int("warmup", warmup, 0)
    repeats = _check_int("repeats", repeats, 1)
    if threads is not None:
        threads = _check_int("threads", threads, 1)
    device = _check_device(device, backend)
    dtype = _check_dtype(dtype, backend)
    start = time.perf_counter()
    load = machine.load_average()
    busy = None if timer is not None else busy_note(device, threads)  # a timer of the caller's own reads no machine
    if busy is not None:
        warn_at_caller(busy)

    with torch_threads(threads):
        dense_model = build(1.0)
        dense_flops = count_flops(dense_model)["total"]
        size = _input_size(dense_model)
        dense = _prepare(dense_model, backend, device, threads, dtype)
        del dense_model
        timer = timer or _timer(size, batch_size, device, backend, warmup, repeats)

        trials: list[LatencyTrial] = []
        by_flops: dict[int, LatencyTrial] = {}
        reference: list[float] = []  # the dense model's latency in the first rounds

        def trial(f: float) -> LatencyTrial:
            model = build(f)
            flops = count_flops(model)["total"]
            if flops in by_flops:
                return by_flops[flops]
            prepared = _prepare(model, backend, device, threads, dtype)
            dense_ms, raw_ms = (float(v) for v in timer([dense, prepared]))
            if not reference:
                reference.append(dense_ms)
            for _ in range(RETIMES):  # a load spike: the scaling holds only while the load slows both alike
                if _off(dense_ms, reference[0]) <= LOAD_DRIFT_WARN:
                    break
                again = tuple(float(v) for v in timer([dense, prepared]))
                if _off(again[0], reference[0]) < _off(dense_ms, reference[0]):
                    dense_ms, raw_ms = again
            estimate = raw_ms * reference[0] / dense_ms
            result = LatencyTrial(f, flops / dense_flops, estimate, raw_ms, dense_ms, estimate <= latency_ms)
            trials.append(result)
            by_flops[flops] = result
            return result

        smallest = trial(min_flops)
        dense_ms = reference[0]
        by_flops.setdefault(dense_flops, LatencyTrial(1.0, 1.0, dense_ms, dense_ms, dense_ms, dense_ms <= latency_ms))
        where = f"batch {batch_size}{pixels(size)} on {_where(backend, device, threads)}, {dtype_name(dtype)}"
        if dense_ms <= latency_ms:
            raise LatencyTargetError(
                f"the dense model already meets latency_ms={latency_ms:g}: it measured {dense_ms:.2f} ms per "
                f"{where}; no slicing needed"
            )
        if not smallest.meets:
            raise LatencyTargetError(
                f"latency_ms={latency_ms:g} is below the smallest budget's {smallest.latency_ms:.2f} ms "
                f"(FLOPs {100 * smallest.flops_fraction:.1f}%; dense {dense_ms:.2f} ms) per {where}"
            )
        lo, hi, best = min_flops, 1.0, smallest  # best (at lo) meets the target; hi does not
        while hi - lo > resolution:
            mid = 0.5 * (lo + hi)
            t = trial(mid)
            if t.meets:
                lo, best = mid, t
            else:
                hi = mid
    result = LatencyBudget(
        target_ms=latency_ms, flops=lo, flops_fraction=best.flops_fraction, latency_ms=best.latency_ms,
        dense_ms=dense_ms, smallest_ms=smallest.latency_ms, step=hi - lo, trials=tuple(trials),
        batch_size=batch_size, device=device, backend=backend, threads=threads,
        seconds=time.perf_counter() - start, load_average=load, dtype=dtype_name(dtype), chosen=best,
        input_size=size,
    )
    if result.drift_warning() is not None:
        warn_at_caller(result.drift_warning())
    return result
