"""The kernel the CUDA dispatch key runs for `low_rank_linear` exists and computes the reference (checked on
CPU tensors with Triton reported available, so a kernel module that does not exist fails here, not on a GPU)."""

import torch
from torch._library.custom_ops import OPDEFS

import relinear.kernels._library as library
import relinear.kernels.low_rank  # noqa: F401  (registers the op)
from relinear.kernels.low_rank.reference import low_rank_linear_reference


def test_the_cuda_kernel_of_low_rank_linear_resolves_and_computes_the_reference(monkeypatch):
    monkeypatch.setattr(library, "triton_available", lambda: True)
    kernels = OPDEFS["relinear::low_rank_linear"]._backend_fns
    cuda = kernels.get("cuda", kernels[None])  # no CUDA kernel: CUDA runs the default (the torch form)
    g = torch.Generator().manual_seed(0)
    x, down, up, bias = (torch.randn(*s, generator=g) for s in ((3, 5, 16), (4, 16), (8, 4), (8,)))
    torch.testing.assert_close(cuda(x, down, up, bias), low_rank_linear_reference(x, down, up, bias))
