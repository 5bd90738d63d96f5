"""Triton kernels for normalized linear attention: causal (chunked scan), bidirectional, gated, decode step.

All kernels accumulate in fp32 and keep the running kv-state in registers, so no [T, F, Dv] tensor ever
reaches HBM. Two kernel families cover forward and backward:

* `_chunk_scan_kernel` computes o_i = sum_{j visible} (a_i . b_j + s_i t_j) c_j, optionally divided by
  sum_{j visible} a_i . b_j, where "visible" is causal (j <= i) or anti-causal (j >= i) on an absolute
  time axis that places queries at the END of keys. The causal forward and the three causal gradients
  (dq, dk, dv) are all of this form with different roles for (a, b, c, s, t).
* `_state_reduce_kernel` / `_state_apply_kernel` compute S = sum_t a_t c_t^T (and z = sum_t a_t s_t), then
  o_t = a_t S + c_t u, optionally normalized: the bidirectional forward and its gradients.

Both families can also take the raw q and k in place of phi_q and phi_k and apply a parameter-free feature
map to each tile as it is loaded (constexpr MAP_A/B/C: 0 = features given, 1 = elu + 1, 2 = relu, of
x * sqrt(scale)), and multiply their output by the map's derivative (GRAD_MAP): then neither phi nor its
gradient is written to or read from HBM.

Besides these: the decay variant of the chunk scan (gated linear attention, forward and backward) and
`_step_kernel` (one decode step). The window hybrids live in `triton_hybrid.py`.

The chunk size of the op is only a tiling choice here (the result does not depend on it); it is clamped
to a power of two in [16, 128] as `tl.dot` needs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from relinear.kernels.linear_attention.mapped import FEATURE_MAP_CODES, check_fused_map

# Triton 3.9's interpreter returns garbage for bf16 `tl.dot`; under it, dots run in fp32 instead.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def mma(a, b):
    """`tl.dot` accumulating in fp32; operands of different dtypes (or under the interpreter) go as fp32."""
    if _INTERPRETED or a.dtype != b.dtype:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b)


@triton.jit
def _features(x, ok, root, MAP: tl.constexpr):
    """phi(x * root) of a loaded tile (MAP 0: x is phi already), in x's dtype as the unfused torch form stores it.

    Zero where `ok` is False: elu + 1 of a padded zero would be 1, a phantom key or feature."""
    if MAP != 0:
        z = x.to(tl.float32) * root
        if MAP == 1:
            phi = tl.maximum(z, 0.0) + tl.exp(tl.minimum(z, 0.0))
        else:
            phi = tl.maximum(z, 0.0)
        x = tl.where(ok, phi, 0.0).to(x.dtype)
    return x


@triton.jit
def _feature_grad(g, x, root, MAP: tl.constexpr):
    """g * d phi(x * root) / dx: phi' is exp(min(z, 0)) for elu + 1 (1 above 0) and [z > 0] for relu, as autograd
    differentiates the torch form; the chain factor is root."""
    z = x.to(tl.float32) * root
    if MAP == 1:
        slope = tl.exp(tl.minimum(z, 0.0))
    else:
        slope = (z > 0.0).to(tl.float32)
    return g * (slope * root)


@dataclass(frozen=True)
class FusedMap:
    """The feature map the kernels apply to the operands that hold raw q or k: `code` is FEATURE_MAP (0 = none)."""

    code: int = 0
    root: float = 1.0

    def on(self, operand: str, mapped: str) -> int:
        """The map's code for `operand` ("a", "b", "c") when it is one of the raw ones listed in `mapped`."""
        return self.code if operand in mapped else 0


NO_MAP = FusedMap()


def fused_map(feature_map: str, scale: float) -> FusedMap:
    """The mapped op's (feature_map name, softmax scale) as the kernels take them: a code and sqrt(scale)."""
    check_fused_map(feature_map, scale)
    return FusedMap(FEATURE_MAP_CODES[feature_map], math.sqrt(scale))


def _strides4(x: torch.Tensor | None) -> tuple[int, ...]:
    return (0, 0, 0, 0) if x is None else x.stride()


def pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


def time_tile(chunk_size: int) -> int:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return min(128, pow2_at_least(chunk_size))


def value_tile(dim: int) -> int:
    return min(64, pow2_at_least(dim))


