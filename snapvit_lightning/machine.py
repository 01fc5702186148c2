"""Where something ran: the device, the CPU model, torch threads and the platform."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

__all__ = ["build_machine", "cpu_model"]


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
