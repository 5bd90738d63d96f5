"""Sparse plus low-rank linear layer (W = S + up @ down): reference, custom op."""

from relinear.kernels.sparse_low_rank import op  # noqa: F401  (registers torch.ops.relinear.sparse_low_rank_linear)
