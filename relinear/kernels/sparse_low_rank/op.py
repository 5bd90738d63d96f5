"""`torch.ops.relinear.sparse_low_rank_linear(x, values, crow_indices, col_indices, down, up, bias)`."""

from relinear.kernels._library import define_op
from relinear.kernels.sparse_low_rank.reference import (
    sparse_low_rank_linear_fake,
    sparse_low_rank_linear_reference,
)

sparse_low_rank_linear = define_op(
    "sparse_low_rank_linear",
    sparse_low_rank_linear_reference,
    schema="(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, Tensor down, Tensor up, "
    "Tensor? bias) -> Tensor",
    fake=sparse_low_rank_linear_fake,
)
