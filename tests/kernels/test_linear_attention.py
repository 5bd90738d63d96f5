"""Linear attention math: the references against naive loops, the chunked forms against the references,
and the invariants every form must keep (causality, masking, convex hull, exact softmax limit)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from relinear.kernels.linear_attention.banded import hybrid_attention_banded
from relinear.kernels.linear_attention.chunked import (
    bidirectional_gated_linear_attention_chunked,
    gated_linear_attention_chunked,
    hybrid_attention_chunked,
    linear_attention_bidirectional,
    linear_attention_causal,
    linear_attention_step,
)
from relinear.kernels.linear_attention.dense import hybrid_attention_dense
from relinear.kernels.linear_attention.reference import (
    bidirectional_gated_linear_attention_reference,
    gated_linear_attention_reference,
    hybrid_attention_reference,
    linear_attention_reference,
)


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    phi_q: torch.Tensor
    phi_k: torch.Tensor
    gate: torch.Tensor
    log_decay: torch.Tensor
    log_decay_after: torch.Tensor  # the bidirectional gated form's decay for keys after the query
    key_mask: torch.Tensor | None
    balance: torch.Tensor  # the hybrid's per-query balance, [H, 3]; passed only where a test asks for it


def make_inputs(
    seed: int,
    batch: int = 2,
    heads: int = 2,
    num_queries: int = 5,
    num_keys: int = 5,
    dim: int = 4,
    features: int = 3,
    dtype: torch.dtype = torch.float64,
    masked: bool = True,
) -> Inputs:
    """Random inputs with positive features; some keys masked and one batch row fully masked."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    key_mask = None
    if masked:
        key_mask = torch.rand(batch, num_keys, generator=generator) > 0.3
        key_mask[-1] = False
    return Inputs(
        q=randn(batch, heads, num_queries, dim).to(dtype),
        k=randn(batch, heads, num_keys, dim).to(dtype),
        v=randn(batch, heads, num_keys, dim + 1).to(dtype),
        phi_q=randn(batch, heads, num_queries, features).exp().to(dtype),
        phi_k=randn(batch, heads, num_keys, features).exp().to(dtype),
        gate=randn(heads).to(dtype),
        log_decay=-torch.rand(batch, heads, num_keys, generator=generator, dtype=torch.float64).to(dtype),
        log_decay_after=-2 * torch.rand(batch, heads, num_keys, generator=generator, dtype=torch.float64).to(dtype),
        key_mask=key_mask,
        balance=(0.5 * randn(heads, 3)).to(dtype),
    )


# ---------------------------------------------------------------- naive per-query loops (tiny sizes only)


def _visible(x: Inputs, b: int, i: int, j: int, causal: bool) -> bool:
    position = x.k.shape[-2] - x.q.shape[-2] + i
    return (x.key_mask is None or bool(x.key_mask[b, j])) and (not causal or j <= position)


