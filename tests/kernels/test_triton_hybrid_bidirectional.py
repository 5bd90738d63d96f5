"""The bidirectional window hybrid's Triton kernels vs the spec (forward) and the chunked form's autograd
(backward), run on CPU by Triton's interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels then run on CPU tensors

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from attention_data import attention_inputs, gradient_errors, key_mask, relative_rms, values  # noqa: E402

from relinear.kernels.linear_attention.chunked import hybrid_attention_chunked  # noqa: E402
from relinear.kernels.linear_attention.reference import hybrid_attention_reference  # noqa: E402
from relinear.kernels.linear_attention.triton_hybrid import (  # noqa: E402
    hybrid_attention_backward_cuda,
    hybrid_attention_cuda,
)

# The linear part is the kv totals minus the band, so fp32 loses a little where the band holds most keys.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-3}
CHUNK = 64
NAMES = ("q", "k", "v", "phi_q", "phi_k", "gate")

CASES = [  # (Tq, Tk, D = Dv, F, window, dtype, masked): lengths around the 64-chunk, windows up to 128
    (1, 1, 16, 16, 1, torch.float32, False),
    (63, 63, 64, 16, 16, torch.float32, True),
    (65, 65, 16, 32, 64, torch.float32, False),
    (127, 127, 16, 16, 128, torch.float32, True),  # the window holds every key: the linear gradients are 0
    (40, 30, 16, 16, 5, torch.float32, True),  # more queries than keys: queries align to the keys' end
    (1, 127, 64, 16, 32, torch.float32, True),
    (65, 65, 64, 16, 7, torch.bfloat16, True),
    (127, 127, 16, 16, 48, torch.bfloat16, False),
]


def hybrid_inputs(tq, tk, dim, f_dim, dtype):
    phi_q, phi_k, v = attention_inputs(tq, tk, f_dim, dim, dtype)
    q, k = values(2, 2, tq, dim, dtype=dtype, seed=5), values(2, 2, tk, dim, dtype=dtype, seed=6)
    return q, k, v, phi_q, phi_k, values(2, seed=7)


@pytest.mark.parametrize(("tq", "tk", "dim", "f_dim", "window", "dtype", "masked"), CASES)
def test_bidirectional_hybrid_forward_and_gradients(tq, tk, dim, f_dim, window, dtype, masked):
    inputs = hybrid_inputs(tq, tk, dim, f_dim, dtype)
    mask = key_mask(2, tk) if masked else None
    args = (mask, False, window, dim**-0.5)
    out = hybrid_attention_cuda(*inputs, *args, CHUNK)
    grad_out = values(*out.shape, seed=8)
    grads = hybrid_attention_backward_cuda(grad_out.to(dtype), *inputs, *args, CHUNK)

    leaves = [t.detach().double().requires_grad_() for t in inputs]
    expected = hybrid_attention_reference(*leaves, *args)
    expected_grads = torch.autograd.grad(hybrid_attention_chunked(*leaves, *args, CHUNK), leaves, grad_out.double())

    assert out.dtype == dtype
    assert relative_rms(out, expected) <= TOLERANCE[dtype]
    assert [g.dtype for g in grads] == [t.dtype for t in inputs]
    errors = gradient_errors(grads, expected_grads, scale=expected_grads[2])
    assert max(errors) <= TOLERANCE[dtype], dict(zip(NAMES, errors, strict=True))
    if masked:
        assert out[0].abs().max() == 0  # nothing visible -> zeros, not NaN
        assert all(torch.isfinite(g).all() for g in grads)


def test_full_window_is_softmax_attention():
    """An exact limit: a window covering every key leaves no linear part, so y is softmax attention."""
    q, k, v, phi_q, phi_k, gate = hybrid_inputs(70, 70, 16, 16, torch.float32)
    out = hybrid_attention_cuda(q, k, v, phi_q, phi_k, gate, None, False, 70, 0.25, 32)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25)
    assert relative_rms(out, expected) <= 1e-5


def test_bad_gate_raises_value_error():
    q, k, v, phi_q, phi_k, _ = hybrid_inputs(8, 8, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="gate"):
        hybrid_attention_cuda(q, k, v, phi_q, phi_k, torch.zeros(3), None, False, 4, 1.0, CHUNK)


@pytest.mark.parametrize("masked", [False, True])
def test_bidirectional_hybrid_with_a_balance(masked):
    """Forward in the kernel; gradients (the balance's too) by autograd through the chunked form."""
    q, k, v, phi_q, phi_k, gate = hybrid_inputs(65, 65, 16, 16, torch.float32)
    balance = torch.tensor([[0.3, -0.5, 0.4], [-0.2, 0.7, -0.6]])
    mask = key_mask(2, 65) if masked else None
    args = (mask, False, 9, 0.25)
    out = hybrid_attention_cuda(q, k, v, phi_q, phi_k, gate, *args, CHUNK, 0, balance)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, phi_q, phi_k, gate, balance)]
    expected = hybrid_attention_reference(*leaves[:6], *args, 0, leaves[6])
    assert relative_rms(out, expected) <= TOLERANCE[torch.float32]

    grad_out = values(*out.shape, seed=8)
    grads = hybrid_attention_backward_cuda(grad_out, q, k, v, phi_q, phi_k, gate, *args, CHUNK, 0, balance)
    want = torch.autograd.grad(expected, leaves, grad_out.double())
    assert len(grads) == (8 if masked else 7)  # one per tensor input: None for the key mask
    if masked:
        assert grads[6] is None
    got = [*grads[:6], grads[-1]]
    errors = gradient_errors(got, want, scale=want[2])
    assert max(errors) <= TOLERANCE[torch.float32], dict(zip((*NAMES, "balance"), errors, strict=True))
