"""The hybrid's CPU inference form: `hybrid_attention_chunked`'s algorithm laid out for few, large GEMMs.

`hybrid_attention_chunked` (differentiable, what autograd records) gives each query chunk a band of key chunks
as a strided `unfold` view: every matmul on it copies the band first, (reach + after + 1) copies of k, phi_k and
v, and its masks are [B, H, N, C, band] tensors built per call (on MiniLM's profile: copy_ 25% of the time,
then fill_, bitwise ops, tril). Here the chunks are stored chunk-major, [N, B, H, C, X], so the key chunks at a
fixed offset from every query chunk form one contiguous slice: each of the band's products is one bmm per
offset into its own contiguous block (CPU bmm into a strided out= loops matrix by matrix), nothing is copied per
offset, and the structural masks ([R, C, C] for the R key chunks of a band) are cached per shape. Linear weights
are made only for the key chunks that hold keys outside the window, and share one weight matrix with the window's
softmax weights, so v is read once. Chunk states outside the band come from a prefix over whole chunk slabs.
Blocks of query chunks run one at a time, reusing the band buffers.
Same conventions and result as `reference.hybrid_attention_reference` (tests/kernels check it).
"""

from __future__ import annotations

import functools

import torch

from relinear.kernels.linear_attention.chunked import (
    _chunked,
    _sink_scores,
    hybrid_attention_chunked,
    hybrid_inputs,
    window_reach,
)
from relinear.kernels.linear_attention.dense import hybrid_attention_dense
from relinear.kernels.linear_attention.reference import linear_factor

_BLOCK_ELEMENTS = 1 << 20  # elements of one band buffer [R, chunks, B, H, C, C] (4 MiB in fp32)
EXP_FLOOR = -80.0  # e^-80 is still a normal float32 (the smallest is ~e^-87)


def _chunk_major(x: torch.Tensor, chunk_size: int, before: int, after: int, chunks: int) -> torch.Tensor:
    """[B, H, T, X] -> [before + chunks + after, B, H, C, X] (contiguous), zero chunks around the sequence.

    One copy into the new layout (padding then permuting would copy twice); only the padding is zeroed."""
    batch, heads, length, width = x.shape
    out = x.new_empty(before + chunks + after, batch, heads, chunk_size, width)
    out[:before].zero_()
    out[before + chunks :].zero_()
    sequence = out[before : before + chunks].permute(1, 2, 0, 3, 4)  # [B, H, N, C, X], a view
    full = length // chunk_size
    sequence[:, :, :full].copy_(x[..., : full * chunk_size, :].unflatten(-2, (full, chunk_size)))
    if full < chunks:  # a last, partial chunk
        rest = length - full * chunk_size
        sequence[:, :, full, :rest].copy_(x[..., full * chunk_size :, :])
        sequence[:, :, full, rest:].zero_()
    return out


@functools.lru_cache(maxsize=64)
def _band_offsets(chunk_size: int, reach: int, after: int, window: int, causal: bool, device: torch.device):
    """(near, reachable), bool [R, 1, 1, 1, C, C] for the R = reach + after + 1 key chunks of a query chunk: key
    in the query's window; key not after the query (causal) or any key."""
    chunk = torch.arange(chunk_size, device=device)
    first = torch.arange(-reach, after + 1, device=device)[:, None, None] * chunk_size
    offset = (first + chunk - chunk[:, None]).view(-1, 1, 1, 1, chunk_size, chunk_size)  # key minus query position
    if causal:
        return (offset > -window) & (offset <= 0), offset <= 0
    return offset.abs() < window, torch.ones_like(offset, dtype=torch.bool)


def _banded_products(queries: torch.Tensor, keys: torch.Tensor, out: torch.Tensor, offsets: range | list[int]) -> None:
    """out[i, n] = queries[n] @ keys[n + offsets[i]].mT (chunk-major): one bmm per offset, each into a contiguous
    block (CPU bmm loops matrix by matrix into a strided out=)."""
    rows, chunk_size = out.shape[1], out.shape[-1]
    flat_q = queries.reshape(-1, chunk_size, queries.shape[-1])
    for i, o in enumerate(offsets):
        torch.bmm(flat_q, keys[o : o + rows].reshape(-1, chunk_size, keys.shape[-1]).mT,
                  out=out[i].view(-1, chunk_size, chunk_size))


def _banded_apply(weights: torch.Tensor, values: torch.Tensor, out: torch.Tensor) -> None:
    """out[n] = sum_o weights[o, n] @ values[n + o] (chunk-major), out a fresh buffer."""
    rows, chunk_size = weights.shape[1], weights.shape[-1]
    flat_out = out.view(-1, chunk_size, out.shape[-1])
    for o in range(weights.shape[0]):
        block = values[o : o + rows].reshape(-1, chunk_size, values.shape[-1])
        part = weights[o].view(-1, chunk_size, chunk_size)
        if o == 0:
            torch.bmm(part, block, out=flat_out)
        else:
            flat_out.baddbmm_(part, block)


