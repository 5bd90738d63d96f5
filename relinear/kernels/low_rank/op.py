"""`torch.ops.relinear.low_rank_linear(x, down, up, bias)`: a rank-r factored dense layer.

No Triton kernel: the torch form is two GEMMs, which cuBLAS runs on CUDA as well as a kernel could."""

from relinear.kernels._library import define_op
from relinear.kernels.low_rank.reference import low_rank_linear_reference

SCHEMA = "(Tensor x, Tensor down, Tensor up, Tensor? bias) -> Tensor"

low_rank_linear = define_op(
    "low_rank_linear",
    low_rank_linear_reference,
    schema=SCHEMA,
)
