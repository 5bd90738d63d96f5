"""Dense layers of an ONNX graph (MatMul or Gemm against an initializer) -> structured factors.

The new weights come from `relinear.approx`, fed the weight in torch's [out, in] layout, so one recipe gives
the same factors here as in the torch front end. Factors are stored as new initializers named after the
weight they replace; a weight shared by several nodes is factored once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
from onnxscript.rewriter import RULE_NAME_TAG, pattern

from relinear.export import lowering
from relinear.export.sites import module_path, selected
from relinear.recipe import RuleConfig
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


def fit(config: RuleConfig, weight: torch.Tensor) -> Factors:
    """The torch front end's fit (same settings, same factors); with max_error, the cheapest setting within
    budget, else the most accurate one tried."""
    from relinear.passes.dense import FAMILIES

    family = FAMILIES[type(config)]
    out_features, in_features = weight.shape
    best = None
    for setting in family.settings(config, weight):
        tensors = tuple(t.detach() for t in family.fit(weight, setting))
        dense = LOWERINGS[config.name].dense(tensors, in_features, out_features).double()
        error = float(torch.linalg.matrix_norm(dense - weight.double())
                      / torch.linalg.matrix_norm(weight.double()).clamp_min(1e-30))
        candidate = Factors(tensors, f"{family.knob}={setting}", family.cost(in_features, out_features, setting)[0],
                            error)
        if best is None or error < best.error:
            best = candidate
        if config.max_error is None or error <= config.max_error:
            return candidate
    return best


def _lower_low_rank(op, x, stored, factors, in_features: int, out_features: int):
    return lowering.low_rank_matmul(op, x, *stored)


def _lower_btt(op, x, stored, factors, in_features: int, out_features: int):
    grid = lowering.btt_grid(factors[0].shape, factors[1].shape)
    return lowering.block_tensor_train_matmul(op, x, *stored, grid, in_features, out_features)


@dataclass(frozen=True)
class Lowering:
    """How a family's factors live in an ONNX file."""

    store: Callable[[torch.Tensor], torch.Tensor]  # factor -> initializer (pre-transposed for MatMul)
    lower: Callable  # (op, x, stored values, factors, in, out) -> x @ W'^T
    dense: Callable  # (factors, in, out) -> W' [out, in], from relinear.approx: the error it costs


def _transposed(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-1, -2)


def _btt_dense(factors, in_features: int, out_features: int) -> torch.Tensor:
    from relinear.approx.btt import btt_to_dense

    return btt_to_dense(*factors, in_features, out_features)


# Monarch is stored and lowered as the BTT pair it is (relinear.approx.monarch).
LOWERINGS: dict[str, Lowering] = {
    "low_rank": Lowering(_transposed, _lower_low_rank, lambda factors, i, o: factors[1] @ factors[0]),
    "monarch": Lowering(_transposed, _lower_btt, _btt_dense),
    "btt": Lowering(_transposed, _lower_btt, _btt_dense),
}


@dataclass
class _Factored:
    factors: Factors | None  # None: over the error budget, left alone
    site: Site
    values: list[ir.Value]


class DenseRules:
    """One rule config applied to every selected dense site; records each site in `report`."""

    def __init__(self, config: RuleConfig, report: RewriteReport, on_site: Callable[[], None] = lambda: None):
        if config.name not in LOWERINGS:
            raise ValueError(f"rewrite_onnx: rule {config.name!r} has no ONNX dense rewrite")
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
                self.report.skip(self.config.name, where, str(e))
                self.factored[w.name] = _Factored(None, Site(self.config.name, where), [])
                return None
            site = Site(self.config.name, where, weight.numel(), factors.params, 2 * weight.numel(),
                        2 * factors.params, factors.error, factors.detail)
            if self.config.max_error is not None and factors.error > self.config.max_error:
                self.report.skip(self.config.name, where, f"best {factors.detail} has weight error "
                                 f"{factors.error:.3g} > max_error={self.config.max_error}")
                factors = None
            self.factored[w.name] = _Factored(factors, site, [])
        rows, columns = w.shape
        self.current = (where, columns, rows) if transposed else (where, rows, columns)
        return self.factored[w.name].factors

    def _apply(self, op, x, w):
        entry = self.factored[w.name]
        where, in_features, out_features = self.current
        form = LOWERINGS[self.config.name]
        if not entry.values:
            for i, tensor in enumerate(entry.factors.tensors):
                name = f"{w.name}.relinear.{self.config.name}.{i}"
                # factors are fit in float32; stored in the weight's own dtype so the graph's types still agree
                array = np.ascontiguousarray(form.store(tensor).numpy().astype(w.const_value.dtype.numpy()))
                entry.values.append(op.initializer(ir.tensor(array, name=name), name))
        self.report.add(dataclasses.replace(entry.site, where=where))
        self.on_site()
        return form.lower(op, x, entry.values, entry.factors.tensors, in_features, out_features)

    def _rewrite_matmul(self, op, x, w, **_):
        return self._apply(op, x, w)

    def _rewrite_gemm(self, op, x, w, b, **_):
        return op.Add(self._apply(op, x, w), b)
