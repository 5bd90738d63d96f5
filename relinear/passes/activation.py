"""GELU / SiLU -> cheaper activations. The fitted form is a plain torch function in the graph (Horner's rule
and two `where`s), so Inductor fuses it and the ONNX exporter writes it in standard ops."""

from __future__ import annotations

import torch

from relinear.approx import activations as act
from relinear.families.activation_approx import ActivationApprox
from relinear.rewrite.context import GraphContext
from relinear.rewrite.engine import Candidate, Proposal, Rule, Skip, site_of
from relinear.rewrite.ops import arg, canonical
from relinear.rewrite.pattern import Match
from relinear.rewrite.report import Site, relative_error


def match_activation(node, ctx: GraphContext) -> Match | None:
    op = canonical(node)
    if op == "gelu" and arg(node, 1, "approximate", "none") == "none":
        return Match(node, {"x": node.args[0], "activation": "gelu"})
    if op == "silu":
        return Match(node, {"x": node.args[0], "activation": "silu"})
    return None


def _replacement(cfg: ActivationApprox, activation: str, x: torch.Tensor):
    """(function, extra args, elementwise cost) of the cheaper form, or a Skip."""
    if cfg.target == "tanh":
        if activation != "gelu":
            return Skip(f"target='tanh' is GELU's tanh form; this is {activation}")
        return act.gelu_tanh, (), act.COST["tanh"] + 6
    if cfg.target == "relu":
        return torch.relu, (), act.COST["relu"]
    lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        return Skip("the example input is constant: no range to fit a polynomial on")
    return act.polynomial_activation, (act.fit_polynomial(activation, lo, hi, cfg.degree),), 2 * cfg.degree + 4


def activation_rules(cfg: ActivationApprox) -> list[Rule]:
    def rewrite(m: Match, ctx: GraphContext):
        x = ctx.activation(m["x"])
        found = _replacement(cfg, m["activation"], x)
        if isinstance(found, Skip):
            return found
        fn, extra, cost = found
        with torch.no_grad():
            err = relative_error(fn(x, *extra), act.EXACT[m["activation"]](x))
        detail = cfg.target + (f", degree={cfg.degree}" if cfg.target == "poly" else "")
        n = x.numel()
        site = Site(cfg.name, site_of(m.root), 0, 0, act.COST[m["activation"]] * n, cost * n, err, detail)

        def insert():
            with ctx.gm.graph.inserting_before(m.root):
                return ctx.gm.graph.call_function(fn, (m["x"], *extra))

        return Proposal([Candidate(site, insert)])

    return [Rule(cfg.name, match_activation, rewrite, select=cfg.selects, needs=("x",))]
