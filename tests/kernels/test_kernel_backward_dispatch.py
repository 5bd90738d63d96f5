"""The custom op's autograd reaches the Triton backward kernel on the kernel path (forced here on CPU, where
TRITON_INTERPRET=1 runs it) and gives the same gradients as differentiating the torch form."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

import relinear.kernels._library as library  # noqa: E402
import relinear.kernels.linear_attention  # noqa: E402,F401


def _grads(causal):
    g = torch.Generator().manual_seed(0)
    phi_q, phi_k = (torch.rand(1, 2, 37, 16, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 37, 16, generator=g, requires_grad=True)
    key_mask = torch.ones(1, 37, dtype=torch.bool)
    key_mask[0, :3] = False
    out = torch.ops.relinear.linear_attention(phi_q, phi_k, v, key_mask, causal, 16)
    weight = torch.randn(out.shape, generator=g)
    return torch.autograd.grad((out * weight).sum(), (phi_q, phi_k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_backward_kernel_matches_torch_form_gradients(causal, monkeypatch):
    reference = _grads(causal)
    calls = []
    real = library._resolve

    def spy(kernel):
        calls.append(kernel)
        return real(kernel)

    monkeypatch.setattr(library, "use_kernels", lambda tensors: True)
    monkeypatch.setattr(library, "_resolve", spy)
    kernel = _grads(causal)
    assert any("linear_attention_backward_cuda" in str(c) for c in calls)
    for got, want in zip(kernel, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
