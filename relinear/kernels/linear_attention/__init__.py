"""Linear attention kernels: `reference` (the spec), `chunked` (CPU forms), `op` (the custom ops)."""

from relinear.kernels.linear_attention import op  # noqa: F401  (registers torch.ops.relinear.*)