def _loop(x: Inputs, weight) -> torch.Tensor:
    """out[b, h, i] = sum_j w v_j / sum_j w for the weights w = weight(b, h, i, j) (None: not counted)."""
    batch, heads, num_queries, _ = x.q.shape
    out = torch.zeros(batch, heads, num_queries, x.v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(num_queries):
                terms = [
                    (w, x.v[b, h, j]) for j in range(x.k.shape[-2]) if (w := weight(b, h, i, j)) is not None
                ]
                denominator = sum(w for w, _ in terms)
                if terms and denominator != 0:
                    out[b, h, i] = sum(w * value for w, value in terms) / denominator
    return out


def naive_linear(x: Inputs, causal: bool) -> torch.Tensor:
    return _loop(
        x, lambda b, h, i, j: x.phi_q[b, h, i] @ x.phi_k[b, h, j] if _visible(x, b, i, j, causal) else None
    )


def naive_hybrid(x: Inputs, causal: bool, window: int, scale: float, sinks: int = 0,
                 balanced: bool = False) -> torch.Tensor:
    offset = x.k.shape[-2] - x.q.shape[-2]

    def is_sink(b, j):
        """Among the first `sinks` keys of row b that are not masked out."""
        attendable = [t for t in range(x.k.shape[-2]) if x.key_mask is None or x.key_mask[b, t]]
        return j in attendable[:sinks]

    def near(b, i, j):
        in_window = 0 <= offset + i - j < window if causal else abs(offset + i - j) < window
        return in_window or is_sink(b, j)

    def top(b, h, i):
        scores = [
            scale * x.q[b, h, i] @ x.k[b, h, j]
            for j in range(x.k.shape[-2])
            if _visible(x, b, i, j, causal) and near(b, i, j)
        ]
        return max(scores) if scores else 0.0

    def window_weight(b, h, i, j):
        return torch.exp(scale * x.q[b, h, i] @ x.k[b, h, j] - top(b, h, i))

    def linear_weight(b, h, i, j):
        return x.phi_q[b, h, i] @ x.phi_k[b, h, j]

    def factor(b, h, i):
        """sigmoid(gate), times exp(balance . (m, log W, log L)) with W, L summed key by key."""
        mix = torch.sigmoid(x.gate[h])
        if not balanced:
            return mix
        keys = [j for j in range(x.k.shape[-2]) if _visible(x, b, i, j, causal)]
        window_sum = sum(float(window_weight(b, h, i, j)) for j in keys if near(b, i, j))
        linear_sum = sum(float(linear_weight(b, h, i, j)) for j in keys if not near(b, i, j))
        features = [float(top(b, h, i)), math.log(window_sum) if window_sum else 0.0,
                    math.log(linear_sum) if linear_sum else 0.0]
        return mix * math.exp(sum(float(w) * f for w, f in zip(x.balance[h], features, strict=True)))

    def weight(b, h, i, j):
        if not _visible(x, b, i, j, causal):
            return None
        if near(b, i, j):
            return window_weight(b, h, i, j)
        return factor(b, h, i) * linear_weight(b, h, i, j)

    return _loop(x, weight)


def naive_gated_recurrence(x: Inputs) -> torch.Tensor:
    """The Liger recurrence S_t = exp(log_decay_t) S_{t-1} + phi_k_t v_t^T, read out at the queries."""
    batch, heads, num_queries, _ = x.q.shape
    num_keys = x.k.shape[-2]
    out = torch.zeros(batch, heads, num_queries, x.v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            state = torch.zeros(x.phi_k.shape[-1], x.v.shape[-1], dtype=torch.float64)
            normalizer = torch.zeros(x.phi_k.shape[-1], dtype=torch.float64)
            for t in range(num_keys):
                if x.key_mask is None or x.key_mask[b, t]:
                    decay = math.exp(x.log_decay[b, h, t])
                    state = decay * state + torch.outer(x.phi_k[b, h, t], x.v[b, h, t])
                    normalizer = decay * normalizer + x.phi_k[b, h, t]
                i = t - (num_keys - num_queries)
                if 0 <= i < num_queries:
                    denominator = x.phi_q[b, h, i] @ normalizer
                    if denominator != 0:
                        out[b, h, i] = x.phi_q[b, h, i] @ state / denominator
    return out


def naive_bidirectional_decay(x: Inputs) -> torch.Tensor:
    """Every unmasked key, weighed phi_q . phi_k times the product of exp(log_decay) over the unmasked
    positions between key and query: (j, p] for a key at or before the query's position p (log_decay),
    [p, j) for one after it (log_decay_after)."""
    offset = x.k.shape[-2] - x.q.shape[-2]

    def kept(b, t):
        return x.key_mask is None or bool(x.key_mask[b, t])

    def weight(b, h, i, j):
        if not _visible(x, b, i, j, causal=False):
            return None
        p = offset + i
        if j <= p:
            between = [x.log_decay[b, h, t] for t in range(j + 1, p + 1) if kept(b, t)]
        else:
            between = [x.log_decay_after[b, h, t] for t in range(max(p, 0), j) if kept(b, t)]
        return x.phi_q[b, h, i] @ x.phi_k[b, h, j] * math.exp(sum(float(d) for d in between))

    return _loop(x, weight)


# ---------------------------------------------------------------- references vs naive loops

tiny_lengths = st.tuples(st.integers(1, 6), st.integers(1, 6))


@pytest.mark.property
@settings(max_examples=15)
@given(seed=st.integers(0, 2**16), lengths=tiny_lengths, causal=st.booleans(), masked=st.booleans())
def test_linear_reference_matches_naive_loop(seed, lengths, causal, masked):
    x = make_inputs(seed, num_queries=lengths[0], num_keys=lengths[1], masked=masked)
    got = linear_attention_reference(x.phi_q, x.phi_k, x.v, x.key_mask, causal)
    torch.testing.assert_close(got, naive_linear(x, causal), rtol=1e-12, atol=1e-12)


@pytest.mark.property
@settings(max_examples=15)
@given(
    seed=st.integers(0, 2**16),
    lengths=tiny_lengths,
    causal=st.booleans(),
    masked=st.booleans(),
    window=st.integers(0, 7),
    scale=st.sampled_from([0.3, 1.0]),
    sinks=st.integers(0, 3),
    balanced=st.booleans(),
)
def test_hybrid_reference_matches_naive_loop(seed, lengths, causal, masked, window, scale, sinks, balanced):
    x = make_inputs(seed, num_queries=lengths[0], num_keys=lengths[1], masked=masked)
    got = hybrid_attention_reference(
        x.q, x.k, x.v, x.phi_q, x.phi_k, x.gate, x.key_mask, causal, window, scale, sinks,
        x.balance if balanced else None,
    )
    expected = naive_hybrid(x, causal, window, scale, sinks, balanced)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.property
@settings(max_examples=15)
@given(seed=st.integers(0, 2**16), lengths=tiny_lengths, masked=st.booleans())
def test_gated_reference_matches_naive_recurrence(seed, lengths, masked):
    x = make_inputs(seed, num_queries=lengths[0], num_keys=lengths[1], masked=masked)
    got = gated_linear_attention_reference(x.phi_q, x.phi_k, x.v, x.log_decay, x.key_mask)
    torch.testing.assert_close(got, naive_gated_recurrence(x), rtol=1e-12, atol=1e-12)


@pytest.mark.property
@settings(max_examples=15)
@given(seed=st.integers(0, 2**16), lengths=tiny_lengths, masked=st.booleans())
def test_bidirectional_gated_reference_matches_naive_loop(seed, lengths, masked):
    x = make_inputs(seed, num_queries=lengths[0], num_keys=lengths[1], masked=masked)
    got = bidirectional_gated_linear_attention_reference(x.phi_q, x.phi_k, x.v, x.log_decay, x.log_decay_after,
                                                         x.key_mask)
    torch.testing.assert_close(got, naive_bidirectional_decay(x), rtol=1e-12, atol=1e-12)


def test_bidirectional_gated_without_decay_is_linear_attention():
    """The exact limit: zero log-decays leave plain bidirectional linear attention."""
    x = make_inputs(3, num_queries=7, num_keys=9)
    zero = torch.zeros_like(x.log_decay)
    got = bidirectional_gated_linear_attention_chunked(x.phi_q, x.phi_k, x.v, zero, zero, x.key_mask, 4)
    torch.testing.assert_close(got, linear_attention_reference(x.phi_q, x.phi_k, x.v, x.key_mask, False),
                               rtol=1e-12, atol=1e-12)


def test_gated_reference_is_causal_only():
    x = make_inputs(0)
    with pytest.raises(ValueError, match="causal"):
        gated_linear_attention_reference(x.phi_q, x.phi_k, x.v, x.log_decay, x.key_mask, causal=False)


# ---------------------------------------------------------------- chunked forms vs references

lengths = st.sampled_from([1, 2, 7, 16, 63, 64, 65])
chunks = st.sampled_from([1, 4, 16, 64])
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def _forms(x: Inputs, causal: bool, window: int, scale: float, chunk_size: int, sinks: int = 0,
           balanced: bool = False):
    """(efficient, reference) output pairs for every form that applies; `balanced`: the hybrid's with x.balance."""
    balance = x.balance if balanced else None
    linear = (
        linear_attention_causal(x.phi_q, x.phi_k, x.v, x.key_mask, chunk_size)
        if causal
        else linear_attention_bidirectional(x.phi_q, x.phi_k, x.v, x.key_mask)
    )
    hybrid_args = (x.q, x.k, x.v, x.phi_q, x.phi_k, x.gate, x.key_mask, causal, window, scale)
    hybrid = hybrid_attention_reference(*hybrid_args, sinks, balance)
    pairs = [
        (linear, linear_attention_reference(x.phi_q, x.phi_k, x.v, x.key_mask, causal)),
        (hybrid_attention_chunked(*hybrid_args, chunk_size, sinks, balance), hybrid),
        (hybrid_attention_banded(*hybrid_args, chunk_size, sinks, balance), hybrid),
        (hybrid_attention_dense(*hybrid_args, sinks, balance), hybrid),
    ]
    if causal:
        pairs.append(
            (
                gated_linear_attention_chunked(x.phi_q, x.phi_k, x.v, x.log_decay, x.key_mask, chunk_size),
                gated_linear_attention_reference(x.phi_q, x.phi_k, x.v, x.log_decay, x.key_mask),
            )
        )
    else:
        decays = (x.log_decay, x.log_decay_after, x.key_mask)
        pairs.append(
            (
                bidirectional_gated_linear_attention_chunked(x.phi_q, x.phi_k, x.v, *decays, chunk_size),
                bidirectional_gated_linear_attention_reference(x.phi_q, x.phi_k, x.v, *decays),
            )
        )
    return pairs


@pytest.mark.property
@settings(max_examples=30)
@given(
    seed=st.integers(0, 2**16),
    num_queries=lengths,
    num_keys=lengths,
    chunk_size=chunks,
    causal=st.booleans(),
    window=st.sampled_from([0, 1, 5, 64, 200]),
    masked=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
    sinks=st.sampled_from([0, 0, 1, 4]),
    balanced=st.booleans(),
)
def test_chunked_forms_match_references(
    seed, num_queries, num_keys, chunk_size, causal, window, masked, dtype, sinks, balanced
):
    x = make_inputs(seed, num_queries=num_queries, num_keys=num_keys, masked=masked, dtype=dtype)
    for got, expected in _forms(x, causal, window, 0.5, chunk_size, sinks, balanced):
        assert got.dtype == dtype and got.shape == expected.shape
        torch.testing.assert_close(got.double(), expected.double(), **TOLERANCES[dtype])


def test_gated_chunked_survives_strong_decay():
    """Decays far below float32's range (exp(-1e4)) must give finite results, not inf * 0 = NaN."""
    x = make_inputs(1, num_queries=130, num_keys=130, dtype=torch.float32)
    strong = x.log_decay * 200
    got = gated_linear_attention_chunked(x.phi_q, x.phi_k, x.v, strong, x.key_mask, 16)
    expected = gated_linear_attention_reference(x.phi_q, x.phi_k, x.v, strong, x.key_mask)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    got = bidirectional_gated_linear_attention_chunked(x.phi_q, x.phi_k, x.v, strong, x.log_decay_after * 200,
                                                       x.key_mask, 16)
    assert torch.isfinite(got).all()
    # against float64: at cumulative log-decays of ~1e4, float32 differences of them are good to ~1e-3
    x = make_inputs(1, num_queries=130, num_keys=130, dtype=torch.float64)
    expected = bidirectional_gated_linear_attention_reference(x.phi_q, x.phi_k, x.v, x.log_decay * 200,
                                                              x.log_decay_after * 200, x.key_mask)
    torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.property
@settings(max_examples=15)
@given(seed=st.integers(0, 2**16), length=lengths, masked=st.booleans(), gated=st.booleans())
def test_recurrent_steps_match_causal_form(seed, length, masked, gated):
    x = make_inputs(seed, num_queries=length, num_keys=length, masked=masked)
    log_decay = x.log_decay if gated else torch.zeros_like(x.log_decay)
    phi_k, step_decay = x.phi_k, log_decay
    if x.key_mask is not None:  # the caller of the step skips padding: a masked token neither adds nor decays
        phi_k, step_decay = phi_k * x.key_mask[:, None, :, None], log_decay * x.key_mask[:, None, :]
    state = normalizer = None
    outputs = []
    for t in range(length):
        out, state, normalizer = linear_attention_step(
            x.phi_q[:, :, t], phi_k[:, :, t], x.v[:, :, t], state, normalizer, step_decay[..., t]
        )
        outputs.append(out)
    assert state.shape == (*x.phi_k.shape[:2], x.phi_k.shape[-1], x.v.shape[-1])  # O(1) in time
    expected = (
        gated_linear_attention_chunked(x.phi_q, x.phi_k, x.v, log_decay, x.key_mask, 16)
        if gated
        else linear_attention_causal(x.phi_q, x.phi_k, x.v, x.key_mask, 16)
    )
    torch.testing.assert_close(torch.stack(outputs, dim=2), expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- invariants


@pytest.mark.property
@settings(max_examples=15)
@given(
    seed=st.integers(0, 2**16),
    num_queries=lengths,
    num_keys=lengths,
    causal=st.booleans(),
    masked=st.booleans(),
    heads=st.sampled_from([(2, 2), (4, 2), (4, 1)]),
    scale=st.sampled_from([None, 0.2, 1.0]),
    cover=st.sampled_from(["window", "sinks"]),
    balanced=st.booleans(),
)
def test_window_covering_every_key_is_softmax_attention(
    seed, num_queries, num_keys, causal, masked, heads, scale, cover, balanced
):
    """Compared with torch's SDPA (GQA by repeating kv heads), masks, causal end-alignment and scale. Sinks
    as many as the keys cover every key too, with a window of one. A balance cannot change that: it only weighs
    the (empty) linear part."""
    x = make_inputs(seed, num_queries=num_queries, num_keys=num_keys, heads=heads[0], masked=masked)
    kv_heads = heads[1]
    k, v = x.k[:, :kv_heads], x.v[:, :kv_heads]
    k_full, v_full = (t.repeat_interleave(heads[0] // kv_heads, dim=1) for t in (k, v))
    mask = torch.ones(num_queries, num_keys, dtype=torch.bool)
    if causal:
        mask = mask.tril(num_keys - num_queries)
    mask = mask[None, None] if x.key_mask is None else mask & x.key_mask[:, None, None, :]
    expected = F.scaled_dot_product_attention(x.q, k_full, v_full, attn_mask=mask, scale=scale)
    expected = expected.masked_fill(~mask.any(-1, keepdim=True), 0)  # rows that see nothing: zeros, not NaN
    used_scale = 1 / math.sqrt(x.q.shape[-1]) if scale is None else scale
    window, sinks = (max(num_queries, num_keys), 0) if cover == "window" else (1, num_keys)
    for form in (hybrid_attention_chunked, hybrid_attention_banded, hybrid_attention_dense, hybrid_attention_reference):
        args = (x.q, k_full, v_full, x.phi_q, x.phi_k, x.gate, x.key_mask, causal, window, used_scale)
        balance = x.balance if balanced else None
        unchunked = form in (hybrid_attention_dense, hybrid_attention_reference)
        got = form(*args, sinks, balance) if unchunked else form(*args, 16, sinks, balance)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.property
@settings(max_examples=15)
@given(seed=st.integers(0, 2**16), length=lengths, causal=st.booleans(), chunk_size=chunks)
def test_pure_linear_outputs_lie_in_the_hull_of_visible_values(seed, length, causal, chunk_size):
    x = make_inputs(seed, num_queries=length, num_keys=length)
    visible = torch.ones(length, length, dtype=torch.bool)
    visible = (visible.tril() if causal else visible)[None, None] & x.key_mask[:, None, None, :]
    values = x.v[:, :, None, :, :]  # [B, H, 1, Tk, Dv] against visible [B, 1, Tq, Tk, 1]
    low = values.masked_fill(~visible[..., None], math.inf).amin(-2)
    high = values.masked_fill(~visible[..., None], -math.inf).amax(-2)
    sees_something = visible.any(-1)[..., None]
    outputs = [
        linear_attention_causal(x.phi_q, x.phi_k, x.v, x.key_mask, chunk_size)
        if causal
        else linear_attention_bidirectional(x.phi_q, x.phi_k, x.v, x.key_mask),
        hybrid_attention_chunked(
            x.q, x.k, x.v, x.phi_q, x.phi_k, x.gate, x.key_mask, causal, 0, 0.5, chunk_size
        ),
        gated_linear_attention_chunked(x.phi_q, x.phi_k, x.v, x.log_decay, x.key_mask, chunk_size)
        if causal
        else bidirectional_gated_linear_attention_chunked(
            x.phi_q, x.phi_k, x.v, x.log_decay, x.log_decay_after, x.key_mask, chunk_size
        ),
    ]
    for out in outputs:
        inside = (out >= low - 1e-12) & (out <= high + 1e-12)
        assert torch.where(sees_something, inside, out == 0).all()


@pytest.mark.property
@settings(max_examples=15)
@given(
    seed=st.integers(0, 2**16),
    length=st.sampled_from([2, 7, 65]),
    cut=st.integers(0, 64),
    window=st.sampled_from([0, 3, 64]),
    chunk_size=chunks,
    balanced=st.booleans(),
)
def test_causal_outputs_never_depend_on_later_tokens(seed, length, cut, window, chunk_size, balanced):
    cut = cut % (length - 1) + 1  # perturb tokens cut.. (queries before cut must not change)
    x, y = (
        make_inputs(seed, num_queries=length, num_keys=length),
        make_inputs(seed + 1, num_queries=length, num_keys=length),
    )
    for name in ("k", "v", "phi_k", "log_decay"):
        later = getattr(x, name).clone()
        later[:, :, cut:] = getattr(y, name)[:, :, cut:]
        changed = Inputs(**{**x.__dict__, name: later})
        for (before, _), (after, _) in zip(
            _forms(x, True, window, 0.5, chunk_size, balanced=balanced),
            _forms(changed, True, window, 0.5, chunk_size, balanced=balanced),
            strict=True,
        ):
            torch.testing.assert_close(after[:, :, :cut], before[:, :, :cut], rtol=1e-12, atol=1e-12)


@pytest.mark.property
@settings(max_examples=15)
@given(
    seed=st.integers(0, 2**16),
    length=lengths,
    causal=st.booleans(),
    window=st.sampled_from([0, 3, 64]),
    chunk_size=chunks,
    balanced=st.booleans(),
)
def test_masked_keys_contribute_nothing(seed, length, causal, window, chunk_size, balanced):
    x, y = (
        make_inputs(seed, num_queries=length, num_keys=length),
        make_inputs(seed + 1, num_queries=length, num_keys=length),
    )
    padding = ~x.key_mask
    changed = Inputs(
        **{
            **x.__dict__,
            "k": torch.where(padding[:, None, :, None], y.k, x.k),
            "v": torch.where(padding[:, None, :, None], y.v, x.v),
            "phi_k": torch.where(padding[:, None, :, None], y.phi_k, x.phi_k),
            "log_decay": torch.where(padding[:, None, :], y.log_decay, x.log_decay),
            "log_decay_after": torch.where(padding[:, None, :], y.log_decay_after, x.log_decay_after),
        }
    )
    for (before, _), (after, _) in zip(
        _forms(x, causal, window, 0.5, chunk_size, balanced=balanced),
        _forms(changed, causal, window, 0.5, chunk_size, balanced=balanced),
        strict=True,
    ):
        torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_query_that_sees_nothing_outputs_zeros(causal, dtype):
    x = make_inputs(0, num_queries=9, num_keys=9, dtype=dtype)  # batch row 1 is fully masked
    for got, expected in _forms(x, causal, 3, 0.5, 4) + _forms(x, causal, 3, 0.5, 4, balanced=True):
        assert not got.isnan().any() and not expected.isnan().any()
        assert (got[-1] == 0).all() and (expected[-1] == 0).all()


def test_empty_window_is_pure_linear_attention():
    """With no window key the linear part is normalized alone: neither the gate nor a balance can matter."""
    x = make_inputs(3, num_queries=20, num_keys=20)
    for causal, balance in itertools.product((False, True), (None, x.balance)):
        torch.testing.assert_close(
            hybrid_attention_chunked(x.q, x.k, x.v, x.phi_q, x.phi_k, x.gate, x.key_mask, causal, 0, 0.5, 8, 0,
                                     balance),
            linear_attention_reference(x.phi_q, x.phi_k, x.v, x.key_mask, causal),
        )


@pytest.mark.parametrize("block", [1, 3 * 25, 5 * 25])
def test_dense_hybrid_in_blocks_of_rows_and_heads(monkeypatch, block):
    """The dense form weighs a few (batch row, head) pairs at a time: one pair, some heads of a row, whole rows;
    per-row key masks and per-head gates and balances must follow each block."""
    import relinear.kernels.linear_attention.dense as dense

    monkeypatch.setattr(dense, "_BLOCK_ELEMENTS", block)
    x = make_inputs(4, batch=3, heads=5, num_queries=5, num_keys=5)
    for causal in (False, True):
        args = (x.q, x.k, x.v, x.phi_q, x.phi_k, x.gate, x.key_mask, causal, 2, 0.5, 1, x.balance)
        torch.testing.assert_close(dense.hybrid_attention_dense(*args), hybrid_attention_reference(*args),
                                   **TOLERANCES[torch.float64])


def test_cpu_hybrid_op_form_is_the_reference_on_both_sides_of_the_dense_threshold():
    """`hybrid_attention_cpu` picks the dense form for few keys and the banded one for many: both give the
    reference's result."""
    from relinear.kernels.linear_attention.banded import dense_is_cheaper, hybrid_attention_cpu

    chosen = set()
    for length in (8, 40):
        x = make_inputs(5, num_queries=length, num_keys=length)
        for causal in (False, True):
            chosen.add(dense_is_cheaper(length, causal, 4, 4))
            args = (x.q, x.k, x.v, x.phi_q, x.phi_k, x.gate, x.key_mask, causal, 4, 0.5)
            torch.testing.assert_close(hybrid_attention_cpu(*args, 4, 1, x.balance),
                                       hybrid_attention_reference(*args, 1, x.balance), **TOLERANCES[torch.float64])
    assert chosen == {True, False}
