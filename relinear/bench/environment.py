"""What a measurement depends on besides the code: the machine, its load, and the software versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def machine() -> dict:
    """The CPU (or GPU), threads, load average when asked, and the versions of the packages a time depends on."""
    return {"cpu": cpu_model(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            **{name: package_version(name) for name in ("transformers", "relinear", "matplotlib")}}
