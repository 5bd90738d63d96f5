"""Time and memory of model calls, measured so that a ratio means something on a shared machine."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch


def interleaved_ms(calls: dict[str, Callable[[], object]], rounds: int,
                   clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Wall milliseconds of every call, `rounds` samples each, taken in turn after a warm-up call each: the
    rewrite engine's own sampler (`timing.interleaved_samples`), keyed by name. A slow phase of the machine
    (runs here vary by 2-3x within minutes) then lands on every side of a ratio, not on one."""
    from relinear.rewrite.timing import interleaved_samples

    samples = interleaved_samples(list(calls.values()), rounds, clock)
    return {name: [seconds * 1e3 for seconds in taken] for name, taken in zip(calls, samples, strict=True)}


def peak_bytes(call: Callable[[], object], *modules: torch.nn.Module) -> int:
    """Peak bytes of live tensors (weights, activations, temporaries) during `call`, by torch's MemTracker,
    which follows every tensor the dispatcher creates: on CPU too, where no allocator keeps statistics."""
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(*modules)
    with tracker, warnings.catch_warnings():
        # its module tracker warns when a graph module's calls do not nest as it expects; the totals still hold
        warnings.filterwarnings("ignore", message="The module hierarchy tracking")
        call()
    return int(sum(by_kind["Total"] for by_kind in tracker.get_tracker_snapshot("peak").values()))
