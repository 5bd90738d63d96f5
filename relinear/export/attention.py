"""Softmax attention subgraphs of an ONNX graph -> linear attention in standard ops.

Both exporters emit `MatMul(q, k^T) -> [Div] -> Add(mask) -> Softmax -> [Where(IsNaN)] -> MatMul(., v)`,
with q and k^T already multiplied by sqrt(scale) (SDPA's decomposition) or the scores divided by a scale
(older eager code). One pattern per combination of the optional pieces shares one check and one rewrite.

The additive mask turns into key weights exp(mask) taken from its last query row (the row that sees every
key a padding mask allows). Whether the mask is also causal is a property of its values, not of the ops
that build it, so `causal_masks` is decided beforehand by evaluating each mask once
(`rewrite_onnx.probe_causal`). Not matched yet: boolean masks applied by Where(mask, scores, -inf).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import onnx_ir as ir
from onnxscript.rewriter import pattern

from relinear.approx.linear_attention import chunk_size_for
from relinear.export import lowering
from relinear.export.dense import RULE_TAG_PREFIX
from relinear.export.sites import module_path, selected
from relinear.recipe import LinearAttention
from relinear.rewrite.report import RewriteReport, Site

FUSED_ATTENTION_OPS = {("com.microsoft", "Attention"), ("com.microsoft", "MultiHeadAttention"),
                       ("com.microsoft", "GroupQueryAttention"), ("", "Attention")}


def _pattern(masked: bool, divided: bool, nan_guard: bool) -> Callable:
    def attention(op, q, k_t, v, mask, scale, zero):
        scores = op.MatMul(q, k_t)
        if divided:
            scores = op.Div(scores, scale)
        if masked:
            scores = op.Add(scores, mask)
        probs = op.Softmax(scores, _outputs=["probs"])
        if nan_guard:
            probs = op.Where(op.IsNaN(probs), zero, probs)
        return op.MatMul(probs, v)

    return attention


def softmax_masks(graph: ir.Graph) -> list[ir.Value]:
    """The additive masks feeding a Softmax (the Add input not computed from a MatMul): causal candidates."""
    masks = []
    for node in graph:
        if node.op_type != "Softmax" or node.inputs[0].producer() is None:
            continue
        add = node.inputs[0].producer()
        if add.op_type == "Add":
            others = [v for v in add.inputs if v.producer() is None or v.producer().op_type not in ("MatMul", "Div")]
            masks.extend(others[:1])
    return masks


class AttentionRules:
    """One LinearAttention config applied to every selected softmax attention; records each site in `report`.

    `causal_masks` names the causal masks; None means they could not be evaluated, and masked attention is
    then left alone (guessing bidirectional would silently let a decoder see the future).
    """

    def __init__(self, config: LinearAttention, report: RewriteReport, causal_masks: set[str] | None,
                 on_site: Callable[[], None] = lambda: None):
        self.config, self.report, self.causal_masks, self.on_site = config, report, causal_masks, on_site
        self.current: tuple[str, bool] = ("", False)

    def rules(self) -> pattern.RewriteRuleSet:
        name = RULE_TAG_PREFIX + self.config.name
        rules = [pattern.RewriteRule(_pattern(*flags), self._rewrite, self._check, name=name)
                 for flags in itertools.product((True, False), repeat=3)]
        return pattern.RewriteRuleSet(rules, commute=True)  # Add(mask, scores) too

    def _check(self, context, q, k_t, v, probs, mask=None, **_) -> bool:
        softmax = probs.producer()
        rank = len(q.shape) if q.shape is not None else None
        axis = softmax.attributes.get_int("axis", -1)
        where = module_path(softmax)
        if not selected(self.config.where, [where, softmax.name]):
            return False
        if axis not in (-1, (rank or 0) - 1):
            return self._skip(where, f"softmax over axis {axis}, not the key axis")
        if mask is not None and self.causal_masks is None:
            return self._skip(where, "could not evaluate the mask to tell causal from bidirectional attention")
        causal = mask is not None and mask.name in self.causal_masks
        if self.config.feature_map not in lowering.FEATURE_MAPS:
            return self._skip(where, f"feature_map {self.config.feature_map!r} has no ONNX-file rewrite "
                                     f"(use {' or '.join(lowering.FEATURE_MAPS)}, or export from torch)")
        if self.config.window:
            return self._skip(where, "window > 0 (hybrid attention) has no ONNX-file rewrite yet")
        if self.config.decay:
            return self._skip(where, "decay (learned, so calibrated first) has no ONNX-file rewrite: rewrite and "
                                     "calibrate in torch, then export")
        self.current = (where, causal)
        return True

    def _skip(self, where: str, reason: str) -> bool:
        if (self.config.name, where, reason) not in self.report.skipped:
            self.report.skip(self.config.name, where, reason)
        return False

    def _rewrite(self, op, q, k_t, v, mask=None, scale=None, **_):
        where, causal = self.current
        if scale is not None:  # scores / scale: feature maps take q and k times sqrt(1 / scale) each
            root = op.Sqrt(scale)
            q, k_t = op.Div(q, root), op.Div(k_t, root)
        phi_q = lowering.feature_map(op, q, self.config.feature_map)
        phi_k_t = lowering.feature_map(op, k_t, self.config.feature_map)
        if mask is not None:
            last_row = op.Gather(mask, lowering.const(op, -1), axis=-2)
            weights = op.Exp(op.Unsqueeze(op.CastLike(last_row, phi_k_t), lowering.const(op, [-2])))
            phi_k_t = op.Mul(phi_k_t, weights)
        if causal:
            chunk_size = chunk_size_for("cpu", self.config.chunk_size)  # the file runs on ONNX Runtime's CPU
            out = lowering.linear_attention_causal(op, phi_q, phi_k_t, v, chunk_size)
        else:
            out = lowering.linear_attention_bidirectional(op, phi_q, phi_k_t, v)
        if mask is not None:
            # the mask was never proven key padding [+ causal] here (a file has no example inputs): check it at
            # every run; a bias (ALiBi), a sliding window or any other pattern makes the output NaN, not a
            # plausible wrong value (ONNX cannot raise)
            _, poison = lowering.key_padding_guard(op, mask, "additive", causal, False)
            out = op.Add(out, op.CastLike(poison, out))
        self.report.add(Site(self.config.name, where, detail=f"{self.config.feature_map}, "
                             f"{'causal' if causal else 'bidirectional'}"))
        self.on_site()
        return out


def fused_attention_nodes(graph: ir.Graph) -> list[ir.Node]:
    """Attention already fused into one node (ORT's optimizer output): reported, never rewritten."""
    return [n for n in graph if (n.domain, n.op_type) in FUSED_ATTENTION_OPS]
