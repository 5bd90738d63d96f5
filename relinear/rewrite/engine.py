"""The engine: apply a list of rules to a graph until none fires, recording what fired and what was left alone.

A rule is data (`Rule`): how to match (a `Pattern`, or a function for structures a pattern cannot say),
what to check, and how to rewrite. The engine knows graphs, not math: rules ask `relinear/approx` for
weights. Each round matches on the current graph, records the example activations every match needs in
one run of the *original* computation, then rewrites; so each site's error is measured in isolation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx
from tqdm.auto import tqdm

from relinear.rewrite.context import GraphContext
from relinear.rewrite.ops import is_metadata_check, module_path
from relinear.rewrite.pattern import Match, Pattern, escaping_intermediate
from relinear.rewrite.report import RewriteReport, Site


class Skip(str):
    """Returned by a rewrite (or check) that declines: the text is the reason shown in the report."""


Matcher = Pattern | Callable[[fx.Node, GraphContext], Match | None]


@dataclass(frozen=True)
class Rule:
    name: str
    match: Matcher
    rewrite: Callable[[Match, GraphContext], tuple[fx.Node, Site] | Skip]
    check: Callable[[Match, GraphContext], str | None] | None = None
    select: Callable[[str], bool] = lambda path: True  # the config's `where=` glob
    needs: tuple[str, ...] = ()  # captures whose example values the rewrite reads (recorded before rewriting)

    def find(self, node: fx.Node, ctx: GraphContext) -> Match | None:
        if isinstance(self.match, Pattern):
            return self.match(node)
        return self.match(node, ctx)


MAX_ROUNDS = 8


def site_of(node: fx.Node) -> str:
    return module_path(node) or node.name


def apply_rules(gm: fx.GraphModule, rules: list[Rule], ctx: GraphContext, *, progress: bool = True) -> RewriteReport:
    report = RewriteReport()
    decided: set[tuple[str, fx.Node]] = set()
    for _ in range(MAX_ROUNDS):
        matches = _find_matches(gm, rules, ctx, report, decided)
        if not matches:
            break
        needed = [m.captures[name] for rule, m in matches for name in rule.needs if name in m.captures]
        ctx.record(n for v in needed for n in (v if isinstance(v, tuple) else (v,)))
        for rule, m in tqdm(matches, desc="relinear: rewriting", unit="site", disable=not progress or None,
                            leave=False):
            result = ctx.rewrite_site(rule, m)
            decided.add((rule.name, m.root))
            if isinstance(result, Skip):
                report.skip(rule.name, site_of(m.root), str(result))
                continue
            new_node, site = result
            new_node.meta.setdefault("nn_module_stack", m.root.meta.get("nn_module_stack", {}))
            m.root.replace_all_uses_with(new_node)
            _erase_unused(gm.graph, [m.root, *m.interior])
            report.add(site)
    if report.sites:
        _drop_unused_weights(gm)
    gm.graph.lint()
    gm.recompile()
    return report


def _erase_unused(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase the matched nodes nothing uses any more, in whatever order the matcher listed them: a dead node
    left in the graph would still run (and a replaced attention would still cost its quadratic softmax)."""
    pending = list(dict.fromkeys(nodes))
    while pending:
        erased = False
        for node in list(pending):
            for check in [u for u in node.users if is_metadata_check(u)]:
                graph.erase_node(check)
            if not node.users:
                graph.erase_node(node)
                pending.remove(node)
                erased = True
        if not erased:
            return  # the rest is still used outside the match (checked by the escape rule) or by each other


def _drop_unused_weights(gm: fx.GraphModule) -> None:
    """Replaced weights leave the module too, so the rewritten model really is smaller. Only tensors read by
    a get_attr that lost its last user go: parameters of called submodules are used without a get_attr."""
    dead = [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]
    for node in dead:
        gm.graph.erase_node(node)
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in {n.target for n in dead} - still_read:
        owner, _, attr = target.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        module._parameters.pop(attr, None)
        module._buffers.pop(attr, None)


def _find_matches(gm, rules, ctx, report, decided) -> list[tuple[Rule, Match]]:
    """At most one match per node; no two matches share a node, and none reads a node another one replaces
    (it would read a deleted node): the next round takes those."""
    found, claimed, inputs = [], set(), set()
    for node in gm.graph.nodes:
        for rule in rules:
            if (rule.name, node) in decided:
                continue
            m = rule.find(node, ctx)
            if m is None or not rule.select(site_of(node)):
                continue
            escaped = escaping_intermediate(m)
            reason = (f"intermediate {escaped.name} is also used elsewhere" if escaped is not None
                      else rule.check(m, ctx) if rule.check else None)
            if reason:
                decided.add((rule.name, node))
                report.skip(rule.name, site_of(node), reason)
                continue
            nodes = {m.root, *m.interior}
            captured = {v for v in m.captures.values() if isinstance(v, fx.Node)} - nodes
            if nodes & (claimed | inputs) or captured & claimed:
                continue
            claimed |= nodes
            inputs |= captured
            found.append((rule, m))
            break
    return found