@triton.jit
def _chunk_scan_kernel(
    A, B, C, S, T, DECAY, MASK, OUT, DEN, X,
    sa_b, sa_h, sa_t, sa_f,
    sb_b, sb_h, sb_t, sb_f,
    sc_b, sc_h, sc_t, sc_d,
    so_b, so_h, so_t, so_d,
    sx_b, sx_h, sx_t, sx_d,
    H, ROWS, COLS, ROW_OFF, COL_OFF, F_DIM, V_DIM, MASK_LEN, ROOT,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr,
    REVERSE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_S: tl.constexpr, HAS_T: tl.constexpr,
    HAS_MASK: tl.constexpr, KEY_ROWS: tl.constexpr, HAS_DECAY: tl.constexpr,
    MAP_A: tl.constexpr, MAP_B: tl.constexpr, MAP_C: tl.constexpr, GRAD_MAP: tl.constexpr,
):
    # rows: the outputs (a, s); cols: what they attend to (b, t, c). The key axis (MASK, DECAY) is the col
    # axis in the forward and dq, the row axis (KEY_ROWS) in dk and dv.
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
        if KEY_ROWS:
            keys = rows
            key_ok = row_ok
            n_keys = ROWS
        else:
            keys = cols
            key_ok = col_ok
            n_keys = COLS
        if HAS_MASK:
            key_ok = key_ok & (tl.load(MASK + b * MASK_LEN + keys, mask=key_ok, other=0) != 0)
        if not KEY_ROWS:
            col_ok = key_ok
        a_ok = row_ok[:, None] & f_ok[None, :]
        b_ok = col_ok[:, None] & f_ok[None, :]
        c_ok = col_ok[:, None] & v_ok[None, :]
        a = _features(tl.load(A + rows[:, None] * sa_t + offs_f[None, :] * sa_f, mask=a_ok, other=0.0),
                      a_ok, ROOT, MAP_A)
        bk = _features(tl.load(B + cols[:, None] * sb_t + offs_f[None, :] * sb_f, mask=b_ok, other=0.0),
                       b_ok, ROOT, MAP_B)
        c = _features(tl.load(C + cols[:, None] * sc_t + offs_v[None, :] * sc_d, mask=c_ok, other=0.0),
                      c_ok, ROOT, MAP_C)
        scores = mma(a, tl.trans(bk))
        carried = mma(a, state)
        if NORMALIZE:
            # only the a.b term here: HAS_S/HAS_T are off for the normalized forward
            carried_den = tl.sum(a.to(tl.float32) * normalizer[None, :], 1)
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
            carried += s[:, None] * scalar_state[None, :]
        if HAS_DECAY:
            # l: cumulative log-decay inside the chunk, so every exponent below is <= 0. Forward, key j reaches
            # query i by exp(l_i - l_j) and the state (kept at the previous chunk's end) by exp(l_i); reverse,
            # by exp(l_j - l_i), the state kept at this chunk's end. Masked keys neither add nor decay.
            step_decay = tl.load(DECAY + bh * n_keys + keys, mask=key_ok, other=0.0).to(tl.float32)
            log_decay = tl.cumsum(step_decay, 0)
            chunk_total = tl.sum(step_decay, 0)
            if REVERSE:
                gap = log_decay[None, :] - log_decay[:, None]
                to_rows = tl.exp(chunk_total - log_decay)
                from_cols = tl.exp(log_decay)
            else:
                gap = log_decay[:, None] - log_decay[None, :]
                to_rows = tl.exp(log_decay)
                from_cols = tl.exp(chunk_total - log_decay)
            scores *= tl.exp(tl.where(visible, gap, 0.0))
            carried *= to_rows[:, None]
            if NORMALIZE:
                carried_den *= to_rows
        scores = tl.where(visible, scores, 0.0)
        out = mma(scores, c) + carried
        if NORMALIZE:
            den = tl.sum(scores, 1) + carried_den
            out = tl.where(den[:, None] != 0.0, out / tl.where(den == 0.0, 1.0, den)[:, None], 0.0)
            if vb == 0:
                tl.store(DEN + bh * ROWS + rows, den, mask=row_ok)
        store_ok = row_ok
        if KEY_ROWS:
            store_ok = key_ok
            out = tl.where(store_ok[:, None], out, 0.0)
        if GRAD_MAP != 0:
            x = tl.load(X + b * sx_b + h * sx_h + rows[:, None] * sx_t + offs_v[None, :] * sx_d,
                        mask=row_ok[:, None] & v_ok[None, :], other=0.0)
            out = _feature_grad(out, x, ROOT, GRAD_MAP)
        tl.store(OUT + rows[:, None] * so_t + offs_v[None, :] * so_d, out.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & v_ok[None, :])
        # carry this chunk's cols into the state
        if HAS_DECAY:
            bk = bk.to(tl.float32) * from_cols[:, None]
            state *= tl.exp(chunk_total)
            normalizer *= tl.exp(chunk_total)
            if HAS_S or HAS_T:
                t *= from_cols
                scalar_state *= tl.exp(chunk_total)
        if NORMALIZE:
            normalizer += tl.sum(bk.to(tl.float32), 0)
        if HAS_S or HAS_T:
            scalar_state += tl.sum(t[:, None] * c.to(tl.float32), 0)
        state += mma(tl.trans(bk), c)


