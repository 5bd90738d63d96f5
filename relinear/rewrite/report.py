"""What a rewrite did: each applied site with its cost and measured time before -> after and its measured error,
and each skip with its reason."""

from __future__ import annotations

import collections
import io
import json
from dataclasses import asdict, dataclass, field


@dataclass
class Site:
    rule: str
    where: str  # module path, or the node name when the graph has no module information
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0  # multiply-adds x 2 per token (dense) or per example (attention)
    flops_after: int = 0
    error: float | None = None  # relative output error ||y' - y|| / ||y|| on the example inputs
    detail: str = ""  # the setting chosen, e.g. "rank=64" or "nblocks=4"
    time_before: float | None = None  # seconds, median on the example inputs (None: not timed)
    time_after: float | None = None


@dataclass
class RewriteReport:
    sites: list[Site] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (rule, where, reason)

    @property
    def counts(self) -> dict[str, int]:
        return dict(collections.Counter(s.rule for s in self.sites))

    def add(self, site: Site) -> None:
        self.sites.append(site)

    def skip(self, rule: str, where: str, reason: str) -> None:
        self.skipped.append((rule, where, reason))

    def extend(self, other: RewriteReport) -> None:
        self.sites.extend(other.sites)
        self.skipped.extend(other.skipped)

    @property
    def max_error(self) -> float | None:
        errors = [s.error for s in self.sites if s.error is not None]
        return max(errors) if errors else None

    @property
    def timed(self) -> list[Site]:
        return [s for s in self.sites if s.time_before is not None and s.time_after is not None]

    @property
    def time_before(self) -> float | None:
        """Total measured time of the rewritten sites before the rewrite (None when none was timed)."""
        return sum(s.time_before for s in self.timed) if self.timed else None

    @property
    def time_after(self) -> float | None:
        return sum(s.time_after for s in self.timed) if self.timed else None

    def to_dict(self) -> dict:
        return {
            "counts": self.counts,
            "sites": [asdict(s) for s in self.sites],
            "skipped": [{"rule": r, "where": w, "reason": why} for r, w, why in self.skipped],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict) -> RewriteReport:
        return cls(
            sites=[Site(**s) for s in data.get("sites", [])],
            skipped=[(s["rule"], s["where"], s["reason"]) for s in data.get("skipped", [])],
        )

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table

        table = Table(title=f"relinear: {sum(self.counts.values())} rewrites {self.counts or ''}")
        for col, justify in (("rule", "left"), ("where", "left"), ("setting", "left"), ("params", "right"),
                             ("FLOPs", "right"), ("time (median)", "right"), ("rel. error", "right")):
            table.add_column(col, justify=justify)
        for s in self.sites:
            table.add_row(
                s.rule, s.where, s.detail,
                f"{_si(s.params_before)} -> {_si(s.params_after)}",
                f"{_si(s.flops_before)} -> {_si(s.flops_after)}",
                _times(s.time_before, s.time_after),
                "-" if s.error is None else f"{s.error:.2e}",
            )
        if self.sites:
            pb, pa = sum(s.params_before for s in self.sites), sum(s.params_after for s in self.sites)
            fb, fa = sum(s.flops_before for s in self.sites), sum(s.flops_after for s in self.sites)
            table.add_row("total", "", "", f"{_si(pb)} -> {_si(pa)}", f"{_si(fb)} -> {_si(fa)}",
                          _times(self.time_before, self.time_after),
                          "" if self.max_error is None else f"max {self.max_error:.2e}", style="bold")
        parts = [table]
        if self.skipped:
            skips = Table(title=f"left alone: {len(self.skipped)}")
            for col in ("rule", "where", "reason"):
                skips.add_column(col)
            for r, w, why in self.skipped:
                skips.add_row(r, w, why)
            parts.append(skips)
        return Group(*parts)

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=140, color_system=None).print(self)
        return buf.getvalue()


def relative_error(approx, exact) -> float:
    """||approx - exact|| / ||exact|| in float64: the error every site reports."""
    exact, approx = exact.double(), approx.double()
    return float((approx - exact).norm() / exact.norm().clamp_min(1e-300))


def _times(before: float | None, after: float | None) -> str:
    from relinear.rewrite.timing import format_seconds

    if before is None or after is None:
        return "-"
    return f"{format_seconds(before)} -> {format_seconds(after)} ({before / after:.2f}x)"


def _si(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
