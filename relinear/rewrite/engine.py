"""The engine: apply a list of rules to a graph until none fires, recording what fired and what was left alone.

A rule is data (`Rule`): how to match (a `Pattern`, or a function for structures a pattern cannot say),
what to check, and how to rewrite. The engine knows graphs, not math: rules ask `relinear/approx` for
weights. Each round matches on the current graph, records the example activations every match needs in
one run of the *original* computation, then rewrites; so each site's error is measured in isolation.

The engine owns the budgets: a rewrite proposes candidates with their measured error (`Proposal`), and the
engine keeps the one within the config's `max_error`, times it against the matched subgraph
(`relinear.rewrite.timing`) and leaves the site alone when it is not `min_speedup` times faster.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch.fx as fx
from tqdm.auto import tqdm

from relinear.recipe import RuleConfig
from relinear.rewrite import subgraph, timing
from relinear.rewrite.context import GraphContext
from relinear.rewrite.ops import is_metadata_check, module_path
from relinear.rewrite.pattern import Match, Pattern, escaping_intermediate
from relinear.rewrite.report import RewriteReport, Site


class Skip(str):
    """Returned by a rewrite (or check) that declines: the text is the reason shown in the report."""


@dataclass
class Candidate:
    """One setting of a replacement, measured but not yet in the graph: its cost and error (`site`), and how
    to put it there (`insert` adds its nodes before the matched root and returns the one that replaces it)."""

    site: Site
    insert: Callable[[], fx.Node]
    on_apply: Callable[[], None] = lambda: None  # called once this candidate is the one kept


@dataclass
class Proposal:
    """What a rewrite offers: candidates in order of preference (cheapest first), each a `Candidate` or a
    `Skip` that ends the site. Without `fastest`, the first one within the error budget is taken; with it
    (an "auto" setting), every one within budget is timed and the fastest taken."""

    candidates: Iterable[Candidate | Skip]
    fastest: bool = False


Matcher = Pattern | Callable[[fx.Node, GraphContext], Match | None]
# a rewrite returns a Proposal, a Skip, or (node, Site) for a replacement it already inserted (user rules)
Rewrite = Callable[[Match, GraphContext], "Proposal | Skip | tuple[fx.Node, Site]"]


@dataclass(frozen=True)
class Rule:
    name: str
    match: Matcher
    rewrite: Rewrite
    check: Callable[[Match, GraphContext], str | None] | None = None
    select: Callable[[str], bool] = lambda path: True  # the config's `where=` glob
    needs: tuple[str, ...] = ()  # captures whose example values the rewrite reads (recorded before rewriting)
    config: RuleConfig | None = None  # its max_error and min_speedup budget every site
    finish: Callable[[fx.Graph], None] | None = None  # once over the graph after every site is decided

    def find(self, node: fx.Node, ctx: GraphContext) -> Match | None:
        if isinstance(self.match, Pattern):
            return self.match(node)
        return self.match(node, ctx)


MAX_ROUNDS = 8


def site_of(node: fx.Node) -> str:
    return module_path(node) or node.name


def over_budget(detail: str, error: float, max_error: float, measure: str = "relative error") -> Skip:
    return Skip(f"best {detail} has {measure} {error:.3g} > max_error={max_error}")


def within_budget(candidates: Iterable, max_error: float | None, error_of: Callable[[object], float | None],
                  keep_all: bool) -> tuple[list, object]:
    """(the candidates within `max_error`: the first one only unless `keep_all`; the most accurate seen).
    A `Skip` among the candidates ends them; with none within budget by then, it is the reason returned."""
    within, best = [], None
    for candidate in candidates:
        if isinstance(candidate, Skip):
            return within, (best if within else candidate)
        error = error_of(candidate)
        if best is None or (error is not None and error < error_of(best)):
            best = candidate
        if max_error is None or error is None or error <= max_error:
            within.append(candidate)
            if not keep_all:
                break
    return within, best


def apply_rules(gm: fx.GraphModule, rules: list[Rule], ctx: GraphContext, *, progress: bool = True) -> RewriteReport:
    report = RewriteReport()
    decided: set[tuple[str, fx.Node]] = set()
    stopwatch = timing.Stopwatch()
    for _ in range(MAX_ROUNDS):
        matches = _find_matches(gm, rules, ctx, report, decided)
        if not matches:
            break
        needed = [m.captures[name] for rule, m in matches for name in rule.needs if name in m.captures]
        if stopwatch.measuring:  # the inputs of every matched subgraph, to time it alone
            needed += [n for _, m in matches for n in subgraph.inputs_of([m.root, *m.interior])]
        ctx.record(n for v in needed for n in (v if isinstance(v, tuple) else (v,)))
        for rule, m in tqdm(matches, desc="relinear: rewriting", unit="site", disable=not progress or None,
                            leave=False):
            decided.add((rule.name, m.root))
            result = ctx.decide_site(rule, m, functools.partial(_decide, rule, m, ctx, stopwatch))
            if isinstance(result, Skip):
                report.skip(rule.name, site_of(m.root), str(result))
                continue
            new_node, site = result
            new_node.meta.setdefault("nn_module_stack", m.root.meta.get("nn_module_stack", {}))
            m.root.replace_all_uses_with(new_node)
            _erase_unused(gm.graph, [m.root, *m.interior])
            report.add(site)
    stopwatch.save()
    if report.sites:
        for finish in dict.fromkeys(rule.finish for rule in rules if rule.finish is not None):
            finish(gm.graph)
        _drop_unused_weights(gm)
    gm.graph.lint()
    gm.recompile()
    return report


@dataclass
class _Placed:
    """A candidate in the graph: its output node, the nodes and holder attributes it added."""

    candidate: Candidate
    node: fx.Node
    nodes: list[fx.Node]
    attributes: list[str]


def _decide(rule: Rule, m: Match, ctx: GraphContext, stopwatch: timing.Stopwatch) -> tuple[fx.Node, Site] | Skip:
    """The error budget, then the timing budget: which candidate replaces the site, or why none does."""
    config = rule.config
    max_error = config.max_error if config is not None else None
    start = _snapshot(ctx)
    result = rule.rewrite(m, ctx)
    if isinstance(result, Skip):
        return result
    if isinstance(result, tuple):  # already inserted: time it as it stands
        node, site = result
        placed = [_placed_since(ctx, start, Candidate(site, lambda: node), node)]
        if max_error is not None and site.error is not None and site.error > max_error:
            _retract(ctx, placed[0])
            return over_budget(site.detail or rule.name, site.error, max_error)
    else:
        fastest = result.fastest and stopwatch.measuring
        within, best = within_budget(result.candidates, max_error, lambda c: c.site.error, keep_all=fastest)
        if not within:
            return best if isinstance(best, Skip) else over_budget(best.site.detail, best.site.error, max_error)
        placed = [_place(ctx, c) for c in within]
    chosen = placed[0]
    if stopwatch.measuring:
        try:
            subgraphs = [([m.root, *m.interior], m.root, "original")]
            subgraphs += [(p.nodes, p.node, p.candidate.site.detail) for p in placed]
            before, *after = stopwatch.time(*zip(*(_timed(ctx, *s) for s in subgraphs), strict=True))
            for p, seconds in zip(placed, after, strict=True):
                p.candidate.site.time_before, p.candidate.site.time_after = before, seconds
            chosen = min(placed, key=lambda p: p.candidate.site.time_after)
        except Exception as e:  # e.g. symbolic sizes in the example values: decide by error alone, and say so
            for p in placed:
                p.candidate.site.time_before = p.candidate.site.time_after = None
                p.candidate.site.detail += f" (not timed: {type(e).__name__}: {str(e).splitlines()[0][:80]})"
    for p in placed:
        if p is not chosen:
            _retract(ctx, p)
    site = chosen.candidate.site
    min_speedup = stopwatch.min_speedup(config.min_speedup if config is not None else None)
    if site.time_after is not None and min_speedup > 0 and site.time_before < min_speedup * site.time_after:
        _retract(ctx, chosen)
        return Skip(f"not faster: {site.detail or rule.name} measured {timing.format_seconds(site.time_before)} "
                    f"-> {timing.format_seconds(site.time_after)} ({site.time_before / site.time_after:.2f}x < "
                    f"min_speedup={min_speedup:g})")
    chosen.candidate.on_apply()
    return chosen.node, site


def _holder_attributes(ctx: GraphContext) -> set[str]:
    holder = getattr(ctx.gm, ctx.holder_name, None)
    if holder is None:
        return set()
    return set(holder._parameters) | set(holder._buffers) | set(holder._modules)


def _snapshot(ctx: GraphContext) -> tuple[set[fx.Node], set[str]]:
    return set(ctx.gm.graph.nodes), _holder_attributes(ctx)


def _placed_since(ctx: GraphContext, snapshot, candidate: Candidate, node: fx.Node) -> _Placed:
    nodes_before, attributes_before = snapshot
    return _Placed(candidate, node, subgraph.nodes_added(nodes_before, ctx.gm.graph),
                   sorted(_holder_attributes(ctx) - attributes_before))


def _place(ctx: GraphContext, candidate: Candidate) -> _Placed:
    snapshot = _snapshot(ctx)
    return _placed_since(ctx, snapshot, candidate, candidate.insert())


def _retract(ctx: GraphContext, placed: _Placed) -> None:
    """Take a candidate back out: its nodes, and the parameters and modules it added."""
    for node in reversed(placed.nodes):
        if not node.users:
            ctx.gm.graph.erase_node(node)
    holder = getattr(ctx.gm, ctx.holder_name, None)
    sources = getattr(ctx.gm, "_param_name_to_source", None)
    for name in placed.attributes:
        for table in (holder._parameters, holder._buffers, holder._modules):
            table.pop(name, None)
        if sources is not None:
            for qualname in [q for q in sources if q.startswith(f"{ctx.holder_name}.{name}")]:
                del sources[qualname]


def _timed(ctx: GraphContext, nodes: list[fx.Node], output: fx.Node, setting: str):
    """(timing key, a call of the subgraph `nodes` on its example inputs)."""
    module, outside = subgraph.extract(ctx.gm, nodes, output)
    values = [ctx.activation(n) for n in outside]
    read = subgraph.tensors(values) + [p for p in module.parameters()] + [b for b in module.buffers()]
    # shapes sorted: a weight is an input of Dynamo's graph but an attribute of torch.export's, same key
    key = timing.TimingKey(subgraph.op_names(nodes), setting, tuple(sorted(tuple(t.shape) for t in read)),
                           str(read[0].dtype) if read else "", timing.device_of(read))
    return key, lambda: module(*values)


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
