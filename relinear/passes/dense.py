"""Dense layers -> structured or sparse forms: the one torch rule of every dense family.

Match a dense product against a weight (`F.linear`, `addmm` with a [in, out] weight as GPT-2's Conv1D,
`x @ W`, `x @ W.t()`), fit the family's factors with `relinear/approx` for each setting its record
(`relinear.families.DenseForm`) lists, measure each one's output error on the example activation, and
propose them to the engine, which applies the error and timing budgets. A weight used at several sites
(ALBERT's shared layer, a module calling one Linear twice) gets one replacement that all its sites share.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.fx as fx

from relinear.families import DenseForm
from relinear.recipe import RuleConfig
from relinear.rewrite.context import GraphContext
from relinear.rewrite.engine import Candidate, Proposal, Rule, Skip, site_of
from relinear.rewrite.pattern import AnyOf, Match, Opt, P, Var, Weight
from relinear.rewrite.report import Site, relative_error

_TRANSPOSED = AnyOf(
    P("t", Weight("w")), P("mT", Weight("w")), P("transpose", Weight("w"), Var(), Var()),
    P("permute", Weight("w"), Var()),
)
DENSE = AnyOf(
    P("linear", Var("x"), Weight("w"), Opt(Weight("b")), kwnames=("input", "weight", "bias")),
    P("addmm", Weight("b"), Var("x"), Weight("wt")),
    P("matmul", Var("x"), _TRANSPOSED),
    P("matmul", Var("x"), Weight("wt")),
)


def match_dense(node: fx.Node, ctx: GraphContext) -> Match | None:
    """A dense product whose weight (and bias) are parameters, not per-call inputs."""
    m = DENSE(node)
    if m is None:
        return None
    weight = m.get("w") or m.get("wt")
    if not ctx.is_weight(weight) or ctx.value(weight).dim() != 2:
        return None
    if m.get("b") is not None and (not ctx.is_weight(m["b"]) or ctx.value(m["b"]).dim() != 1):
        return None
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    return m


def dense_weight(m: Match, ctx: GraphContext) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer as (W [out, in], b): whatever the spelling, y = x @ W.T + b."""
    w = ctx.value(m["w"]) if m.get("w") is not None else ctx.value(m["wt"]).T
    b = ctx.value(m["b"]) if m.get("b") is not None else None
    return w.detach(), None if b is None else b.detach()


@dataclass
class _Shared:
    """A weight's replacement, kept at its first site: later sites of the same weight reuse its parameters."""

    setting: object
    factors: tuple[torch.Tensor, ...]
    targets: list[str]  # get_attr targets of the factors, then the bias (when there is one)
    where: str


# per graph: (config, weight, bias) identities -> the replacement every site of that weight shares
_SHARED: weakref.WeakKeyDictionary[GraphContext, dict[tuple, _Shared]] = weakref.WeakKeyDictionary()


def _rewrite(cfg: RuleConfig, form: DenseForm):
    def rewrite(m: Match, ctx: GraphContext) -> Proposal:
        w, b = dense_weight(m, ctx)
        out_f, in_f = w.shape
        x = ctx.activation(m["x"])
        where = site_of(m.root)
        with torch.no_grad():
            exact = torch.nn.functional.linear(x, w, b)
        tokens = x.numel() // in_f
        bias_params = 0 if b is None else out_f
        shared = _SHARED.setdefault(ctx, {})
        identity = (cfg, "w" if m.get("w") is not None else "wt", id(ctx.value(m.get("w") or m.get("wt"))),
                    id(ctx.value(m["b"])) if m.get("b") is not None else None)

        def candidate(setting, factors, reuse: _Shared | None = None) -> Candidate:
            with torch.no_grad():
                err = relative_error(form.call(x, factors, b, out_f), exact)
            params, flops = form.cost(in_f, out_f, setting)
            site = Site(cfg.name, where, in_f * out_f + bias_params, params + bias_params,
                        2 * in_f * out_f * tokens, flops * tokens, err, f"{form.knob}={setting}")
            if reuse is not None:  # the parameters are counted at the site that made them
                site.params_before = site.params_after = 0
                site.detail += f", shares {reuse.where}'s weights"
            made: list[str] = []

            def insert() -> fx.Node:
                graph = ctx.gm.graph
                with graph.inserting_before(m.root):
                    if reuse is not None:
                        nodes = [graph.get_attr(t) for t in reuse.targets]
                    else:
                        stem = ctx.fresh_name(f"{cfg.name}_{where}")
                        tensors = [*factors, *([] if b is None else [b])]
                        names = [*(f"{stem}_{i}" for i in range(len(factors))), f"{stem}_bias"]
                        nodes = [ctx.add_param(n, t) for n, t in zip(names, tensors, strict=False)]
                        made[:] = [n.target for n in nodes]
                    factor_nodes, bias_node = nodes[:len(factors)], (nodes[len(factors)] if b is not None else None)
                    extra = (out_f,) if form.takes_out_features else ()
                    return graph.call_function(form.torch_op(), (m["x"], *factor_nodes, bias_node, *extra))

            def remember() -> None:
                if reuse is None:
                    shared[identity] = _Shared(setting, factors, list(made), where)

            return Candidate(site, insert, remember)

        if identity in shared:  # one weight, one replacement: the setting its first site chose
            first = shared[identity]
            return Proposal([candidate(first.setting, first.factors, first)])

        settings = form.settings(cfg, w)

        def candidates():
            for setting in settings:
                try:
                    factors = form.fit(w, setting)
                except ValueError as e:
                    yield Skip(f"{cfg.name}: {form.knob}={setting!r} does not fit this layer [{out_f}x{in_f}]: {e}")
                    return
                yield candidate(setting, factors)

        return Proposal(candidates(), fastest=len(settings) > 1)

    return rewrite


def dense_rules(cfg: RuleConfig) -> list[Rule]:
    from relinear.families import family_of

    return [Rule(cfg.name, match_dense, _rewrite(cfg, family_of(cfg).dense), select=cfg.selects, needs=("x",))]
