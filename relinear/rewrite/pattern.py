"""A small pattern language over torch.fx graphs, in canonical op names (see `ops.py`).

    P("linear", Var("x"), Weight("w"), Opt(Weight("b")))

matches `F.linear(x, w, b)`, `aten.linear.default(x, w)`, ... and captures x, w and b. A pattern is data; the
engine (engine.py) decides what to do with a match. Interior nodes (matched by `P` below the root) are
recorded so the engine can refuse a match whose intermediate value is also used elsewhere.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch.fx as fx

from relinear.rewrite.ops import canonical, is_metadata_check


@dataclass
class Match:
    root: fx.Node
    captures: dict[str, object] = field(default_factory=dict)
    interior: list[fx.Node] = field(default_factory=list)  # matched call nodes below the root

    def __getitem__(self, name: str):
        return self.captures[name]

    def get(self, name: str, default=None):
        return self.captures.get(name, default)


class Pattern:
    def match(self, value, m: Match) -> bool:
        raise NotImplementedError

    def __call__(self, node: fx.Node) -> Match | None:
        """Match at `node` (the root); a fresh Match or None."""
        m = Match(root=node)
        return m if self.match(node, m) else None


@dataclass(frozen=True)
class Var(Pattern):
    """Anything (a node or a Python value); captured under `name` unless name is None."""

    name: str | None = None

    def match(self, value, m: Match) -> bool:
        if self.name is None:
            return True
        if self.name in m.captures:  # the same name twice means the same value
            return m.captures[self.name] is value
        m.captures[self.name] = value
        return True


@dataclass(frozen=True)
class Weight(Var):
    """A weight: a `get_attr` (torch.export graphs) or a placeholder (Dynamo graphs, where parameters arrive
    as inputs). Whether a placeholder really holds a parameter is decided in the rule's check, which sees values."""

    def match(self, value, m: Match) -> bool:
        return isinstance(value, fx.Node) and value.op in ("get_attr", "placeholder") and super().match(value, m)


@dataclass(frozen=True)
class Const(Var):
    """A Python number."""

    def match(self, value, m: Match) -> bool:
        return isinstance(value, numbers.Number) and not isinstance(value, bool) and super().match(value, m)


@dataclass(frozen=True)
class Opt(Pattern):
    """An optional argument: matches `inner`, or an absent / None argument."""

    inner: Pattern

    def match(self, value, m: Match) -> bool:
        return value is None or self.inner.match(value, m)


@dataclass(frozen=True)
class P(Pattern):
    """A call node whose canonical op is `op` (or one of `op`), with positional argument patterns.

    Missing trailing arguments are read from keywords by `kwnames` (the function's parameter names), so
    `F.linear(x, weight=w)` and `F.linear(x, w)` match alike.
    """

    op: str | tuple[str, ...]
    args: tuple[Pattern, ...] = ()
    kwnames: tuple[str, ...] = ()
    name: str | None = None

    def __init__(self, op, *args: Pattern, kwnames: tuple[str, ...] = (), name: str | None = None):
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "kwnames", kwnames)
        object.__setattr__(self, "name", name)

    def match(self, value, m: Match) -> bool:
        if not isinstance(value, fx.Node):
            return False
        ops = self.op if isinstance(self.op, tuple) else (self.op,)
        if canonical(value) not in ops:
            return False
        for i, sub in enumerate(self.args):
            if i < len(value.args):
                a = value.args[i]
            elif i < len(self.kwnames):
                a = value.kwargs.get(self.kwnames[i])
            else:
                a = None
            if not sub.match(a, m):
                return False
        if value is not m.root:
            m.interior.append(value)
        if self.name:
            m.captures[self.name] = value
        return True


@dataclass(frozen=True)
class AnyOf(Pattern):
    """The first alternative that matches (captures of failed alternatives are discarded)."""

    alternatives: tuple[Pattern, ...]

    def __init__(self, *alternatives: Pattern):
        object.__setattr__(self, "alternatives", alternatives)

    def match(self, value, m: Match) -> bool:
        for alt in self.alternatives:
            trial = Match(m.root, dict(m.captures), list(m.interior))
            if alt.match(value, trial):
                m.captures, m.interior = trial.captures, trial.interior
                return True
        return False


def escaping_intermediate(m: Match) -> fx.Node | None:
    """An interior node also used outside the match: rewriting would drop that other use's value."""
    inside = set(m.interior) | {m.root}
    for node in m.interior:
        if any(user not in inside and not is_metadata_check(user) for user in node.users):
            return node
    return None
