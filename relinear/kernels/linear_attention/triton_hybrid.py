"""Triton kernels for the sliding-window softmax + gated linear hybrid (LoLCATs), causal and bidirectional.

Forward: `_hybrid_causal_kernel` walks the query chunks in order with the linear state of the keys that
left the window in registers; `_window_kernel` (bidirectional) takes each query tile's band of keys
|i - j| < window, and the linear part as phi_q times the kv totals minus the band's own linear terms.

Backward. With num = A + f N, den = Z + f L (A, Z: the window's softmax sums taken relative to the
window max M; N, L: the linear sums outside the window; f the linear factor, per head or, with a balance,
per query), the gradient reaches each window weight W_ij as omega_ij = dA_i . v_j + dZ_i. The softmax scores
get W_ij omega_ij, minus delta_i = sum_j W_ij omega_ij - dM_i at the key that gave M_i (M is subtracted but
does not cancel, since the linear part is not rescaled; a balance also reads M). The linear part's weights
get dN_i . v_j + dL_i with dN = f dnum and dL = f dden (plus the balance's share through log L): causal, a
shifted causal linear attention that reuses `chunk_scan`; bidirectional, "totals minus the band" again:
d phi_q_i = S^T dN_i + z dL_i - sum_{j in band} (dN_i . v_j + dL_i) phi_k_j with S = sum_j phi_k_j v_j^T,
z = sum_j phi_k_j, and symmetrically for the keys with R = sum_i phi_q_i dN_i^T, r = sum_i phi_q_i dL_i.
The per-query glue (`_output_grads`) is elementwise torch. A tie for a window max sends its gradient to one
key (autograd splits it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from relinear.kernels.linear_attention.chunked import hybrid_attention_chunked
from relinear.kernels.linear_attention.reference import BALANCE_FEATURES, balance_features, linear_factor
from relinear.kernels.linear_attention.triton import (
    check_shapes,
    chunk_scan,
    mask_bytes,
    mma,
    normalization_grads,
    pow2_at_least,
    state_reduce,
    time_tile,
    value_tile,
)


@triton.jit
def _softmax_tile(acc, total, top, scores, in_window, v):
    """One online-softmax step over a key tile: rescale (acc, total) to the new running max `top`."""
    scores = tl.where(in_window, scores, -1e30)
    new_top = tl.maximum(top, tl.max(scores, 1))
    weights = tl.where(in_window, tl.exp(scores - new_top[:, None]), 0.0)
    rescale = tl.exp(top - new_top)
    acc = acc * rescale[:, None] + mma(weights, v)
    total = total * rescale + tl.sum(weights, 1)
    return acc, total, new_top


@triton.jit
def _linear_factor(mix, BALANCE, h, top, total, lin_den, HAS_BALANCE: tl.constexpr):
    """The reference's `linear_factor` for a tile of queries: mix, times exp(balance[h] . (m, log W, log L))."""
    if HAS_BALANCE:
        top = tl.where(total > 0.0, top, 0.0)  # no window key: the reference's m = 0
        exponent = (tl.load(BALANCE + h * 3).to(tl.float32) * top
                    + tl.load(BALANCE + h * 3 + 1).to(tl.float32) * tl.log(tl.maximum(total, 1.0))
                    + tl.load(BALANCE + h * 3 + 2).to(tl.float32) * tl.log(tl.where(lin_den > 0.0, lin_den, 1.0)))
        return mix * tl.exp(exponent)
    return mix + tl.zeros_like(total)


