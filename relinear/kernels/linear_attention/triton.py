"""Triton kernels for normalized linear attention: causal (chunked scan), bidirectional, hybrid, decode step.

All kernels accumulate in fp32 and keep the running kv-state in registers, so no [T, F, Dv] tensor ever
reaches HBM. Two kernel families cover forward and backward:

* `_chunk_scan_kernel` computes o_i = sum_{j visible} (a_i . b_j + s_i t_j) c_j, optionally divided by
  sum_{j visible} a_i . b_j, where "visible" is causal (j <= i) or anti-causal (j >= i) on an absolute
  time axis that places queries at the END of keys. The causal forward and the three causal gradients
  (dq, dk, dv) are all of this form with different roles for (a, b, c, s, t).
* `_state_reduce_kernel` / `_state_apply_kernel` compute S = sum_t a_t c_t^T (and z = sum_t a_t s_t), then
  o_t = a_t S + c_t u, optionally normalized: the bidirectional forward and its gradients.

Besides these: `_hybrid_causal_kernel` (sliding-window softmax + gated linear part, one normalization),
the decay variant of the chunk scan (gated linear attention) and `_step_kernel` (one decode step).

The chunk size of the op is only a tiling choice here (the result does not depend on it); it is clamped
to a power of two in [16, 128] as `tl.dot` needs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton 3.9's interpreter returns garbage for bf16 `tl.dot`; under it, dots run in fp32 instead.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def mma(a, b):
    """`tl.dot` accumulating in fp32; operands of different dtypes (or under the interpreter) go as fp32."""
    if _INTERPRETED or a.dtype != b.dtype:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b)


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


def _tile(chunk_size: int) -> int:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return min(128, _pow2_at_least(chunk_size))


def _value_tile(dim: int) -> int:
    return min(64, _pow2_at_least(dim))


@triton.jit
def _chunk_scan_kernel(
    A, B, C, S, T, DECAY, MASK, OUT, DEN,
    sa_b, sa_h, sa_t, sa_f,
    sb_b, sb_h, sb_t, sb_f,
    sc_b, sc_h, sc_t, sc_d,
    so_b, so_h, so_t, so_d,
    H, ROWS, COLS, ROW_OFF, COL_OFF, F_DIM, V_DIM, MASK_LEN,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr,
    REVERSE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_S: tl.constexpr, HAS_T: tl.constexpr,
    MASK_COLS: tl.constexpr, MASK_ROWS: tl.constexpr, HAS_DECAY: tl.constexpr,
):
    # rows: the outputs (a, s); cols: what they attend to (b, t, c); MASK indexes the key axis, which is
    # the col axis in the forward and dq, the row axis in dk and dv.
    bh = tl.program_id(0)
    vb = tl.program_id(1)
    b = bh // H
    h = bh % H
    A += b * sa_b + h * sa_h
    B += b * sb_b + h * sb_h
    C += b * sc_b + h * sc_h
    OUT += b * so_b + h * so_h
    offs_t = tl.arange(0, BLOCK_T)
    offs_f = tl.arange(0, BLOCK_F)
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    f_ok = offs_f < F_DIM
    v_ok = offs_v < V_DIM
    if REVERSE:
        visible = offs_t[:, None] <= offs_t[None, :]
    else:
        visible = offs_t[:, None] >= offs_t[None, :]
    state = tl.zeros([BLOCK_F, BLOCK_V], dtype=tl.float32)
    normalizer = tl.zeros([BLOCK_F], dtype=tl.float32)
    scalar_state = tl.zeros([BLOCK_V], dtype=tl.float32)
    start = tl.minimum(ROW_OFF, COL_OFF)
    n_chunks = tl.cdiv(tl.maximum(ROW_OFF + ROWS, COL_OFF + COLS) - start, BLOCK_T)
    for it in range(0, n_chunks):
        if REVERSE:
            chunk = n_chunks - 1 - it
        else:
            chunk = it
        pos = start + chunk * BLOCK_T + offs_t
        rows = pos - ROW_OFF
        cols = pos - COL_OFF
        row_ok = (rows >= 0) & (rows < ROWS)
        col_ok = (cols >= 0) & (cols < COLS)
        if MASK_COLS:
            col_ok = col_ok & (tl.load(MASK + b * MASK_LEN + cols, mask=col_ok, other=0) != 0)
        a = tl.load(A + rows[:, None] * sa_t + offs_f[None, :] * sa_f,
                    mask=row_ok[:, None] & f_ok[None, :], other=0.0)
        bk = tl.load(B + cols[:, None] * sb_t + offs_f[None, :] * sb_f,
                     mask=col_ok[:, None] & f_ok[None, :], other=0.0)
        c = tl.load(C + cols[:, None] * sc_t + offs_v[None, :] * sc_d,
                    mask=col_ok[:, None] & v_ok[None, :], other=0.0)
        scores = mma(a, tl.trans(bk))
        carried = mma(a, state)
        carried_den = tl.sum(a.to(tl.float32) * normalizer[None, :], 1)
        if HAS_DECAY:
            # decay from key j to query i is exp(l_i - l_j) inside the chunk, exp(l_i) from the chunk start
            step_decay = tl.load(DECAY + bh * COLS + cols, mask=col_ok, other=0.0).to(tl.float32)
            log_decay = tl.cumsum(step_decay, 0)
            scores *= tl.exp(tl.where(visible, log_decay[:, None] - log_decay[None, :], 0.0))
            carried *= tl.exp(log_decay)[:, None]
            carried_den *= tl.exp(log_decay)
        if HAS_S or HAS_T:
            if HAS_S:
                s = tl.load(S + bh * ROWS + rows, mask=row_ok, other=0.0)
            else:
                s = row_ok.to(tl.float32)
            if HAS_T:
                t = tl.load(T + bh * COLS + cols, mask=col_ok, other=0.0)
            else:
                t = col_ok.to(tl.float32)
            scores += s[:, None] * t[None, :]
        scores = tl.where(visible, scores, 0.0)
        out = mma(scores, c) + carried
        if NORMALIZE:
            # scores has only the a.b term here (HAS_S/HAS_T are off for the normalized forward)
            den = tl.sum(scores, 1) + carried_den
        if HAS_S or HAS_T:
            out += s[:, None] * scalar_state[None, :]
            scalar_state += tl.sum(t[:, None] * c.to(tl.float32), 0)
        if NORMALIZE:
            out = tl.where(den[:, None] != 0.0, out / tl.where(den == 0.0, 1.0, den)[:, None], 0.0)
            if vb == 0:
                tl.store(DEN + bh * ROWS + rows, den, mask=row_ok)
        if HAS_DECAY:
            # move the state to the chunk's end: keys decay by exp(l_end - l_j) <= 1, the state by exp(l_end)
            chunk_total = tl.sum(step_decay, 0)
            bk = bk.to(tl.float32) * tl.exp(chunk_total - log_decay)[:, None]
            state *= tl.exp(chunk_total)
            normalizer *= tl.exp(chunk_total)
        if NORMALIZE:
            normalizer += tl.sum(bk.to(tl.float32), 0)
        store_ok = row_ok
        if MASK_ROWS:
            store_ok = store_ok & (tl.load(MASK + b * MASK_LEN + rows, mask=row_ok, other=0) != 0)
            out = tl.where(store_ok[:, None], out, 0.0)
        tl.store(OUT + rows[:, None] * so_t + offs_v[None, :] * so_d, out.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & v_ok[None, :])
        state += mma(tl.trans(bk), c)


def _mask_bytes(key_mask: torch.Tensor | None, batch: int, keys: int) -> torch.Tensor | None:
    if key_mask is None:
        return None
    if key_mask.shape != (batch, keys):
        raise ValueError(f"key_mask must have shape {(batch, keys)}, got {tuple(key_mask.shape)}")
    return key_mask.to(torch.uint8).contiguous()


def _chunk_scan(
    a, b, c, *, row_off: int, reverse: bool, chunk_size: int, mask=None, mask_rows: bool = False,
    s=None, t=None, log_decay=None, normalize: bool = False, out_dtype=None,
):
    """o = chunked (anti-)causal sum over cols of (a.b + s t) c; returns (o, den or None)."""
    batch, heads, rows, f_dim = a.shape
    cols, v_dim = c.shape[2], c.shape[3]
    out = torch.empty(batch, heads, rows, v_dim, device=a.device, dtype=out_dtype or c.dtype)
    den = torch.empty(batch, heads, rows, device=a.device, dtype=torch.float32) if normalize else None
    block_v = _value_tile(v_dim)
    grid = (batch * heads, triton.cdiv(v_dim, block_v))
    _chunk_scan_kernel[grid](
        a, b, c, s, t, log_decay, mask, out, den,
        *a.stride(), *b.stride(), *c.stride(), *out.stride(),
        heads, rows, cols, row_off, 0, f_dim, v_dim, mask.shape[1] if mask is not None else 0,
        BLOCK_T=_tile(chunk_size), BLOCK_F=_pow2_at_least(f_dim), BLOCK_V=block_v,
        REVERSE=reverse, NORMALIZE=normalize, HAS_S=s is not None, HAS_T=t is not None,
        MASK_COLS=mask is not None and not mask_rows, MASK_ROWS=mask is not None and mask_rows,
        HAS_DECAY=log_decay is not None,
    )
    return out, den


@triton.jit
def _state_reduce_kernel(
    A, C, S, MASK, STATE, NORM,
    sa_b, sa_h, sa_t, sa_f,
    sc_b, sc_h, sc_t, sc_d,
    H, LENGTH, F_DIM, V_DIM,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_S: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """STATE[f, v] = sum_t a[t, f] c[t, v]; NORM[f] = sum_t a[t, f] s[t] (masked t dropped)."""
    bh = tl.program_id(0)
    fb = tl.program_id(1)
    vb = tl.program_id(2)
    b = bh // H
    h = bh % H
    A += b * sa_b + h * sa_h
    C += b * sc_b + h * sc_h
    offs_t = tl.arange(0, BLOCK_T)
    offs_f = fb * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    f_ok = offs_f < F_DIM
    v_ok = offs_v < V_DIM
    state = tl.zeros([BLOCK_F, BLOCK_V], dtype=tl.float32)
    norm = tl.zeros([BLOCK_F], dtype=tl.float32)
    for t0 in range(0, LENGTH, BLOCK_T):
        t_idx = t0 + offs_t
        t_ok = t_idx < LENGTH
        if HAS_MASK:
            t_ok = t_ok & (tl.load(MASK + b * LENGTH + t_idx, mask=t_ok, other=0) != 0)
        a = tl.load(A + t_idx[:, None] * sa_t + offs_f[None, :] * sa_f, mask=t_ok[:, None] & f_ok[None, :],
                    other=0.0)
        c = tl.load(C + t_idx[:, None] * sc_t + offs_v[None, :] * sc_d, mask=t_ok[:, None] & v_ok[None, :],
                    other=0.0)
        state += mma(tl.trans(a), c)
        if HAS_S:
            s = tl.load(S + bh * LENGTH + t_idx, mask=t_ok, other=0.0)
        else:
            s = t_ok.to(tl.float32)
        norm += tl.sum(a.to(tl.float32) * s[:, None], 0)
    tl.store(STATE + bh * F_DIM * V_DIM + offs_f[:, None] * V_DIM + offs_v[None, :], state,
             mask=f_ok[:, None] & v_ok[None, :])
    if vb == 0:
        tl.store(NORM + bh * F_DIM + offs_f, norm, mask=f_ok)


def _state_reduce(a, c, *, mask=None, s=None, block_t: int = 64):
    """(sum_t a_t c_t^T [B,H,F,Dv], sum_t a_t s_t [B,H,F]) in fp32, masked rows of a/c dropped."""
    batch, heads, length, f_dim = a.shape
    v_dim = c.shape[3]
    state = torch.empty(batch, heads, f_dim, v_dim, device=a.device, dtype=torch.float32)
    norm = torch.empty(batch, heads, f_dim, device=a.device, dtype=torch.float32)
    block_f, block_v = _value_tile(f_dim), _value_tile(v_dim)
    grid = (batch * heads, triton.cdiv(f_dim, block_f), triton.cdiv(v_dim, block_v))
    _state_reduce_kernel[grid](
        a, c, s, mask, state, norm, *a.stride(), *c.stride(), heads, length, f_dim, v_dim,
        BLOCK_T=block_t, BLOCK_F=block_f, BLOCK_V=block_v, HAS_S=s is not None, HAS_MASK=mask is not None,
    )
    return state, norm


@triton.jit
def _state_apply_kernel(
    A, M, C, U, Z, MASK, OUT, DEN,
    sa_b, sa_h, sa_t, sa_f,
    sm_bh, sm_f, sm_d,
    so_b, so_h, so_t, so_d,
    H, LENGTH, F_DIM, V_DIM,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_C: tl.constexpr, NORMALIZE: tl.constexpr, MASK_ROWS: tl.constexpr,
):
    """o_t = a_t M + c_t u (u: [V]); with NORMALIZE, o_t /= a_t . z (zero where that is zero)."""
    bh = tl.program_id(0)
    tb = tl.program_id(1)
    vb = tl.program_id(2)
    b = bh // H
    h = bh % H
    A += b * sa_b + h * sa_h
    M += bh * sm_bh
    OUT += b * so_b + h * so_h
    t_idx = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    t_ok = t_idx < LENGTH
    v_ok = offs_v < V_DIM
    out = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    den = tl.zeros([BLOCK_T], dtype=tl.float32)
    for f0 in range(0, F_DIM, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        f_ok = offs_f < F_DIM
        a = tl.load(A + t_idx[:, None] * sa_t + offs_f[None, :] * sa_f, mask=t_ok[:, None] & f_ok[None, :],
                    other=0.0)
        m = tl.load(M + offs_f[:, None] * sm_f + offs_v[None, :] * sm_d, mask=f_ok[:, None] & v_ok[None, :],
                    other=0.0)
        out += mma(a, m)
        if NORMALIZE:
            z = tl.load(Z + bh * F_DIM + offs_f, mask=f_ok, other=0.0)
            den += tl.sum(a.to(tl.float32) * z[None, :], 1)
    if HAS_C:
        c = tl.load(C + bh * LENGTH + t_idx, mask=t_ok, other=0.0)
        u = tl.load(U + bh * V_DIM + offs_v, mask=v_ok, other=0.0)
        out += c[:, None] * u[None, :]
    if NORMALIZE:
        out = tl.where(den[:, None] != 0.0, out / tl.where(den == 0.0, 1.0, den)[:, None], 0.0)
        if vb == 0:
            tl.store(DEN + bh * LENGTH + t_idx, den, mask=t_ok)
    if MASK_ROWS:
        keep = tl.load(MASK + b * LENGTH + t_idx, mask=t_ok, other=0) != 0
        out = tl.where(keep[:, None], out, 0.0)
    tl.store(OUT + t_idx[:, None] * so_t + offs_v[None, :] * so_d, out.to(OUT.dtype.element_ty),
             mask=t_ok[:, None] & v_ok[None, :])


def _state_apply(a, m, *, c=None, u=None, z=None, mask=None, out_dtype=None, block_t: int = 64):
    """a [B,H,T,F] times per-head m [B,H,F,V] (any strides) plus c u^T; normalized by a.z when z is given."""
    batch, heads, length, f_dim = a.shape
    v_dim = m.shape[3]
    out = torch.empty(batch, heads, length, v_dim, device=a.device, dtype=out_dtype or a.dtype)
    den = torch.empty(batch, heads, length, device=a.device, dtype=torch.float32) if z is not None else None
    block_v = _value_tile(v_dim)
    grid = (batch * heads, triton.cdiv(length, block_t), triton.cdiv(v_dim, block_v))
    _state_apply_kernel[grid](
        a, m, c, u, z, mask, out, den, *a.stride(), m.stride(1), m.stride(2), m.stride(3), *out.stride(),
        heads, length, f_dim, v_dim, BLOCK_T=block_t, BLOCK_F=_value_tile(f_dim), BLOCK_V=block_v,
        HAS_C=c is not None, NORMALIZE=z is not None, MASK_ROWS=mask is not None,
    )
    return out, den


def _check_shapes(phi_q, phi_k, v):
    if phi_q.dim() != 4 or phi_k.dim() != 4 or v.dim() != 4:
        raise ValueError("phi_q, phi_k and v must be 4-D [B, H, T, *]")
    heads_match = phi_q.shape[:2] == phi_k.shape[:2] and phi_q.shape[3] == phi_k.shape[3]
    if not heads_match or phi_k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"incompatible shapes phi_q {tuple(phi_q.shape)}, phi_k {tuple(phi_k.shape)}, v {tuple(v.shape)}"
        )


def linear_attention_forward(phi_q, phi_k, v, key_mask, causal, chunk_size, out_dtype=None):
    """(output [B,H,Tq,Dv] in `out_dtype` (default v's), denominator [B,H,Tq] fp32).

    The backward wants the output in fp32: its gradient subtracts y from each value, and a bf16 y would
    turn that cancellation into a visible error.
    """
    _check_shapes(phi_q, phi_k, v)
    mask = _mask_bytes(key_mask, phi_k.shape[0], phi_k.shape[2])
    if causal:
        return _chunk_scan(phi_q, phi_k, v, row_off=phi_k.shape[2] - phi_q.shape[2], reverse=False,
                           chunk_size=chunk_size, mask=mask, normalize=True, out_dtype=out_dtype)
    state, norm = _state_reduce(phi_k, v, mask=mask)
    return _state_apply(phi_q, state, z=norm, out_dtype=out_dtype or v.dtype)


def linear_attention_cuda(phi_q, phi_k, v, key_mask, causal, chunk_size):
    """Normalized linear attention (see the op); queries aligned to the end of keys when causal."""
    return linear_attention_forward(phi_q, phi_k, v, key_mask, causal, chunk_size)[0]


def linear_attention_backward_cuda(
    grad_out, phi_q, phi_k, v, key_mask, causal, chunk_size, out=None, den=None
):
    """(d phi_q, d phi_k, d v) of `linear_attention_cuda`; pass the forward's (out, den) to skip recomputing.

    With y = num / den, the gradient flows into num as g / den and into den as -(g . y) / den, so each
    gradient is an unnormalized (anti-)causal linear attention with one rank-1 extra score term.
    """
    if out is None or den is None:
        out, den = linear_attention_forward(phi_q, phi_k, v, key_mask, causal, chunk_size, torch.float32)
    seen = den != 0
    safe_den = torch.where(seen, den, torch.ones_like(den))
    g = grad_out.float()
    d_num = torch.where(seen[..., None], g / safe_den[..., None], 0.0).contiguous()
    d_den = torch.where(seen, -(g * out.float()).sum(-1) / safe_den, 0.0).contiguous()
    mask = _mask_bytes(key_mask, phi_k.shape[0], phi_k.shape[2])
    if causal:
        row_off = phi_k.shape[2] - phi_q.shape[2]
        scan = dict(chunk_size=chunk_size, mask=mask)
        # dq_i = sum_{j<=i} (dnum_i.v_j + dden_i) k_j
        dq, _ = _chunk_scan(d_num, v, phi_k, row_off=row_off, reverse=False, s=d_den, **scan)
        # dk_j = sum_{i>=j} (v_j.dnum_i + dden_i) q_i ; dv_j = sum_{i>=j} (k_j.q_i) dnum_i
        dk, _ = _chunk_scan(v, d_num, phi_q, row_off=-row_off, reverse=True, t=d_den, mask_rows=True, **scan)
        dv, _ = _chunk_scan(phi_k, phi_q, d_num, row_off=-row_off, reverse=True, mask_rows=True, **scan)
        return dq.to(phi_q.dtype), dk.to(phi_k.dtype), dv.to(v.dtype)
    state, norm = _state_reduce(phi_k, v, mask=mask)
    d_state, d_norm = _state_reduce(phi_q, d_num, s=d_den)
    dq, _ = _state_apply(d_num, state.transpose(2, 3), c=d_den, u=norm, out_dtype=phi_q.dtype)
    ones = torch.ones_like(den[:, :, :1]).expand(-1, -1, v.shape[2]).contiguous()
    dk, _ = _state_apply(v, d_state.transpose(2, 3), c=ones, u=d_norm, mask=mask, out_dtype=phi_k.dtype)
    dv, _ = _state_apply(phi_k, d_state, mask=mask, out_dtype=v.dtype)
    return dq, dk, dv


def gated_linear_attention_cuda(phi_q, phi_k, v, log_decay, key_mask, chunk_size):
    """Causal linear attention whose state decays by exp(log_decay_t) at each key position (Liger/GLA)."""
    _check_shapes(phi_q, phi_k, v)
    if log_decay.shape != phi_k.shape[:3]:
        raise ValueError(f"log_decay must have shape {tuple(phi_k.shape[:3])}, got {tuple(log_decay.shape)}")
    mask = _mask_bytes(key_mask, phi_k.shape[0], phi_k.shape[2])
    out, _ = _chunk_scan(phi_q, phi_k, v, row_off=phi_k.shape[2] - phi_q.shape[2], reverse=False,
                         chunk_size=chunk_size, mask=mask, log_decay=log_decay.float().contiguous(),
                         normalize=True)
    return out


@triton.jit
def _step_kernel(
    PQ, PK, V, STATE, NORM, DECAY, OUT, NEW_STATE, NEW_NORM,
    F_DIM, V_DIM,
    BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr, HAS_STATE: tl.constexpr, HAS_DECAY: tl.constexpr,
):
    bh = tl.program_id(0)
    vb = tl.program_id(1)
    offs_f = tl.arange(0, BLOCK_F)
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    f_ok = offs_f < F_DIM
    v_ok = offs_v < V_DIM
    fv_ok = f_ok[:, None] & v_ok[None, :]
    q = tl.load(PQ + bh * F_DIM + offs_f, mask=f_ok, other=0.0).to(tl.float32)
    k = tl.load(PK + bh * F_DIM + offs_f, mask=f_ok, other=0.0).to(tl.float32)
    v = tl.load(V + bh * V_DIM + offs_v, mask=v_ok, other=0.0).to(tl.float32)
    state_offsets = bh * F_DIM * V_DIM + offs_f[:, None] * V_DIM + offs_v[None, :]
    if HAS_STATE:
        state = tl.load(STATE + state_offsets, mask=fv_ok, other=0.0).to(tl.float32)
        norm = tl.load(NORM + bh * F_DIM + offs_f, mask=f_ok, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK_F, BLOCK_V], dtype=tl.float32)
        norm = tl.zeros([BLOCK_F], dtype=tl.float32)
    if HAS_DECAY:
        decay = tl.exp(tl.load(DECAY + bh).to(tl.float32))
        state *= decay
        norm *= decay
    state += k[:, None] * v[None, :]
    norm += k
    num = tl.sum(q[:, None] * state, 0)
    den = tl.sum(q * norm, 0)
    out = tl.where(den != 0.0, num / tl.where(den == 0.0, 1.0, den), 0.0)
    tl.store(OUT + bh * V_DIM + offs_v, out.to(OUT.dtype.element_ty), mask=v_ok)
    tl.store(NEW_STATE + state_offsets, state, mask=fv_ok)
    if vb == 0:
        tl.store(NEW_NORM + bh * F_DIM + offs_f, norm, mask=f_ok)


def linear_attention_step_cuda(phi_q_t, phi_k_t, v_t, state=None, normalizer=None, log_decay_t=None):
    """One decode step (see `chunked.linear_attention_step`): (out [B,H,Dv], state, normalizer) in fp32."""
    batch, heads, f_dim = phi_k_t.shape
    v_dim = v_t.shape[-1]
    if (state is None) != (normalizer is None):
        raise ValueError("state and normalizer must be given together")
    if state is not None and state.shape != (batch, heads, f_dim, v_dim):
        raise ValueError(f"state must have shape {(batch, heads, f_dim, v_dim)}, got {tuple(state.shape)}")
    out = torch.empty(batch, heads, v_dim, device=v_t.device, dtype=v_t.dtype)
    new_state = torch.empty(batch, heads, f_dim, v_dim, device=v_t.device, dtype=torch.float32)
    new_norm = torch.empty(batch, heads, f_dim, device=v_t.device, dtype=torch.float32)
    inputs = (phi_q_t, phi_k_t, v_t, state, normalizer, log_decay_t)
    contiguous = [t if t is None else t.contiguous() for t in inputs]
    block_v = _value_tile(v_dim)
    _step_kernel[(batch * heads, triton.cdiv(v_dim, block_v))](
        *contiguous, out, new_state, new_norm, f_dim, v_dim,
        BLOCK_F=_pow2_at_least(f_dim), BLOCK_V=block_v, HAS_STATE=state is not None,
        HAS_DECAY=log_decay_t is not None,
    )
    return out, new_state, new_norm


class LinearAttentionFunction(torch.autograd.Function):
    """Differentiable Triton linear attention: forward and backward both run the kernels above."""

    @staticmethod
    def forward(ctx, phi_q, phi_k, v, key_mask, causal, chunk_size):
        out, den = linear_attention_forward(phi_q, phi_k, v, key_mask, causal, chunk_size, torch.float32)
        ctx.save_for_backward(phi_q, phi_k, v, key_mask, out, den)
        ctx.config = (causal, chunk_size)
        return out.to(v.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        phi_q, phi_k, v, key_mask, out, den = ctx.saved_tensors
        grads = linear_attention_backward_cuda(grad_out.contiguous(), phi_q, phi_k, v, key_mask, *ctx.config,
                                               out=out, den=den)
        return (*grads, None, None, None)


def linear_attention_triton(phi_q, phi_k, v, key_mask=None, causal=True, chunk_size=64):
    """`linear_attention_cuda` with the Triton backward attached (for training outside the custom op)."""
    return LinearAttentionFunction.apply(phi_q, phi_k, v, key_mask, causal, chunk_size)


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
def _hybrid_causal_kernel(
    Q, K, PQ, PK, V, GATE, MASK, OUT,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    spq_b, spq_h, spq_t, spq_f,
    spk_b, spk_h, spk_t, spk_f,
    sv_b, sv_h, sv_t, sv_d,
    so_b, so_h, so_t, so_d,
    H, TQ, TK, D_DIM, F_DIM, V_DIM, WINDOW, scale,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_MASK: tl.constexpr,
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
        num = acc + mix * lin_num
        den = total + mix * lin_den
        out = tl.where(den[:, None] != 0.0, num / tl.where(den == 0.0, 1.0, den)[:, None], 0.0)
        tl.store(OUT + rows[:, None] * so_t + offs_v[None, :] * so_d, out.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & v_ok[None, :])


def hybrid_attention_cuda(q, k, v, phi_q, phi_k, gate, key_mask, causal, window, scale, chunk_size):
    """Sliding-window softmax + gated linear attention, one joint normalization (see the reference).

    The fused kernel covers the causal case; bidirectional windows fall back to the chunked torch form.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not causal:
        from relinear.kernels.linear_attention.chunked import hybrid_attention_chunked

        return hybrid_attention_chunked(q, k, v, phi_q, phi_k, gate, key_mask, causal, window, scale,
                                        chunk_size)
    _check_shapes(phi_q, phi_k, v)
    batch, heads, tq, d_dim = q.shape
    tk, f_dim, v_dim = k.shape[2], phi_q.shape[3], v.shape[3]
    if gate.shape != (heads,):
        raise ValueError(f"gate must have shape ({heads},), got {tuple(gate.shape)}")
    mask = _mask_bytes(key_mask, batch, tk)
    out = torch.empty(batch, heads, tq, v_dim, device=v.device, dtype=v.dtype)
    block_v = _value_tile(v_dim)
    grid = (batch * heads, triton.cdiv(v_dim, block_v))
    _hybrid_causal_kernel[grid](
        q, k, phi_q, phi_k, v, gate, mask, out,
        *q.stride(), *k.stride(), *phi_q.stride(), *phi_k.stride(), *v.stride(), *out.stride(),
        heads, tq, tk, d_dim, f_dim, v_dim, window, float(scale),
        BLOCK_T=_tile(chunk_size), BLOCK_D=_pow2_at_least(d_dim), BLOCK_F=_pow2_at_least(f_dim),
        BLOCK_V=block_v, HAS_MASK=mask is not None,
    )
    return out


# Hybrid backward. With num = A + mix N, den = Z + mix L (A, Z: the window's softmax sums taken relative to
# the window max M; N, L: the linear sums outside the window), the gradient reaches each weight w_ij as
# omega_ij = dnum_i . v_j + dden_i. The softmax scores get W_ij omega_ij, minus delta_i = sum_j W_ij omega_ij
# at the key that gave M_i (M is subtracted but does not cancel, since the linear part is not rescaled); the
# linear part is a shifted causal linear attention and reuses `_chunk_scan`.


@triton.jit
def _window_scores(Q, K, MASK, b, rows, row_ok, cols, row_off, TK, D_DIM, sq_t, sq_d, sk_t, sk_d, WINDOW, scale,
                   BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr):
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
    in_window = (distance >= 0) & (distance < WINDOW) & col_ok[None, :] & row_ok[:, None]
    return mma(q, tl.trans(k)) * scale, in_window, q, k


@triton.jit
def _window_stats_kernel(
    Q, K, V, MASK, ACC, TOTAL, TOP, ARG,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    H, TQ, TK, D_DIM, V_DIM, WINDOW, scale,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """Per query: A (ACC), Z (TOTAL) relative to the window max M (TOP) and M's key (ARG, -1 if none)."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    row_off = TK - TQ
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < TQ
    offs_v = tl.arange(0, BLOCK_V)
    v_ok = offs_v < V_DIM
    acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    total = tl.zeros([BLOCK_T], dtype=tl.float32)
    top = tl.full([BLOCK_T], -1e30, dtype=tl.float32)
    arg = tl.full([BLOCK_T], -1, dtype=tl.int32)
    first = tl.program_id(1) * BLOCK_T + row_off
    for j0 in range(first - WINDOW + 1, first + BLOCK_T, BLOCK_T):
        cols = j0 + tl.arange(0, BLOCK_T)
        scores, in_window, q, k = _window_scores(Q, K, MASK, b, rows, row_ok, cols, row_off, TK, D_DIM,
                                                 sq_t, sq_d, sk_t, sk_d, WINDOW, scale, BLOCK_D, HAS_MASK)
        v = tl.load(V + cols[:, None] * sv_t + offs_v[None, :] * sv_d,
                    mask=((cols >= 0) & (cols < TK))[:, None] & v_ok[None, :], other=0.0)
        masked = tl.where(in_window, scores, -1e30)
        tile_arg = j0 + tl.argmax(masked, 1).to(tl.int32)
        arg = tl.where(tl.max(masked, 1) > top, tile_arg, arg)
        acc, total, top = _softmax_tile(acc, total, top, scores, in_window, v)
    out = ACC + bh * TQ * V_DIM + rows[:, None] * V_DIM + offs_v[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & v_ok[None, :])
    tl.store(TOTAL + bh * TQ + rows, total, mask=row_ok)
    tl.store(TOP + bh * TQ + rows, top, mask=row_ok)
    tl.store(ARG + bh * TQ + rows, arg, mask=row_ok)


@triton.jit
def _window_grad_kernel(
    Q, K, V, MASK, TOP, ARG, DNUM, DDEN, DELTA, DQ, DK, DV,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    H, TQ, TK, D_DIM, V_DIM, WINDOW, scale,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_V: tl.constexpr, HAS_MASK: tl.constexpr,
    FOR_KEYS: tl.constexpr,
):
    """The softmax part's gradients: dq for a query tile (FOR_KEYS off), else dk and dv for a key tile."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    Q += b * sq_b + h * sq_h
    K += b * sk_b + h * sk_h
    V += b * sv_b + h * sv_h
    row_off = TK - TQ
    tile = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_V)
    d_ok = offs_d < D_DIM
    v_ok = offs_v < V_DIM
    grad_q = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    grad_k = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    grad_v = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
    if FOR_KEYS:
        # queries at positions [j, j + WINDOW) see key j
        lo = tl.program_id(1) * BLOCK_T - row_off
        hi = lo + BLOCK_T + WINDOW - 1
    else:
        lo = tl.program_id(1) * BLOCK_T + row_off - WINDOW + 1
        hi = tl.program_id(1) * BLOCK_T + row_off + BLOCK_T
    for start in range(lo, hi, BLOCK_T):
        if FOR_KEYS:
            rows = start + tl.arange(0, BLOCK_T)
            cols = tile
        else:
            rows = tile
            cols = start + tl.arange(0, BLOCK_T)
        row_ok = (rows >= 0) & (rows < TQ)
        scores, in_window, q, k = _window_scores(Q, K, MASK, b, rows, row_ok, cols, row_off, TK, D_DIM,
                                                 sq_t, sq_d, sk_t, sk_d, WINDOW, scale, BLOCK_D, HAS_MASK)
        v = tl.load(V + cols[:, None] * sv_t + offs_v[None, :] * sv_d,
                    mask=((cols >= 0) & (cols < TK))[:, None] & v_ok[None, :], other=0.0)
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
    if FOR_KEYS:
        key_ok = tile < TK
        tl.store(DK + bh * TK * D_DIM + tile[:, None] * D_DIM + offs_d[None, :], grad_k,
                 mask=key_ok[:, None] & d_ok[None, :])
        tl.store(DV + bh * TK * V_DIM + tile[:, None] * V_DIM + offs_v[None, :], grad_v,
                 mask=key_ok[:, None] & v_ok[None, :])
    else:
        tl.store(DQ + bh * TQ * D_DIM + tile[:, None] * D_DIM + offs_d[None, :], grad_q,
                 mask=(tile < TQ)[:, None] & d_ok[None, :])


def hybrid_attention_backward_cuda(grad_out, q, k, v, phi_q, phi_k, gate, key_mask, causal, window, scale,
                                   chunk_size):
    """(dq, dk, dv, d phi_q, d phi_k, d gate) of `hybrid_attention_cuda`.

    Causal: Triton throughout (window statistics, the softmax part's dq and dk/dv, the linear part by the
    chunk scan), with elementwise torch glue in between. Bidirectional windows, whose forward is the torch
    form, differentiate that form. A tie for a window max sends its gradient to one key (autograd splits it).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not causal:
        from relinear.kernels.linear_attention.chunked import hybrid_attention_chunked

        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v, phi_q, phi_k, gate)]
            out = hybrid_attention_chunked(*leaves, key_mask, causal, window, scale, chunk_size)
            return torch.autograd.grad(out, leaves, grad_out)
    _check_shapes(phi_q, phi_k, v)
    batch, heads, tq, d_dim = q.shape
    tk, v_dim = k.shape[2], v.shape[3]
    if tk < tq:
        raise ValueError(f"the causal hybrid backward needs at least as many keys ({tk}) as queries ({tq})")
    mask = _mask_bytes(key_mask, batch, tk)
    f32 = dict(device=v.device, dtype=torch.float32)
    acc = torch.empty(batch, heads, tq, v_dim, **f32)
    total, top = torch.empty(batch, heads, tq, **f32), torch.empty(batch, heads, tq, **f32)
    arg = torch.empty(batch, heads, tq, device=v.device, dtype=torch.int32)
    block_t, block_d, block_v = _tile(chunk_size), _pow2_at_least(d_dim), _pow2_at_least(v_dim)
    strides = (*q.stride(), *k.stride(), *v.stride())
    sizes = (heads, tq, tk, d_dim, v_dim, window, float(scale))
    blocks = dict(BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_V=block_v, HAS_MASK=mask is not None)
    _window_stats_kernel[(batch * heads, triton.cdiv(tq, block_t))](
        q, k, v, mask, acc, total, top, arg, *strides, *sizes, **blocks)

    # the linear part sees keys at least `window` behind: a causal scan with queries shifted back by it
    lin_off = tk - tq - window
    scan = dict(chunk_size=chunk_size, mask=mask, out_dtype=torch.float32)
    with_ones = torch.cat([v.float(), torch.ones_like(v[..., :1], dtype=torch.float32)], -1)
    linear, _ = _chunk_scan(phi_q, phi_k, with_ones, row_off=lin_off, reverse=False, **scan)
    lin_num, lin_den = linear[..., :-1], linear[..., -1]
    mix = torch.sigmoid(gate.float())[None, :, None]
    num = acc + mix[..., None] * lin_num
    den = total + mix * lin_den
    seen = den != 0
    safe_den = torch.where(seen, den, torch.ones_like(den))
    g = grad_out.float()
    out = num / safe_den[..., None]
    d_num = torch.where(seen[..., None], g / safe_den[..., None], 0.0).contiguous()
    d_den = torch.where(seen, -(g * out).sum(-1) / safe_den, 0.0).contiguous()
    delta = ((d_num * acc).sum(-1) + d_den * total).contiguous()
    d_mix = ((d_num * lin_num).sum(-1) + d_den * lin_den).sum((0, 2))
    d_gate = d_mix * mix.flatten() * (1 - mix.flatten())

    dq = torch.empty(batch, heads, tq, d_dim, **f32)
    dk = torch.empty(batch, heads, tk, d_dim, **f32)
    dv = torch.empty(batch, heads, tk, v_dim, **f32)
    for for_keys, length in ((False, tq), (True, tk)):
        _window_grad_kernel[(batch * heads, triton.cdiv(length, block_t))](
            q, k, v, mask, top, arg, d_num, d_den, delta, dq, dk, dv, *strides, *sizes, **blocks,
            FOR_KEYS=for_keys)
    d_phi_q, _ = _chunk_scan(d_num, v, phi_k, row_off=lin_off, reverse=False, s=d_den, **scan)
    d_phi_k, _ = _chunk_scan(v, d_num, phi_q, row_off=-lin_off, reverse=True, t=d_den, mask_rows=True, **scan)
    dv_linear, _ = _chunk_scan(phi_k, phi_q, d_num, row_off=-lin_off, reverse=True, mask_rows=True, **scan)
    mix = mix[..., None]
    return (dq.to(q.dtype), dk.to(k.dtype), (dv + mix * dv_linear).to(v.dtype),
            (mix * d_phi_q).to(phi_q.dtype), (mix * d_phi_k).to(phi_k.dtype), d_gate.to(gate.dtype))
