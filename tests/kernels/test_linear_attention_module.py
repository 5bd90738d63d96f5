"""LinearizedAttention: GQA, scale, exact softmax limit, Liger, parameters, dtypes, argument errors."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from relinear.approx.linear_attention import LinearizedAttention
from relinear.kernels.linear_attention.reference import gated_linear_attention_reference

HEADS, KV_HEADS, DIM = 4, 2, 8


def _qkv(seed, num_queries=9, num_keys=9, dtype=torch.float64, kv_heads=KV_HEADS):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, HEADS, num_queries, DIM, generator=generator, dtype=torch.float64)
    k = torch.randn(2, kv_heads, num_keys, DIM, generator=generator, dtype=torch.float64)
    v = torch.randn(2, kv_heads, num_keys, DIM, generator=generator, dtype=torch.float64)
    key_mask = torch.rand(2, num_keys, generator=generator) > 0.3
    return q.to(dtype), k.to(dtype), v.to(dtype), key_mask


def _sdpa_mask(key_mask, num_queries, num_keys, causal, window=None):
    """bool [B, 1, Tq, Tk] for SDPA: queries end-aligned to the keys, optional sliding window."""
    offset = torch.arange(num_keys - num_queries, num_keys)[:, None] - torch.arange(num_keys)
    allowed = (offset >= 0) if causal else torch.ones_like(offset, dtype=torch.bool)
    if window is not None:
        allowed = allowed & (offset < window)
    return allowed[None, None] & key_mask[:, None, None, :]


def _sdpa(q, k, v, mask, scale=None):
    """Softmax attention; a query that sees no key gets zeros, as relinear's forms give."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.masked_fill(~mask.any(-1, keepdim=True), 0)


def _module(**kwargs):
    return LinearizedAttention(HEADS, DIM, generator=torch.Generator().manual_seed(0), **kwargs).double()


@pytest.mark.property
@settings(max_examples=10)
@given(
    seed=st.integers(0, 2**16),
    lengths=st.sampled_from([(1, 1), (9, 9), (3, 70), (65, 65)]),
    causal=st.booleans(),
    scale=st.sampled_from([None, 0.1, 1.0]),
    feature_map=st.sampled_from(["hedgehog", "elu", "taylor"]),
)
def test_window_covering_every_key_equals_sdpa(seed, lengths, causal, scale, feature_map):
    num_queries, num_keys = lengths
    q, k, v, key_mask = _qkv(seed, num_queries, num_keys)
    module = _module(feature_map=feature_map, window=num_keys, chunk_size=16)
    got = module(q, k, v, key_mask=key_mask, causal=causal, scale=scale)
    mask = _sdpa_mask(key_mask, num_queries, num_keys, causal)
    expected = _sdpa(q, k, v, mask, scale)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_scale_reaches_the_feature_maps():
    """taylor with window 0: weights must be 1 + a + a^2 / 2 with a = scale * q.k, for the given scale."""
    q, k, v, key_mask = _qkv(1, kv_heads=HEADS)
    scale = 0.37
    got = _module(feature_map="taylor")(q, k, v, key_mask=key_mask, scale=scale)
    a = scale * q @ k.mT
    weights = (1 + a + a**2 / 2) * key_mask[:, None, None, :]
    torch.testing.assert_close(got, weights @ v / weights.sum(-1, keepdim=True), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_grouped_kv_heads_serve_consecutive_query_heads(window, causal):
    q, k, v, key_mask = _qkv(2)
    module = _module(window=window)
    expanded = [t.repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (k, v)]
    torch.testing.assert_close(
        module(q, k, v, key_mask, causal), module(q, *expanded, key_mask, causal), rtol=0, atol=0
    )


def test_liger_is_half_decaying_linear_half_sliding_window():
    q, k, v, key_mask = _qkv(3, num_queries=20, num_keys=20, kv_heads=HEADS)
    window = 4
    module = _module(gate="liger", window=window, chunk_size=8)
    assert module.trainable_parameters() == []  # softmax map, decay from k: no new parameters
    scale = 1 / math.sqrt(DIM)
    phi_q, phi_k = (torch.softmax(t * math.sqrt(scale), -1) for t in (q, k))
    log_decay = F.logsigmoid(k.mean(-1)) / 16
    recurrent = gated_linear_attention_reference(phi_q, phi_k, v, log_decay, key_mask)
    mask = _sdpa_mask(key_mask, 20, 20, causal=True, window=window)
    local = _sdpa(q, k, v, mask)
    torch.testing.assert_close(module(q, k, v, key_mask, causal=True), (recurrent + local) / 2)


def test_liger_is_causal_only():
    q, k, v, _ = _qkv(4)
    with pytest.raises(ValueError, match="causal"):
        _module(gate="liger")(q, k, v, causal=False)
    assert _module(gate="liger").window == 64


def test_trainable_parameters_are_feature_maps_and_window_gate():
    hybrid = _module(window=4)
    assert len(hybrid.trainable_parameters()) == 6  # two hedgehog maps (weight, magnitude) + gate + balance
    assert any(p is hybrid.window_gate for p in hybrid.trainable_parameters())
    assert any(p is hybrid.window_balance for p in hybrid.trainable_parameters())
    assert len(_module(window=4, balance=False).trainable_parameters()) == 5
    assert _module(window=4, balance=False).window_balance is None
    assert hybrid.feature_map_q is not hybrid.feature_map_k
    torch.testing.assert_close(hybrid.feature_map_q.weight, hybrid.feature_map_k.weight)
    assert _module(feature_map="elu").trainable_parameters() == []

    q, k, v, key_mask = _qkv(5)
    hybrid(q, k, v, key_mask, causal=True).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hybrid.trainable_parameters())


