"""`torch.ops.relinear.monarch_linear(x, blocks1, blocks2, bias, out_features)`: a Monarch layer."""

from relinear.kernels._library import define_op
from relinear.kernels.monarch.reference import monarch_linear_cpu, monarch_linear_fake

SCHEMA = "(Tensor x, Tensor blocks1, Tensor blocks2, Tensor? bias, int out_features) -> Tensor"

monarch_linear = define_op(
    "monarch_linear",
    monarch_linear_cpu,
    schema=SCHEMA,
    fake=monarch_linear_fake,
    cuda="relinear.kernels.monarch.triton:monarch_linear_cuda",
    cuda_backward="relinear.kernels.monarch.triton:monarch_linear_backward_cuda",
)
