"""The spec of linear attention: quadratic forms that build every weight matrix explicitly.

Slow (O(Tq * Tk) memory) and meant to be obviously right; the efficient forms in `chunked.py` and the Triton
kernels are tested against these.

Conventions, shared by every form:
- phi_q [B, H, Tq, F], phi_k [B, H, Tk, F], v [B, H, Tk, Dv]; q, k [B, H, T, D] for the softmax part.
- key_mask: optional bool [B, Tk], True where the key may be attended (padding is False).
- Queries align to the END of the keys: query i sits at position Tk - Tq + i. `causal` lets it see keys
  j <= its position. The window of a query holds keys with 0 <= pos - j < window (causal) or
  |pos - j| < window (bidirectional).
- Computation in float32 (float64 for float64 inputs); the result has v's dtype.
- A query that may see no key outputs zeros: only an exactly zero denominator is guarded, so nothing
  biases a result whose denominator is merely small.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def query_positions(num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """Absolute positions of the queries among the keys: the last query sits at the last key."""
    return torch.arange(num_keys - num_queries, num_keys, device=device)


def visible_keys(
    key_mask: torch.Tensor | None, causal: bool, num_queries: int, num_keys: int, device: torch.device
) -> torch.Tensor:
    """bool [B or 1, 1, Tq, Tk]: which key each query may attend."""
    keys = torch.arange(num_keys, device=device)
    visible = torch.ones(num_queries, num_keys, dtype=torch.bool, device=device)
    if causal:
        visible = keys <= query_positions(num_queries, num_keys, device)[:, None]
    visible = visible[None, None]
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    return visible


def in_window(window: int, causal: bool, num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """bool [Tq, Tk]: whether key j lies in query i's window (visibility aside)."""
    offset = query_positions(num_queries, num_keys, device)[:, None] - torch.arange(num_keys, device=device)
    if causal:
        return (offset >= 0) & (offset < window)
    return offset.abs() < window


