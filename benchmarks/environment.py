"""What every benchmark result records about the run: machine, versions, and the command (repo-relative)."""

from __future__ import annotations

import os
import platform
import sys
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


def command() -> str:
    """The command line as a reader would type it from the repository root, with no machine paths."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(Path.cwd())
    except ValueError:
        script = Path("benchmarks") / script.name
    return " ".join(["python", str(script), *sys.argv[1:]])


def run_info() -> dict:
    return {"cpu": cpu_model(), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cores": os.cpu_count(), "load_average": os.getloadavg(),
            "command": command()}
