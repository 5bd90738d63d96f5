"""Token-by-token decoding of the causal window hybrid (LoLCATs) in O(window + sinks) memory per sequence.

Softmax needs the window's keys exactly, so the cache keeps the last `window` of them (k, phi_k, v) in a
shifted buffer, oldest first, of fixed size: every step has the same shapes (friendly to CUDA graphs and
torch.compile), and empty slots are simply invisible. Keys that left the window are only needed through
the linear part, so they live in the running linear-attention state (sum phi_k v^T, sum phi_k). A step
moves the oldest key into that state, appends the new one, and mixes both parts in one normalization with
the window max subtracted, exactly as `hybrid_attention_reference` (causal) does for the last query.

With `sinks` > 0 the first `sinks` attendable keys stay exact for every later query: a window slot
remembers whether it holds a sink, and a sink leaving the window goes to a second fixed-size buffer of
`sinks` slots instead of the linear state. The exact part then spans the window and the retired sinks
(a sink still in the window counts once, there), and the max subtracted is taken over both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from relinear.kernels.linear_attention.reference import compute_dtype, linear_factor, safe_divide


@dataclass(frozen=True)
class HybridCache:
    """The decoding state of one hybrid attention layer for a batch of sequences.

    keys [B, H, W, D], phi_keys [B, H, W, F], values [B, H, W, Dv]: the last W positions, oldest first, in
    the inputs' dtype; visible [B, W]: which slots hold an attendable key (False for empty or masked ones);
    state [B, H, F, Dv] and normalizer [B, H, F]: sum phi_k v^T and sum phi_k over the visible keys that
    left the window, sinks excepted, in the accumulation dtype.

    Attention sinks (S = `sinks`, 0 slots when off): seen [B] (long) counts the attendable keys so far, which
    tells whether the next one is a sink; sink_slot [B, W]: which window slots hold a sink; sink_keys
    [B, H, S, D], sink_values [B, H, S, Dv] and sink_visible [B, S]: the sinks that left the window, in the
    inputs' dtype, filled oldest first as they leave.
    """

    keys: torch.Tensor
    phi_keys: torch.Tensor
    values: torch.Tensor
    visible: torch.Tensor
    state: torch.Tensor
    normalizer: torch.Tensor
    seen: torch.Tensor
    sink_slot: torch.Tensor
    sink_keys: torch.Tensor
    sink_values: torch.Tensor
    sink_visible: torch.Tensor

    @property
    def window(self) -> int:
        return self.keys.shape[2]

    @property
    def sinks(self) -> int:
        return self.sink_keys.shape[2]

    @classmethod
    def empty(
        cls, k_t: torch.Tensor, phi_k_t: torch.Tensor, v_t: torch.Tensor, window: int, sinks: int = 0
    ) -> HybridCache:
        """The cache before the first token, shaped after one step's k_t [B, H, D], phi_k_t [B, H, F], v_t."""
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {sinks}")
        batch, heads, features = phi_k_t.shape
        dtype = compute_dtype(v_t.dtype)
        return cls(
            keys=k_t.new_zeros(batch, heads, window, k_t.shape[-1]),
            phi_keys=phi_k_t.new_zeros(batch, heads, window, features),
            values=v_t.new_zeros(batch, heads, window, v_t.shape[-1]),
            visible=torch.zeros(batch, window, dtype=torch.bool, device=v_t.device),
            state=torch.zeros(batch, heads, features, v_t.shape[-1], dtype=dtype, device=v_t.device),
            normalizer=torch.zeros(batch, heads, features, dtype=dtype, device=v_t.device),
            seen=torch.zeros(batch, dtype=torch.long, device=v_t.device),
            sink_slot=torch.zeros(batch, window, dtype=torch.bool, device=v_t.device),
            sink_keys=k_t.new_zeros(batch, heads, sinks, k_t.shape[-1]),
            sink_values=v_t.new_zeros(batch, heads, sinks, v_t.shape[-1]),
            sink_visible=torch.zeros(batch, sinks, dtype=torch.bool, device=v_t.device),
        )


def _shifted(buffer: torch.Tensor, newest: torch.Tensor) -> torch.Tensor:
    """Drops the oldest slot (dimension 2 of [B, H, W, X]) and appends `newest` [B, H, X]."""
    return torch.cat([buffer[:, :, 1:], newest.unsqueeze(2).to(buffer.dtype)], dim=2)


