"""Triton kernel for `relinear.btt_linear`: the fused two-core kernel Monarch also runs (same layout)."""

from relinear.kernels.monarch.triton import btt_linear_backward_triton, btt_linear_triton


def btt_linear_cuda(x, core1, core2, bias, out_features):
    """`relinear.btt_linear` on GPU: core1 [m1, n1*r, m2], core2 [n1, n2, r*m1]."""
    return btt_linear_triton(x, core1, core2, bias, out_features)


def btt_linear_backward_cuda(grad_out, x, core1, core2, bias, out_features):
    """(dx, dcore1, dcore2, dbias) of `btt_linear_cuda`."""
    return btt_linear_backward_triton(grad_out, x, core1, core2, bias, out_features)
