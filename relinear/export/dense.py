"""Dense layers of an ONNX graph (MatMul or Gemm against an initializer) -> a dense family's form.

The family's record (`relinear.families.DenseForm`) gives the settings, the fit from `relinear.approx` (fed
the weight in torch's [out, in] layout, so one recipe gives the same factors here as in the torch front end)
and the lowering to standard ops. Factors are stored as new initializers named after the weight they
replace; a weight shared by several nodes is factored once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
from onnxscript.rewriter import RULE_NAME_TAG, pattern

from relinear.export.sites import module_path, selected
from relinear.recipe import RuleConfig
from relinear.rewrite.engine import Skip, over_budget, within_budget
from relinear.rewrite.report import RewriteReport, Site

# Rules are named "relinear.<rule>": the rewriter tags the nodes they write with it (exporters tag theirs too).
RULE_TAG_PREFIX = "relinear."


@dataclass
class Factors:
    """A fitted setting: the factors as the torch op takes them, what they cost, and their weight error."""

    tensors: tuple[torch.Tensor, ...]
    detail: str
    params: int
    error: float  # ||W' - W|| / ||W||: the output error for white inputs (a file has no activations)


def fit(config: RuleConfig, weight: torch.Tensor) -> Factors | Skip:
    """The torch front end's fit (same settings, same factors), the cheapest setting within the config's
    max_error by weight error; or a Skip saying why none is."""
    from relinear.families import family_of

    form = family_of(config).dense
    out_features, in_features = weight.shape

    def candidates():
        for setting in form.settings(config, weight):
            tensors = tuple(t.detach() for t in form.fit(weight, setting))
            dense = form.dense(tensors, in_features, out_features).double()
            error = float(torch.linalg.matrix_norm(dense - weight.double())
                          / torch.linalg.matrix_norm(weight.double()).clamp_min(1e-30))
            yield Factors(tensors, f"{form.knob}={setting}", form.cost(in_features, out_features, setting)[0],
                          error)

    within, best = within_budget(candidates(), config.max_error, lambda f: f.error, keep_all=False)
    if within:
        return within[0]
    return over_budget(best.detail, best.error, config.max_error, measure="weight error")


@dataclass
class _Factored:
    factors: Factors | None  # None: over the error budget, left alone
    site: Site
    values: list[ir.Value]


class DenseRules:
    """One rule config applied to every selected dense site; records each site in `report`."""

    def __init__(self, config: RuleConfig, report: RewriteReport, causal_masks: set[str] | None = None,
                 on_site: Callable[[], None] = lambda: None):
        from relinear.families import family_of

        self.form = family_of(config).dense
        self.config, self.report, self.on_site = config, report, on_site
        self.factored: dict[str, _Factored] = {}
        self.current: tuple[str, int, int] = ("", 0, 0)  # (site, in, out features) of the match in hand

    def rules(self) -> pattern.RewriteRuleSet:
        name = f"{RULE_TAG_PREFIX}{self.config.name}"
        return pattern.RewriteRuleSet([
            pattern.RewriteRule(lambda op, x, w: op.MatMul(x, w), self._rewrite_matmul, self._check, name=name),
            pattern.RewriteRule(lambda op, x, w, b: op.Gemm(x, w, b), self._rewrite_gemm, self._check_gemm,
                                name=name),
            pattern.RewriteRule(lambda op, x, w: op.Gemm(x, w), self._rewrite_matmul, self._check_gemm, name=name),
        ])

    def _check(self, context, x, w, **_) -> bool:
        root = context.root
        if root.metadata_props.get(RULE_NAME_TAG, "").startswith(RULE_TAG_PREFIX):
            return False  # a node relinear just wrote
        if w is None or not w.is_initializer() or w.const_value is None or len(w.shape or ()) != 2:
            return False
        where = module_path(root)
        if not selected(self.config.where, [where, root.name, w.name]):
            return False
        return self._factors(w, transposed=root.attributes.get_int("transB", 0) == 1, where=where) is not None

    def _check_gemm(self, context, x, w, b=None, **_) -> bool:
        attrs = context.root.attributes
        plain = (attrs.get_int("transA", 0) == 0 and attrs.get_float("alpha", 1.0) == 1.0
                 and attrs.get_float("beta", 1.0) == 1.0)
        return plain and self._check(context, x, w)

    def _factors(self, w: ir.Value, *, transposed: bool, where: str) -> Factors | None:
        """Fit once per weight; a weight over the error budget is skipped (and remembered as such)."""
        if w.name not in self.factored:
            array = w.const_value.numpy()
            weight = torch.from_numpy(np.array(array if transposed else array.T, dtype=np.float32))
            try:
                factors = fit(self.config, weight)
            except ValueError as e:  # a setting that does not fit this shape, e.g. more blocks than rows
                factors = Skip(str(e))
            if isinstance(factors, Skip):
                self.report.skip(self.config.name, where, str(factors))
                self.factored[w.name] = _Factored(None, Site(self.config.name, where), [])
                return None
            site = Site(self.config.name, where, weight.numel(), factors.params, 2 * weight.numel(),
                        2 * factors.params, factors.error, factors.detail)
            self.factored[w.name] = _Factored(factors, site, [])
        rows, columns = w.shape
        self.current = (where, columns, rows) if transposed else (where, rows, columns)
        return self.factored[w.name].factors

    def _apply(self, op, x, w):
        entry = self.factored[w.name]
        where, in_features, out_features = self.current
        if not entry.values:
            for i, tensor in enumerate(entry.factors.tensors):
                name = f"{w.name}.relinear.{self.config.name}.{i}"
                # factors are fit in float32; stored transposed for MatMul, in the weight's own dtype so the
                # graph's types still agree
                stored = tensor.transpose(-1, -2).numpy().astype(w.const_value.dtype.numpy())
                entry.values.append(op.initializer(ir.tensor(np.ascontiguousarray(stored), name=name), name))
        self.report.add(dataclasses.replace(entry.site, where=where))
        self.on_site()
        return self.form.lowering(op, x, entry.values, entry.factors.tensors, in_features, out_features)

    def _rewrite_matmul(self, op, x, w, **_):
        return self._apply(op, x, w)

    def _rewrite_gemm(self, op, x, w, b, **_):
        return op.Add(self._apply(op, x, w), b)
