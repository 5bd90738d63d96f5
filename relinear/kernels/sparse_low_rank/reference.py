"""The spec of the sparse plus low-rank layer: y = x S^T + (x down^T) up^T + b, S in CSR (as
relinear.kernels.sparse), down [r, in], up [out, r]; r may be 0 (the sparse layer alone)."""

from __future__ import annotations

import torch

from relinear.kernels.low_rank.reference import low_rank_linear_reference
from relinear.kernels.sparse.reference import sparse_linear_fake, sparse_linear_reference


def sparse_low_rank_linear_reference(x: torch.Tensor, values: torch.Tensor, crow_indices: torch.Tensor,
                                     col_indices: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                                     bias: torch.Tensor | None) -> torch.Tensor:
    if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
        raise ValueError(f"down [r, in] and up [out, r] must share the rank, got {tuple(down.shape)} and "
                         f"{tuple(up.shape)}")
    sparse = sparse_linear_reference(x, values, crow_indices, col_indices, None)
    return sparse + low_rank_linear_reference(x, down, up, bias)


def sparse_low_rank_linear_fake(x, values, crow_indices, col_indices, down, up, bias):
    return sparse_linear_fake(x, values, crow_indices, col_indices, bias)
