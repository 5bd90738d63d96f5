"""Triton BSR block-sparse linear: y = x W^T + b touching only the stored blocks of W.

One program owns a [BLOCK_M, block_size] tile of y (token tile x one block-row of W) and walks that
block-row's stored blocks, so the work is proportional to nnz and y is written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from relinear.kernels.block_sparse.reference import check_layout
from relinear.kernels.linear_attention.triton import mma


@triton.jit
def _bsr_linear_kernel(
    X, VALUES, CROW, COL, BIAS, Y,
    M, IN_F, OUT_F,
    sx_m, sy_m,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    block_row = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_s = tl.arange(0, BLOCK_S)
    m_ok = offs_m < M
    acc = tl.zeros([BLOCK_M, BLOCK_S], dtype=tl.float32)
    first = tl.load(CROW + block_row)
    last = tl.load(CROW + block_row + 1)
    for i in range(first, last):
        col = tl.load(COL + i)
        x = tl.load(X + offs_m[:, None] * sx_m + (col * BLOCK_S + offs_s)[None, :], mask=m_ok[:, None],
                    other=0.0)
        # values[i] is [r, c]; load it transposed as [c, r]
        w_t = tl.load(VALUES + i * BLOCK_S * BLOCK_S + offs_s[None, :] * BLOCK_S + offs_s[:, None])
        acc += mma(x, w_t)
    out_cols = block_row * BLOCK_S + offs_s
    if HAS_BIAS:
        acc += tl.load(BIAS + out_cols).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None] * sy_m + out_cols[None, :], acc.to(Y.dtype.element_ty), mask=m_ok[:, None])


def block_sparse_linear_cuda(x, values, crow_indices, col_indices, bias, out_features, block_size):
    """`relinear.block_sparse_linear` on GPU; block_size a power of two >= 16 (as `tl.dot` needs)."""
    check_layout(x, values, crow_indices, col_indices, out_features, block_size)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 for the Triton kernel, got {block_size}")
    lead, in_features = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape[0], out_features, device=x.device, dtype=x.dtype)
    block_m = 64 if x2.shape[0] <= 4096 else 128
    grid = (triton.cdiv(x2.shape[0], block_m), out_features // block_size)
    _bsr_linear_kernel[grid](
        x2, values.contiguous(), crow_indices, col_indices, bias, y,
        x2.shape[0], in_features, out_features, x2.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_S=block_size, HAS_BIAS=bias is not None,
    )
    return y.reshape(*lead, out_features)
