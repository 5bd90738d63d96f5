"""Unstructured sparse (CSR) linear layer: reference, custom op."""

from relinear.kernels.sparse import op  # noqa: F401  (registers torch.ops.relinear.sparse_linear)
