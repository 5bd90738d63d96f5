"""`torch.ops.relinear.block_sparse_linear`: BSR linear layer (layout in reference.py)."""

from __future__ import annotations

from relinear.kernels._library import define_op
from relinear.kernels.block_sparse.reference import block_sparse_linear_reference


def _fake(x, values, crow_indices, col_indices, bias, out_features, block_size):
    return x.new_empty(*x.shape[:-1], out_features)


block_sparse_linear = define_op(
    "block_sparse_linear",
    block_sparse_linear_reference,
    schema="(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, Tensor? bias, "
    "SymInt out_features, int block_size) -> Tensor",
    fake=_fake,
    cuda="relinear.kernels.block_sparse.triton:block_sparse_linear_cuda",
    cuda_backward="relinear.kernels.block_sparse.triton:block_sparse_linear_backward_cuda",
)
