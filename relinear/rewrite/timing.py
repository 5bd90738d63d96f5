"""How long a site takes before and after its rewrite: the speed half of every decision.

The engine times the matched subgraph and its replacement(s) on the example inputs, on the device the rewrite
runs on: the median of `DEFAULT_REPEATS` calls of each after a warm-up, sampled in turns. A site whose
replacement is not `min_speedup` times faster is left alone, with both times as the reason. Times are cached on
disk per (op, setting, shapes, dtype, device, versions), so a second rewrite on the same machine makes the same
decisions without timing again; `rl.rewrite` and the torch.compile backend share the cache.

Settings come from, in order: `with timing.settings(...)`, the environment (`RELINEAR_TIMING=off` times
nothing and checks no speed, which is what relinear's own test suite sets; `RELINEAR_MIN_SPEEDUP`;
`RELINEAR_TIMING_CACHE` = a file path, or `off`), the defaults below. A rule config's own `min_speedup`
wins over the session's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_MIN_SPEEDUP = 1.0
DEFAULT_REPEATS = 5


@dataclass(frozen=True)
class TimingKey:
    """What a measured time depends on; its text is the cache key."""

    op: str  # the ops of the subgraph, e.g. "linear" or "low_rank_linear"
    setting: str  # "original", or the replacement's setting ("rank=8")
    shapes: tuple[tuple[int, ...], ...]  # of every tensor the subgraph reads, weights included
    dtype: str
    device: str

    def text(self) -> str:
        return json.dumps([self.op, self.setting, [list(s) for s in self.shapes], self.dtype, self.device,
                           versions()])


# (what is timed, a call of each) -> seconds each; given the original and its candidates together
Timer = Callable[[list[TimingKey], list[Callable[[], object]]], list[float]]


def interleaved_samples(runs: list[Callable[[], object]], repeats: int = DEFAULT_REPEATS,
                        clock: Callable[[], float] = time.perf_counter,
                        synchronize: Callable[[], None] = lambda: None) -> list[list[float]]:
    """`repeats` times (by `clock`) of each of `runs`, sampled in turns (one call of each per round, after a
    warm-up call of each): a slow phase of a shared machine then falls on every side of a ratio, not on one."""
    for run in runs:
        run()
    synchronize()
    samples: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, taken in zip(runs, samples, strict=True):
            start = clock()
            run()
            synchronize()
            taken.append(clock() - start)
    return samples


def interleaved_medians(runs: list[Callable[[], object]], repeats: int = DEFAULT_REPEATS,
                        clock: Callable[[], float] = time.perf_counter,
                        synchronize: Callable[[], None] = lambda: None) -> list[float]:
    """The median of each run's `interleaved_samples`."""
    return [statistics.median(taken) for taken in interleaved_samples(runs, repeats, clock, synchronize)]


def wall_clock(keys: list[TimingKey], runs: list[Callable[[], object]]) -> list[float]:
    cuda = any(key.device.startswith("cuda") for key in keys)
    with torch.no_grad():
        return interleaved_medians(runs, synchronize=torch.cuda.synchronize if cuda else (lambda: None))


@dataclass(frozen=True)
class TimingSettings:
    measure: bool = True  # False: nothing is timed, no speed is checked, the report shows no times
    min_speedup: float = DEFAULT_MIN_SPEEDUP  # for rules whose config leaves min_speedup unset; 0: no check
    cache: str | None = None  # the cache file; None: no cache
    timer: Timer = wall_clock


def default_cache_path() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "relinear", "timings.json")


def _from_environment() -> TimingSettings:
    flag = os.environ.get("RELINEAR_TIMING", "on").strip().lower()
    if flag not in ("on", "off", "1", "0", "true", "false"):
        raise ValueError(f"RELINEAR_TIMING must be on or off, got {flag!r}")
    speedup = os.environ.get("RELINEAR_MIN_SPEEDUP")
    try:
        min_speedup = DEFAULT_MIN_SPEEDUP if speedup is None else float(speedup)
    except ValueError:
        raise ValueError(f"RELINEAR_MIN_SPEEDUP must be a number, got {speedup!r}") from None
    cache = os.environ.get("RELINEAR_TIMING_CACHE", default_cache_path())
    return TimingSettings(measure=flag in ("on", "1", "true"), min_speedup=min_speedup,
                          cache=None if cache.strip().lower() == "off" else cache)


_overrides: list[TimingSettings] = []


def current() -> TimingSettings:
    return _overrides[-1] if _overrides else _from_environment()


@contextlib.contextmanager
def settings(**changes) -> Iterator[TimingSettings]:
    """Change timing for a block: `measure=False`, `min_speedup=`, `cache=path or None`, `timer=fake`."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(TimingSettings)}
    if unknown:
        raise TypeError(f"timing.settings: unknown setting(s) {sorted(unknown)}")
    chosen = dataclasses.replace(current(), **changes)
    _overrides.append(chosen)
    try:
        yield chosen
    finally:
        _overrides.remove(chosen)


@functools.cache
def versions() -> str:
    """The software a time depends on: a new torch, triton or relinear times again."""
    from importlib import metadata

    found = [f"torch {torch.__version__}"]
    for package in ("triton", "relinear"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package} -")
    return ", ".join(found)


def device_of(tensors) -> str:
    """The device a time was taken on: the GPU's name, or the CPU with its thread count."""
    for t in tensors:
        if t.is_cuda:
            return f"cuda {torch.cuda.get_device_name(t.device)}"
    return f"cpu x{torch.get_num_threads()}"


class TimingCache:
    """{key text: seconds} in a JSON file, written whole (atomically) by `save`."""

    def __init__(self, path: str | None):
        self.path = path
        self.times: dict[str, float] = {}
        self.dirty = False
        if path is not None and os.path.exists(path):
            try:
                self.times = {k: float(v) for k, v in json.loads(Path(path).read_text()).items()}
            except (ValueError, AttributeError):  # a damaged cache is only lost time: start a new one
                self.times = {}

    def get(self, key: TimingKey) -> float | None:
        return self.times.get(key.text())

    def put(self, key: TimingKey, seconds: float) -> None:
        self.times[key.text()] = seconds
        self.dirty = True

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
            json.dump(self.times, f, indent=0, sort_keys=True)
        os.replace(f.name, self.path)
        self.dirty = False


class Stopwatch:
    """One rewrite's timing: the settings in force when it started, and the cache it reads and fills."""

    def __init__(self, chosen: TimingSettings | None = None):
        self.settings = chosen or current()
        self.cache = TimingCache(self.settings.cache if self.settings.measure else None)

    @property
    def measuring(self) -> bool:
        return self.settings.measure

    def min_speedup(self, configured: float | None) -> float:
        return self.settings.min_speedup if configured is None else configured

    def time(self, keys: list[TimingKey], runs: list[Callable[[], object]]) -> list[float]:
        """Seconds for each key: from the cache, else measured (those not cached, together)."""
        missing = [i for i, key in enumerate(keys) if self.cache.get(key) is None]
        if missing:
            measured = self.settings.timer([keys[i] for i in missing], [runs[i] for i in missing])
            for i, seconds in zip(missing, measured, strict=True):
                self.cache.put(keys[i], float(seconds))
        return [self.cache.get(key) for key in keys]

    def save(self) -> None:
        self.cache.save()


def format_seconds(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"