def sink_keys(key_mask: torch.Tensor | None, sinks: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """bool [B or 1, Tk]: the attention sinks, i.e. the first `sinks` attendable keys of each sequence.

    Counted among attendable keys, not positions, so a left-padded sequence's sinks are its first real
    tokens (BOS), wherever the padding put them.
    """
    if key_mask is None:
        return (torch.arange(num_keys, device=device) < sinks)[None]
    return key_mask & (key_mask.cumsum(-1) <= sinks)


def exact_keys(
    key_mask: torch.Tensor | None, causal: bool, window: int, sinks: int, num_queries: int, num_keys: int,
    device: torch.device,
) -> torch.Tensor:
    """bool [B or 1, 1, Tq, Tk]: the keys the hybrid weighs by exact softmax: visible, and in the query's
    window or among the sinks."""
    near = in_window(window, causal, num_queries, num_keys, device)[None]
    if sinks:
        near = near | sink_keys(key_mask, sinks, num_keys, device)[:, None, :]
    return visible_keys(key_mask, causal, num_queries, num_keys, device) & near[:, None]


def safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, with 0 where the denominator is exactly 0 (a query that sees nothing)."""
    return numerator / torch.where(denominator == 0, torch.ones_like(denominator), denominator)


def _normalized(weights: torch.Tensor, v: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    return safe_divide(weights @ v, weights.sum(-1, keepdim=True)).to(out_dtype)


def linear_attention_reference(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    causal: bool,
) -> torch.Tensor:
    """y_i = sum_j A_ij v_j / sum_j A_ij with A_ij = phi_q_i . phi_k_j over the keys query i may see."""
    out_dtype, dtype = v.dtype, compute_dtype(v.dtype)
    phi_q, phi_k, v = phi_q.to(dtype), phi_k.to(dtype), v.to(dtype)
    visible = visible_keys(key_mask, causal, phi_q.shape[-2], phi_k.shape[-2], v.device)
    weights = (phi_q @ phi_k.mT).masked_fill(~visible, 0)
    return _normalized(weights, v, out_dtype)


def hybrid_attention_reference(
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
    sinks: int = 0,
    balance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax over the window plus gated linear attention outside it, in one normalization (LoLCATs).

    y_i = (sum_{j in window} exp(s_ij - m_i) v_j + f_i sum_{j visible, outside} phi_q_i . phi_k_j v_j) / (same
    with v_j = 1), s_ij = scale q_i . k_j, f_i = `linear_factor` (sigmoid(gate[h]) without a `balance`).

    With `sinks` > 0 the first `sinks` attendable keys (`sink_keys`) count as in every window (StreamingLLM's
    attention sinks): a [CLS] or BOS token that draws much of the attention from everywhere stays exact.

    m_i is the largest score in query i's window (0 when the window holds no visible key). This keeps
    every exponent <= 0, so nothing overflows, and the window's top weight is exactly 1 whatever the scores'
    magnitude, which gives the linear part a fixed reference to be balanced against (through f and the
    learned feature maps). With a window covering every visible key the linear sum is empty and y is softmax
    attention exactly; with an empty window it is linear attention exactly (f cancels).
    """
    out_dtype, dtype = v.dtype, compute_dtype(v.dtype)
    q, k, v, phi_q, phi_k = (t.to(dtype) for t in (q, k, v, phi_q, phi_k))
    num_queries, num_keys = q.shape[-2], k.shape[-2]
    visible = visible_keys(key_mask, causal, num_queries, num_keys, v.device)
    windowed = exact_keys(key_mask, causal, window, sinks, num_queries, num_keys, v.device)
    scores = (scale * (q @ k.mT)).masked_fill(~windowed, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    softmax_part = torch.exp(scores - top)
    linear_part = (phi_q @ phi_k.mT).masked_fill(~(visible & ~windowed), 0)
    factor = linear_factor(gate, balance, top, softmax_part.sum(-1, keepdim=True), linear_part.sum(-1, keepdim=True))
    return _normalized(softmax_part + factor * linear_part, v, out_dtype)


BALANCE_FEATURES = 3  # m_i, log W_i, log L_i


def linear_factor(
    gate: torch.Tensor,
    balance: torch.Tensor | None,
    top: torch.Tensor,
    window_mass: torch.Tensor,
    linear_mass: torch.Tensor,
) -> torch.Tensor:
    """The hybrid's weight of the linear part against the window's, per query: [B, H, ..., 1].

    f_i = sigmoid(gate[h]) * exp(balance[h] . (m_i, log W_i, log L_i)), with m_i the window's max score,
    W_i = sum_{j in window} exp(s_ij - m_i) and L_i = sum_{j outside} phi_q_i . phi_k_j (top, window_mass,
    linear_mass, each [B, H, ..., 1], heads on axis 1). Without a balance, f = sigmoid(gate[h]).

    Why per query: the softmax part is taken relative to m_i and the linear part is not, so the share the
    linear part should get, c_i = sum_{j outside} exp(s_ij - m_i) / L_i, varies from query to query, which one
    gate per head cannot follow; (m_i, log W_i, log L_i) are values the op holds anyway, and a fit on them
    follows most of it (figures: docs/attention_quality.md, "Why the hybrid weighs its linear part per query").
    An empty window (W_i = 0) or an empty outside (L_i = 0) enters as log 1 = 0: the part is zero there, so f
    only needs to stay finite; window 0 and a window covering every key stay exact.
    """
    heads = (1, -1) + (1,) * (top.dim() - 2)
    mix = torch.sigmoid(gate.to(top.dtype)).view(heads)
    if balance is None:
        return mix
    if balance.shape != (gate.shape[0], BALANCE_FEATURES):
        raise ValueError(f"balance must have shape ({gate.shape[0]}, {BALANCE_FEATURES}) (heads, features), "
                         f"got {tuple(balance.shape)}")
    weight = balance.to(top.dtype)
    features = balance_features(top, window_mass, linear_mass)
    exponent = sum(weight[:, i].view(heads) * feature for i, feature in enumerate(features))
    return mix * torch.exp(exponent)


def balance_features(top: torch.Tensor, window_mass: torch.Tensor, linear_mass: torch.Tensor) -> tuple:
    """(m_i, log W_i, log L_i), what a balance weighs (`linear_factor`), each shaped like its input; an empty
    part's log enters as log 1 = 0."""
    log_window = torch.log(window_mass.clamp(min=1))  # W_i >= 1 whenever the window holds a key (its max adds 1)
    log_linear = torch.log(torch.where(linear_mass > 0, linear_mass, torch.ones_like(linear_mass)))
    return top, log_window, log_linear


def gated_linear_attention_reference(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    key_mask: torch.Tensor | None,
    causal: bool = True,
) -> torch.Tensor:
    """Decaying linear attention (Liger): S_t = exp(log_decay_t) S_{t-1} + phi_k_t v_t^T, normalized.

    log_decay [B, H, Tk] (<= 0) belongs to the key positions. In closed form key j reaches query position p
    with weight phi_q . phi_k_j * exp(L_p - L_j), L = cumsum(log_decay). A masked position neither
    contributes nor decays the state: padding is invisible, wherever it sits.
    """
    if not causal:
        raise ValueError("gated_linear_attention is causal only; got causal=False")
    out_dtype, dtype = v.dtype, compute_dtype(v.dtype)
    phi_q, phi_k, v, log_decay = phi_q.to(dtype), phi_k.to(dtype), v.to(dtype), log_decay.to(dtype)
    num_queries, num_keys = phi_q.shape[-2], phi_k.shape[-2]
    if key_mask is not None:
        log_decay = log_decay.masked_fill(~key_mask[:, None, :], 0)
    total = log_decay.cumsum(-1)
    total_at_query = total[..., query_positions(num_queries, num_keys, v.device).clamp(min=0)]
    visible = visible_keys(key_mask, True, num_queries, num_keys, v.device)
    exponent = (total_at_query[..., :, None] - total[..., None, :]).masked_fill(~visible, float("-inf"))
    weights = (phi_q @ phi_k.mT) * torch.exp(exponent)
    return _normalized(weights, v, out_dtype)


def bidirectional_gated_linear_attention_reference(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    log_decay_before: torch.Tensor,
    log_decay_after: torch.Tensor,
    key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Decaying linear attention in both directions: every unmasked key, weighed by how far it lies.

    log_decay_before / log_decay_after [B, H, Tk] (<= 0) belong to the key positions. Key j <= p reaches
    query position p with weight phi_q . phi_k_j * exp(sum of log_decay_before over (j, p]), the causal
    form's weight; key j > p with exp(sum of log_decay_after over [p, j)), the same form run backwards in
    time. The query's own key has weight phi_q . phi_k. A masked position neither contributes nor decays,
    as in the causal form.
    """
    out_dtype, dtype = v.dtype, compute_dtype(v.dtype)
    phi_q, phi_k, v = phi_q.to(dtype), phi_k.to(dtype), v.to(dtype)
    before, after = log_decay_before.to(dtype), log_decay_after.to(dtype)
    num_queries, num_keys = phi_q.shape[-2], phi_k.shape[-2]
    if key_mask is not None:
        before, after = (x.masked_fill(~key_mask[:, None, :], 0) for x in (before, after))
    total_before = before.cumsum(-1)
    total_after = after.cumsum(-1) - after  # exclusive: the sum over positions < t
    # A query left of every key (more queries than keys) sits at a negative position: its totals are 0.
    positions = query_positions(num_queries, num_keys, v.device)
    at_query = [torch.where(positions >= 0, t[..., positions.clamp(min=0)], torch.zeros_like(t[..., :1]))
                for t in (total_before, total_after)]
    offset = positions[:, None] - torch.arange(num_keys, device=v.device)  # p - j
    exponent = torch.where(offset >= 0, at_query[0][..., :, None] - total_before[..., None, :],
                           total_after[..., None, :] - at_query[1][..., :, None])
    visible = visible_keys(key_mask, False, num_queries, num_keys, v.device)
    weights = (phi_q @ phi_k.mT) * torch.exp(exponent.masked_fill(~visible, float("-inf")))
    return _normalized(weights, v, out_dtype)
