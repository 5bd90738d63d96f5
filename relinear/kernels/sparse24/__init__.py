"""2:4 semi-structured sparse linear layer: compact reference, custom op, CUDA semi-structured path."""

from relinear.kernels.sparse24 import op  # noqa: F401  (registers torch.ops.relinear.sparse24_linear)
