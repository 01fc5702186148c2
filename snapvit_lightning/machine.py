"""Where something ran: the device, the CPU model, torch threads, the platform, and how busy the machine is."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["build_machine", "busy_load", "cpu_model", "load_average", "oversubscribed", "usable_cores"]


def load_average() -> float | None:
    """The machine's 1-minute load average (``None`` where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; else the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cores(n: int) -> str:
    return f"{n} core{'s' * (n != 1)}"


def busy_load() -> str | None:
    """``1-minute load average 6.64 on the machine's 2 cores`` when the load exceeds them, else ``None``.

    The load average counts the whole machine's runnable processes, so it is compared with the whole
    machine's cores, not with the ones this process may use.
    """
    load, cores = load_average(), os.cpu_count() or 1
    if load is None or load <= cores:
        return None
    return f"1-minute load average {load:.2f} on the machine's {_cores(cores)}"


def oversubscribed(threads: int) -> str | None:
    """``64 threads on the 2 cores this process may use`` when ``threads`` exceed them, else ``None``."""
    cores = usable_cores()
    return None if threads <= cores else f"{threads} threads on the {_cores(cores)} this process may use"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (``platform.processor()`` is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_machine(device: Any = "cpu") -> dict[str, Any]:
    """Where a build stage ran: ``device``, ``device_name`` (GPU or CPU model), ``cpu``, threads, platform."""
    import torch

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else cpu_model()
    return {"device": str(device), "device_name": name, "cpu": cpu_model(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
