"""Efficient plain-torch forms of linear attention: what runs on CPU, and the algorithm the kernels follow.

Same conventions as `reference.py` (which these must match). Time is cut into chunks of `chunk_size`:
inside a chunk, weights are a small quadratic block; across chunks, keys enter through running sums of
phi(k) v^T (the "state"), so time is O(T * (chunk + F * Dv)) and memory never holds a T x T matrix.
Masked keys are removed by zeroing their features, so they add nothing to numerator or denominator.
Every form is built from whole-tensor ops with no loop over time, so torch.compile/export can trace it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from relinear.kernels.linear_attention.reference import compute_dtype, linear_factor, safe_divide, sink_keys


def _pad_time(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Zero-pads dimension -2 (time) of [..., T, X]."""
    if before == 0 and after == 0:
        return x
    return F.pad(x, (0, 0, before, after))


_BLOCK_ELEMENTS = 1 << 20  # elements of the [C, C] blocks made at once by the causal form (4 MiB in fp32)


def _chunked(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[..., T, X] -> [..., N, chunk_size, X], zero-padding T up to a multiple of chunk_size."""
    length = x.shape[-2]
    padded = -(-length // chunk_size) * chunk_size
    return _pad_time(x, 0, padded - length).unflatten(-2, (padded // chunk_size, chunk_size))


def _unchunked(x: torch.Tensor, length: int, keep: int) -> torch.Tensor:
    """Inverse of `_chunked`, keeping the last `keep` of the `length` real steps: [..., N, C, X] -> [..., keep, X].

    Contiguous, so the result never depends on how much padding the chunks carried.
    """
    return x.flatten(-3, -2)[..., length - keep : length, :].contiguous()


def _end_aligned(
    queries: list[torch.Tensor], keys: list[torch.Tensor], key_mask: torch.Tensor | None
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """Left-pads the shorter side so query i and key i share a position (queries align to the keys' end).

    Padded queries are dropped by the caller; padded keys get zero tensors and a False mask.
    """
    num_queries, num_keys = queries[0].shape[-2], keys[0].shape[-2]
    if num_queries < num_keys:
        queries = [_pad_time(x, num_keys - num_queries, 0) for x in queries]
    elif num_keys < num_queries:
        missing = num_queries - num_keys
        keys = [_pad_time(x, missing, 0) for x in keys]
        if key_mask is None:
            key_mask = torch.ones(keys[0].shape[0], num_keys, dtype=torch.bool, device=keys[0].device)
        key_mask = F.pad(key_mask, (missing, 0), value=False)
    return queries, keys, key_mask


def _prefix_group(chunks: int) -> int:
    """Group size for `_exclusive_prefix`: a divisor of `chunks` near sqrt(chunks) when there is one (no
    padding copy), else isqrt(chunks)."""
    root = math.isqrt(chunks)
    near = [g for g in range(max(1, root // 2), 2 * root + 1) if chunks % g == 0]
    return min(near, key=lambda g: abs(g - root)) if near else max(1, root)


def _exclusive_prefix(x: torch.Tensor) -> torch.Tensor:
    """Sum over the chunks before each chunk, for chunk states x [..., N, A, B].

    Two levels, because CPU cumsum along a non-last dimension is slow (~5x a matmul of the same size):
    chunks form groups of ~sqrt(N); inside a group a strictly lower-triangular [G, G] matmul sums the
    earlier chunks, and a cumsum over the N / G group totals adds the earlier groups. The in-place ops
    write only into fresh matmul/cumsum results, which autograd does not need.
    """
    flat = x.flatten(-2)
    chunks = flat.shape[-2]
    blocks = _chunked(flat, _prefix_group(chunks))  # [..., M, G, A * B]
    group = blocks.shape[-2]
    earlier_in_group = torch.ones(group, group, dtype=x.dtype, device=x.device).tril(-1) @ blocks
    totals = blocks.sum(-2)
    earlier_groups = totals.cumsum(-2).sub_(totals).unsqueeze(-2)
    return _unchunked(earlier_in_group.add_(earlier_groups), chunks, chunks).view(x.shape)


def _masked_features(phi_k: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    return phi_k if key_mask is None else phi_k * key_mask[:, None, :, None].to(phi_k.dtype)


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    """[..., Dv] -> [..., Dv + 1]: one matmul then yields numerator and denominator together."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _normalize(numerator_and_denominator: torch.Tensor) -> torch.Tensor:
    return safe_divide(numerator_and_denominator[..., :-1], numerator_and_denominator[..., -1:])


def _divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """`safe_divide`, in place into `numerator` (a fresh result of the caller) unless autograd records it.

    Saves a T x Dv allocation and pass on CPU inference, where the output's page faults cost as much as
    the arithmetic.
    """
    if torch.is_grad_enabled() and (numerator.requires_grad or denominator.requires_grad):
        return safe_divide(numerator, denominator)
    return numerator.div_(torch.where(denominator == 0, torch.ones_like(denominator), denominator))


def _add_products_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b for batched [..., M, K] @ [..., K, N], accumulated in place (no M x N temporary): on CPU a
    fresh T x Dv result costs its page faults as well as a pass. `out` must be a fresh contiguous result."""
    out.view(-1, *out.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))


def linear_attention_bidirectional(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """Every query sees every unmasked key: reduce keys to phi_k^T v [F, Dv] and sum phi_k [F] once, apply."""
    out_dtype, dtype = v.dtype, compute_dtype(v.dtype)
    phi_q, v = phi_q.to(dtype), v.to(dtype)
    phi_k = _masked_features(phi_k.to(dtype), key_mask)
    numerator = phi_q @ (phi_k.mT @ v)
    denominator = phi_q @ phi_k.sum(-2).unsqueeze(-1)
    return _divide(numerator, denominator).to(out_dtype)


def linear_attention_causal(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    chunk_size: int,
) -> torch.Tensor:
    """Causal linear attention: lower-triangular blocks inside chunks, prefix sums of chunk states across.

    Numerator and denominator are kept apart (no column of ones appended to v): the denominator's terms are
    row sums and matrix-vector products, far cheaper than a (Dv + 1)-wide copy of v and matmuls.
    """
    out_dtype, dtype = v.dtype, compute_dtype(v.dtype)
    num_queries = phi_q.shape[-2]
    (phi_q,), (phi_k, v), key_mask = _end_aligned([phi_q.to(dtype)], [phi_k.to(dtype), v.to(dtype)], key_mask)
    length = phi_q.shape[-2]
    phi_k = _masked_features(phi_k, key_mask)
    q_chunks, k_chunks, v_chunks = (_chunked(x, chunk_size) for x in (phi_q, phi_k, v))

    # Each query: the state before its chunk, plus its chunk's causal block.
    numerator = q_chunks @ _exclusive_prefix(k_chunks.mT @ v_chunks)
    denominator = q_chunks @ _exclusive_prefix(k_chunks.sum(-2).unsqueeze(-1))  # [..., N, C, 1]
    # The [C, C] blocks are the largest temporaries (T * C per head): made for a few heads at a time, so the
    # working set stays small enough for the CPU allocator to reuse instead of page-faulting in fresh memory.
    rows = [x.reshape(-1, *x.shape[-3:]) for x in (q_chunks, k_chunks, v_chunks, numerator, denominator)]
    q_rows, k_rows, v_rows, numerator_rows, denominator_rows = rows  # [B * H, N, C, X]; the last two are views
    per_block = max(1, _BLOCK_ELEMENTS // (k_rows.shape[1] * chunk_size * chunk_size))
    for lo in range(0, q_rows.shape[0], per_block):
        block = slice(lo, lo + per_block)
        intra = (q_rows[block] @ k_rows[block].mT).tril_()
        _add_products_(numerator_rows[block], intra, v_rows[block])
        denominator_rows[block] += intra.sum(-1, keepdim=True)
    out = _divide(numerator, denominator)
    return _unchunked(out, length, num_queries).to(out_dtype)


def linear_attention_step(
    phi_q_t: torch.Tensor,
    phi_k_t: torch.Tensor,
    v_t: torch.Tensor,
    state: torch.Tensor | None = None,
    normalizer: torch.Tensor | None = None,
    log_decay_t: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoding step in O(F * Dv) memory: phi_q_t, phi_k_t [B, H, F], v_t [B, H, Dv].

    state [B, H, F, Dv] = sum phi_k v^T and normalizer [B, H, F] = sum phi_k over the past (zeros when
    None); `log_decay_t` [B, H] decays both first (gated form). The token sees itself, as in the causal form.
    Returns (out [B, H, Dv] in v_t's dtype, state, normalizer), the latter two in the accumulation dtype.
    """
    out_dtype, dtype = v_t.dtype, compute_dtype(v_t.dtype)
    phi_q_t, phi_k_t, v_t = phi_q_t.to(dtype), phi_k_t.to(dtype), v_t.to(dtype)
    if state is None:
        state = phi_k_t.new_zeros(*phi_k_t.shape, v_t.shape[-1])
    if normalizer is None:
        normalizer = torch.zeros_like(phi_k_t)
    if log_decay_t is not None:
        decay = torch.exp(log_decay_t.to(dtype))
        state = state * decay[..., None, None]
        normalizer = normalizer * decay[..., None]
    state = state + phi_k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
    normalizer = normalizer + phi_k_t
    numerator = (phi_q_t.unsqueeze(-2) @ state).squeeze(-2)
    denominator = (phi_q_t * normalizer).sum(-1, keepdim=True)
    return safe_divide(numerator, denominator).to(out_dtype), state, normalizer


def _banded(x: torch.Tensor, chunk_size: int, before: int, after: int) -> torch.Tensor:
    """[..., T, X] -> [..., N, X, band]: for chunk n the keys of chunks n - before .. n + after.

    A strided view (no copy) of the zero-padded sequence; band = (before + after + 1) * chunk_size.
    """
    length = x.shape[-2]
    chunks = -(-length // chunk_size)
    padded = _pad_time(x, before * chunk_size, (chunks + after) * chunk_size - length)
    return padded.unfold(-2, (before + after + 1) * chunk_size, chunk_size)


def _states_outside_band(chunk_states: torch.Tensor, before: int, after: int | None) -> torch.Tensor:
    """Sum of chunk_states [..., N, X, Y] over the chunks m < n - before (and m > n + after unless None)."""
    chunks = chunk_states.shape[-3]
    outside = F.pad(_exclusive_prefix(chunk_states), (0, 0, 0, 0, before, 0))[..., :chunks, :, :]
    if after is not None:
        later = _exclusive_prefix(chunk_states.flip(-3)).flip(-3)  # sum over the chunks m > n
        outside = outside + F.pad(later, (0, 0, 0, 0, 0, after))[..., after:, :, :]
    return outside


def _sink_scores(
    q_chunks: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: torch.Tensor, causal: bool, window: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [B, H, N, C, S] of each query against the sinks it sees outside its window, -inf elsewhere;
    the sinks' values [B, H, 1, S, Dv + 1]). Keys inside the window are left to the band, so none counts twice.
    """
    batch, heads, chunks, chunk_size, _ = q_chunks.shape
    count = int(sink.sum(-1).max())
    # positions of each row's sinks, in order: a stable sort puts the sink keys first
    where = torch.sort((~sink).to(torch.uint8), dim=-1, stable=True).indices[:, :count]  # [B, S]
    real = sink.gather(-1, where)  # False where a row has fewer sinks
    sink_k = k.gather(2, where[:, None, :, None].expand(batch, heads, count, k.shape[-1]))
    sink_v = v.gather(2, where[:, None, :, None].expand(batch, heads, count, v.shape[-1]))
    positions = torch.arange(chunks * chunk_size, device=k.device).view(chunks, chunk_size, 1)
    offset = where[:, None, None, :] - positions  # key minus query position, [B, N, C, S]
    if causal:
        extra = (offset <= -window) & real[:, None, None, :]
    else:
        extra = (offset.abs() >= window) & real[:, None, None, :]
    scores = scale * (q_chunks @ sink_k.mT.unsqueeze(2))
    return scores.masked_fill(~extra[:, None], float("-inf")), sink_v.unsqueeze(2)


def hybrid_inputs(q, k, v, phi_q, phi_k, key_mask, window: int, chunk_size: int, sinks: int):
    """What both hybrid forms start from: (q, k, v with a column of ones, phi_q, phi_k zeroed at masked keys and
    sinks, key_mask (all True when None), sink (bool [B, T] or None), reach) in the compute dtype, queries and keys
    end-aligned; reach: how many key chunks before a query chunk its window can touch."""
    dtype = compute_dtype(v.dtype)
    (q, phi_q), (k, phi_k, v), key_mask = _end_aligned(
        [q.to(dtype), phi_q.to(dtype)], [k.to(dtype), phi_k.to(dtype), v.to(dtype)], key_mask
    )
    length = q.shape[-2]
    if key_mask is None:
        key_mask = torch.ones(q.shape[0], length, dtype=torch.bool, device=q.device)
    sink = sink_keys(key_mask, sinks, length, q.device) if sinks else None
    if sink is not None and not sink.any():  # every key masked: no sink to weigh
        sink = None
    phi_k = _masked_features(phi_k, key_mask if sink is None else key_mask & ~sink)
    return q, k, _with_ones(v), phi_q, phi_k, key_mask, sink, window_reach(length, window, chunk_size)


def window_reach(length: int, window: int, chunk_size: int) -> int:
    """How many key chunks before (or after) a query chunk its queries' windows can touch."""
    chunks = -(-length // chunk_size)
    return min(chunks - 1, math.ceil(max(window - 1, 0) / chunk_size))


def hybrid_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    gate: torch.Tensor,
    key_mask: torch.Tensor | None,
    causal: bool,
    window: int,
    scale: float,
    chunk_size: int,
    sinks: int = 0,
    balance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sliding-window softmax + gated linear attention outside the window, one normalization (LoLCATs).

    Query chunk n computes exact weights (softmax or linear, per the window) against a band of key chunks
    wide enough to hold its whole window: memory O(T * (window + chunk)). Keys beyond the band are outside
    every window of the chunk, so they enter through prefix (and, bidirectionally, suffix) chunk states.
    The max subtracted inside the softmax part is the max over the window, as in the reference.
    Sinks (`reference.sink_keys`) leave the linear part (their features are zeroed) and every query weighs
    the ones outside its window exactly, from a gathered [S] block of keys.
    """
    out_dtype, num_queries = v.dtype, q.shape[-2]
    q, k, v, phi_q, phi_k, key_mask, sink, reach = hybrid_inputs(q, k, v, phi_q, phi_k, key_mask, window,
                                                                 chunk_size, sinks)
    length = q.shape[-2]
    after = None if causal else reach

    q_chunks, phi_q_chunks = _chunked(q, chunk_size), _chunked(phi_q, chunk_size)
    band_after = after or 0
    k_band, phi_k_band = _banded(k, chunk_size, reach, band_after), _banded(phi_k, chunk_size, reach, band_after)
    v_band = _banded(v, chunk_size, reach, band_after).mT
    mask_band = _banded(key_mask[:, None, :, None].to(q.dtype), chunk_size, reach, band_after) > 0  # [B,1,N,1,band]
    offset = (
        torch.arange(k_band.shape[-1], device=q.device) - reach * chunk_size
        - torch.arange(chunk_size, device=q.device)[:, None]
    )  # key position minus query position, [C, band]
    visible = mask_band & (offset <= 0) if causal else mask_band
    near = (offset > -window) & (offset <= 0) if causal else offset.abs() < window
    windowed = visible & near

    scores = (scale * (q_chunks @ k_band)).masked_fill(~windowed, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    if sink is not None:
        sink_scores, sink_values = _sink_scores(q_chunks, k, v, sink, causal, window, scale)
        top = torch.maximum(top, sink_scores.amax(-1, keepdim=True))
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    # The two parts stay apart until their weight f is known: with a balance it depends on both sums.
    window_part = torch.exp(scores - top) @ v_band  # [..., Dv + 1]: numerator, then denominator W
    if sink is not None:
        window_part = window_part + torch.exp(sink_scores - top) @ sink_values
    phi_k_chunks, v_chunks = _chunked(phi_k, chunk_size), _chunked(v, chunk_size)
    outside = _states_outside_band(phi_k_chunks.mT @ v_chunks, reach, after)
    linear = (phi_q_chunks @ phi_k_band).masked_fill(~(visible & ~windowed), 0)
    linear_part = linear @ v_band + phi_q_chunks @ outside
    factor = linear_factor(gate, balance, top, window_part[..., -1:], linear_part[..., -1:])
    out = _normalize(window_part + factor * linear_part)
    return _unchunked(out, length, num_queries).to(out_dtype)


def gated_linear_attention_chunked(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    key_mask: torch.Tensor | None,
    chunk_size: int,
) -> torch.Tensor:
    """Causal decaying linear attention (Liger/GLA) in chunks."""
    out_dtype = v.dtype
    return _normalize(_gated_sums(phi_q, phi_k, v, log_decay, key_mask, chunk_size)).to(out_dtype)


def bidirectional_gated_linear_attention_chunked(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    log_decay_before: torch.Tensor,
    log_decay_after: torch.Tensor,
    key_mask: torch.Tensor | None,
    chunk_size: int,
) -> torch.Tensor:
    """Decaying linear attention in both directions (see the reference): the causal form's sums with
    `log_decay_before`, plus those of the causal form run on reversed time with `log_decay_after`, minus
    the query's own key, which both count."""
    out_dtype, dtype = v.dtype, compute_dtype(v.dtype)
    num_queries = phi_q.shape[-2]
    (phi_q,), (phi_k, v, before, after), key_mask = _end_aligned(
        [phi_q.to(dtype)], [phi_k.to(dtype), v.to(dtype), log_decay_before.to(dtype).unsqueeze(-1),
                            log_decay_after.to(dtype).unsqueeze(-1)], key_mask
    )
    before, after = before.squeeze(-1), after.squeeze(-1)
    forward = _gated_sums(phi_q, phi_k, v, before, key_mask, chunk_size)
    backward = _gated_sums(*(x.flip(-2) for x in (phi_q, phi_k, v)), after.flip(-1),
                           None if key_mask is None else key_mask.flip(-1), chunk_size).flip(-2)
    own = (phi_q * _masked_features(phi_k, key_mask)).sum(-1, keepdim=True) * _with_ones(v)
    out = _normalize(forward + backward - own)
    return out[..., out.shape[-2] - num_queries:, :].contiguous().to(out_dtype)


def _gated_sums(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    key_mask: torch.Tensor | None,
    chunk_size: int,
) -> torch.Tensor:
    """The causal decaying form's numerator and denominator, [B, H, Tq, Dv + 1], in the compute dtype.

    Decays are kept as differences of cumulative log-decays that are always <= 0 before exp: inside a
    chunk exp(l_i - l_j), from a key to its chunk's end exp(l_end - l_j), between chunk ends a [N, N]
    lower-triangular transfer matrix, from the chunk start to a query exp(l_i). So nothing overflows
    however strong the decay, and the chunk-state recurrence is one matmul rather than a loop.
    """
    dtype = compute_dtype(v.dtype)
    num_queries = phi_q.shape[-2]
    if key_mask is not None:
        log_decay = log_decay.masked_fill(~key_mask[:, None, :], 0)
    (phi_q,), (phi_k, v, log_decay), key_mask = _end_aligned(
        [phi_q.to(dtype)], [phi_k.to(dtype), _with_ones(v.to(dtype)), log_decay.to(dtype).unsqueeze(-1)], key_mask
    )
    length = phi_q.shape[-2]
    phi_k = _masked_features(phi_k, key_mask)
    q_chunks, k_chunks, v_chunks = (_chunked(x, chunk_size) for x in (phi_q, phi_k, v))
    local = _chunked(log_decay, chunk_size).squeeze(-1).cumsum(-1)  # [B, H, N, C], l_i within a chunk

    upper = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=v.device).triu(1)
    intra_decay = torch.exp((local[..., :, None] - local[..., None, :]).masked_fill(upper, float("-inf")))
    numerator = ((q_chunks @ k_chunks.mT) * intra_decay) @ v_chunks

    chunk_total = local[..., -1]  # [B, H, N]
    to_chunk_end = torch.exp(chunk_total[..., None] - local).unsqueeze(-1)
    chunk_states = (k_chunks * to_chunk_end).mT @ v_chunks  # [B, H, N, F, Dv + 1] at each chunk's end
    ends = chunk_total.cumsum(-1)
    chunks = ends.shape[-1]
    not_before = torch.ones(chunks, chunks, dtype=torch.bool, device=v.device).triu()
    # transfer[n, m]: decay from the end of chunk m to the start of chunk n (= end of chunk n - 1), m < n.
    transfer = torch.exp(
        ((ends - chunk_total)[..., :, None] - ends[..., None, :]).masked_fill(not_before, float("-inf"))
    )
    start_states = (transfer @ chunk_states.flatten(-2)).unflatten(-1, chunk_states.shape[-2:])
    numerator = numerator + (q_chunks * torch.exp(local).unsqueeze(-1)) @ start_states
    return _unchunked(numerator, length, num_queries)
