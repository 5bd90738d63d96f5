"""Rewrite decisions that outlive one graph, for the compile backend.

Dynamo turns one model into several graphs, and each reaches the backend alone with the example inputs of the
call being compiled: the first call's static graph, the dynamic graph of the automatic recompile when a size
changes, a graph per piece between graph breaks, a new graph when a guard fails (grad mode, a flag). A rewrite
whose choice reads those examples (a rank picked for `max_error`, a polynomial fitted on the range it saw, a
mask proven to be padding, a site skipped over budget) would choose differently in each graph, and the
compiled model would compute a different function depending on which graph runs it.

So the first graph that rewrites a site decides it, and every later graph of the same model and recipe that
reaches the same site replays the decision: a Skip stays a Skip, and a rewrite inserts the same nodes reading
the very tensors and modules the first graph computed (computed once, shared, never refitted). A site is the
same when its rule, module path, ordinal, op, capture layout and weights (identity and in-place version) agree;
otherwise it is decided afresh.
"""

from __future__ import annotations

import collections
import dataclasses
import operator

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate

from relinear.rewrite.context import GraphContext
from relinear.rewrite.engine import site_of
from relinear.rewrite.ops import canonical
from relinear.rewrite.pattern import Match
from relinear.rewrite.report import Site


@dataclasses.dataclass(frozen=True)
class _Inserted:
    index: int  # position among the nodes the rewrite inserted


@dataclasses.dataclass(frozen=True)
class _Captured:
    name: str
    position: int | None  # the position inside a tuple capture (additive mask terms), else None


@dataclasses.dataclass(frozen=True)
class _Held:
    value: torch.Tensor | torch.nn.Module  # what a get_attr / call_module of the holder reads


@dataclasses.dataclass
class _Recorded:
    nodes: list[tuple[str, object, object, object]]  # (op, target, args, kwargs), references encoded
    result: object  # the encoded node that replaces the root
    site: Site


@dataclasses.dataclass
class Decision:
    signature: tuple
    outcome: object  # a Skip, or the _Recorded rewrite


class _NotReplayable(Exception):
    """The rewrite reads a node that is neither its own nor a capture: it cannot be moved to another graph."""


def signature(m: Match, ctx: GraphContext) -> tuple:
    """What must agree for a replay: the root's op, how many nodes the match covers, every capture's kind
    and aliasing, constants by value, and weights by identity, in-place version, shape and dtype."""
    parts: list = [canonical(m.root), len(m.interior)]
    first: dict[fx.Node, tuple] = {}
    for name in sorted(m.captures):
        value = m.captures[name]
        for i, item in enumerate(value if isinstance(value, tuple) else (value,)):
            if not isinstance(item, fx.Node):
                parts.append((name, i, repr(item)))
                continue
            weight = ctx.value(item) if ctx.is_weight(item) else None
            held = None if weight is None else (id(weight), weight._version, tuple(weight.shape), weight.dtype)
            parts.append((name, i, first.setdefault(item, (name, i)), held))
    return tuple(parts)


class ReplayContext(GraphContext):
    """A GraphContext whose sites are decided once per model: `decisions` is shared by every graph of one
    model and recipe (the backend keeps it); `replayed` counts the sites of this graph answered from it."""

    def __init__(self, *args, decisions: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.decisions = decisions
        self.replayed = 0
        self.inserted: list[fx.Node] = []  # the nodes the latest site's rewrite inserted
        self._ordinals: collections.Counter = collections.Counter()

    def decide_site(self, rule, m: Match, decide):
        where = site_of(m.root)
        key = (rule.name, where, self._ordinals[(rule.name, where)])
        self._ordinals[(rule.name, where)] += 1
        sig = signature(m, self)
        known = self.decisions.get(key)
        replay = known is not None and known.signature == sig
        before = set(self.gm.graph.nodes)
        if replay:
            self.replayed += 1
            result = known.outcome if not isinstance(known.outcome, _Recorded) else self._replay(known.outcome, m)
        else:
            result = decide()
        self.inserted = [n for n in self.gm.graph.nodes if n not in before]
        if not replay:
            try:
                outcome = result if not isinstance(result, tuple) else self._record(result, m)
                self.decisions[key] = Decision(sig, outcome)
            except _NotReplayable:
                self.decisions.pop(key, None)  # later graphs decide this site themselves
        return result

    def _record(self, result: tuple[fx.Node, Site], m: Match) -> _Recorded:
        new_node, site = result
        index = {n: i for i, n in enumerate(self.inserted)}
        captured = {}
        for name, value in m.captures.items():
            for i, item in enumerate(value if isinstance(value, tuple) else (value,)):
                if isinstance(item, fx.Node):
                    captured.setdefault(item, _Captured(name, i if isinstance(value, tuple) else None))

        def encode(arg):
            if not isinstance(arg, fx.Node):
                return arg
            if arg in index:
                return _Inserted(index[arg])
            if arg in captured:
                return captured[arg]
            raise _NotReplayable(arg.name)

        nodes = []
        for n in self.inserted:
            target = _Held(self._held(n.target)) if n.op in ("get_attr", "call_module") else n.target
            nodes.append((n.op, target, map_aggregate(n.args, encode), map_aggregate(n.kwargs, encode)))
        return _Recorded(nodes, encode(new_node), dataclasses.replace(site))

    def _held(self, qualname: str):
        if qualname.rpartition(".")[0] != self.holder_name:
            raise _NotReplayable(qualname)  # reads a model attribute: only the holder's contents move
        return operator.attrgetter(qualname)(self.gm)

    def _replay(self, recorded: _Recorded, m: Match) -> tuple[fx.Node, Site]:
        graph = self.gm.graph
        made: list[fx.Node] = []

        def decode(arg):
            if isinstance(arg, _Inserted):
                return made[arg.index]
            if isinstance(arg, _Captured):
                value = m.captures[arg.name]
                return value if arg.position is None else value[arg.position]
            return arg

        with graph.inserting_before(m.root):
            for op, target, args, kwargs in recorded.nodes:
                if isinstance(target, _Held):
                    target = self.adopt(self.fresh_name("replayed"), target.value)
                made.append(graph.create_node(op, target, map_aggregate(args, decode), map_aggregate(kwargs, decode)))
        return decode(recorded.result), dataclasses.replace(recorded.site)
