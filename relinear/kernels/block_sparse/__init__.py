"""Block-sparse (BSR) linear layer: reference, custom op, Triton kernel."""

from relinear.kernels.block_sparse import op  # noqa: F401  (registers torch.ops.relinear.block_sparse_linear)
from relinear.kernels.block_sparse.reference import (
    block_sparse_from_dense,
    block_sparse_linear_reference,
    block_sparse_to_dense,
)

__all__ = ["block_sparse_from_dense", "block_sparse_linear_reference", "block_sparse_to_dense"]
