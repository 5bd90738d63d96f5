"""Triton kernel for Monarch / BTT linear layers: both block products and the permutation fused.

Layout (relinear.approx.btt): x padded to m1*m2 features is x[t, i, j]; core1 [m1, n1*r, m2];
core2 [n1, n2, r*m1];
y[t, v*n2 + c] = sum_{i,a} core2[v, c, a*m1 + i] * sum_j core1[i, v*r + a, j] x[t, i, j].

One program owns a token tile and one output block v (and an n2 tile when n2 is large). The stage-1 channels
(i, v, a) that block v consumes belong to it alone, so splitting by v repeats no stage-1 work, and the
permuted intermediate lives only in registers: nothing but x, the cores and y touch HBM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from relinear.kernels.linear_attention.triton import mma


def _pow2_tile(size: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(size)))


@triton.jit
def _btt_kernel(
    X, CORE1, CORE2, BIAS, Y,
    TOKENS, IN_F, OUT_F, sx_t, sy_t,
    M1, M2, N1, N2, RANK,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    v = tl.program_id(1)
    pid_c = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_ok = offs_m < TOKENS
    c_ok = offs_c < N2
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for i in range(0, M1):
        for r0 in range(0, RANK, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_ok = offs_r < RANK
            # stage 1: the r channels (i, v, a) for this tile of a
            mixed = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for j0 in range(0, M2, BLOCK_J):
                offs_j = j0 + tl.arange(0, BLOCK_J)
                feature = i * M2 + offs_j
                x = tl.load(X + offs_m[:, None] * sx_t + feature[None, :],
                            mask=m_ok[:, None] & ((offs_j < M2) & (feature < IN_F))[None, :], other=0.0)
                core1_t = tl.load(CORE1 + (i * N1 * RANK + v * RANK + offs_r)[None, :] * M2 + offs_j[:, None],
                                  mask=r_ok[None, :] & (offs_j < M2)[:, None], other=0.0)
                mixed += mma(x, core1_t)
            # stage 2: the permutation is the index a*m1 + i into core2's last axis
            core2_t = tl.load(CORE2 + (v * N2 + offs_c)[None, :] * (RANK * M1) + (offs_r * M1 + i)[:, None],
                              mask=r_ok[:, None] & c_ok[None, :], other=0.0)
            acc += mma(mixed, core2_t)
    out_cols = v * N2 + offs_c
    col_ok = c_ok & (out_cols < OUT_F)
    if HAS_BIAS:
        acc += tl.load(BIAS + out_cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * sy_t + out_cols[None, :], acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & col_ok[None, :])


def btt_linear_triton(x, core1, core2, bias, out_features):
    """y = x W^T + bias for W in the BTT layout above; x [..., in] -> [..., out_features]."""
    if core1.dim() != 3 or core2.dim() != 3:
        raise ValueError(f"core1/blocks1 and core2/blocks2 must be 3-D, got {tuple(core1.shape)}, "
                         f"{tuple(core2.shape)}")
    m1, n1_rank, m2 = core1.shape
    n1, n2, rank_m1 = core2.shape
    rank = rank_m1 // m1
    if n1_rank != n1 * rank or rank_m1 != rank * m1:
        raise ValueError(f"core shapes {tuple(core1.shape)} and {tuple(core2.shape)} do not form a BTT pair")
    if x.shape[-1] > m1 * m2 or out_features > n1 * n2:
        raise ValueError(f"x features {x.shape[-1]} / out_features {out_features} exceed the cores' "
                         f"{m1 * m2} / {n1 * n2}")
    lead, in_features = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, in_features)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.empty(rows.shape[0], out_features, device=x.device, dtype=x.dtype)
    core1, core2 = core1.to(x.dtype).contiguous(), core2.to(x.dtype).contiguous()
    block_m, block_c = 64, _pow2_tile(n2, 128)
    grid = (triton.cdiv(rows.shape[0], block_m), n1, triton.cdiv(n2, block_c))
    _btt_kernel[grid](
        rows, core1, core2, bias, y, rows.shape[0], in_features, out_features, rows.stride(0), y.stride(0),
        m1, m2, n1, n2, rank,
        BLOCK_M=block_m, BLOCK_J=_pow2_tile(m2, 64), BLOCK_R=_pow2_tile(rank, 64), BLOCK_C=block_c,
        HAS_BIAS=bias is not None,
    )
    return y.reshape(*lead, out_features)


def transposed_cores(core1, core2):
    """The BTT pair of W^T: it maps out-features [v, c] to in-features [i, j] through the same rank channels.

    core1'[v, i*r + a, c] = core2[v, c, a*m1 + i] and core2'[i, j, a*n1 + v] = core1[i, v*r + a, j], so
    the forward kernel computes x-gradients too (a weight-sized copy, no new kernel).
    """
    m1, n1_rank, m2 = core1.shape
    n1, n2, rank_m1 = core2.shape
    rank = rank_m1 // m1
    core1_t = core2.view(n1, n2, rank, m1).permute(0, 3, 2, 1).reshape(n1, m1 * rank, n2)
    core2_t = core1.view(m1, n1, rank, m2).permute(0, 3, 2, 1).reshape(m1, m2, rank * n1)
    return core1_t, core2_t


def btt_linear_backward_triton(grad_out, x, core1, core2, bias, out_features):
    """(dx, dcore1, dcore2, dbias) of `btt_linear_triton`.

    dx runs the fused Triton kernel on the transposed cores; the core gradients are two batched matmuls each
    (cuBLAS) on the stage-1 intermediate and the gradient reaching it, which are recomputed here (one
    bmm each) rather than kept from the forward.
    """
    m1, _, m2 = core1.shape
    n1, n2, rank_m1 = core2.shape
    rank = rank_m1 // m1
    in_features = x.shape[-1]
    dx = btt_linear_triton(grad_out, *transposed_cores(core1, core2), None, in_features)
    rows = x.reshape(-1, in_features)
    rows = F.pad(rows, (0, m1 * m2 - in_features)).view(-1, m1, m2).transpose(0, 1)  # [i, t, j]
    grads = grad_out.reshape(-1, out_features).to(x.dtype)
    grads = F.pad(grads, (0, n1 * n2 - out_features)).view(-1, n1, n2).transpose(0, 1)  # [v, t, c]
    tokens = rows.shape[1]
    c1, c2 = core1.to(x.dtype), core2.to(x.dtype)
    stage1 = torch.bmm(rows, c1.transpose(1, 2))  # [i, t, (v, a)]
    mixed = stage1.view(m1, tokens, n1, rank).permute(2, 1, 3, 0).reshape(n1, tokens, rank * m1)
    dcore2 = torch.bmm(grads.transpose(1, 2), mixed)  # [v, c, (a, i)]
    d_mixed = torch.bmm(grads, c2)  # [v, t, (a, i)]
    d_stage1 = d_mixed.view(n1, tokens, rank, m1).permute(3, 1, 0, 2).reshape(m1, tokens, n1 * rank)
    dcore1 = torch.bmm(d_stage1.transpose(1, 2), rows)  # [i, (v, a), j]
    dbias = None if bias is None else grad_out.reshape(-1, out_features).sum(0).to(bias.dtype)
    return dx.to(x.dtype), dcore1.to(core1.dtype), dcore2.to(core2.dtype), dbias


def monarch_linear_cuda(x, blocks1, blocks2, bias, out_features):
    """`relinear.monarch_linear` on GPU: blocks1 [k, k*t, p], blocks2 [k, s, t*k] (a two-core BTT)."""
    return btt_linear_triton(x, blocks1, blocks2, bias, out_features)


def monarch_linear_backward_cuda(grad_out, x, blocks1, blocks2, bias, out_features):
    """(dx, dblocks1, dblocks2, dbias) of `monarch_linear_cuda`."""
    return btt_linear_backward_triton(grad_out, x, blocks1, blocks2, bias, out_features)
