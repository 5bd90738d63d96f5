"""The causal CPU forms work a few heads at a time (the [C, C] blocks; the mapped op's whole inference path); the split
must not change the result."""

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


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_mapped_op_inference_in_head_blocks_equals_the_reference(feature_map):
    """Inference runs the causal mapped op a few heads at a time; 5 heads make an uneven last block."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 5, 21, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    key_mask = torch.ones(2, 21, dtype=torch.bool)
    key_mask[0, :3] = False
    scale = 0.3
    phi = {"elu": lambda x: torch.nn.functional.elu(x) + 1, "relu": torch.relu}[feature_map]
    want = linear_attention_reference(phi(q * scale**0.5), phi(k * scale**0.5), v, key_mask, True)
    with torch.no_grad():
        got = torch.ops.relinear.mapped_linear_attention(q, k, v, key_mask, True, 8, feature_map, scale)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
