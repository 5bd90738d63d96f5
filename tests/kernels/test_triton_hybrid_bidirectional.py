"""The bidirectional window hybrid's Triton kernels vs the spec (forward) and the chunked form's autograd
(backward), run on CPU by Triton's interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels then run on CPU tensors

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from attention_data import BALANCE, attention_inputs, gradient_errors, key_mask, relative_rms, values  # noqa: E402
from kernel_path import forbid_hybrid_fallback  # noqa: E402

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

CASES = [  # (Tq, Tk, D = Dv, F, window, dtype, masked, balanced): lengths around the 64-chunk, windows up to 128
    (1, 1, 16, 16, 1, torch.float32, False, False),
    (63, 63, 64, 16, 16, torch.float32, True, True),
    (65, 65, 16, 32, 64, torch.float32, False, False),
    (65, 65, 16, 32, 64, torch.float32, False, True),
    (127, 127, 16, 16, 128, torch.float32, True, True),  # the window holds every key: the linear gradients are 0
    (40, 30, 16, 16, 5, torch.float32, True, False),  # more queries than keys: queries align to the keys' end
    (40, 30, 16, 16, 5, torch.float32, True, True),
    (1, 127, 64, 16, 32, torch.float32, True, False),
    (65, 65, 64, 16, 7, torch.bfloat16, True, True),
    (127, 127, 16, 16, 48, torch.bfloat16, False, False),
]


def hybrid_inputs(tq, tk, dim, f_dim, dtype):
    phi_q, phi_k, v = attention_inputs(tq, tk, f_dim, dim, dtype)
    q, k = values(2, 2, tq, dim, dtype=dtype, seed=5), values(2, 2, tk, dim, dtype=dtype, seed=6)
    return q, k, v, phi_q, phi_k, values(2, seed=7)


@pytest.mark.parametrize(("tq", "tk", "dim", "f_dim", "window", "dtype", "masked", "balanced"), CASES)
def test_bidirectional_hybrid_forward_and_gradients(tq, tk, dim, f_dim, window, dtype, masked, balanced,
                                                    monkeypatch):
    forbid_hybrid_fallback(monkeypatch)
    inputs = hybrid_inputs(tq, tk, dim, f_dim, dtype)
    mask = key_mask(2, tk) if masked else None
    args = (mask, False, window, dim**-0.5)
    balance = BALANCE.to(dtype) if balanced else None
    out = hybrid_attention_cuda(*inputs, *args, CHUNK, 0, balance)
    grad_out = values(*out.shape, seed=8)
    grads = hybrid_attention_backward_cuda(grad_out.to(dtype), *inputs, *args, CHUNK, 0, balance)

    leaves = [t.detach().double().requires_grad_() for t in (*inputs, *([balance] if balanced else []))]
    tuned = leaves[6] if balanced else None
    expected = hybrid_attention_reference(*leaves[:6], *args, 0, tuned)
    chunked = hybrid_attention_chunked(*leaves[:6], *args, CHUNK, 0, tuned)
    expected_grads = torch.autograd.grad(chunked, leaves, grad_out.double())

    assert out.dtype == dtype
    assert relative_rms(out, expected) <= TOLERANCE[dtype]
    if balanced:  # one gradient per tensor input: None for the key mask
        assert len(grads) == (8 if masked else 7)
        if masked:
            assert grads[6] is None
        grads = (*grads[:6], grads[-1])
    assert [g.dtype for g in grads] == [t.dtype for t in inputs] + ([dtype] if balanced else [])
    errors = gradient_errors(grads, expected_grads, scale=expected_grads[2])
    assert max(errors) <= TOLERANCE[dtype], dict(zip((*NAMES, "balance"), errors, strict=False))
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
