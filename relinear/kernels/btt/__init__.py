from relinear.kernels.btt import op  # noqa: F401  (registers torch.ops.relinear.btt_linear)
