from relinear.kernels.monarch import op  # noqa: F401  (registers torch.ops.relinear.monarch_linear)
