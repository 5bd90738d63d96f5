"""The linear-attention custom ops: `torch.ops.relinear.{linear_attention, mapped_linear_attention,
hybrid_attention, gated_linear_attention, bidirectional_gated_linear_attention}`.

Each is opaque to torch.compile/export (one graph node), runs the chunked torch form on CPU and the Triton
kernel (`triton.py`) on CUDA (bidirectional_gated_linear_attention has no kernel: its torch form runs
there). Heads of k and v already equal those of q here: GQA is expanded by the caller.
The fake kernels compute only the output's shape and dtype: [B, H, Tq, Dv] in v's dtype.
"""

from __future__ import annotations

import torch

from relinear.kernels._library import define_op
from relinear.kernels.linear_attention.banded import hybrid_attention_cpu
from relinear.kernels.linear_attention.chunked import (
    bidirectional_gated_linear_attention_chunked,
    gated_linear_attention_chunked,
    linear_attention_bidirectional,
    linear_attention_causal,
)
from relinear.kernels.linear_attention.mapped import check_fused_map, mapped_features

_TRITON = "relinear.kernels.linear_attention.triton:"
_TRITON_HYBRID = "relinear.kernels.linear_attention.triton_hybrid:"


def _output_like(queries: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return v.new_empty(*queries.shape[:-1], v.shape[-1])


def _linear_attention(phi_q, phi_k, v, key_mask, causal, chunk_size):
    if causal:
        return linear_attention_causal(phi_q, phi_k, v, key_mask, chunk_size)
    return linear_attention_bidirectional(phi_q, phi_k, v, key_mask)


linear_attention = define_op(
    "linear_attention",
    _linear_attention,
    schema="(Tensor phi_q, Tensor phi_k, Tensor v, Tensor? key_mask, bool causal, int chunk_size) -> Tensor",
    fake=lambda phi_q, phi_k, v, key_mask, causal, chunk_size: _output_like(phi_q, v),
    cuda=_TRITON + "linear_attention_cuda",
    cuda_backward=_TRITON + "linear_attention_backward_cuda",
)


_HEADS_PER_BLOCK = 2


def _mapped_linear_attention(q, k, v, key_mask, causal, chunk_size, feature_map, scale):
    recording = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not causal or recording or q.shape[1] <= _HEADS_PER_BLOCK:
        return _linear_attention(*mapped_features(q, k, feature_map, scale), v, key_mask, causal, chunk_size)
    # Inference, causal: features and chunk blocks made for a few heads at a time stay in cache and reuse the
    # allocator's memory (measured ~10% less CPU time at T=8192 than all heads at once, and steadier).
    out = _output_like(q, v)
    for first in range(0, q.shape[1], _HEADS_PER_BLOCK):
        heads = slice(first, first + _HEADS_PER_BLOCK)
        phi_q, phi_k = mapped_features(q[:, heads], k[:, heads], feature_map, scale)
        out[:, heads] = _linear_attention(phi_q, phi_k, v[:, heads], key_mask, causal, chunk_size)
    return out


def _mapped_output_like(q, k, v, key_mask, causal, chunk_size, feature_map, scale):
    check_fused_map(feature_map, scale)  # a bad map fails at trace time, not first at run time
    return _output_like(q, v)


# linear_attention of phi(q * sqrt(scale)), phi(k * sqrt(scale)) for a parameter-free map ("elu" or "relu"),
# which the kernels compute from q and k in place.
mapped_linear_attention = define_op(
    "mapped_linear_attention",
    _mapped_linear_attention,
    schema=(
        "(Tensor q, Tensor k, Tensor v, Tensor? key_mask, bool causal, int chunk_size, str feature_map, "
        "float scale) -> Tensor"
    ),
    fake=_mapped_output_like,
    cuda=_TRITON + "mapped_linear_attention_cuda",
    cuda_backward=_TRITON + "mapped_linear_attention_backward_cuda",
)

hybrid_attention = define_op(
    "hybrid_attention",
    hybrid_attention_cpu,
    schema=(
        "(Tensor q, Tensor k, Tensor v, Tensor phi_q, Tensor phi_k, Tensor gate, Tensor? key_mask, bool causal, "
        "int window, float scale, int chunk_size, int sinks=0, Tensor? balance=None) -> Tensor"
    ),
    fake=lambda q, k, v, phi_q, phi_k, gate, key_mask, causal, window, scale, chunk_size, sinks=0, balance=None: (
        _output_like(q, v)
    ),
    cuda=_TRITON_HYBRID + "hybrid_attention_cuda",
    cuda_backward=_TRITON_HYBRID + "hybrid_attention_backward_cuda",
)

gated_linear_attention = define_op(
    "gated_linear_attention",
    gated_linear_attention_chunked,
    schema=(
        "(Tensor phi_q, Tensor phi_k, Tensor v, Tensor log_decay, Tensor? key_mask, int chunk_size) -> Tensor"
    ),
    fake=lambda phi_q, phi_k, v, log_decay, key_mask, chunk_size: _output_like(phi_q, v),
    cuda=_TRITON + "gated_linear_attention_cuda",
    cuda_backward=_TRITON + "gated_linear_attention_backward_cuda",
)

# Learned decay (LinearizedAttention(decay=True)) when bidirectional: the gated form both ways in time.
bidirectional_gated_linear_attention = define_op(
    "bidirectional_gated_linear_attention",
    bidirectional_gated_linear_attention_chunked,
    schema=(
        "(Tensor phi_q, Tensor phi_k, Tensor v, Tensor log_decay_before, Tensor log_decay_after, Tensor? key_mask, "
        "int chunk_size) -> Tensor"
    ),
    fake=lambda phi_q, phi_k, v, log_decay_before, log_decay_after, key_mask, chunk_size: _output_like(phi_q, v),
)