def mask_bytes(key_mask: torch.Tensor | None, batch: int, keys: int) -> torch.Tensor | None:
    if key_mask is None:
        return None
    if key_mask.shape != (batch, keys):
        raise ValueError(f"key_mask must have shape {(batch, keys)}, got {tuple(key_mask.shape)}")
    return key_mask.to(torch.uint8).contiguous()


def chunk_scan(
    a, b, c, *, row_off: int, reverse: bool, chunk_size: int, mask=None, key_rows: bool = False,
    s=None, t=None, log_decay=None, normalize: bool = False, out_dtype=None,
    fmap: FusedMap = NO_MAP, mapped: str = "", grad_of=None,
):
    """o = chunked (anti-)causal sum over cols of (a.b + s t) c, decayed by exp(log_decay) per key step;
    returns (o, den or None). `key_rows`: the keys (mask, log_decay) are the rows, not the cols.
    With `fmap`, the operands named in `mapped` are raw q/k that the kernel maps, and o is multiplied by the
    map's derivative at `grad_of` (the raw input whose feature gradient o is)."""
    batch, heads, rows, f_dim = a.shape
    cols, v_dim = c.shape[2], c.shape[3]
    out = torch.empty(batch, heads, rows, v_dim, device=a.device, dtype=out_dtype or c.dtype)
    den = torch.empty(batch, heads, rows, device=a.device, dtype=torch.float32) if normalize else None
    block_v = value_tile(v_dim)
    grid = (batch * heads, triton.cdiv(v_dim, block_v))
    _chunk_scan_kernel[grid](
        a, b, c, s, t, log_decay, mask, out, den, grad_of,
        *a.stride(), *b.stride(), *c.stride(), *out.stride(), *_strides4(grad_of),
        heads, rows, cols, row_off, 0, f_dim, v_dim, mask.shape[1] if mask is not None else 0, fmap.root,
        BLOCK_T=time_tile(chunk_size), BLOCK_F=pow2_at_least(f_dim), BLOCK_V=block_v,
        REVERSE=reverse, NORMALIZE=normalize, HAS_S=s is not None, HAS_T=t is not None,
        HAS_MASK=mask is not None, KEY_ROWS=key_rows, HAS_DECAY=log_decay is not None,
        MAP_A=fmap.on("a", mapped), MAP_B=fmap.on("b", mapped), MAP_C=fmap.on("c", mapped),
        GRAD_MAP=fmap.code if grad_of is not None else 0,
    )
    return out, den


