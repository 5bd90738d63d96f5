"""Triton BSR block-sparse linear: y = x W^T + b touching only the stored blocks of W.

One program owns a [BLOCK_M, block_size] tile of y (token tile x one block-row of W) and walks that
block-row's stored blocks, so the work is proportional to nnz and y is written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from relinear.kernels.block_sparse.reference import block_rows, check_layout
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


@triton.jit
def _bsr_weight_grad_kernel(
    G, X, ROWS, COL, DVALUES,
    M, sg_m, sx_m,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dvalues[n] = G[:, rows of block n]^T @ X[:, cols of block n], one program per stored block."""
    block = tl.program_id(0)
    row = tl.load(ROWS + block)
    col = tl.load(COL + block)
    offs_s = tl.arange(0, BLOCK_S)
    acc = tl.zeros([BLOCK_S, BLOCK_S], dtype=tl.float32)
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        g = tl.load(G + offs_m[:, None] * sg_m + (row * BLOCK_S + offs_s)[None, :], mask=m_ok[:, None],
                    other=0.0)
        x = tl.load(X + offs_m[:, None] * sx_m + (col * BLOCK_S + offs_s)[None, :], mask=m_ok[:, None],
                    other=0.0)
        acc += mma(tl.trans(g), x)
    out = DVALUES + block * BLOCK_S * BLOCK_S + offs_s[:, None] * BLOCK_S + offs_s[None, :]
    tl.store(out, acc.to(DVALUES.dtype.element_ty))


def _check_block_size(block_size):
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16 for the Triton kernel, got {block_size}")


def _token_rows(t):
    """t [..., features] as a 2-D [tokens, features] view (or copy) with unit feature stride."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _token_tile(tokens):
    return 64 if tokens <= 4096 else 128


def block_sparse_linear_cuda(x, values, crow_indices, col_indices, bias, out_features, block_size):
    """`relinear.block_sparse_linear` on GPU; block_size a power of two >= 16 (as `tl.dot` needs)."""
    check_layout(x, values, crow_indices, col_indices, out_features, block_size)
    _check_block_size(block_size)
    lead, in_features = x.shape[:-1], x.shape[-1]
    x2 = _token_rows(x)
    y = torch.empty(x2.shape[0], out_features, device=x.device, dtype=x.dtype)
    block_m = _token_tile(x2.shape[0])
    grid = (triton.cdiv(x2.shape[0], block_m), out_features // block_size)
    _bsr_linear_kernel[grid](
        x2, values.contiguous(), crow_indices, col_indices, bias, y,
        x2.shape[0], in_features, out_features, x2.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_S=block_size, HAS_BIAS=bias is not None,
    )
    return y.reshape(*lead, out_features)


def transposed_layout(values, crow_indices, col_indices, in_features):
    """The BSR triple of W^T [in, out] from that of W: the blocks regrouped by block-column, each transposed.

    Blocks are stored row-major, so a stable sort by block-column keeps block-rows ascending within each
    block-column of W, i.e. within each block-row of W^T; only the nnz stored blocks are copied.
    """
    block_size = values.shape[1]
    rows = block_rows(crow_indices, values.shape[0])
    order = torch.sort(col_indices, stable=True).indices
    per_column = torch.bincount(col_indices, minlength=in_features // block_size)
    crow_t = torch.zeros(in_features // block_size + 1, dtype=crow_indices.dtype, device=crow_indices.device)
    crow_t[1:] = per_column.cumsum(0)
    return values[order].transpose(1, 2).contiguous(), crow_t, rows[order].to(col_indices.dtype)


def block_sparse_linear_backward_cuda(grad_out, x, values, crow_indices, col_indices, bias, out_features,
                                      block_size):
    """(dx, dvalues, None, None, dbias) of `block_sparse_linear_cuda`, all work proportional to nnz.

    dx = grad_out @ W runs the forward kernel on the BSR of W^T; dvalues runs `_bsr_weight_grad_kernel`
    (one program per stored block, fp32 accumulation over tokens); dbias sums grad_out over tokens.
    """
    _check_block_size(block_size)
    in_features = x.shape[-1]
    dx = block_sparse_linear_cuda(
        grad_out.to(x.dtype), *transposed_layout(values, crow_indices, col_indices, in_features), None,
        in_features, block_size,
    )
    g2, x2 = _token_rows(grad_out), _token_rows(x)
    dvalues = torch.empty_like(values, memory_format=torch.contiguous_format)
    if values.shape[0]:
        _bsr_weight_grad_kernel[(values.shape[0],)](
            g2, x2, block_rows(crow_indices, values.shape[0]), col_indices, dvalues,
            x2.shape[0], g2.stride(0), x2.stride(0),
            BLOCK_M=_token_tile(x2.shape[0]), BLOCK_S=block_size,
        )
    dbias = None if bias is None else g2.sum(0, dtype=torch.float32).to(bias.dtype)
    return dx, dvalues, None, None, dbias