def _states_outside_band(states: torch.Tensor, band_chunks: int, causal: bool) -> torch.Tensor:
    """Sum of per-chunk states [N', B, H, ...] (chunk-major, of keys as `_chunk_major` pads them) over the key
    chunks outside each query chunk's band, [N, B, H, ...].

    With the zero chunks around the sequence, the band of query chunk n is padded chunks n .. n + band_chunks - 1:
    before it, prefix[n]; after it (bidirectional), total - prefix[n + band_chunks], prefix[j] being the sum over
    padded chunks < j. The prefix is a loop of adds over chunks: whole [B, H, ...] slabs, measured 7x faster
    than cumsum over the leading dimension here.
    """
    prefix = states.new_empty(states.shape[0] + 1, *states.shape[1:])
    prefix[0] = 0
    for j in range(states.shape[0]):
        torch.add(prefix[j], states[j], out=prefix[j + 1])
    chunks = states.shape[0] + 1 - band_chunks
    if causal:
        return prefix[:chunks]
    return torch.sub(prefix[:chunks], prefix[band_chunks:]).add_(prefix[-1])  # one temporary, not two


def _heads_second(fn, *tensors: torch.Tensor) -> torch.Tensor:
    """fn on chunk-major [N, B, H, ...] tensors seen as [N, H, B, ...] (heads on axis 1, as `linear_factor`
    broadcasts its per-head weights), returned in the chunk-major layout."""
    return fn(*(t.transpose(1, 2) for t in tensors)).transpose(1, 2)