@triton.jit
def _state_reduce_kernel(
    A, C, S, MASK, STATE, NORM,
    sa_b, sa_h, sa_t, sa_f,
    sc_b, sc_h, sc_t, sc_d,
    H, LENGTH, F_DIM, V_DIM, ROOT,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_S: tl.constexpr, HAS_MASK: tl.constexpr, MAP_A: tl.constexpr,
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
        a_ok = t_ok[:, None] & f_ok[None, :]
        a = _features(tl.load(A + t_idx[:, None] * sa_t + offs_f[None, :] * sa_f, mask=a_ok, other=0.0),
                      a_ok, ROOT, MAP_A)
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


def state_reduce(a, c, *, mask=None, s=None, block_t: int = 64, fmap: FusedMap = NO_MAP, mapped: str = ""):
    """(sum_t a_t c_t^T [B,H,F,Dv], sum_t a_t s_t [B,H,F]) in fp32, masked rows of a/c dropped; a mapped by
    `fmap` when `mapped` names it."""
    batch, heads, length, f_dim = a.shape
    v_dim = c.shape[3]
    state = torch.empty(batch, heads, f_dim, v_dim, device=a.device, dtype=torch.float32)
    norm = torch.empty(batch, heads, f_dim, device=a.device, dtype=torch.float32)
    block_f, block_v = value_tile(f_dim), value_tile(v_dim)
    grid = (batch * heads, triton.cdiv(f_dim, block_f), triton.cdiv(v_dim, block_v))
    _state_reduce_kernel[grid](
        a, c, s, mask, state, norm, *a.stride(), *c.stride(), heads, length, f_dim, v_dim, fmap.root,
        BLOCK_T=block_t, BLOCK_F=block_f, BLOCK_V=block_v, HAS_S=s is not None, HAS_MASK=mask is not None,
        MAP_A=fmap.on("a", mapped),
    )
    return state, norm


@triton.jit
def _state_apply_kernel(
    A, M, C, U, Z, MASK, OUT, DEN, X,
    sa_b, sa_h, sa_t, sa_f,
    sm_bh, sm_f, sm_d,
    so_b, so_h, so_t, so_d,
    sx_b, sx_h, sx_t, sx_d,
    H, LENGTH, F_DIM, V_DIM, ROOT,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_C: tl.constexpr, NORMALIZE: tl.constexpr, MASK_ROWS: tl.constexpr,
    MAP_A: tl.constexpr, GRAD_MAP: tl.constexpr,
):
    """o_t = a_t M + c_t u (u: [V]); with NORMALIZE, o_t /= a_t . z (zero where that is zero); with GRAD_MAP,
    o_t is multiplied by the feature map's derivative at x_t."""
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
        a_ok = t_ok[:, None] & f_ok[None, :]
        a = _features(tl.load(A + t_idx[:, None] * sa_t + offs_f[None, :] * sa_f, mask=a_ok, other=0.0),
                      a_ok, ROOT, MAP_A)
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
    if GRAD_MAP != 0:
        x = tl.load(X + b * sx_b + h * sx_h + t_idx[:, None] * sx_t + offs_v[None, :] * sx_d,
                    mask=t_ok[:, None] & v_ok[None, :], other=0.0)
        out = _feature_grad(out, x, ROOT, GRAD_MAP)
    tl.store(OUT + t_idx[:, None] * so_t + offs_v[None, :] * so_d, out.to(OUT.dtype.element_ty),
             mask=t_ok[:, None] & v_ok[None, :])


def _state_apply(
    a, m, *, c=None, u=None, z=None, mask=None, out_dtype=None, block_t: int = 64,
    fmap: FusedMap = NO_MAP, mapped: str = "", grad_of=None,
):
    """a [B,H,T,F] times per-head m [B,H,F,V] (any strides) plus c u^T; normalized by a.z when z is given.
    `fmap`, `mapped`, `grad_of`: as in `chunk_scan`."""
    batch, heads, length, f_dim = a.shape
    v_dim = m.shape[3]
    out = torch.empty(batch, heads, length, v_dim, device=a.device, dtype=out_dtype or a.dtype)
    den = torch.empty(batch, heads, length, device=a.device, dtype=torch.float32) if z is not None else None
    block_v = value_tile(v_dim)
    grid = (batch * heads, triton.cdiv(length, block_t), triton.cdiv(v_dim, block_v))
    _state_apply_kernel[grid](
        a, m, c, u, z, mask, out, den, grad_of, *a.stride(), m.stride(1), m.stride(2), m.stride(3),
        *out.stride(), *_strides4(grad_of), heads, length, f_dim, v_dim, fmap.root,
        BLOCK_T=block_t, BLOCK_F=value_tile(f_dim), BLOCK_V=block_v,
        HAS_C=c is not None, NORMALIZE=z is not None, MASK_ROWS=mask is not None,
        MAP_A=fmap.on("a", mapped), GRAD_MAP=fmap.code if grad_of is not None else 0,
    )
    return out, den


def check_shapes(phi_q, phi_k, v):
    if phi_q.dim() != 4 or phi_k.dim() != 4 or v.dim() != 4:
        raise ValueError("phi_q, phi_k and v must be 4-D [B, H, T, *]")
    heads_match = phi_q.shape[:2] == phi_k.shape[:2] and phi_q.shape[3] == phi_k.shape[3]
    if not heads_match or phi_k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"incompatible shapes phi_q {tuple(phi_q.shape)}, phi_k {tuple(phi_k.shape)}, v {tuple(v.shape)}"
        )


