"""Dense layers -> structured matrices: low-rank, Monarch, BTT.

One rule shape serves every family: match a dense product against a weight (`F.linear`, `addmm` with a
[in, out] weight as GPT-2's Conv1D, `x @ W`, `x @ W.t()`), fit the family's factors with `relinear/approx`,
measure the output error on the example activation, and call the family's custom op. A family is a row of
data (`DenseFamily`): which settings to try, how to fit, which op, what it costs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from relinear.approx import btt as btt_math
from relinear.approx import low_rank as low_rank_math
from relinear.approx import monarch as monarch_math
from relinear.kernels import btt as _btt_ops  # noqa: F401  (registers the ops)
from relinear.kernels import low_rank as _low_rank_ops  # noqa: F401
from relinear.kernels import monarch as _monarch_ops  # noqa: F401
from relinear.passes import register
from relinear.recipe import BTT, LowRank, Monarch, RuleConfig
from relinear.rewrite.context import GraphContext
from relinear.rewrite.engine import Rule, Skip, site_of
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


@dataclass(frozen=True)
class DenseFamily:
    config: type
    knob: str  # the config field that sets the size, e.g. "nblocks"
    settings: Callable[[RuleConfig, torch.Tensor], list]  # values of the knob to try, cheapest first
    fit: Callable[[torch.Tensor, object], tuple[torch.Tensor, ...]]
    op: Callable  # torch.ops.relinear.<op>.default
    cost: Callable[[int, int, object], tuple[int, int]]  # (in, out, setting) -> (params, flops per token)
    takes_out_features: bool = True


def _low_rank_settings(cfg: LowRank, w: torch.Tensor) -> list[int]:
    if cfg.rank == "auto":
        return sorted({r for r in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048) if r < min(w.shape)}
                      | {min(w.shape)})
    if cfg.energy is not None:
        return [low_rank_math.rank_for_energy(w, cfg.energy)]
    if cfg.ratio is not None:
        return [low_rank_math.rank_for_ratio(w, cfg.ratio)]
    return [cfg.rank]


def _pow2_settings(value, largest: int) -> list[int]:
    if value != "auto":
        return [value]
    # fewer blocks / higher rank = more parameters, so the cheapest setting comes first
    return [b for b in (64, 32, 16, 8, 4, 2) if b <= largest]


FAMILIES: dict[type, DenseFamily] = {
    LowRank: DenseFamily(
        LowRank, "rank", _low_rank_settings,
        fit=lambda w, r: tuple(reversed(low_rank_math.svd_factors(w, r))),  # (down, up)
        op=torch.ops.relinear.low_rank_linear.default,
        cost=lambda i, o, r: low_rank_math.low_rank_cost(i, o, r),
        takes_out_features=False,
    ),
    Monarch: DenseFamily(
        Monarch, "nblocks", lambda cfg, w: _pow2_settings(cfg.nblocks, min(w.shape)),
        fit=monarch_math.monarch_project,
        op=torch.ops.relinear.monarch_linear.default,
        cost=monarch_math.monarch_cost,
    ),
    BTT: DenseFamily(
        BTT, "rank", lambda cfg, w: [1, 2, 4, 8, 16, 32] if cfg.rank == "auto" else [cfg.rank],
        fit=btt_math.btt_fit,
        op=torch.ops.relinear.btt_linear.default,
        cost=btt_math.btt_cost,
    ),
}


def _make_rewrite(cfg: RuleConfig, family: DenseFamily):
    def rewrite(m: Match, ctx: GraphContext):
        w, b = dense_weight(m, ctx)
        out_f, in_f = w.shape
        x = ctx.activation(m["x"])
        where = site_of(m.root)
        extra = (out_f,) if family.takes_out_features else ()
        best = None
        with torch.no_grad():
            exact = torch.nn.functional.linear(x, w, b)
            for setting in family.settings(cfg, w):
                try:
                    factors = family.fit(w, setting)
                except ValueError as e:
                    return Skip(f"{cfg.name}: {family.knob}={setting!r} does not fit this layer "
                                f"[{out_f}x{in_f}]: {e}")
                err = relative_error(family.op(x, *factors, b, *extra), exact)
                if best is None or err < best[2]:
                    best = (setting, factors, err)
                if cfg.max_error is None or err <= cfg.max_error:
                    chosen = (setting, factors, err)
                    break
            else:
                return Skip(f"{cfg.name}: best {family.knob}={best[0]} has relative error {best[2]:.3g} > "
                            f"max_error={cfg.max_error}")
        setting, factors, err = chosen
        graph = ctx.gm.graph
        stem = ctx.fresh_name(f"{cfg.name}_{where}")
        with graph.inserting_before(m.root):
            factor_nodes = [ctx.add_param(f"{stem}_{i}", f) for i, f in enumerate(factors)]
            bias_node = ctx.add_param(f"{stem}_bias", b) if b is not None else None
            new = graph.call_function(family.op, (m["x"], *factor_nodes, bias_node, *extra))
        tokens = x.numel() // in_f
        params, flops = family.cost(in_f, out_f, setting)
        bias_params = 0 if b is None else out_f
        return new, Site(cfg.name, where, in_f * out_f + bias_params, params + bias_params,
                          2 * in_f * out_f * tokens, flops * tokens, err, f"{family.knob}={setting}")

    return rewrite


def dense_rule(cfg: RuleConfig) -> Rule:
    family = FAMILIES[type(cfg)]
    return Rule(cfg.name, match_dense, _make_rewrite(cfg, family), select=cfg.selects, needs=("x",))


for _config in FAMILIES:
    register(_config)(lambda cfg: [dense_rule(cfg)])
