"""The module that replaces softmax attention: feature maps + (hybrid / gated) linear attention ops.

It takes the q, k, v an attention layer already computed (after projections and rotary embeddings) and
returns what softmax attention would, approximately: [B, H, Tq, Dv]. Its parameters (feature maps, window
gate) are what calibration trains.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import relinear.kernels.linear_attention  # noqa: F401  (registers torch.ops.relinear.*)
from relinear.approx.feature_maps import make_feature_map
from relinear.kernels.linear_attention.chunked import linear_attention_step
from relinear.kernels.linear_attention.decode import (
    HybridCache,
    hybrid_attention_step,
    hybrid_cache_from_prompt,
    linear_state_from_prompt,
)
from relinear.kernels.linear_attention.mapped import fused_map_name
from relinear.kernels.linear_attention.reference import BALANCE_FEATURES

LIGER_DEFAULT_WINDOW = 64
# Chunk length when none is given, per device. CPU: 32 was the fastest of 16..128 for head dims 16..64 in
# the chunked torch form (causal elu, T=8192, one thread); CUDA: 64, the tensor-core tile the kernels' tiling
# was written around. The result does not depend on it (only rounding does).
DEFAULT_CHUNK_SIZE = {"cpu": 32, "cuda": 64}
# Liger's forget gate is logsigmoid(.) / 16: the GLA temperature, which keeps decays near 1 so the
# recurrent state remembers well beyond the sliding window.
LIGER_GATE_TEMPERATURE = 16.0
# Learned decay (decay=True): the log-decay per token is -exp(DECAY_GAIN * p), p a parameter per head and side.
# The gain lets Adam, whose steps move p by about the learning rate, change the rate by ~10% a step at lr 1e-2:
# from DECAY_INIT's e^-10 (a key 256 tokens away keeps 99% of its weight: no decay to speak of) to a local
# head's ~1 (lambda ~0.4) in ~100 steps (by that arithmetic). What MiniLM learned: docs/attention_quality.md.
DECAY_GAIN = 10.0
DECAY_INIT = -1.0
# decay = n >= 2: rate g of n starts at p = DECAY_INIT * (1 - g / (n - 1)), from none (g = 0) to lambda = e^-1 (the
# last), and the mix starts at softmax([0, DECAY_MIX_INIT, ...]): mostly the undecayed part (88% for n = 2), so
# a fresh module is close to the pure linear attention that starts close to softmax attention.
DECAY_MIX_INIT = -2.0


def _decay_init(num_heads: int, rates: int) -> torch.Tensor:
    """[H, 2] for one rate (DECAY_INIT: no decay to speak of), [H, rates, 2] for more (see DECAY_MIX_INIT)."""
    if rates == 1:
        return torch.full((num_heads, 2), DECAY_INIT)
    start = DECAY_INIT * (1 - torch.arange(rates) / (rates - 1))
    return start.view(1, rates, 1).repeat(num_heads, 1, 2)


def _decay_mix_init(num_heads: int, rates: int) -> torch.Tensor:
    """[H, rates]: logits DECAY_MIX_INIT, but 0 for the undecayed rate."""
    mix = torch.full((num_heads, rates), DECAY_MIX_INIT)
    mix[:, 0] = 0.0
    return mix


def chunk_size_for(device_type: str, chunk_size: int | None = None) -> int:
    """`chunk_size` when one was chosen, else the default for `device_type` (the CPU's for other devices)."""
    return chunk_size or DEFAULT_CHUNK_SIZE.get(device_type, DEFAULT_CHUNK_SIZE["cpu"])


def repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, Hk, T, D] -> [B, num_heads, T, D], each kv head serving num_heads / Hk consecutive query heads."""
    kv_heads = x.shape[1]
    if num_heads % kv_heads:
        raise ValueError(f"key/value heads ({kv_heads}) must divide query heads ({num_heads})")
    return x if kv_heads == num_heads else x.repeat_interleave(num_heads // kv_heads, dim=1)


@dataclass(frozen=True)
class DecodeCache:
    """What `LinearizedAttention.step` carries between tokens: the running (state, normalizer) of the linear
    or gated part, and the sliding window's keys and values; each None until used."""

    linear: tuple[torch.Tensor, torch.Tensor] | None = None
    window: HybridCache | None = None


