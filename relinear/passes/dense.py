"""Dense layers -> structured or sparse forms: the one torch rule of every dense family.

Match a dense product against a weight (`F.linear`, `addmm` with a [in, out] weight as GPT-2's Conv1D,
`x @ W`, `x @ W.t()`), fit the family's factors with `relinear/approx` for each setting its record
(`relinear.families.DenseForm`) lists, measure each one's output error on the example activation, and
propose them to the engine, which applies the error and timing budgets. A weight used at several sites
(ALBERT's shared layer, a module calling one Linear twice) gets one replacement that all its sites share.
"""

from __future__ import annotations

import functools
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
                    extra = form.op_scalars(factors, out_f)
                    return graph.call_function(form.torch_op(), (m["x"], *factor_nodes, bias_node, *extra))

            def remember() -> None:
                if reuse is None:
                    shared[identity] = _Shared(setting, factors, list(made), where)

            return Candidate(site, insert, remember)

        if identity in shared:  # one weight, one replacement: the setting its first site chose
            first = shared[identity]
            return Proposal([candidate(first.setting, first.factors, first)])

        settings = form.settings(cfg, w)
        reads = form.inputs(cfg)
        inputs = (ctx.input_stats(m["x"], with_gram=reads == "gram"),) if reads else ()

        def candidates():
            for setting in settings:
                try:
                    factors = form.fit(w, setting, *inputs)
                except ValueError as e:
                    yield Skip(f"{cfg.name}: {form.knob}={setting!r} does not fit this layer [{out_f}x{in_f}]: {e}")
                    return
                yield candidate(setting, factors)

        return Proposal(candidates(), fastest=len(settings) > 1)

    return rewrite


def dense_rules(cfg: RuleConfig) -> list[Rule]:
    from relinear.families import family_of

    return [Rule(cfg.name, match_dense, _rewrite(cfg, family_of(cfg).dense), select=cfg.selects, needs=("x",))]


def detect_rules(cfg: RuleConfig) -> list[Rule]:
    """`detect`: each weight's rewrite is that of the form it exactly has (`relinear.families.detect`)."""
    from relinear.families.detect import detected_form

    def rewrite(m: Match, ctx: GraphContext) -> Proposal | Skip:
        form = detected_form(dense_weight(m, ctx)[0])
        return Skip(f"{cfg.name}: {form}") if isinstance(form, str) else _rewrite(cfg, form)(m, ctx)

    return [Rule(cfg.name, match_dense, rewrite, select=cfg.selects, needs=("x",))]


def dense_forms() -> dict:
    """Each dense family's op overload -> its form."""
    from relinear.families import families

    forms = {}
    for family in families():
        if family.dense is not None:
            family.load_kernels()
            forms[family.dense.torch_op()] = family.dense
    return forms


def dense_site_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights of every rewritten dense site in `model` that can train: the arguments its family's
    `DenseForm.trains` names, and its bias, read from the op calls `insert` wrote (weights as get_attr nodes).
    A weight that several sites share counts once; a constant (a buffer, as under the compile backend) not at all.
    """
    forms = dense_forms()
    found: dict[int, torch.nn.Parameter] = {}
    for gm in (m for m in model.modules() if isinstance(m, fx.GraphModule)):
        for node in gm.graph.nodes:
            form = forms.get(node.target) if node.op == "call_function" else None
            if form is None:
                continue
            names = [a.name for a in node.target._schema.arguments]
            arguments = {**dict(zip(names, node.args, strict=False)), **node.kwargs}
            for arg in (arguments.get(name) for name in (*form.trains, "bias")):
                if isinstance(arg, fx.Node) and arg.op == "get_attr":
                    value = functools.reduce(getattr, arg.target.split("."), gm)
                    if isinstance(value, torch.nn.Parameter):
                        found.setdefault(id(value), value)
    return list(found.values())
