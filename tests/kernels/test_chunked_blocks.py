"""The causal CPU form builds its [C, C] blocks a few heads at a time; the split must not change the result."""

import pytest
import torch

import relinear.kernels.linear_attention.chunked as chunked
from relinear.kernels.linear_attention.reference import linear_attention_reference


@pytest.mark.parametrize("block_elements", [1, 4 * 3 * 16 * 16, 1 << 20])
def test_causal_form_is_independent_of_the_head_blocking(block_elements, monkeypatch):
    monkeypatch.setattr(chunked, "_BLOCK_ELEMENTS", block_elements)
    gen = torch.Generator().manual_seed(0)
    phi_q, phi_k = (torch.rand(2, 3, 37, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 3, 37, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    key_mask = torch.ones(2, 37, dtype=torch.bool)
    key_mask[1, :4] = False
    got = chunked.linear_attention_causal(phi_q, phi_k, v, key_mask, 16)
    want = linear_attention_reference(phi_q, phi_k, v, key_mask, True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(want)
    grads_got = torch.autograd.grad((got * weights).sum(), (phi_q, phi_k, v))
    grads_want = torch.autograd.grad((want * weights).sum(), (phi_q, phi_k, v))
    for g, w in zip(grads_got, grads_want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # the in-place inference path
        torch.testing.assert_close(chunked.linear_attention_causal(phi_q, phi_k, v, key_mask, 16), want,
                                   rtol=1e-10, atol=1e-10)