def hybrid_attention_banded(
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
    """`hybrid_attention_chunked` for inference (in-place ops and bmm out=: not differentiable)."""
    out_dtype, num_queries = v.dtype, q.shape[-2]
    q, k, v, phi_q, phi_k, key_mask, sink, reach = hybrid_inputs(q, k, v, phi_q, phi_k, key_mask, window,
                                                                 chunk_size, sinks)
    batch, heads, length, _ = q.shape
    dtype = q.dtype
    chunks = -(-length // chunk_size)
    after = 0 if causal else reach
    band = (reach + after + 1) * chunk_size  # keys per query chunk

    sink_scores = sink_values = None
    if sink is not None:
        sink_scores, sink_values = _sink_scores(_chunked(q, chunk_size), k, v, sink, causal, window, scale)
        sink_scores = sink_scores.permute(2, 0, 1, 3, 4)  # [N, B, H, C, S]
        sink_values = sink_values.squeeze(2)[None, ..., :-1]  # [1, B, H, S, Dv]

    q_major = _chunk_major(q * scale, chunk_size, 0, 0, chunks)
    phi_q_major = _chunk_major(phi_q, chunk_size, 0, 0, chunks)
    # Values without the column of ones `hybrid_inputs` appends: every product with v is then Dv = 32 wide
    # (33 wastes most of a vector register), and the denominators are the masses the loop sums anyway.
    k_major, phi_k_major, v_major = (_chunk_major(x, chunk_size, reach, after, chunks) for x in (k, phi_k, v[..., :-1]))
    far = phi_q_major @ _states_outside_band(phi_k_major.mT @ v_major, reach + after + 1, causal)  # [N, B, H, C, Dv]
    # [N, B, H, C, 1]; a product and a sum, not a matmul: CPU bmm with one column is ~4x slower here
    far_mass = (phi_q_major * _states_outside_band(phi_k_major.sum(-2, keepdim=True), reach + after + 1, causal)).sum(
        -1, keepdim=True)
    key_visible = _chunk_major(key_mask[:, None, :, None].to(dtype), chunk_size, reach, after, chunks) > 0
    # [N', B, 1, C, 1] -> [R, N, B, 1, 1, C]: whether key c of the o-th key chunk of query chunk n may be seen
    key_visible = key_visible.flatten(-2).unfold(0, reach + after + 1, 1).permute(4, 0, 1, 2, 3).unsqueeze(-2)
    near, reachable = _band_offsets(chunk_size, reach, after, window, causal, q.device)
    windowed = key_visible & near  # [R, N, B, 1, C, C]
    # Masks as float factors and biases: on CPU masked_fill_ with a broadcast bool mask is ~5x slower than an
    # add_ or mul_ of the same shape.
    window_bias = torch.zeros(windowed.shape, dtype=dtype, device=q.device).masked_fill_(~windowed, float("-inf"))
    window_keys = windowed.to(dtype)
    # Only the key chunks with keys outside the window need linear weights: the outer ones (2 of 5 offsets at
    # window 64, chunk 32, bidirectional).
    outer = reachable & ~near
    linear_offsets = [o for o in range(reach + after + 1) if outer[o].any()]
    linear_keys = (key_visible[linear_offsets] & outer[linear_offsets]).to(dtype)

    out = v.new_empty(chunks, batch, heads, chunk_size, v.shape[-1] - 1)
    per_block = max(1, _BLOCK_ELEMENTS // (batch * heads * chunk_size * band))
    scores = q.new_empty(reach + after + 1, min(per_block, chunks), batch, heads, chunk_size, chunk_size)
    linear = scores.new_empty(len(linear_offsets), *scores.shape[1:])
    sums = v.new_empty(min(per_block, chunks), batch, heads, chunk_size, v.shape[-1] - 1)
    both = (0, -1)  # a band's keys: its chunks, and the keys in each
    for lo in range(0, chunks, per_block):
        hi = min(lo + per_block, chunks)
        rows = hi - lo
        block_scores, block_linear, block_sums = scores[:, :rows], linear[:, :rows], sums[:rows]
        _banded_products(q_major[lo:hi], k_major[lo:], block_scores, range(reach + after + 1))
        block_scores.add_(window_bias[:, lo:hi])
        top = block_scores.amax(both, keepdim=True).squeeze(0)
        if sink_scores is not None:
            top = torch.maximum(top, sink_scores[lo:hi].amax(-1, keepdim=True))
        top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
        # exp_ of -inf or of anything that underflows takes a slow path on CPU (~3x, ~20x into subnormals):
        # exponents below EXP_FLOOR rise to it and the window mask zeroes the keys outside again. A key kept
        # in the window with a score more than 80 below the top weighs e^-80 ~ 2e-35 instead of less.
        window_weights = block_scores.sub_(top).clamp_(min=EXP_FLOOR).exp_().mul_(window_keys[:, lo:hi])
        window_mass = window_weights.sum(both, keepdim=True).squeeze(0)
        if sink_scores is not None:
            sink_weights = torch.exp(sink_scores[lo:hi] - top)
            window_mass = window_mass + sink_weights.sum(-1, keepdim=True)
        _banded_products(phi_q_major[lo:hi], phi_k_major[lo:], block_linear, linear_offsets)
        block_linear.mul_(linear_keys[:, lo:hi])
        linear_mass = block_linear.sum(both, keepdim=True).squeeze(0) + far_mass[lo:hi]
        factor = _heads_second(lambda t, w, m: linear_factor(gate, balance, t, w, m), top, window_mass, linear_mass)
        for i, o in enumerate(linear_offsets):  # window and linear weights in one matrix: v is read once
            window_weights[o].add_(block_linear[i].mul_(factor))
        _banded_apply(window_weights, v_major[lo:], block_sums)
        block_sums.add_(far[lo:hi] * factor)
        if sink_scores is not None:
            block_sums += sink_weights @ sink_values
        denominator = window_mass + factor * linear_mass
        torch.div(block_sums, torch.where(denominator == 0, torch.ones_like(denominator), denominator), out=out[lo:hi])
    out = out.permute(1, 2, 0, 3, 4).flatten(2, 3)
    return out[:, :, length - num_queries : length].to(out_dtype).contiguous()


def hybrid_attention_cpu(
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
    """The op's torch form: the differentiable chunked one when autograd records; else the dense form while the
    keys are few next to a query chunk's band (`dense_is_cheaper`), the banded one beyond."""
    tensors = (q, k, v, phi_q, phi_k, gate, balance)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return hybrid_attention_chunked(q, k, v, phi_q, phi_k, gate, key_mask, causal, window, scale, chunk_size,
                                        sinks, balance)
    if dense_is_cheaper(k.shape[-2], causal, window, chunk_size):
        return hybrid_attention_dense(q, k, v, phi_q, phi_k, gate, key_mask, causal, window, scale, sinks, balance)
    return hybrid_attention_banded(q, k, v, phi_q, phi_k, gate, key_mask, causal, window, scale, chunk_size,
                                   sinks, balance)


# How many keys per query the dense form may weigh, in keys of a query chunk's band, and still be faster:
# measured on one CPU thread at B8 H12 D32 (benchmarks/results/hybrid_forms_cpu.json).
DENSE_KEYS_PER_BAND = {False: 3.0, True: 2.0}  # by causal


def dense_is_cheaper(num_keys: int, causal: bool, window: int, chunk_size: int) -> bool:
    """Whether `hybrid_attention_dense` beats `hybrid_attention_banded` at this size: it weighs every key, the
    banded form the (reach + after + 1) key chunks around each query chunk."""
    reach = window_reach(num_keys, window, chunk_size)
    band = (reach + (0 if causal else reach) + 1) * chunk_size
    return num_keys <= DENSE_KEYS_PER_BAND[causal] * band
