"""The spec of the unstructured sparse linear layer: y = x W^T + b with W [out, in] stored as CSR.

Layout (torch's `sparse_csr` convention): values [nnz], crow_indices [out + 1] (row n holds the values
crow_indices[n]:crow_indices[n+1]), col_indices [nnz] (ascending within a row).

Two forms, the same numbers: torch's CSR matmul (work proportional to nnz), or the dense W rebuilt and one
GEMM. On CPU the CSR matmul wins only at low density: at 10% and 5% it beat dense, at 50% it was 2.5-4x
slower (2 cores, fp32, 256 tokens; benchmarks/bench_sparse_cpu.py measures it), so it runs up to
`SPARSE_MATMUL_MAX_DENSITY` and the dense form above. Both run on CUDA too (cuSPARSE for CSR); unstructured
sparsity does not pay with a Triton kernel on GPU tensor cores, so there is none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from relinear.approx.sparse import csr_to_dense

SPARSE_MATMUL_MAX_DENSITY = 0.2
SPARSE_MATMUL_DTYPES = (torch.float32, torch.float64)


def check_layout(x: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor,
                 col_indices: torch.Tensor) -> None:
    """Raise ValueError naming the first argument that does not fit the CSR layout."""
    if values.dim() != 1 or col_indices.shape != values.shape:
        raise ValueError(f"values and col_indices must both be [nnz], got {tuple(values.shape)} and "
                         f"{tuple(col_indices.shape)}")
    if crow_indices.dim() != 1 or crow_indices.shape[0] < 2:
        raise ValueError(f"crow_indices must be [out + 1] with out >= 1, got {tuple(crow_indices.shape)}")


def uses_sparse_matmul(x: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor) -> bool:
    """Whether this call runs torch's CSR matmul rather than the dense form (see the module docstring)."""
    dense_size = (crow_indices.shape[0] - 1) * x.shape[-1]
    return x.dtype in SPARSE_MATMUL_DTYPES and values.shape[0] <= SPARSE_MATMUL_MAX_DENSITY * dense_size


def sparse_linear_reference(x: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor,
                            col_indices: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    check_layout(x, values, crow_indices, col_indices)
    out_features, in_features = crow_indices.shape[0] - 1, x.shape[-1]
    bias = None if bias is None else bias.to(x.dtype)
    if not uses_sparse_matmul(x, values, crow_indices):
        return F.linear(x, csr_to_dense(values.to(x.dtype), crow_indices, col_indices, in_features), bias)
    weight = torch.sparse_csr_tensor(crow_indices, col_indices, values.to(x.dtype), (out_features, in_features),
                                     check_invariants=False)
    rows = x.reshape(-1, in_features)
    y_t = weight @ rows.T  # [out, tokens]: torch's CSR product takes the sparse matrix on the left
    if bias is not None:
        y_t = y_t + bias[:, None]
    return y_t.T.contiguous().reshape(*x.shape[:-1], out_features)


def sparse_linear_fake(x, values, crow_indices, col_indices, bias):
    return x.new_empty(*x.shape[:-1], crow_indices.shape[0] - 1)
