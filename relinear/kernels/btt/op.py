"""`torch.ops.relinear.btt_linear(x, core1, core2, bias, out_features)`: a two-core BTT layer."""

from relinear.kernels._library import define_op
from relinear.kernels.btt.reference import btt_linear_cpu, btt_linear_fake

SCHEMA = "(Tensor x, Tensor core1, Tensor core2, Tensor? bias, int out_features) -> Tensor"

btt_linear = define_op(
    "btt_linear",
    btt_linear_cpu,
    schema=SCHEMA,
    fake=btt_linear_fake,
    cuda="relinear.kernels.btt.triton:btt_linear_cuda",
    cuda_backward="relinear.kernels.btt.triton:btt_linear_backward_cuda",
)
