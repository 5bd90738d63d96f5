"""relinear's custom ops -> standard ONNX ops, for `torch.onnx.export(..., dynamo=True,
custom_translation_table=custom_translation_table())`.

Each translation is a trace-only onnxscript function: plain Python over `onnxscript.opset18`, called with
the op's tensors (symbolic ONNX values, or None for an absent optional) and its Python scalars. The graph
itself lives in `lowering`, shared with the ONNX-file rewriter.

- linear_attention: bidirectional with two MatMuls; causal in the chunked CumSum form (no T x T matrix).
- mapped_linear_attention: Elu + 1 or Relu of q, k times sqrt(scale), then linear_attention's form.
- hybrid_attention, gated_linear_attention, bidirectional_gated_linear_attention: exact, with explicit
  [Tq, Tk] weights (quadratic in time).
The dense families' ops translate in their own modules (`relinear.families.*`); the registry lists them all.
"""

from __future__ import annotations

import torch
from onnxscript import opset18 as op

from relinear.export import lowering


def linear_attention(phi_q, phi_k, v, key_mask=None, causal: bool = False, chunk_size: int = 64):
    return lowering.linear_attention(op, phi_q, phi_k, v, key_mask, causal, chunk_size)


def mapped_linear_attention(q, k, v, key_mask=None, causal: bool = False, chunk_size: int = 64,
                            feature_map: str = "elu", scale: float = 1.0):
    return lowering.mapped_linear_attention(op, q, k, v, key_mask, causal, chunk_size, feature_map, scale)


def hybrid_attention(q, k, v, phi_q, phi_k, gate, key_mask=None, causal: bool = False, window: int = 64,
                     scale: float = 1.0, chunk_size: int = 64, sinks: int = 0, balance=None):
    return lowering.hybrid_attention_quadratic(op, q, k, v, phi_q, phi_k, gate, key_mask, causal, window, scale,
                                               sinks, balance)


def gated_linear_attention(phi_q, phi_k, v, log_decay, key_mask=None, chunk_size: int = 64):
    return lowering.gated_linear_attention_quadratic(op, phi_q, phi_k, v, log_decay, key_mask)


def bidirectional_gated_linear_attention(phi_q, phi_k, v, log_decay_before, log_decay_after, key_mask=None,
                                         chunk_size: int = 64):
    return lowering.bidirectional_gated_linear_attention_quadratic(op, phi_q, phi_k, v, log_decay_before,
                                                                   log_decay_after, key_mask)


def custom_translation_table() -> dict:
    """{torch.ops.relinear.<op>.default: translation} for the ops of every registered family.

    Importing each family's kernels registers its ops; a package still missing (a partial install) is left
    out, and the exporter then names the op it could not translate.
    """
    from relinear.families import families, resolve

    table = {}
    for family in families():
        try:
            family.load_kernels()
        except ImportError:
            continue
        for name, translation in family.translations.items():
            packet = getattr(torch.ops.relinear, name, None)
            if packet is not None:
                table[packet.default] = resolve(translation)
    return table