def linear_attention_forward(phi_q, phi_k, v, key_mask, causal, chunk_size, out_dtype=None, fmap=NO_MAP):
    """(output [B,H,Tq,Dv] in `out_dtype` (default v's), denominator [B,H,Tq] fp32).

    The backward wants the output in fp32: its gradient subtracts y from each value, and a bf16 y would
    turn that cancellation into a visible error. With `fmap`, phi_q and phi_k are the raw q and k.
    """
    check_shapes(phi_q, phi_k, v)
    mask = mask_bytes(key_mask, phi_k.shape[0], phi_k.shape[2])
    if causal:
        return chunk_scan(phi_q, phi_k, v, row_off=phi_k.shape[2] - phi_q.shape[2], reverse=False,
                           chunk_size=chunk_size, mask=mask, normalize=True, out_dtype=out_dtype,
                           fmap=fmap, mapped="ab")
    state, norm = state_reduce(phi_k, v, mask=mask, fmap=fmap, mapped="a")
    return _state_apply(phi_q, state, z=norm, out_dtype=out_dtype or v.dtype, fmap=fmap, mapped="a")


def linear_attention_cuda(phi_q, phi_k, v, key_mask, causal, chunk_size):
    """Normalized linear attention (see the op); queries aligned to the end of keys when causal."""
    return linear_attention_forward(phi_q, phi_k, v, key_mask, causal, chunk_size)[0]


def normalization_grads(grad_out, out, den):
    """(d num [B,H,T,Dv], d den [B,H,T]) in fp32 for out = num / den (0 where den is 0): g / den and
    -(g . out) / den, nothing flowing through a query that sees no key."""
    seen = den != 0
    safe_den = torch.where(seen, den, torch.ones_like(den))
    g = grad_out.float()
    d_num = torch.where(seen[..., None], g / safe_den[..., None], 0.0).contiguous()
    d_den = torch.where(seen, -(g * out.float()).sum(-1) / safe_den, 0.0).contiguous()
    return d_num, d_den


def linear_attention_backward_cuda(
    grad_out, phi_q, phi_k, v, key_mask, causal, chunk_size, out=None, den=None, fmap=NO_MAP
):
    """(d phi_q, d phi_k, d v) of `linear_attention_cuda`; pass the forward's (out, den) to skip recomputing.

    With y = num / den, the gradient flows into num as g / den and into den as -(g . y) / den, so each
    gradient is an unnormalized (anti-)causal linear attention with one rank-1 extra score term. With `fmap`,
    phi_q and phi_k are the raw q and k, and the first two gradients are theirs (d phi times phi').
    """
    if out is None or den is None:
        out, den = linear_attention_forward(phi_q, phi_k, v, key_mask, causal, chunk_size, torch.float32, fmap)
    d_num, d_den = normalization_grads(grad_out, out, den)
    mask = mask_bytes(key_mask, phi_k.shape[0], phi_k.shape[2])
    if causal:
        row_off = phi_k.shape[2] - phi_q.shape[2]
        scan = dict(chunk_size=chunk_size, mask=mask, fmap=fmap)
        # dq_i = sum_{j<=i} (dnum_i.v_j + dden_i) k_j
        dq, _ = chunk_scan(d_num, v, phi_k, row_off=row_off, reverse=False, s=d_den, mapped="c", grad_of=phi_q,
                            **scan)
        # dk_j = sum_{i>=j} (v_j.dnum_i + dden_i) q_i ; dv_j = sum_{i>=j} (k_j.q_i) dnum_i
        dk, _ = chunk_scan(v, d_num, phi_q, row_off=-row_off, reverse=True, t=d_den, key_rows=True, mapped="c",
                            grad_of=phi_k, **scan)
        dv, _ = chunk_scan(phi_k, phi_q, d_num, row_off=-row_off, reverse=True, key_rows=True, mapped="ab",
                            **scan)
        return dq.to(phi_q.dtype), dk.to(phi_k.dtype), dv.to(v.dtype)
    state, norm = state_reduce(phi_k, v, mask=mask, fmap=fmap, mapped="a")
    d_state, d_norm = state_reduce(phi_q, d_num, s=d_den, fmap=fmap, mapped="a")
    dq, _ = _state_apply(d_num, state.transpose(2, 3), c=d_den, u=norm, out_dtype=phi_q.dtype, fmap=fmap,
                         grad_of=phi_q)
    ones = torch.ones_like(den[:, :, :1]).expand(-1, -1, v.shape[2]).contiguous()
    dk, _ = _state_apply(v, d_state.transpose(2, 3), c=ones, u=d_norm, mask=mask, out_dtype=phi_k.dtype,
                         fmap=fmap, grad_of=phi_k)
    dv, _ = _state_apply(phi_k, d_state, mask=mask, out_dtype=v.dtype, fmap=fmap, mapped="a")
    return dq, dk, dv