class LinearizedAttention(nn.Module):
    """Linear attention in place of softmax attention, optionally hybrid or gated.

    - window = 0: linear attention with `feature_map` (hedgehog by default).
    - window > 0: LoLCATs hybrid, exact softmax over the `window` nearest keys plus linear attention over the
      rest, mixed in one normalization by a learned per-head factor sigmoid(window_gate) (starts at 1/2),
      and, with `balance` (the default), a learned per-query one on top: exp(window_balance[h] . (window max,
      log window sum, log linear sum)), see `reference.linear_factor`. window_balance starts at 0 (factor 1).
      `sinks` > 0 keeps the first `sinks` attendable keys exact for every query too (attention sinks: a
      [CLS] / BOS token that draws attention from everywhere).
    - decay = True (window 0, no gate): linear attention whose weights decay with distance, a learned rate per
      head for the keys before the query and another for those after (bidirectional; causal uses the first):
      key j reaches query i with phi(q_i) . phi(k_j) * lambda^|i - j|, as in RetNet but learned per side. It lets
      positive feature maps express the heads that attend to their neighbours, which they cannot alone. Still
      linear in time: the gated ops (two passes when bidirectional). Starts at (almost) no decay.
      decay = n >= 2: n such attentions per head, each with its own rates and normalized on its own, their
      outputs mixed by learned per-head weights softmax(decay_mix[h]): a head can be partly local, partly
      global. n times the linear-attention work.
    - gate = "liger": Liger, causal only. Decaying linear attention (softmax feature map unless another is
      named) averaged 50/50 with sliding-window softmax attention (window 64 when window = 0). The decay
      uses no new parameters: log_decay_t = logsigmoid(mean_d k_t) / 16 per head and token, a gate read off
      the existing key projection.

    q and k get separate feature maps (as in LoLCATs) that start identical, so the initial kernel is
    symmetric in q and k.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        feature_map: str | None = None,
        window: int = 0,
        gate: str | None = None,
        feature_dim: int | None = None,
        chunk_size: int | None = None,
        generator: torch.Generator | None = None,
        sinks: int = 0,
        balance: bool = True,
        decay: bool | int = False,
    ):
        super().__init__()
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        if sinks < 0 or (sinks and (window == 0 or gate is not None)):
            raise ValueError(f"sinks must be 0, or > 0 with a window (window > 0, gate=None); got sinks={sinks}, "
                             f"window={window}, gate={gate!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be None or >= 1, got {chunk_size}")
        if gate not in (None, "liger"):
            raise ValueError(f"gate must be None or 'liger', got {gate!r}")
        if isinstance(decay, bool):
            decay = int(decay)
        if not isinstance(decay, int) or decay < 0:
            raise ValueError(f"decay must be True, False or a number of rates >= 0, got {decay!r}")
        if decay and (window or gate is not None):
            raise ValueError(f"decay is for pure linear attention (window=0, gate=None); got decay={decay}, "
                             f"window={window}, gate={gate!r}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.gate = gate
        self.chunk_size = chunk_size
        self.sinks = sinks
        if gate == "liger":
            feature_map = feature_map or "softmax"
            window = window or LIGER_DEFAULT_WINDOW
        self.window = window
        self.feature_map_q = make_feature_map(
            feature_map or "hedgehog", num_heads, head_dim, feature_dim, generator=generator
        )
        self.feature_map_k = copy.deepcopy(self.feature_map_q)
        hybrid = window > 0 and gate is None
        self.window_gate = nn.Parameter(torch.zeros(num_heads)) if hybrid else None
        self.window_balance = nn.Parameter(torch.zeros(num_heads, BALANCE_FEATURES)) if hybrid and balance else None
        self.decay_rates = decay
        # [H, 2] (n = 1) or [H, n, 2]: rates for the keys before the query, for those after it; see DECAY_GAIN
        self.decay = nn.Parameter(_decay_init(num_heads, decay)) if decay else None
        # [H, n]: how each head mixes its n decaying attentions (softmax over n)
        self.decay_mix = nn.Parameter(_decay_mix_init(num_heads, decay)) if decay > 1 else None

    def _check_query(self, q: torch.Tensor, name: str, expected: str) -> None:
        if q.shape[1] != self.num_heads or q.shape[-1] != self.head_dim:
            raise ValueError(f"{name} must be {expected} (num_heads, head_dim); got {tuple(q.shape)}")

    def _chunk_size(self, x: torch.Tensor) -> int:
        return chunk_size_for(x.device.type, self.chunk_size)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What calibration trains: the feature maps' weights, the window gate and balance, the decay."""
        return list(self.parameters())

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        causal: bool = False,
        scale: float | None = None,
    ) -> torch.Tensor:
        """q [B, H, Tq, D], k [B, Hk, Tk, D], v [B, Hk, Tk, Dv], key_mask bool [B, Tk] -> [B, H, Tq, Dv]."""
        self._check_query(q, "q", f"[B, {self.num_heads}, T, {self.head_dim}]")
        if self.gate == "liger" and not causal:
            raise ValueError("gate='liger' (decaying linear attention) is causal only; got causal=False")
        scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
        k, v = repeat_kv(k, self.num_heads), repeat_kv(v, self.num_heads)
        chunk_size = self._chunk_size(q)
        fused = fused_map_name(self.feature_map_q, self.feature_map_k)
        if fused is not None and self.window == 0 and self.gate is None and self.decay is None:
            # elu / relu are computed inside the kernels: phi_q, phi_k and their gradients never reach memory.
            return torch.ops.relinear.mapped_linear_attention(
                q, k, v, key_mask, causal, chunk_size, fused, scale
            )
        root = math.sqrt(scale)
        phi_q, phi_k = self.feature_map_q.of_scaled(q, root), self.feature_map_k.of_scaled(k, root)
        if self.gate == "liger":
            return self._liger(q, k, v, phi_q, phi_k, key_mask, scale)
        if self.decay is not None:
            phi_q, phi_k, v = (self._per_rate(x) for x in (phi_q, phi_k, v))
            before = self.log_decay(0, v.shape[:-1])
            if causal:
                out = torch.ops.relinear.gated_linear_attention(phi_q, phi_k, v, before, key_mask, chunk_size)
            else:
                out = torch.ops.relinear.bidirectional_gated_linear_attention(
                    phi_q, phi_k, v, before, self.log_decay(1, v.shape[:-1]), key_mask, chunk_size
                )
            return self._mix_rates(out)
        if self.window_gate is not None:
            return torch.ops.relinear.hybrid_attention(
                q, k, v, phi_q, phi_k, self.window_gate, key_mask, causal, self.window, scale, chunk_size,
                self.sinks, self.window_balance,
            )
        return torch.ops.relinear.linear_attention(phi_q, phi_k, v, key_mask, causal, chunk_size)

    def step(
        self,
        q_t: torch.Tensor,
        k_t: torch.Tensor,
        v_t: torch.Tensor,
        cache: DecodeCache | None = None,
        key_mask_t: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> tuple[torch.Tensor, DecodeCache]:
        """One causal decoding step in O(1) (linear, gated) or O(window) memory: q_t [B, H, D], k_t [B, Hk, D],
        v_t [B, Hk, Dv], key_mask_t bool [B] (False: this token is padding). Returns (out [B, H, Dv], cache);
        T steps give `forward(..., causal=True)` token by token."""
        self._check_query(q_t, "q_t", f"[B, {self.num_heads}, {self.head_dim}]")
        scale = 1 / math.sqrt(q_t.shape[-1]) if scale is None else scale
        k_t, v_t = (repeat_kv(x.unsqueeze(2), self.num_heads).squeeze(2) for x in (k_t, v_t))
        root = math.sqrt(scale)
        phi_q, phi_k = (fm.of_scaled(x.unsqueeze(2), root).squeeze(2)
                        for fm, x in ((self.feature_map_q, q_t), (self.feature_map_k, k_t)))
        keep = None if key_mask_t is None else key_mask_t[:, None].to(phi_k.dtype)  # [B, 1]
        if keep is not None:
            phi_k = phi_k * keep[..., None]  # a padding key adds nothing to any state
        cache = cache or DecodeCache()
        if self.gate == "liger":
            log_decay = F.logsigmoid(k_t.mean(-1)) / LIGER_GATE_TEMPERATURE
            log_decay = log_decay if keep is None else log_decay * keep  # padding does not decay the state
            recurrent, *linear = linear_attention_step(phi_q, phi_k, v_t, *(cache.linear or (None, None)),
                                                       log_decay_t=log_decay)
            window_only = torch.full((self.num_heads,), float("-inf"), device=q_t.device)
            local, window = hybrid_attention_step(q_t, k_t, v_t, phi_q, phi_k, window_only, cache.window,
                                                  self.window, scale, key_mask_t)
            return 0.5 * (recurrent + local), DecodeCache(tuple(linear), window)
        if self.window_gate is not None:
            out, window = hybrid_attention_step(q_t, k_t, v_t, phi_q, phi_k, self.window_gate, cache.window,
                                                self.window, scale, key_mask_t, self.sinks, self.window_balance)
            return out, DecodeCache(window=window)
        log_decay = None
        if self.decay is not None:
            phi_q, phi_k, v_t = (self._per_rate(x) for x in (phi_q, phi_k, v_t))
            log_decay = self.log_decay(0, v_t.shape[:-1])
            log_decay = log_decay if keep is None else log_decay * keep  # padding does not decay the state
        out, *linear = linear_attention_step(phi_q, phi_k, v_t, *(cache.linear or (None, None)),
                                             log_decay_t=log_decay)
        return self._mix_rates(out), DecodeCache(linear=tuple(linear))

    def prefill_cache(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> DecodeCache:
        """The cache that `step` holds after a whole prompt k [B, Hk, T, D], v [B, Hk, T, Dv] (key_mask bool
        [B, T]), built in one pass instead of T steps: decoding goes on from a prompt that
        `forward(..., causal=True)` ran at once."""
        scale = 1 / math.sqrt(k.shape[-1]) if scale is None else scale
        k, v = repeat_kv(k, self.num_heads), repeat_kv(v, self.num_heads)
        phi_k = self.feature_map_k.of_scaled(k, math.sqrt(scale))
        if key_mask is not None:
            phi_k = phi_k * key_mask[:, None, :, None].to(phi_k.dtype)  # as `step` masks each token's key
        if self.gate == "liger":
            log_decay = F.logsigmoid(k.mean(-1)) / LIGER_GATE_TEMPERATURE
            return DecodeCache(linear_state_from_prompt(phi_k, v, key_mask, log_decay),
                               hybrid_cache_from_prompt(k, phi_k, v, key_mask, self.window))
        if self.window_gate is not None:
            return DecodeCache(window=hybrid_cache_from_prompt(k, phi_k, v, key_mask, self.window, self.sinks))
        log_decay = None
        if self.decay is not None:
            phi_k, v = self._per_rate(phi_k), self._per_rate(v)
            log_decay = self.log_decay(0, v.shape[:-1])
        return DecodeCache(linear=linear_state_from_prompt(phi_k, v, key_mask, log_decay))

    def log_decay(self, side: int, shape: torch.Size) -> torch.Tensor:
        """The learned log-decay per token of one side (0: keys before the query, 1: after) for every head
        and rate (head h's rate g at index h * n + g), broadcast to `shape` [B, H * n, ...]."""
        rate = torch.exp(DECAY_GAIN * self.decay[..., side]).reshape(-1)
        return (-rate).view(-1, *(1,) * (len(shape) - 2)).expand(shape).contiguous()

    def _per_rate(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, ...] -> [B, H * n, ...]: one copy of each head per decay rate."""
        return x if self.decay_rates <= 1 else x.repeat_interleave(self.decay_rates, dim=1)

    def _mix_rates(self, out: torch.Tensor) -> torch.Tensor:
        """[B, H * n, ...] -> [B, H, ...]: each head's n outputs mixed by softmax(decay_mix[h])."""
        if self.decay_rates <= 1:
            return out
        weights = torch.softmax(self.decay_mix, dim=-1).to(out.dtype)  # [H, n]
        out = out.unflatten(1, (self.num_heads, self.decay_rates))
        return (out * weights.view(*weights.shape, *(1,) * (out.dim() - 3))).sum(2)

    def _liger(self, q, k, v, phi_q, phi_k, key_mask, scale):
        log_decay = F.logsigmoid(k.mean(-1)) / LIGER_GATE_TEMPERATURE
        recurrent = torch.ops.relinear.gated_linear_attention(
            phi_q, phi_k, v, log_decay, key_mask, self._chunk_size(q)
        )
        # The hybrid op with a linear factor sigmoid(-inf) = 0 is exactly sliding-window softmax attention.
        window_only = torch.full((self.num_heads,), float("-inf"), device=q.device)
        local = torch.ops.relinear.hybrid_attention(
            q, k, v, phi_q, phi_k, window_only, key_mask, True, self.window, scale, self._chunk_size(q)
        )
        return 0.5 * (recurrent + local)
