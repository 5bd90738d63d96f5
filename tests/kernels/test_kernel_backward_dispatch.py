"""The custom op's autograd reaches the Triton backward kernel on the kernel path (forced here on CPU, where
TRITON_INTERPRET=1 runs it) and gives the same gradients as differentiating the torch form."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from kernel_path import assert_kernel_gradients_match  # noqa: E402

import relinear.kernels.linear_attention  # noqa: E402,F401


@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_backward_kernel_matches_torch_form(causal, monkeypatch):
    g = torch.Generator().manual_seed(0)
    phi_q, phi_k = (torch.rand(1, 2, 37, 16, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 37, 16, generator=g, requires_grad=True)
    key_mask = torch.ones(1, 37, dtype=torch.bool)
    key_mask[0, :3] = False
    assert_kernel_gradients_match(torch.ops.relinear.linear_attention, (phi_q, phi_k, v, key_mask), (causal, 16),
                                  "linear_attention_backward_cuda", monkeypatch)
