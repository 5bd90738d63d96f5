"""`torch.ops.relinear.low_rank_linear(x, down, up, bias)`: a rank-r factored dense layer.

No Triton kernel, on purpose: the torch form is two GEMMs with the bias fused into the second, which cuBLAS
runs well; the rank-r intermediate is small, so fusing would save little. Every device (CUDA included) runs it.
"""

from relinear.kernels._library import define_op
from relinear.kernels.low_rank.reference import low_rank_linear_reference

SCHEMA = "(Tensor x, Tensor down, Tensor up, Tensor? bias) -> Tensor"

low_rank_linear = define_op("low_rank_linear", low_rank_linear_reference, schema=SCHEMA)
