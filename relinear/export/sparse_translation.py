"""The sparse ops' translations for the dynamo exporter (see relinear.export.translation): trace-only
onnxscript functions over `opset18`, the graph itself in `sparse_lowering`. Feature counts must be static."""

from __future__ import annotations

from onnxscript import opset18 as op

from relinear.export import sparse_lowering


def _static(value, what: str) -> int:
    if not isinstance(value, int):
        raise ValueError(f"sparse ops: {what} must be static in the exported graph, got {value}")
    return value


def _in_features(x) -> int:
    return _static(x.shape[-1], "the input's feature dim")


def sparse24_linear(x, values, positions, bias=None):
    out_features = _static(values.shape[0], "the 2:4 weight's rows")
    return sparse_lowering.sparse24_matmul(op, x, values, positions, out_features, _in_features(x), bias)


def _flat_index(values, crow_indices, col_indices, in_features: int):
    nnz = _static(values.shape[0], "the number of stored weights")
    return sparse_lowering.csr_flat_index(op, crow_indices, col_indices, nnz, in_features)


def _out_features(crow_indices) -> int:
    return _static(crow_indices.shape[0], "the CSR row pointers' length") - 1


def sparse_linear(x, values, crow_indices, col_indices, bias=None):
    in_features = _in_features(x)
    flat = _flat_index(values, crow_indices, col_indices, in_features)
    return sparse_lowering.flat_sparse_matmul(op, x, values, flat, _out_features(crow_indices), in_features, bias)


def sparse_low_rank_linear(x, values, crow_indices, col_indices, down, up, bias=None):
    in_features = _in_features(x)
    flat = _flat_index(values, crow_indices, col_indices, in_features)
    return sparse_lowering.sparse_low_rank_matmul(op, x, values, flat, op.Transpose(down), op.Transpose(up),
                                                  _out_features(crow_indices), in_features, bias)


def block_sparse_linear(x, values, crow_indices, col_indices, bias=None, out_features: int = 0,
                        block_size: int = 1):
    nnz = _static(values.shape[0], "the number of stored blocks")
    index = sparse_lowering.bsr_block_index(op, crow_indices, col_indices, nnz)
    return sparse_lowering.block_sparse_matmul(op, x, values, index, out_features, _in_features(x), block_size,
                                               bias)
