"""Triton linear-attention kernels vs the plain-torch spec, run on CPU by Triton's interpreter."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels then run on CPU tensors

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from attention_data import BALANCE, TOLERANCE, attention_inputs, features, key_mask, relative_rms, values  # noqa: E402

from relinear.kernels.linear_attention import reference  # noqa: E402
from relinear.kernels.linear_attention.chunked import linear_attention_step  # noqa: E402
from relinear.kernels.linear_attention.triton import (  # noqa: E402
    gated_linear_attention_cuda,
    linear_attention_cuda,
    linear_attention_step_cuda,
    linear_attention_triton,
)
from relinear.kernels.linear_attention.triton_hybrid import hybrid_attention_cuda  # noqa: E402

CHUNK = 64


CASES = [  # (Tq, Tk, F, Dv, dtype, masked); one visible key would make d phi_q exactly 0: no relative scale
    (1, 5, 16, 16, torch.float32, False),
    (63, 63, 32, 32, torch.float32, True),
    (65, 65, 64, 16, torch.float32, False),
    (127, 127, 16, 128, torch.float32, True),
    (1, 127, 32, 64, torch.float32, True),
    (40, 30, 16, 16, torch.float32, False),
    (65, 65, 32, 32, torch.bfloat16, True),
    (127, 127, 128, 16, torch.bfloat16, False),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize(("tq", "tk", "f_dim", "v_dim", "dtype", "masked"), CASES)
def test_linear_attention_forward_and_gradients(causal, tq, tk, f_dim, v_dim, dtype, masked):
    phi_q, phi_k, v = (t.requires_grad_() for t in attention_inputs(tq, tk, f_dim, v_dim, dtype))
    mask = key_mask(2, tk) if masked else None
    out = linear_attention_triton(phi_q, phi_k, v, mask, causal, CHUNK)
    grad_out = values(*out.shape, seed=4)
    grads = torch.autograd.grad(out, (phi_q, phi_k, v), grad_out.to(dtype))

    leaves = [t.detach().double().requires_grad_() for t in (phi_q, phi_k, v)]
    expected = reference.linear_attention_reference(*leaves, mask, causal)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out.double())

    assert out.dtype == dtype
    assert relative_rms(out, expected) <= TOLERANCE[dtype]
    for name, got, want in zip(("phi_q", "phi_k", "v"), grads, expected_grads, strict=True):
        assert relative_rms(got, want) <= TOLERANCE[dtype], name
    if masked:
        assert out[0].abs().max() == 0  # nothing visible -> zeros, not NaN


def test_op_launcher_matches_autograd_forward():
    phi_q, phi_k, v = attention_inputs(65, 65, 16, 16, torch.float32)
    assert torch.equal(linear_attention_cuda(phi_q, phi_k, v, None, True, CHUNK),
                       linear_attention_triton(phi_q, phi_k, v, None, True, CHUNK))


@pytest.mark.parametrize("chunk_size", [16, 32, 128])
def test_result_does_not_depend_on_chunk_size(chunk_size):
    phi_q, phi_k, v = attention_inputs(100, 100, 16, 32, torch.float64)
    expected = reference.linear_attention_reference(phi_q, phi_k, v, None, True)
    assert relative_rms(linear_attention_cuda(phi_q, phi_k, v, None, True, chunk_size), expected) <= 1e-5


@pytest.mark.parametrize(("tq", "tk", "window", "dtype", "masked"), [
    (1, 1, 1, torch.float32, False),
    (63, 63, 16, torch.float32, True),
    (65, 65, 64, torch.float32, False),
    (127, 127, 128, torch.float32, True),
    (1, 127, 32, torch.float32, True),
    (30, 20, 5, torch.float32, False),
    (65, 100, 7, torch.bfloat16, True),
])
def test_hybrid_attention_matches_reference(tq, tk, window, dtype, masked):
    d_dim = 32
    q, k = values(2, 2, tq, d_dim, dtype=dtype, seed=5), values(2, 2, tk, d_dim, dtype=dtype, seed=6)
    phi_q, phi_k, v = attention_inputs(tq, tk, 16, 32, dtype)
    gate = values(2, seed=7)
    mask = key_mask(2, tk) if masked else None
    args = (gate, mask, True, window, d_dim**-0.5)
    out = hybrid_attention_cuda(q, k, v, phi_q, phi_k, *args, CHUNK)
    expected = reference.hybrid_attention_reference(*(t.double() for t in (q, k, v, phi_q, phi_k)), *args)
    assert out.dtype == dtype
    assert relative_rms(out, expected) <= TOLERANCE[dtype]


@pytest.mark.parametrize("causal", [True, False])
def test_hybrid_with_sinks_matches_reference(causal):
    """Sinks have no kernel yet: the CUDA entry point must still honour them (it runs the torch form)."""
    q, k = values(2, 2, 40, 16, seed=12), values(2, 2, 40, 16, seed=13)
    phi_q, phi_k, v = attention_inputs(40, 40, 16, 16, torch.float32)
    args = (values(2, seed=14), key_mask(2, 40), causal, 4, 0.25)
    out = hybrid_attention_cuda(q, k, v, phi_q, phi_k, *args, CHUNK, 2)
    expected = reference.hybrid_attention_reference(*(t.double() for t in (q, k, v, phi_q, phi_k)), *args, 2)
    assert relative_rms(out, expected) <= TOLERANCE[torch.float32]


def test_hybrid_with_full_window_is_softmax_attention():
    """An exact limit: a window covering every key leaves no linear part, so y is causal softmax attention."""
    q, k, v = (values(2, 2, 70, 16, seed=s) for s in (8, 9, 10))
    phi_q, phi_k, _ = attention_inputs(70, 70, 16, 16, torch.float32)
    out = hybrid_attention_cuda(q, k, v, phi_q, phi_k, values(2, seed=11), None, True, 128, 0.25, 32)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)
    assert relative_rms(out, expected) <= 1e-5


@pytest.mark.parametrize(("tq", "tk", "dtype", "masked"), [
    (63, 63, torch.float32, False), (65, 65, torch.float32, True), (1, 127, torch.float32, True),
    (127, 127, torch.bfloat16, False),
])
def test_gated_linear_attention_matches_reference(tq, tk, dtype, masked):
    phi_q, phi_k, v = attention_inputs(tq, tk, 32, 16, dtype)
    log_decay = -3 * features(2, 2, tk, seed=12)
    mask = key_mask(2, tk) if masked else None
    out = gated_linear_attention_cuda(phi_q, phi_k, v, log_decay, mask, CHUNK)
    expected = reference.gated_linear_attention_reference(
        *(t.double() for t in (phi_q, phi_k, v, log_decay)), mask)
    assert relative_rms(out, expected) <= TOLERANCE[dtype]


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_decode_step_matches_torch_step(with_state, gated):
    phi_q, phi_k = features(2, 3, 16, seed=13), features(2, 3, 16, seed=14)
    v = values(2, 3, 80, seed=15)
    state = (features(2, 3, 16, 80, seed=16), features(2, 3, 16, seed=17)) if with_state else (None, None)
    log_decay = -features(2, 3, seed=18) if gated else None
    got = linear_attention_step_cuda(phi_q, phi_k, v, *state, log_decay)
    expected = linear_attention_step(*(t.double() for t in (phi_q, phi_k, v)),
                                     *(None if t is None else t.double() for t in state),
                                     None if log_decay is None else log_decay.double())
    for name, g, e in zip(("out", "state", "normalizer"), got, expected, strict=True):
        assert relative_rms(g, e) <= 1e-5, name


def test_decode_steps_continue_a_causal_prefix():
    """Steps after a prefill give what one causal pass over the whole sequence gives at the last token."""
    phi_q, phi_k, v = attention_inputs(20, 20, 16, 16, torch.float32, heads=1)
    state = reference_state = None
    normalizer = None
    for t in range(20):
        out, state, normalizer = linear_attention_step_cuda(phi_q[:, :, t], phi_k[:, :, t], v[:, :, t], state,
                                                            normalizer)
    reference_state = reference.linear_attention_reference(phi_q, phi_k, v, None, True)[:, :, -1]
    assert relative_rms(out, reference_state) <= 1e-5


def test_bad_arguments_raise_value_errors():
    phi_q, phi_k, v = attention_inputs(8, 8, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="key_mask"):
        linear_attention_cuda(phi_q, phi_k, v, torch.ones(2, 9, dtype=torch.bool), True, CHUNK)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention_cuda(phi_q, phi_k, v, None, True, 0)
    with pytest.raises(ValueError, match="shapes"):
        linear_attention_cuda(phi_q, phi_k[:, :, :4], v, None, True, CHUNK)
    with pytest.raises(ValueError, match="window"):
        hybrid_attention_cuda(phi_q, phi_k, v, phi_q, phi_k, torch.zeros(2), None, True, 0, 1.0, CHUNK)


@pytest.mark.parametrize("masked", [False, True])
def test_causal_hybrid_with_a_balance_matches_reference(masked):
    """The causal kernel weighs the linear part per query from its window max, window sum and linear sum."""
    q, k = values(2, 2, 70, 16, seed=15), values(2, 2, 70, 16, seed=16)
    phi_q, phi_k, v = attention_inputs(70, 70, 16, 16, torch.float32)
    balance = BALANCE.T.contiguous().T  # non-contiguous, same values
    assert not balance.is_contiguous()
    args = (values(2, seed=17), key_mask(2, 70) if masked else None, True, 9, 0.25)
    out = hybrid_attention_cuda(q, k, v, phi_q, phi_k, *args, CHUNK, 0, balance)
    expected = reference.hybrid_attention_reference(*(t.double() for t in (q, k, v, phi_q, phi_k)), *args, 0,
                                                    balance.double())
    assert relative_rms(out, expected) <= TOLERANCE[torch.float32]
    unbalanced = reference.hybrid_attention_reference(*(t.double() for t in (q, k, v, phi_q, phi_k)), *args)
    assert relative_rms(unbalanced, expected) > 10 * TOLERANCE[torch.float32]  # the balance matters here
