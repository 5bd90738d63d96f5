"""The hybrid's CPU inference form for short sequences: the reference's quadratic form, a few heads at a time.

When the keys are few compared with a query chunk's band (`banded.py`), the band's many small bmm's, its
chunk-major copies and its prefix states cost more than one [Tq, Tk] weight matrix per head: two large GEMMs
make the window's scores and the linear weights, the masks come from `reference` as they are, and sinks are
just more keys in the window. Heads go a block at a time so the [Tq, Tk] buffers stay in cache.
Same conventions and result as `reference.hybrid_attention_reference` (tests/kernels check it).
"""

from __future__ import annotations

import torch

from relinear.kernels.linear_attention.reference import (
    compute_dtype,
    exact_keys,
    linear_factor,
    safe_divide,
    visible_keys,
)

_BLOCK_ELEMENTS = 1 << 18  # elements of one [heads, Tq, Tk] weight block (1 MiB in fp32: stays in L2)


def hybrid_attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    gate: torch.Tensor,
    key_mask: torch.Tensor | None,
    causal: bool,
    window: int,
    scale: float,
    sinks: int = 0,
    balance: torch.Tensor | None = None,
) -> torch.Tensor:
    """`hybrid_attention_reference` for inference (in-place ops on its own buffers: not differentiable)."""
    out_dtype, dtype = v.dtype, compute_dtype(v.dtype)
    batch, heads, num_queries, _ = q.shape
    num_keys = k.shape[-2]
    q = q.to(dtype) * scale  # scaled once here, not per score
    k, v, phi_q, phi_k = (t.to(dtype) for t in (k, v, phi_q, phi_k))
    visible = visible_keys(key_mask, causal, num_queries, num_keys, q.device)  # [B or 1, 1, Tq, Tk]
    windowed = exact_keys(key_mask, causal, window, sinks, num_queries, num_keys, q.device)
    # Masks as float factors and biases: on CPU masked_fill_ with a broadcast bool mask is ~5x slower than an
    # add_ or mul_ of the same shape.
    window_bias = torch.zeros(windowed.shape, dtype=dtype, device=q.device).masked_fill_(~windowed, float("-inf"))
    outside = (visible & ~windowed).to(dtype)

    out = v.new_empty(batch, heads, num_queries, v.shape[-1])
    per_block = max(1, _BLOCK_ELEMENTS // (num_queries * num_keys))  # (batch row, head) pairs per block
    rows, cols = max(1, per_block // heads), min(heads, per_block)  # whole batch rows, or heads of one row
    for b in range(0, batch, rows):
        rows_b = slice(b, b + rows)
        bias_b, outside_b = (m[rows_b] if m.shape[0] > 1 else m for m in (window_bias, outside))
        for h in range(0, heads, cols):
            at = (rows_b, slice(h, h + cols))
            scores = (q[at] @ k[at].mT).add_(bias_b)
            top = scores.amax(-1, keepdim=True)
            # softmax, not exp_: CPU exp_ takes a slow path on -inf (~3x), softmax's own exp does not. Its
            # weights are the reference's exp(s - top) divided by their sum W, so W = 1 / their largest.
            weights = torch.softmax(scores, -1)
            empty = torch.isinf(top)  # no key in the window: the reference weighs it 0, with top 0
            if empty.any():
                weights.masked_fill_(empty, 0)
                top = top.masked_fill(empty, 0)
            window_mass = torch.where(empty, 0, weights.amax(-1, keepdim=True).reciprocal())
            linear = (phi_q[at] @ phi_k[at].mT).mul_(outside_b)
            linear_mass = linear.sum(-1, keepdim=True)
            block_balance = None if balance is None else balance[at[1]]
            factor = linear_factor(gate[at[1]], block_balance, top, window_mass, linear_mass)
            # (W softmax + f linear) / (W + f L) = (softmax + f / W linear) / (1 + f / W L) where W > 0
            relative = torch.where(empty, factor, factor / window_mass)
            weights.addcmul_(linear, relative)
            out[at] = safe_divide(weights @ v[at], (~empty).to(dtype) + relative * linear_mass)
    return out.to(out_dtype)
