"""What every benchmark result records about the run (machine, versions, the command, repo-relative), and how
it is saved."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

from relinear.bench.environment import cpu_model


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


def save_result(path: str | Path, fields: dict) -> None:
    """Write run_info() + fields as JSON to `path`, whole or not at all (a temporary file renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({**run_info(), **fields}, indent=1))
    partial.replace(path)
    print(f"saved {path}")