def _retire_oldest(cache: HybridCache, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(state, normalizer) with the oldest slot's key added, if it is visible and no sink: it is leaving the
    window, and only a sink stays exact after that."""
    linear = cache.visible[:, :1] & ~cache.sink_slot[:, :1]  # [B, 1]
    leaving = cache.phi_keys[:, :, 0].to(dtype) * linear[:, None].to(dtype)  # [B, H, F]
    state = cache.state + leaving.unsqueeze(-1) * cache.values[:, :, 0].to(dtype).unsqueeze(-2)
    return state, cache.normalizer + leaving


def _retire_sink(cache: HybridCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sink_keys, sink_values, sink_visible) with the oldest window slot appended where it holds a sink.

    Shifting only the rows that take a sink keeps the shapes fixed; no visible sink is ever shifted out,
    since a row takes at most `sinks` of them into empty slots.
    """
    taking = cache.sink_slot[:, 0]  # [B]; a sink slot is always visible

    def take(buffer: torch.Tensor, oldest: torch.Tensor) -> torch.Tensor:
        return torch.where(taking.view(-1, *[1] * (buffer.dim() - 1)), _shifted(buffer, oldest), buffer)

    keys, values = take(cache.sink_keys, cache.keys[:, :, 0]), take(cache.sink_values, cache.values[:, :, 0])
    visible = take(cache.sink_visible[:, None], taking[:, None])[:, 0]
    return keys, values, visible


def hybrid_attention_step(
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    v_t: torch.Tensor,
    phi_q_t: torch.Tensor,
    phi_k_t: torch.Tensor,
    gate: torch.Tensor,
    cache: HybridCache | None,
    window: int,
    scale: float,
    key_mask_t: torch.Tensor | None = None,
    sinks: int = 0,
    balance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, HybridCache]:
    """One decoding step of the causal hybrid: q_t, k_t [B, H, D], v_t [B, H, Dv], phi_q_t, phi_k_t [B, H, F],
    gate [H] and balance [H, 3] or None (see `linear_factor`); `cache` None before the first token.
    `key_mask_t` [B] (True: attendable) marks this token's key, e.g. False for left padding. The token sees
    itself, as in the causal forms. `sinks`: the first attendable keys kept exact for every query (see
    `hybrid_attention_reference`); the cache must have been made with it.

    Returns (out [B, H, Dv] in v_t's dtype, the cache after this token); T steps give the causal
    `hybrid_attention_chunked` output token by token.
    """
    if cache is None:
        cache = HybridCache.empty(k_t, phi_k_t, v_t, window, sinks)
    elif cache.window != window:
        raise ValueError(f"cache holds a window of {cache.window} keys, but window={window}")
    elif cache.sinks != sinks:
        raise ValueError(f"cache holds {cache.sinks} sinks, but sinks={sinks}")
    if gate.shape != (q_t.shape[1],):
        raise ValueError(f"gate must have shape ({q_t.shape[1]},), got {tuple(gate.shape)}")
    batch = q_t.shape[0]
    if key_mask_t is None:
        key_mask_t = torch.ones(batch, dtype=torch.bool, device=q_t.device)
    elif key_mask_t.shape != (batch,):
        raise ValueError(f"key_mask_t must have shape ({batch},), got {tuple(key_mask_t.shape)}")
    dtype = compute_dtype(v_t.dtype)
    state, normalizer = _retire_oldest(cache, dtype)
    sink_keys, sink_values, sink_visible = _retire_sink(cache) if sinks else (
        cache.sink_keys, cache.sink_values, cache.sink_visible)
    is_sink = key_mask_t & (cache.seen < sinks)
    cache = HybridCache(
        keys=_shifted(cache.keys, k_t),
        phi_keys=_shifted(cache.phi_keys, phi_k_t),
        values=_shifted(cache.values, v_t),
        visible=torch.cat([cache.visible[:, 1:], key_mask_t[:, None]], dim=1),
        state=state,
        normalizer=normalizer,
        seen=cache.seen + key_mask_t.long(),
        sink_slot=torch.cat([cache.sink_slot[:, 1:], is_sink[:, None]], dim=1),
        sink_keys=sink_keys,
        sink_values=sink_values,
        sink_visible=sink_visible,
    )

    # Retired sinks join the window's keys: one softmax-style block, one max, as in the reference.
    keys, values, visible = cache.keys, cache.values, cache.visible
    if sinks:
        keys = torch.cat([keys, cache.sink_keys], dim=2)
        values = torch.cat([values, cache.sink_values], dim=2)
        visible = torch.cat([visible, cache.sink_visible], dim=1)
    scores = scale * (keys.to(dtype) @ q_t.to(dtype).unsqueeze(-1)).squeeze(-1)  # [B, H, W + S]
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    top = scores.amax(-1, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weights = torch.exp(scores - top)
    phi_q = phi_q_t.to(dtype)
    window_mass, linear_mass = weights.sum(-1, keepdim=True), (phi_q * normalizer).sum(-1, keepdim=True)
    factor = linear_factor(gate, balance, top, window_mass, linear_mass)
    numerator = (weights.unsqueeze(-2) @ values.to(dtype)).squeeze(-2)
    numerator = numerator + factor * (phi_q.unsqueeze(-2) @ state).squeeze(-2)
    return safe_divide(numerator, window_mass + factor * linear_mass).to(v_t.dtype), cache


def linear_state_from_prompt(
    phi_k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    log_decay: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(state [B, H, F, Dv], normalizer [B, H, F]) that T calls of `linear_attention_step` leave after a prompt
    phi_k [B, H, T, F], v [B, H, T, Dv], in one pass: key j enters with weight exp(sum over later keys i of
    log_decay_i) (1 without `log_decay` [B, H, T]). A key that `key_mask` [B, T] drops adds nothing and decays
    nothing, as in the steps. In the accumulation dtype."""
    dtype = compute_dtype(v.dtype)
    phi_k, v = phi_k.to(dtype), v.to(dtype)
    if key_mask is not None:
        keep = key_mask[:, None, :].to(dtype)  # [B, 1, T]
        phi_k = phi_k * keep[..., None]
        log_decay = None if log_decay is None else log_decay.to(dtype) * keep
    if log_decay is not None:
        # the decay each key sees after it: a reverse cumulative sum shifted by one, so the recent keys (the
        # ones with weight near 1) never subtract two large sums
        later = F.pad(log_decay.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1))
        phi_k = phi_k * torch.exp(later)[..., None]
    return phi_k.transpose(-1, -2) @ v, phi_k.sum(-2)


def _last_slots(x: torch.Tensor, window: int, dim: int) -> torch.Tensor:
    """The last `window` positions along `dim`, with empty (zero / False) slots in front when there are fewer."""
    short = window - x.shape[dim]
    if short > 0:
        shape = list(x.shape)
        shape[dim] = short
        x = torch.cat([x.new_zeros(shape), x], dim=dim)
    return x.narrow(dim, x.shape[dim] - window, window)


def hybrid_cache_from_prompt(
    k: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    window: int,
    sinks: int = 0,
) -> HybridCache:
    """The `HybridCache` that T calls of `hybrid_attention_step` leave after a prompt k [B, H, T, D], phi_k
    [B, H, T, F] (already zero where `key_mask` drops the key, as the steps get it), v [B, H, T, Dv], built at
    once: the last `window` positions in the window slots, the first `sinks` attendable keys that left the
    window in the sink slots (right-aligned, oldest first, as `_retire_sink` fills them), every other
    attendable key that left the window in the linear state."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    batch, _, length, _ = k.shape
    if key_mask is None:
        key_mask = torch.ones(batch, length, dtype=torch.bool, device=k.device)
    key_mask = key_mask.bool()
    is_sink = key_mask & (key_mask.long().cumsum(1) <= sinks)  # the first `sinks` attendable keys
    retired = torch.arange(length, device=k.device) < length - window  # [T]: left the window
    state, normalizer = linear_state_from_prompt(phi_k, v, key_mask & ~is_sink & retired)
    retired_sinks = is_sink & retired  # [B, T]
    slot = sinks - retired_sinks.sum(1, keepdim=True) + retired_sinks.long().cumsum(1) - 1  # [B, T]
    select = retired_sinks[:, None, :] & (slot[:, None, :] == torch.arange(sinks, device=k.device)[None, :, None])
    pick = select.to(k.dtype)  # [B, S, T]: one-hot rows, so the products below copy the keys exactly
    return HybridCache(
        keys=_last_slots(k, window, 2),
        phi_keys=_last_slots(phi_k, window, 2),
        values=_last_slots(v, window, 2),
        visible=_last_slots(key_mask, window, 1),
        state=state,
        normalizer=normalizer,
        seen=key_mask.long().sum(1),
        sink_slot=_last_slots(is_sink, window, 1),
        sink_keys=torch.einsum("bst,bhtd->bhsd", pick, k),
        sink_values=torch.einsum("bst,bhtd->bhsd", pick.to(v.dtype), v),
        sink_visible=select.any(-1),
    )
