from relinear.kernels.low_rank import op  # noqa: F401  (registers torch.ops.relinear.low_rank_linear)