@triton.jit
def _hybrid_causal_kernel(
    Q, K, PQ, PK, V, GATE, BALANCE, MASK, OUT,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    spq_b, spq_h, spq_t, spq_f,
    spk_b, spk_h, spk_t, spk_f,
    sv_b, sv_h, sv_t, sv_d,
    so_b, so_h, so_t, so_d,
    H, TQ, TK, D_DIM, F_DIM, V_DIM, WINDOW, scale,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BALANCE: tl.constexpr,
):
    # Walks query chunks in order. Keys at least WINDOW behind every query of the chunk live in the
    # linear state; the first key tile of a chunk's window straddles the window edge, so it feeds both
    # parts and then joins the state; later tiles are softmax only.
    bh = tl.program_id(0)
    vb = tl.program_id(1)
    b = bh // H
    h = bh % H
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h
    PQ += b * spq_b + h * spq_h
    PK += b * spk_b + h * spk_h
    V += b * sv_b + h * sv_h
    OUT += b * so_b + h * so_h
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_f = tl.arange(0, BLOCK_F)
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    d_ok = offs_d < D_DIM
    f_ok = offs_f < F_DIM
    v_ok = offs_v < V_DIM
    mix = tl.sigmoid(tl.load(GATE + h).to(tl.float32))
    row_off = TK - TQ
    state = tl.zeros([BLOCK_F, BLOCK_V], dtype=tl.float32)
    normalizer = tl.zeros([BLOCK_F], dtype=tl.float32)
    prefix_end = row_off - WINDOW + 1
    for j0 in range(0, prefix_end, BLOCK_T):
        cols = j0 + offs_t
        col_ok = cols < prefix_end
        if HAS_MASK:
            col_ok = col_ok & (tl.load(MASK + b * TK + cols, mask=col_ok, other=0) != 0)
        pk = tl.load(PK + cols[:, None] * spk_t + offs_f[None, :] * spk_f,
                     mask=col_ok[:, None] & f_ok[None, :], other=0.0)
        v = tl.load(V + cols[:, None] * sv_t + offs_v[None, :] * sv_d, mask=col_ok[:, None] & v_ok[None, :],
                    other=0.0)
        state += mma(tl.trans(pk), v)
        normalizer += tl.sum(pk.to(tl.float32), 0)
    for c0 in range(row_off, TK, BLOCK_T):
        pos = c0 + offs_t
        rows = pos - row_off
        row_ok = rows < TQ
        q = tl.load(Q + rows[:, None] * sq_t + offs_d[None, :] * sq_d, mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0)
        pq = tl.load(PQ + rows[:, None] * spq_t + offs_f[None, :] * spq_f,
                     mask=row_ok[:, None] & f_ok[None, :], other=0.0)
        lin_num = mma(pq, state)
        lin_den = tl.sum(pq.to(tl.float32) * normalizer[None, :], 1)
        acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
        total = tl.zeros([BLOCK_T], dtype=tl.float32)
        top = tl.full([BLOCK_T], -1e30, dtype=tl.float32)
        for j0 in range(c0 - WINDOW + 1, c0 + BLOCK_T, BLOCK_T):
            cols = j0 + offs_t
            col_ok = (cols >= 0) & (cols < TK)
            if HAS_MASK:
                col_ok = col_ok & (tl.load(MASK + b * TK + cols, mask=col_ok, other=0) != 0)
            k = tl.load(K + cols[:, None] * sk_t + offs_d[None, :] * sk_d,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(V + cols[:, None] * sv_t + offs_v[None, :] * sv_d,
                        mask=col_ok[:, None] & v_ok[None, :], other=0.0)
            distance = pos[:, None] - cols[None, :]
            in_window = (distance >= 0) & (distance < WINDOW) & col_ok[None, :]
            acc, total, top = _softmax_tile(acc, total, top, mma(q, tl.trans(k)) * scale, in_window, v)
            if j0 == c0 - WINDOW + 1:
                pk = tl.load(PK + cols[:, None] * spk_t + offs_f[None, :] * spk_f,
                             mask=col_ok[:, None] & f_ok[None, :], other=0.0)
                edge = tl.where((distance >= WINDOW) & col_ok[None, :], mma(pq, tl.trans(pk)), 0.0)
                lin_num += mma(edge, v)
                lin_den += tl.sum(edge, 1)
                state += mma(tl.trans(pk), v)
                normalizer += tl.sum(pk.to(tl.float32), 0)
        factor = _linear_factor(mix, BALANCE, h, top, total, lin_den, HAS_BALANCE)
        num = acc + factor[:, None] * lin_num
        den = total + factor * lin_den
        out = tl.where(den[:, None] != 0.0, num / tl.where(den == 0.0, 1.0, den)[:, None], 0.0)
        tl.store(OUT + rows[:, None] * so_t + offs_v[None, :] * so_d, out.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & v_ok[None, :])


def _checked_mask(q, phi_q, phi_k, v, gate, key_mask, window, balance=None):
    """The key mask as bytes, after checking the arguments both directions and passes share."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    check_shapes(phi_q, phi_k, v)
    heads = q.shape[1]
    if gate.shape != (heads,):
        raise ValueError(f"gate must have shape ({heads},), got {tuple(gate.shape)}")
    if balance is not None and balance.shape != (heads, BALANCE_FEATURES):
        raise ValueError(f"balance must have shape ({heads}, {BALANCE_FEATURES}), got {tuple(balance.shape)}")
    return mask_bytes(key_mask, q.shape[0], v.shape[2])


@triton.jit
def _window_scores(Q, K, MASK, b, rows, row_ok, cols, row_off, TK, D_DIM, sq_t, sq_d, sk_t, sk_d, WINDOW, scale,
                   BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """(scaled q.k scores of a query tile against a key tile, which pairs are in the softmax window)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D_DIM
    col_ok = (cols >= 0) & (cols < TK)
    if HAS_MASK:
        col_ok = col_ok & (tl.load(MASK + b * TK + cols, mask=col_ok, other=0) != 0)
    q = tl.load(Q + rows[:, None] * sq_t + offs_d[None, :] * sq_d, mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)
    k = tl.load(K + cols[:, None] * sk_t + offs_d[None, :] * sk_d, mask=col_ok[:, None] & d_ok[None, :],
                other=0.0)
    distance = (rows + row_off)[:, None] - cols[None, :]
    if CAUSAL:
        near = (distance >= 0) & (distance < WINDOW)
    else:
        near = (distance < WINDOW) & (distance > -WINDOW)
    in_window = near & col_ok[None, :] & row_ok[:, None]
    return mma(q, tl.trans(k)) * scale, in_window, q, k


@triton.jit
def _rows(X, rows, row_ok, offs, offs_ok, s_t, s_x):
    """A [rows, offs] tile of a per-head [T, X] tensor, zeros outside."""
    return tl.load(X + rows[:, None] * s_t + offs[None, :] * s_x, mask=row_ok[:, None] & offs_ok[None, :],
                   other=0.0)


@triton.jit
def _head_totals(STATE, NORM, bh, offs_f, f_ok, offs_v, v_ok, F_DIM, V_DIM):
    """(a head's [F, V] totals matrix, its [F] vector) from contiguous fp32 [B*H, F, V] and [B*H, F]."""
    matrix = tl.load(STATE + bh * F_DIM * V_DIM + offs_f[:, None] * V_DIM + offs_v[None, :],
                     mask=f_ok[:, None] & v_ok[None, :], other=0.0)
    return matrix, tl.load(NORM + bh * F_DIM + offs_f, mask=f_ok, other=0.0)


@triton.jit
def _window_kernel(
    Q, K, V, PQ, PK, GATE, BALANCE, MASK, VISIBLE, STATE, NORM, OUT, ACC, TOTAL, TOP, ARG, LIN, LIN_DEN,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    spq_b, spq_h, spq_t, spq_f,
    spk_b, spk_h, spk_t, spk_f,
    H, TQ, TK, D_DIM, F_DIM, V_DIM, WINDOW, scale,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, STATS: tl.constexpr, HAS_BALANCE: tl.constexpr,
):
    """A query tile's window softmax A (ACC), Z (TOTAL) relative to the window max M (TOP), M's key (ARG, -1 if
    none). Bidirectional, also the linear part outside the window, N (LIN) and L (LIN_DEN) = phi_q times the
    kv totals (STATE, NORM) minus the band's linear terms, and the output (OUT) unless STATS are wanted.
    Causal, only the statistics: the caller adds the linear part by a chunk scan.

    A query whose band holds every visible key (VISIBLE per batch row, TK without a mask) gets N = L = 0
    exactly, as in the reference: totals minus band leaves rounding noise there, and a balance reads log L,
    so the noise would set the linear factor (measured: relative error 2.4e-3 at T = 65, window 64)."""
    bh = tl.program_id(0)
    vb = tl.program_id(2)
    b = bh // H
    h = bh % H
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    PQ += b * spq_b + h * spq_h
    PK += b * spk_b + h * spk_h
    row_off = TK - TQ
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < TQ
    offs_f = tl.arange(0, BLOCK_F)
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    f_ok = offs_f < F_DIM
    v_ok = offs_v < V_DIM
    acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    total = tl.zeros([BLOCK_T], dtype=tl.float32)
    top = tl.full([BLOCK_T], -1e30, dtype=tl.float32)
    arg = tl.full([BLOCK_T], -1, dtype=tl.int32)
    first = tl.program_id(1) * BLOCK_T + row_off
    if CAUSAL:
        last = first + BLOCK_T
    else:
        last = first + BLOCK_T + WINDOW - 1
        pq = _rows(PQ, rows, row_ok, offs_f, f_ok, spq_t, spq_f)
        totals, normalizer = _head_totals(STATE, NORM, bh, offs_f, f_ok, offs_v, v_ok, F_DIM, V_DIM)
        lin = mma(pq, totals)
        lin_den = tl.sum(pq.to(tl.float32) * normalizer[None, :], 1)
        in_band = tl.zeros([BLOCK_T], dtype=tl.int32)
    for j0 in range(first - WINDOW + 1, last, BLOCK_T):
        cols = j0 + tl.arange(0, BLOCK_T)
        scores, in_window, q, k = _window_scores(Q, K, MASK, b, rows, row_ok, cols, row_off, TK, D_DIM,
                                                 sq_t, sq_d, sk_t, sk_d, WINDOW, scale, BLOCK_D, HAS_MASK, CAUSAL)
        col_in = (cols >= 0) & (cols < TK)
        v = _rows(V, cols, col_in, offs_v, v_ok, sv_t, sv_d)
        if STATS:
            masked = tl.where(in_window, scores, -1e30)
            arg = tl.where(tl.max(masked, 1) > top, j0 + tl.argmax(masked, 1).to(tl.int32), arg)
        if not CAUSAL:
            band = tl.where(in_window, mma(pq, tl.trans(_rows(PK, cols, col_in, offs_f, f_ok, spk_t, spk_f))), 0.0)
            lin -= mma(band, v)
            lin_den -= tl.sum(band, 1)
            in_band += tl.sum(in_window.to(tl.int32), 1)
        acc, total, top = _softmax_tile(acc, total, top, scores, in_window, v)
    if not CAUSAL:
        if HAS_MASK:
            visible = tl.load(VISIBLE + b)
        else:
            visible = TK
        lin = tl.where((in_band == visible)[:, None], 0.0, lin)
        lin_den = tl.where(in_band == visible, 0.0, lin_den)
    stat = bh * TQ + rows
    per_value = stat[:, None] * V_DIM + offs_v[None, :]
    value_ok = row_ok[:, None] & v_ok[None, :]
    if STATS:
        tl.store(ACC + per_value, acc, mask=value_ok)
        if not CAUSAL:
            tl.store(LIN + per_value, lin, mask=value_ok)
        if vb == 0:
            tl.store(TOTAL + stat, total, mask=row_ok)
            tl.store(TOP + stat, top, mask=row_ok)
            tl.store(ARG + stat, arg, mask=row_ok)
            if not CAUSAL:
                tl.store(LIN_DEN + stat, lin_den, mask=row_ok)
    else:
        mix = tl.sigmoid(tl.load(GATE + h).to(tl.float32))
        factor = _linear_factor(mix, BALANCE, h, top, total, lin_den, HAS_BALANCE)
        num = acc + factor[:, None] * lin
        den = total + factor * lin_den
        out = tl.where(den[:, None] != 0.0, num / tl.where(den == 0.0, 1.0, den)[:, None], 0.0)
        tl.store(OUT + per_value, out.to(OUT.dtype.element_ty), mask=value_ok)


def _window_layout(q, k, v, phi_q, phi_k, window, scale):
    """The strides and sizes `_window_kernel` and `_window_grad_kernel` share, in their order."""
    batch, heads, tq, d_dim = q.shape
    return (*q.stride(), *k.stride(), *v.stride(), *phi_q.stride(), *phi_k.stride(),
            heads, tq, k.shape[2], d_dim, phi_q.shape[3], v.shape[3], window, float(scale))


def _window_pass(q, k, v, phi_q, phi_k, gate, mask, causal, window, scale, chunk_size, totals=(None, None),
                 stats=False, balance=None):
    """Runs `_window_kernel`: the output in v's dtype, or (stats=True) the fp32 statistics
    (acc, total, top, arg, lin, lin_den), the last two None when causal."""
    batch, heads, tq, d_dim = q.shape
    v_dim = v.shape[3]
    f32 = dict(device=v.device, dtype=torch.float32)
    out = None if stats else torch.empty(batch, heads, tq, v_dim, device=v.device, dtype=v.dtype)
    acc = lin = total = top = lin_den = arg = None
    if stats:
        acc, total, top = (torch.empty(batch, heads, tq, *tail, **f32) for tail in ((v_dim,), (), ()))
        arg = torch.empty(batch, heads, tq, device=v.device, dtype=torch.int32)
        if not causal:
            lin, lin_den = torch.empty_like(acc), torch.empty_like(total)
    block_t, block_v = time_tile(chunk_size), value_tile(v_dim)
    grid = (batch * heads, triton.cdiv(tq, block_t), triton.cdiv(v_dim, block_v))
    visible = None if causal or mask is None else mask.sum(-1, dtype=torch.int32)  # visible keys per row
    _window_kernel[grid](
        q, k, v, phi_q, phi_k, gate, balance, mask, visible, *totals, out, acc, total, top, arg, lin, lin_den,
        *_window_layout(q, k, v, phi_q, phi_k, window, scale),
        BLOCK_T=block_t, BLOCK_D=pow2_at_least(d_dim), BLOCK_F=pow2_at_least(phi_q.shape[3]), BLOCK_V=block_v,
        HAS_MASK=mask is not None, CAUSAL=causal, STATS=stats, HAS_BALANCE=balance is not None,
    )
    return (acc, total, top, arg, lin, lin_den) if stats else out


def hybrid_attention_cuda(q, k, v, phi_q, phi_k, gate, key_mask, causal, window, scale, chunk_size, sinks=0,
                          balance=None):
    """Sliding-window softmax + gated linear attention, one joint normalization (see the reference), the
    linear part weighed per query when a `balance` is given.

    Attention sinks have no kernel yet: with sinks > 0 the chunked torch form runs (on the GPU, unfused)."""
    if sinks:
        return hybrid_attention_chunked(q, k, v, phi_q, phi_k, gate, key_mask, causal, window, scale, chunk_size,
                                        sinks, balance)
    mask = _checked_mask(q, phi_q, phi_k, v, gate, key_mask, window, balance)
    balance = None if balance is None else balance.contiguous()  # the kernels index it as [H, 3] rows
    if not causal:
        totals = state_reduce(phi_k, v, mask=mask)
        return _window_pass(q, k, v, phi_q, phi_k, gate, mask, False, window, scale, chunk_size, totals,
                            balance=balance)
    batch, heads, tq, d_dim = q.shape
    tk, f_dim, v_dim = k.shape[2], phi_q.shape[3], v.shape[3]
    out = torch.empty(batch, heads, tq, v_dim, device=v.device, dtype=v.dtype)
    block_v = value_tile(v_dim)
    grid = (batch * heads, triton.cdiv(v_dim, block_v))
    _hybrid_causal_kernel[grid](
        q, k, phi_q, phi_k, v, gate, balance, mask, out,
        *q.stride(), *k.stride(), *phi_q.stride(), *phi_k.stride(), *v.stride(), *out.stride(),
        heads, tq, tk, d_dim, f_dim, v_dim, window, float(scale),
        BLOCK_T=time_tile(chunk_size), BLOCK_D=pow2_at_least(d_dim), BLOCK_F=pow2_at_least(f_dim),
        BLOCK_V=block_v, HAS_MASK=mask is not None, HAS_BALANCE=balance is not None,
    )
    return out


@triton.jit
def _window_grad_kernel(
    Q, K, V, PQ, PK, MASK, TOP, ARG, DNUM, DDEN, DELTA, LNUM, LDEN, STATE, NORM, DQ, DK, DV, DPQ, DPK,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    spq_b, spq_h, spq_t, spq_f,
    spk_b, spk_h, spk_t, spk_f,
    H, TQ, TK, D_DIM, F_DIM, V_DIM, WINDOW, scale,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, FOR_KEYS: tl.constexpr,
):
    """Gradients through the window: dq of a query tile (FOR_KEYS off), else dk and dv of a key tile.
    DNUM, DDEN are the gradients of the window's sums (A, Z), LNUM, LDEN those of the linear part's (N, L),
    which already carry the linear factor. Bidirectional, also the linear part's own: d phi_q (d phi_k, and its
    share of dv) = totals - band terms, with totals from STATE, NORM = (S, z) for queries, (R, r) for keys."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    PQ += b * spq_b + h * spq_h
    PK += b * spk_b + h * spk_h
    row_off = TK - TQ
    tile = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_f = tl.arange(0, BLOCK_F)
    offs_v = tl.arange(0, BLOCK_V)
    d_ok = offs_d < D_DIM
    f_ok = offs_f < F_DIM
    v_ok = offs_v < V_DIM
    grad_q = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    grad_k = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    grad_v = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    band_features = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
    band_v = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    if CAUSAL:
        after = 0
    else:
        after = WINDOW - 1
    if FOR_KEYS:
        # queries at positions (j - WINDOW, j + after] see key j
        lo = tl.program_id(1) * BLOCK_T - row_off - after
        hi = tl.program_id(1) * BLOCK_T - row_off + BLOCK_T + WINDOW - 1
    else:
        lo = tl.program_id(1) * BLOCK_T + row_off - WINDOW + 1
        hi = tl.program_id(1) * BLOCK_T + row_off + BLOCK_T + after
    for start in range(lo, hi, BLOCK_T):
        if FOR_KEYS:
            rows = start + tl.arange(0, BLOCK_T)
            cols = tile
        else:
            rows = tile
            cols = start + tl.arange(0, BLOCK_T)
        row_ok = (rows >= 0) & (rows < TQ)
        col_in = (cols >= 0) & (cols < TK)
        scores, in_window, q, k = _window_scores(Q, K, MASK, b, rows, row_ok, cols, row_off, TK, D_DIM,
                                                 sq_t, sq_d, sk_t, sk_d, WINDOW, scale, BLOCK_D, HAS_MASK, CAUSAL)
        v = _rows(V, cols, col_in, offs_v, v_ok, sv_t, sv_d)
        stat = bh * TQ + rows
        top = tl.load(TOP + stat, mask=row_ok, other=0.0)
        arg = tl.load(ARG + stat, mask=row_ok, other=-1)
        d_num = tl.load(DNUM + stat[:, None] * V_DIM + offs_v[None, :], mask=row_ok[:, None] & v_ok[None, :],
                        other=0.0)
        d_den = tl.load(DDEN + stat, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + stat, mask=row_ok, other=0.0)
        weights = tl.where(in_window, tl.exp(tl.where(in_window, scores - top[:, None], 0.0)), 0.0)
        omega = mma(d_num, tl.trans(v)) + d_den[:, None]
        d_scores = weights * omega - tl.where(in_window & (cols[None, :] == arg[:, None]), delta[:, None], 0.0)
        if FOR_KEYS:
            grad_k += mma(tl.trans(d_scores), q) * scale
            grad_v += mma(tl.trans(weights), d_num)
        else:
            grad_q += mma(d_scores, k) * scale
        if not CAUSAL:
            l_num = tl.load(LNUM + stat[:, None] * V_DIM + offs_v[None, :], mask=row_ok[:, None] & v_ok[None, :],
                            other=0.0)
            l_den = tl.load(LDEN + stat, mask=row_ok, other=0.0)
            band_omega = tl.where(in_window, mma(l_num, tl.trans(v)) + l_den[:, None], 0.0)
            pq = _rows(PQ, rows, row_ok, offs_f, f_ok, spq_t, spq_f)
            pk = _rows(PK, cols, col_in, offs_f, f_ok, spk_t, spk_f)
            if FOR_KEYS:
                band_features += mma(tl.trans(band_omega), pq)
                band_v += mma(tl.trans(tl.where(in_window, mma(pq, tl.trans(pk)), 0.0)), l_num)
            else:
                band_features += mma(band_omega, pk)
    if not CAUSAL:
        totals, normalizer = _head_totals(STATE, NORM, bh, offs_f, f_ok, offs_v, v_ok, F_DIM, V_DIM)
    if FOR_KEYS:
        key_ok = tile < TK
        per_key = bh * TK + tile
        if not CAUSAL:
            if HAS_MASK:
                key_ok = key_ok & (tl.load(MASK + b * TK + tile, mask=key_ok, other=0) != 0)
            v_tile = _rows(V, tile, key_ok, offs_v, v_ok, sv_t, sv_d)
            pk_tile = _rows(PK, tile, key_ok, offs_f, f_ok, spk_t, spk_f)
            d_pk = mma(v_tile, tl.trans(totals)) + normalizer[None, :] - band_features
            tl.store(DPK + per_key[:, None] * F_DIM + offs_f[None, :], tl.where(key_ok[:, None], d_pk, 0.0),
                     mask=(tile < TK)[:, None] & f_ok[None, :])
            grad_v += mma(pk_tile, totals) - band_v
        tl.store(DK + per_key[:, None] * D_DIM + offs_d[None, :], grad_k, mask=(tile < TK)[:, None] & d_ok[None, :])
        tl.store(DV + per_key[:, None] * V_DIM + offs_v[None, :], grad_v, mask=(tile < TK)[:, None] & v_ok[None, :])
    else:
        query_ok = tile < TQ
        per_query = bh * TQ + tile
        if not CAUSAL:
            l_num = tl.load(LNUM + per_query[:, None] * V_DIM + offs_v[None, :],
                            mask=query_ok[:, None] & v_ok[None, :], other=0.0)
            l_den = tl.load(LDEN + per_query, mask=query_ok, other=0.0)
            d_pq = mma(l_num, tl.trans(totals)) + l_den[:, None] * normalizer[None, :] - band_features
            tl.store(DPQ + per_query[:, None] * F_DIM + offs_f[None, :], d_pq, mask=query_ok[:, None] & f_ok[None, :])
        tl.store(DQ + per_query[:, None] * D_DIM + offs_d[None, :], grad_q, mask=query_ok[:, None] & d_ok[None, :])


def hybrid_attention_backward_cuda(grad_out, q, k, v, phi_q, phi_k, gate, key_mask, causal, window, scale,
                                   chunk_size, sinks=0, balance=None):
    """The gradients of `hybrid_attention_cuda`, one per tensor input in order: (dq, dk, dv, d phi_q, d phi_k,
    d gate[, None for key_mask][, d balance]). Triton throughout (window statistics, the window's gradients,
    the linear part's), with elementwise torch glue in between; with sinks, autograd through the chunked
    torch form (no sink kernel yet)."""
    if sinks:
        inputs = [x.detach().requires_grad_() for x in (q, k, v, phi_q, phi_k, gate)]
        tuned = None if balance is None else balance.detach().requires_grad_()
        with torch.enable_grad():
            out = hybrid_attention_chunked(*inputs, key_mask, causal, window, scale, chunk_size, sinks, tuned)
        grads = list(torch.autograd.grad(out, inputs + ([tuned] if tuned is not None else []), grad_out,
                                         allow_unused=True))
        return _per_input(grads[:6], key_mask, grads[6] if tuned is not None else None)
    mask = _checked_mask(q, phi_q, phi_k, v, gate, key_mask, window, balance)
    batch, heads, tq, d_dim = q.shape
    tk, f_dim, v_dim = k.shape[2], phi_q.shape[3], v.shape[3]
    if causal and tk < tq:
        raise ValueError(f"the causal hybrid backward needs at least as many keys ({tk}) as queries ({tq})")
    kv_totals = (None, None) if causal else state_reduce(phi_k, v, mask=mask)
    acc, total, top, arg, lin, lin_den = _window_pass(q, k, v, phi_q, phi_k, gate, mask, causal, window, scale,
                                                      chunk_size, kv_totals, stats=True)
    # causal: the linear part sees keys at least `window` behind, a causal scan with queries shifted back by it
    lin_off = tk - tq - window
    scan = dict(chunk_size=chunk_size, mask=mask, out_dtype=torch.float32)
    if causal:
        with_ones = torch.cat([v.float(), torch.ones_like(v[..., :1], dtype=torch.float32)], -1)
        linear, _ = chunk_scan(phi_q, phi_k, with_ones, row_off=lin_off, reverse=False, **scan)
        lin, lin_den = linear[..., :-1], linear[..., -1]
    grads = _output_grads(grad_out, gate, balance, acc, total, top, lin, lin_den)
    d_num, d_window_sum, delta, d_linear_num, d_linear_sum, d_gate, d_balance = grads

    f32 = dict(device=v.device, dtype=torch.float32)
    dq, dk, dv = (torch.empty(batch, heads, length, dim, **f32) for length, dim in ((tq, d_dim), (tk, d_dim),
                                                                                  (tk, v_dim)))
    d_phi_q, d_phi_k = (None, None) if causal else (torch.empty(*x.shape, **f32) for x in (phi_q, phi_k))
    query_totals = (None, None) if causal else state_reduce(phi_q, d_linear_num, s=d_linear_sum)
    block_t = time_tile(chunk_size)
    layout = _window_layout(q, k, v, phi_q, phi_k, window, scale)
    blocks = dict(BLOCK_T=block_t, BLOCK_D=pow2_at_least(d_dim), BLOCK_F=pow2_at_least(f_dim),
                  BLOCK_V=pow2_at_least(v_dim), HAS_MASK=mask is not None, CAUSAL=causal)
    for for_keys, length, totals in ((False, tq, kv_totals), (True, tk, query_totals)):
        _window_grad_kernel[(batch * heads, triton.cdiv(length, block_t))](
            q, k, v, phi_q, phi_k, mask, top, arg, d_num, d_window_sum, delta, d_linear_num, d_linear_sum, *totals,
            dq, dk, dv, d_phi_q, d_phi_k, *layout, **blocks, FOR_KEYS=for_keys)
    if causal:
        d_phi_q, _ = chunk_scan(d_linear_num, v, phi_k, row_off=lin_off, reverse=False, s=d_linear_sum, **scan)
        d_phi_k, _ = chunk_scan(v, d_linear_num, phi_q, row_off=-lin_off, reverse=True, t=d_linear_sum,
                                key_rows=True, **scan)
        dv_linear, _ = chunk_scan(phi_k, phi_q, d_linear_num, row_off=-lin_off, reverse=True, key_rows=True,
                                  **scan)
        dv = dv + dv_linear
    grads = [dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), d_phi_q.to(phi_q.dtype), d_phi_k.to(phi_k.dtype),
             d_gate.to(gate.dtype)]
    return _per_input(grads, key_mask, None if balance is None else d_balance.to(balance.dtype))


def _per_input(grads, key_mask, d_balance):
    """The six gradients, then a None for the key mask and the balance's gradient, as far as they are inputs."""
    if d_balance is None:
        return tuple(grads)
    return (*grads, *([None] if key_mask is not None else []), d_balance)


def _output_grads(grad_out, gate, balance, acc, total, top, lin, lin_den):
    """From the window's statistics (A, Z, M) and the linear sums (N, L), all fp32: the gradients of the
    window's sums (d A, d Z), delta (what the window max M passes to its key, negated), those of the linear
    sums (d N, d L), d gate and d balance (None without one).

    out = (A + f N) / (Z + f L), log f = log sigmoid(gate) + b . (m, log Z, log L) (`linear_factor`), so with
    e = (d num . N + d den L) f, the gradient of log f: d gate = sum e (1 - sigmoid(gate)), d b = sum e
    (m, log Z, log L), and the balance adds e b_1 / Z to d Z, e b_2 / L to d L and e b_0 to d M (each only
    where its feature is not the log 1 = 0 stand-in)."""
    seen_window, seen_linear = total > 0, lin_den > 0
    top = torch.where(seen_window, top, 0.0)  # no window key: the reference's m = 0
    factor = linear_factor(gate.float(), None if balance is None else balance.float(), top[..., None],
                           total[..., None], lin_den[..., None])[..., 0].expand_as(total)
    num = acc + factor[..., None] * lin
    den = total + factor * lin_den
    d_num, d_den = normalization_grads(grad_out, num / torch.where(den == 0, 1.0, den)[..., None], den)
    d_log_factor = ((d_num * lin).sum(-1) + d_den * lin_den) * factor
    d_gate = d_log_factor.sum((0, 2)) * (1 - torch.sigmoid(gate.float()))
    d_window_sum, d_linear_sum, d_top, d_balance = d_den, factor * d_den, 0.0, None
    if balance is not None:
        features = balance_features(top, total, lin_den)
        d_balance = torch.stack([(d_log_factor * feature).sum((0, 2)) for feature in features], -1)
        weight = [d_log_factor * balance.float()[:, i, None] for i in range(BALANCE_FEATURES)]
        d_top = torch.where(seen_window, weight[0], 0.0)
        d_window_sum = d_den + torch.where(seen_window, weight[1] / torch.where(seen_window, total, 1.0), 0.0)
        d_linear_sum = d_linear_sum + torch.where(seen_linear, weight[2] / torch.where(seen_linear, lin_den, 1.0),
                                                  0.0)
    delta = (d_num * acc).sum(-1) + d_window_sum * total - d_top
    return (d_num, d_window_sum.contiguous(), delta.contiguous(), (factor[..., None] * d_num).contiguous(),
            d_linear_sum.contiguous(), d_gate, d_balance)
