"""The spec of the block-sparse linear layer: y = x W^T + b with W stored in BSR (block compressed rows).

Layout (torch's `sparse_bsr` convention for W [out_features, in_features]):
- values [nnz, bs, bs] (bs = block_size): values[i][r][c] = W[row_i * bs + r, col_indices[i] * bs + c]
- crow_indices [out_features / bs + 1] int: block-row n holds blocks crow_indices[n]:crow_indices[n+1]
- col_indices [nnz] int: the block-column of each block, ascending within a block-row.
"""

from __future__ import annotations

import torch

from relinear.approx import sparse as sparse_math
from relinear.approx.sparse import csr_rows as block_rows  # the block-row of each stored block


def check_layout(x, values, crow_indices, col_indices, out_features, block_size):
    """Raise ValueError naming the first argument that does not fit the BSR layout."""
    if values.dim() != 3 or values.shape[1:] != (block_size, block_size):
        raise ValueError(f"values must be [nnz, {block_size}, {block_size}], got {tuple(values.shape)}")
    if out_features % block_size or x.shape[-1] % block_size:
        raise ValueError(
            f"out_features ({out_features}) and in_features ({x.shape[-1]}) must be multiples of block_size "
            f"({block_size})"
        )
    if crow_indices.shape != (out_features // block_size + 1,):
        raise ValueError(f"crow_indices must have {out_features // block_size + 1} entries, got "
                         f"{tuple(crow_indices.shape)}")
    if col_indices.shape != (values.shape[0],):
        raise ValueError(f"col_indices must have one entry per block ({values.shape[0]}), got "
                         f"{tuple(col_indices.shape)}")


def block_sparse_linear_reference(
    x: torch.Tensor,
    values: torch.Tensor,
    crow_indices: torch.Tensor,
    col_indices: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    block_size: int,
) -> torch.Tensor:
    """x [..., in] -> [..., out]: each stored block multiplies its slice of x into its slice of y.

    Work and memory scale with the stored blocks, not with out * in; accumulates in float32.
    """
    check_layout(x, values, crow_indices, col_indices, out_features, block_size)
    lead = x.shape[:-1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_blocks = x.reshape(-1, x.shape[-1] // block_size, block_size).to(dtype)
    partial = torch.einsum("mnc,nrc->mnr", x_blocks[:, col_indices], values.to(dtype))
    y = x_blocks.new_zeros(x_blocks.shape[0], out_features // block_size, block_size)
    y = y.index_add(1, block_rows(crow_indices, values.shape[0]), partial).reshape(*lead, out_features)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype)


def block_sparse_to_dense(
    values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor, out_features: int,
    in_features: int,
) -> torch.Tensor:
    """The dense W [out, in] that the BSR triple stores (zeros outside the stored blocks)."""
    block_size = values.shape[1]
    blocks = values.new_zeros(out_features // block_size, in_features // block_size, block_size, block_size)
    blocks[block_rows(crow_indices, values.shape[0]), col_indices] = values
    return blocks.transpose(1, 2).reshape(out_features, in_features)


def block_sparse_from_dense(
    weight: torch.Tensor, block_size: int, sparsity: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, crow_indices, col_indices) keeping the (1 - sparsity) fraction of blocks of largest norm.

    At least one block is kept; ties go to the earlier block in row-major order (relinear.approx.sparse).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if block_size < 1 or weight.shape[0] % block_size or weight.shape[1] % block_size:
        raise ValueError(f"block_size {block_size} must divide both weight dims {tuple(weight.shape)}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    keep = sparse_math.block_mask(weight.abs(), block_size, 1.0 - sparsity)
    return sparse_math.to_bsr(weight, keep, block_size)
