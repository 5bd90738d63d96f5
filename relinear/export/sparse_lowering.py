"""The sparse ops in standard ONNX ops, for any ONNX graph builder `op` (as `relinear.export.lowering`).

ONNX has no sparse matmul that ONNX Runtime runs, so each lowering keeps the file compact (only the kept
weights and their indices are stored) and rebuilds the dense W inside the graph with one scatter, then runs
one MatMul. The rebuild reads only initializers: ORT computes it once per run, a small cost next to the
MatMul for any batch of tokens, and the output equals the dense masked product exactly.

Indices: a 2:4 weight stores int8 offsets inside each group of 4 (as relinear.kernels.sparse24); CSR and BSR
weights store flat row-major positions (`flat_index`, `block_index`): the torch translation computes them from
the op's compressed row pointers in the graph, the ONNX-file rewriter stores them directly.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from relinear.export.lowering import const, low_rank_matmul


def _dense_matmul(op, x, dense, bias):
    y = op.MatMul(x, op.Transpose(dense, perm=[1, 0]))
    return y if bias is None else op.Add(y, bias)


def _zeros(op, shape: list[int], like):
    return op.CastLike(op.ConstantOfShape(const(op, shape)), like)


def sparse24_matmul(op, x, values, positions, out_features: int, in_features: int, bias=None):
    """x @ W^T (+ bias), W rebuilt from values [out, 2g] and int8 group offsets [out, 2g], g = ceil(in / 4)."""
    stored = 2 * -(-in_features // 4)
    group_start = const(op, np.arange(stored) // 2 * 4)
    columns = op.Add(op.Cast(positions, to=ir.DataType.INT64), group_start)
    dense = op.ScatterElements(_zeros(op, [out_features, 2 * stored], values), columns, values, axis=1)
    if 2 * stored != in_features:  # a last partial group: its padding columns hold zeros
        dense = op.Slice(dense, const(op, [0]), const(op, [in_features]), const(op, [1]))
    return _dense_matmul(op, x, dense, bias)


def rows_of_csr(op, crow_indices, nnz: int):
    """The row of each of the `nnz` stored entries: a 1 where each row after the first starts, summed up.

    ScatterElements with reduction="add" (opset 16) counts rows that start at the same place (empty rows)."""
    starts = op.Slice(crow_indices, const(op, [1]), const(op, [-1]), const(op, [0]))
    marks = op.ScatterElements(_zeros(op, [nnz + 1], const(op, [0])), op.Cast(starts, to=ir.DataType.INT64),
                               op.Expand(const(op, [1]), op.Shape(starts)), axis=0, reduction="add")
    return op.Slice(op.CumSum(marks, const(op, 0)), const(op, [0]), const(op, [nnz]), const(op, [0]))


def csr_flat_index(op, crow_indices, col_indices, nnz: int, in_features: int):
    """row * in + col of each stored entry, int64 [nnz]."""
    rows = rows_of_csr(op, crow_indices, nnz)
    return op.Add(op.Mul(rows, const(op, in_features)), op.Cast(col_indices, to=ir.DataType.INT64))


def flat_sparse_matmul(op, x, values, flat_index, out_features: int, in_features: int, bias=None):
    """x @ W^T (+ bias), W [out, in] holding `values` at the row-major positions `flat_index` (any int type)."""
    index = op.Unsqueeze(op.Cast(flat_index, to=ir.DataType.INT64), const(op, [1]))
    dense = op.ScatterND(_zeros(op, [out_features * in_features], values), index, values)
    return _dense_matmul(op, x, op.Reshape(dense, const(op, [out_features, in_features])), bias)


def sparse_low_rank_matmul(op, x, values, flat_index, down_t, up_t, out_features: int, in_features: int,
                           bias=None):
    """x @ S^T + x @ down^T @ up^T (+ bias); the low-rank factors stored transposed."""
    sparse = flat_sparse_matmul(op, x, values, flat_index, out_features, in_features)
    return op.Add(sparse, low_rank_matmul(op, x, down_t, up_t, bias))


def bsr_block_index(op, crow_indices, col_indices, nnz: int):
    """(block-row, block-column) of each stored block, int64 [nnz, 2]."""
    rows = rows_of_csr(op, crow_indices, nnz)
    columns = op.Cast(col_indices, to=ir.DataType.INT64)
    return op.Concat(op.Unsqueeze(rows, const(op, [1])), op.Unsqueeze(columns, const(op, [1])), axis=1)


def block_sparse_matmul(op, x, values, block_index, out_features: int, in_features: int, block_size: int,
                        bias=None):
    """x @ W^T (+ bias), W's blocks values [nnz, bs, bs] at (block-row, block-column) pairs block_index."""
    rows, cols = out_features // block_size, in_features // block_size
    grid = _zeros(op, [rows, cols, block_size, block_size], values)
    blocks = op.ScatterND(grid, op.Cast(block_index, to=ir.DataType.INT64), values)
    dense = op.Reshape(op.Transpose(blocks, perm=[0, 2, 1, 3]), const(op, [out_features, in_features]))
    return _dense_matmul(op, x, dense, bias)
