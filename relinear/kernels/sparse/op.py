"""`torch.ops.relinear.sparse_linear(x, values, crow_indices, col_indices, bias)`: a CSR sparse layer."""

from relinear.kernels._library import define_op
from relinear.kernels.sparse.reference import sparse_linear_fake, sparse_linear_reference

sparse_linear = define_op(
    "sparse_linear",
    sparse_linear_reference,
    schema="(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, Tensor? bias) -> Tensor",
    fake=sparse_linear_fake,
)