@pytest.mark.parametrize("window", [0, 3])
def test_bfloat16_in_bfloat16_out(window):
    q, k, v, key_mask = _qkv(6)
    module = LinearizedAttention(HEADS, DIM, window=window)
    expected = module(*(t.float() for t in (q, k, v)), key_mask, causal=True)
    got = module(*(t.bfloat16() for t in (q, k, v)), key_mask, causal=True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=5e-2, atol=5e-2)


def test_bad_arguments_are_rejected_by_name():
    for kwargs, name in [({"window": -1}, "window"), ({"gate": "sigmoid"}, "gate"), ({"chunk_size": 0}, "chunk_size")]:
        with pytest.raises(ValueError, match=name):
            LinearizedAttention(HEADS, DIM, **kwargs)
    q, k, v, _ = _qkv(7)
    module = LinearizedAttention(HEADS, DIM).double()
    with pytest.raises(ValueError, match="num_heads"):
        module(q[:, :3], k, v)
    with pytest.raises(ValueError, match="divide"):
        module(q, k[:, :1].expand(-1, 3, -1, -1), v[:, :1].expand(-1, 3, -1, -1))


@pytest.mark.parametrize(
    "kwargs, ops",
    [
        ({}, ["linear_attention"]),
        ({"window": 4}, ["hybrid_attention"]),
        ({"gate": "liger", "window": 4}, ["gated_linear_attention", "hybrid_attention"]),
        ({"decay": True}, ["gated_linear_attention"]),
    ],
)
def test_export_sees_the_relinear_ops_only_as_single_nodes(kwargs, ops):
    q, k, v, key_mask = _qkv(8, dtype=torch.float32)
    module = LinearizedAttention(HEADS, DIM, **kwargs)

    class Causal(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = module

        def forward(self, q, k, v, key_mask):
            return self.attention(q, k, v, key_mask, causal=True)

    graph = torch.export.export(Causal(), (q, k, v, key_mask)).graph
    targets = [node.target for node in graph.nodes if node.op == "call_function"]
    relinear_ops = sorted(str(t) for t in targets if str(t).startswith("relinear."))
    assert relinear_ops == sorted(f"relinear.{op}.default" for op in ops)


def test_balance_starts_at_the_per_head_gate():
    """window_balance starts at 0, so a fresh hybrid computes what one without a balance does."""
    q, k, v, key_mask = _qkv(9)
    for causal in (False, True):
        with_balance = _module(window=3)(q, k, v, key_mask, causal=causal)
        torch.testing.assert_close(with_balance, _module(window=3, balance=False)(q, k, v, key_mask, causal=causal),
                                   rtol=0, atol=0)
