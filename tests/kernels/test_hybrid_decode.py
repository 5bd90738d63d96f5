"""Token-by-token decoding of the causal window hybrid reproduces the causal forms at every step."""

import pytest
import torch
from attention_data import BALANCE, relative_rms

from relinear.kernels.linear_attention.chunked import hybrid_attention_chunked
from relinear.kernels.linear_attention.decode import HybridCache, hybrid_attention_step
from relinear.kernels.linear_attention.reference import hybrid_attention_reference

WINDOW = 8


def sequence(length, dtype=torch.float64, seed=0):
    """(q, k, v, phi_q, phi_k, gate) for 2 sequences, 3 heads."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 3, length, 4, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(2, 3, length, 5, generator=gen, dtype=dtype)
    phi_q, phi_k = (torch.rand(2, 3, length, 6, generator=gen, dtype=dtype) for _ in range(2))
    return q, k, v, phi_q, phi_k, torch.randn(3, generator=gen, dtype=dtype)


def decode(q, k, v, phi_q, phi_k, gate, key_mask, window, scale, sinks=0, balance=None):
    """Runs one step per token; returns the outputs stacked [B, H, T, Dv] and the last cache."""
    cache, outs = None, []
    for t in range(q.shape[2]):
        mask_t = None if key_mask is None else key_mask[:, t]
        out, cache = hybrid_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], phi_q[:, :, t], phi_k[:, :, t], gate,
                                           cache, window, scale, mask_t, sinks, balance)
        outs.append(out)
    return torch.stack(outs, dim=2), cache


@pytest.mark.parametrize("length", [5, WINDOW, 21])
@pytest.mark.parametrize("masked", [False, True])
def test_steps_reproduce_the_causal_hybrid(length, masked):
    inputs = sequence(length)
    key_mask = None
    if masked:
        key_mask = torch.rand(2, length, generator=torch.Generator().manual_seed(1)) > 0.3
        key_mask[1, :3] = False  # left padding
        key_mask[0, :] = False  # a sequence with no visible key: zeros
    args = (key_mask, True, WINDOW, 0.5)
    decoded, cache = decode(*inputs, key_mask, WINDOW, 0.5)
    assert torch.allclose(decoded, hybrid_attention_chunked(*inputs, *args, 4), rtol=0, atol=1e-9)
    assert torch.allclose(decoded, hybrid_attention_reference(*inputs, *args), rtol=0, atol=1e-9)
    assert cache.keys.shape[2] == WINDOW  # O(window) memory, whatever the length
    if masked:
        assert decoded[0].abs().max() == 0


def test_window_of_one_is_softmax_on_self_plus_linear_past():
    """An exact limit: with window 1 the softmax part is the token itself with weight 1."""
    q, k, v, phi_q, phi_k, gate = sequence(6)
    decoded, _ = decode(q, k, v, phi_q, phi_k, gate, None, 1, 0.5)
    weights = torch.einsum("bhtf,bhsf->bhts", phi_q, phi_k).tril(-1) * torch.sigmoid(gate)[:, None, None]
    weights = weights + torch.eye(6, dtype=weights.dtype)
    expected = weights @ v / weights.sum(-1, keepdim=True)
    assert torch.allclose(decoded, expected, rtol=0, atol=1e-12)


def test_bfloat16_steps_keep_the_cache_in_the_input_dtype():
    q, k, v, phi_q, phi_k, gate = (t.to(torch.bfloat16) for t in sequence(12))
    decoded, cache = decode(q, k, v, phi_q, phi_k, gate, None, WINDOW, 0.5)
    expected = hybrid_attention_reference(*(t.double() for t in (q, k, v, phi_q, phi_k, gate)), None, True,
                                          WINDOW, 0.5)
    assert decoded.dtype == cache.keys.dtype == torch.bfloat16
    assert cache.state.dtype == torch.float32
    assert relative_rms(decoded, expected) <= 5e-3  # bf16 rounding of the outputs


def test_bad_arguments_raise_value_errors():
    *per_token, gate = sequence(1)
    q, k, v, phi_q, phi_k = (t[:, :, 0] for t in per_token)
    _, cache = hybrid_attention_step(q, k, v, phi_q, phi_k, gate, None, WINDOW, 0.5)
    with pytest.raises(ValueError, match="window"):
        hybrid_attention_step(q, k, v, phi_q, phi_k, gate, cache, WINDOW + 1, 0.5)
    with pytest.raises(ValueError, match="window"):
        HybridCache.empty(k, phi_k, v, 0)
    with pytest.raises(ValueError, match="sinks"):
        hybrid_attention_step(q, k, v, phi_q, phi_k, gate, cache, WINDOW, 0.5, None, 2)
    with pytest.raises(ValueError, match="sinks"):
        HybridCache.empty(k, phi_k, v, WINDOW, -1)
    with pytest.raises(ValueError, match="gate"):
        hybrid_attention_step(q, k, v, phi_q, phi_k, gate[:2], None, WINDOW, 0.5)
    with pytest.raises(ValueError, match="key_mask_t"):
        hybrid_attention_step(q, k, v, phi_q, phi_k, gate, None, WINDOW, 0.5, torch.ones(3, dtype=torch.bool))


def sink_sequence(length, seed=0):
    """(q, k, v, phi_q, phi_k, gate) for 2 sequences, 2 heads; the keys' scale makes exact and linear weights
    differ clearly, so a sink weighed the wrong way shows."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (2 * torch.randn(2, 2, length, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 2, length, 3, generator=gen, dtype=torch.float64)
    phi_q, phi_k = (torch.rand(2, 2, length, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    return q, k, v, phi_q, phi_k, torch.randn(2, generator=gen, dtype=torch.float64)


def sink_mask(kind, length):
    """None, or a [2, T] key mask whose sinks do not sit at position 0."""
    if kind == "none":
        return None
    key_mask = torch.rand(2, length, generator=torch.Generator().manual_seed(2)) > 0.25
    key_mask[1, :4] = False  # left padding: row 1's sinks are its first real tokens
    if kind == "scarce":  # row 0 has fewer attendable keys than 3 sinks, scattered
        key_mask[0] = False
        key_mask[0, [2, length - 2]] = True
    return key_mask


@pytest.mark.parametrize("sinks", [1, 3])
@pytest.mark.parametrize("window", [1, 2, 5])
@pytest.mark.parametrize("length", [4, 17])
@pytest.mark.parametrize("mask", ["none", "padded", "scarce"])
def test_steps_with_sinks_reproduce_the_causal_hybrid(sinks, window, length, mask):
    inputs = sink_sequence(length)
    key_mask = sink_mask(mask, length)
    decoded, cache = decode(*inputs, key_mask, window, 0.5, sinks)
    want = hybrid_attention_reference(*inputs, key_mask, True, window, 0.5, sinks)
    assert torch.allclose(decoded, want, rtol=0, atol=1e-9)
    chunked = hybrid_attention_chunked(*inputs, key_mask, True, window, 0.5, 4, sinks)
    assert torch.allclose(decoded, chunked, rtol=0, atol=1e-9)
    assert cache.keys.shape[2] == window and cache.sink_keys.shape[2] == sinks  # O(window + sinks) memory


def test_sinks_change_late_tokens():
    """Guards against sinks being ignored: long after the sinks left the window, the steps follow the
    reference with sinks, not the one without."""
    inputs = sink_sequence(20, seed=3)
    key_mask = sink_mask("padded", 20)
    decoded, _ = decode(*inputs, key_mask, 3, 0.5, 2)
    with_sinks = hybrid_attention_reference(*inputs, key_mask, True, 3, 0.5, 2)
    without = hybrid_attention_reference(*inputs, key_mask, True, 3, 0.5)
    assert torch.allclose(decoded, with_sinks, rtol=0, atol=1e-9)
    assert (decoded[..., -1, :] - without[..., -1, :]).abs().amax() > 1e-3


@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize("mask", ["none", "padded"])
def test_steps_with_a_balance_reproduce_the_causal_hybrid(sinks, mask):
    """The per-query balance reads the window's max and sum and the linear sum, which the steps hold too."""
    length = 17
    inputs = sink_sequence(length, seed=4)
    balance = BALANCE.double()
    key_mask = sink_mask(mask, length)
    decoded, _ = decode(*inputs, key_mask, 3, 0.5, sinks, balance)
    want = hybrid_attention_reference(*inputs, key_mask, True, 3, 0.5, sinks, balance)
    assert torch.allclose(decoded, want, rtol=0, atol=1e-9)
    chunked = hybrid_attention_chunked(*inputs, key_mask, True, 3, 0.5, 4, sinks, balance)
    assert torch.allclose(decoded, chunked, rtol=0, atol=1e-9)
    unbalanced = hybrid_attention_reference(*inputs, key_mask, True, 3, 0.5, sinks)
    assert (decoded - unbalanced).abs().amax() > 1e-3  # the balance is not ignored
