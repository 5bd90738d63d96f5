"""`torch.ops.relinear.sparse24_linear(x, values, positions, bias)`: a 2:4 sparse layer (layout in reference.py)."""

from relinear.kernels._library import define_op
from relinear.kernels.sparse24.reference import sparse24_linear_fake, sparse24_linear_reference

sparse24_linear = define_op(
    "sparse24_linear",
    sparse24_linear_reference,
    schema="(Tensor x, Tensor values, Tensor positions, Tensor? bias) -> Tensor",
    fake=sparse24_linear_fake,
    cuda="relinear.kernels.sparse24.cuda:sparse24_linear_cuda",
)