def mapped_linear_attention_cuda(q, k, v, key_mask, causal, chunk_size, feature_map, scale):
    """`linear_attention_cuda` of phi(q * sqrt(scale)), phi(k * sqrt(scale)), phi computed inside the kernels."""
    return linear_attention_forward(q, k, v, key_mask, causal, chunk_size, fmap=fused_map(feature_map, scale))[0]


def mapped_linear_attention_backward_cuda(grad_out, q, k, v, key_mask, causal, chunk_size, feature_map, scale):
    """(d q, d k, d v) of `mapped_linear_attention_cuda`."""
    return linear_attention_backward_cuda(grad_out, q, k, v, key_mask, causal, chunk_size,
                                          fmap=fused_map(feature_map, scale))


def _gated_forward(phi_q, phi_k, v, log_decay, key_mask, chunk_size, out_dtype=None):
    check_shapes(phi_q, phi_k, v)
    if log_decay.shape != phi_k.shape[:3]:
        raise ValueError(f"log_decay must have shape {tuple(phi_k.shape[:3])}, got {tuple(log_decay.shape)}")
    mask = mask_bytes(key_mask, phi_k.shape[0], phi_k.shape[2])
    return chunk_scan(phi_q, phi_k, v, row_off=phi_k.shape[2] - phi_q.shape[2], reverse=False,
                       chunk_size=chunk_size, mask=mask, log_decay=log_decay.float().contiguous(),
                       normalize=True, out_dtype=out_dtype)


def gated_linear_attention_cuda(phi_q, phi_k, v, log_decay, key_mask, chunk_size):
    """Causal linear attention whose state decays by exp(log_decay_t) at each key position (Liger/GLA)."""
    return _gated_forward(phi_q, phi_k, v, log_decay, key_mask, chunk_size)[0]


def gated_linear_attention_backward_cuda(grad_out, phi_q, phi_k, v, log_decay, key_mask, chunk_size):
    """(d phi_q, d phi_k, d v, d log_decay) of `gated_linear_attention_cuda`.

    The feature and value gradients are the causal ones with every pair weighted by its decay, so the same
    decayed chunk scans give them. The decay between key j and query i spans the steps j < t <= i, so
    d log_decay_t sums the pairs that straddle t: with c_i = phi_q_i . d phi_q_i (all pairs of query i) and
    r_j = phi_k_j . d phi_k_j (all pairs of key j), it is sum_{s >= t} (c_s - r_s), a reverse cumulative
    sum of differences whose partial sums stay as small as the result (no cancellation of large totals).
    """
    out, den = _gated_forward(phi_q, phi_k, v, log_decay, key_mask, chunk_size, torch.float32)
    d_num, d_den = normalization_grads(grad_out, out, den)
    num_keys = phi_k.shape[2]
    row_off = num_keys - phi_q.shape[2]
    mask = mask_bytes(key_mask, phi_k.shape[0], num_keys)
    scan = dict(chunk_size=chunk_size, mask=mask, log_decay=log_decay.float().contiguous(),
                out_dtype=torch.float32)
    dq, _ = chunk_scan(d_num, v, phi_k, row_off=row_off, reverse=False, s=d_den, **scan)
    dk, _ = chunk_scan(v, d_num, phi_q, row_off=-row_off, reverse=True, t=d_den, key_rows=True, **scan)
    dv, _ = chunk_scan(phi_k, phi_q, d_num, row_off=-row_off, reverse=True, key_rows=True, **scan)
    per_step = -(phi_k.float() * dk).sum(-1)
    by_query = (phi_q.float() * dq).sum(-1)  # queries before the first key straddle no decay step: dropped
    per_step[..., max(row_off, 0):] += by_query[..., max(-row_off, 0):]
    d_decay = per_step.flip(-1).cumsum(-1).flip(-1)
    if key_mask is not None:
        d_decay = d_decay.masked_fill(~key_mask[:, None, :], 0.0)
    return dq.to(phi_q.dtype), dk.to(phi_k.dtype), dv.to(v.dtype), d_decay.to(log_decay.dtype)


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
    block_v = value_tile(v_dim)
    _step_kernel[(batch * heads, triton.cdiv(v_dim, block_v))](
        *contiguous, out, new_state, new_norm, f_dim, v_dim,
        BLOCK_F=pow2_at_least(f_dim), BLOCK_V=block_v, HAS_STATE=state is not None,
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

