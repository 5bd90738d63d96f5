"""Rewrite an existing .onnx file with a recipe: `rewrite_onnx(src, dst, recipe) -> RewriteReport`.

Built on `onnxscript.rewriter` pattern rules, one rule family per recipe entry, applied in recipe order so
that an earlier rule claims a site first (as in the torch front end). The input file is only read; the
output keeps the input's opset, IR version and external-data layout, passes `onnx.checker` and shape
inference, carries the report in its metadata, and appears atomically.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from relinear.export import model_io
from relinear.export.attention import fused_attention_nodes, softmax_masks
from relinear.export.sites import module_path
from relinear.families import NotInOnnx
from relinear.recipe import LinearAttention, Recipe, RuleConfig
from relinear.rewrite.report import RewriteReport

PROBE_SEQUENCE = 8


def _evaluate(model: ir.Model, values: list[ir.Value]) -> dict[str, np.ndarray]:
    """Run the model on a short random input with `values` as extra outputs (the model is left as it was)."""
    from relinear.export import ort

    added = [v for v in values if v not in model.graph.outputs]
    model.graph.outputs.extend(added)
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "probe.onnx")
            ir.save(model, path, external_data="probe.onnx.data" if model_io.uses_external_data(model) else None)
            session = ort.make_session(path)
            inputs = ort.random_inputs(session, batch=1, sequence=PROBE_SEQUENCE)
            names = [v.name for v in values]
            return dict(zip(names, session.run(names, inputs), strict=True))
    finally:
        for v in added:
            model.graph.outputs.remove(v)


def probe_causal(model: ir.Model, masks: list[ir.Value]) -> set[str] | None:
    """Names of the masks that hide a later key from the first query, or None when the model cannot run on
    a random input (then no masked attention is rewritten)."""
    if not masks:
        return set()
    try:
        values = _evaluate(model, masks)
    except Exception:  # ORT raises its own types for any input it rejects; the answer is "unknown" for all
        return None
    causal = set()
    for name, value in values.items():
        if value.ndim >= 2 and value.shape[-2] > 1:
            rows = np.asarray(value, dtype=np.float64).reshape(-1, *value.shape[-2:])[0]
            if rows[0, -1] < rows[-1, -1] - 1.0:
                causal.add(name)
    return causal


def _rule_family(config: RuleConfig, report: RewriteReport, causal: set[str] | None,
                 on_site: Callable[[], None]):
    """The family's ONNX-file rules, or its stated reason for having none."""
    from relinear.families import family_of, resolve

    onnx_rules = family_of(config).onnx_rules
    if isinstance(onnx_rules, NotInOnnx):
        return onnx_rules
    return resolve(onnx_rules)(config, report, causal, on_site)


def rewrite_model(model: ir.Model, recipe: Recipe, on_site: Callable[[], None] = lambda: None,
                  on_rule: Callable[[RuleConfig], None] = lambda config: None) -> RewriteReport:
    """Rewrite `model` in place; the file-free core of `rewrite_onnx`."""
    report = RewriteReport()
    for node in fused_attention_nodes(model.graph):
        report.skip("detect", module_path(node), f"fused {node.domain or 'ai.onnx'}::{node.op_type}: not rewritten")
    needs_probe = any(isinstance(c, LinearAttention) for c in recipe.rules)
    causal = probe_causal(model, softmax_masks(model.graph)) if needs_probe else set()
    for config in recipe.rules:
        on_rule(config)
        if not isinstance(config, RuleConfig):
            report.skip(config.name, "*", "a user rule rewrites torch graphs only, not ONNX files")
            continue
        family = _rule_family(config, report, causal, on_site)
        if isinstance(family, NotInOnnx):
            report.skip(config.name, "*", f"not in ONNX files: {family.reason}")
            continue
        family.rules().apply_to_model(model)
    ir_passes.RemoveUnusedNodesPass()(model)
    return report


def rewrite_onnx(src: str | os.PathLike, dst: str | os.PathLike, recipe: Recipe, *,
                 on_site: Callable[[], None] = lambda: None,
                 on_rule: Callable[[RuleConfig], None] = lambda config: None) -> RewriteReport:
    """Rewrite the ONNX file `src` with `recipe` into `dst` and return what was done.

    `on_rule` / `on_site` are called as each rule starts and each site is rewritten (progress bars).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise model_io.OnnxInputError(f"{dst}: output must differ from the input (the input is never modified)")
    model = model_io.load_model(src)
    external_data = model_io.uses_external_data(model)  # before the rewrite replaces the external weights
    report = rewrite_model(model, recipe, on_site, on_rule)
    model.metadata_props[model_io.REPORT_KEY] = report.to_json()
    model_io.save_atomic(model, dst, external_data=external_data)
    return report


__all__ = ["rewrite_onnx", "rewrite_model", "probe_causal"]
