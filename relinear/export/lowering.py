"""relinear's ops written once in standard ONNX ops, for any ONNX graph builder.

Every function takes the builder `op` as its first argument: `onnxscript.opset18` while the dynamo exporter
traces a custom translation, or the rewriter's tape builder inside an `onnxscript.rewriter` rule. Both
accept `op.<OpType>(inputs..., attr=...)`, so the exporter and the ONNX-file rewriter emit the same graph
for the same op. Constants are built as `ir` tensors and cast to the data's dtype, which keeps fp16 and
bf16 models in their precision.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from relinear.approx.btt import BlockGrid

FEATURE_MAPS = ("elu", "relu")


def const(op, value, like=None):
    """A constant node; cast to `like`'s dtype when given (ints stay int64 otherwise)."""
    array = np.asarray(value)
    if array.dtype.kind == "i":
        array = array.astype(np.int64)
    elif array.dtype.kind == "f":
        array = array.astype(np.float32)
    node = op.Constant(value=ir.tensor(array))
    return node if like is None else op.CastLike(node, like)


def shape_of(op, x, start: int, end: int | None = None):
    """Shape(x)[start:end] as a 1-D int64 tensor, spelled for every opset >= 13 (no Shape start/end)."""
    stop = np.iinfo(np.int64).max if end is None else end
    return op.Slice(op.Shape(x), const(op, [start]), const(op, [stop]), const(op, [0]))


def _zeros_along(op, x, axis: int, amount):
    """Zeros shaped like x except `amount` (int64 [1]) along `axis` (-1 or a non-negative axis)."""
    parts = [shape_of(op, x, 0, axis), amount] + ([] if axis == -1 else [shape_of(op, x, axis + 1)])
    return op.CastLike(op.ConstantOfShape(op.Concat(*parts, axis=0)), x)


def pad_end(op, x, axis: int, amount):
    """Append zeros along `axis` (Concat, not Pad: Pad's `axes` input needs opset 18)."""
    return op.Concat(x, _zeros_along(op, x, axis, amount), axis=axis)


def pad_front(op, x, axis: int, amount):
    return op.Concat(_zeros_along(op, x, axis, amount), x, axis=axis)


def feature_map(op, x, name: str):
    """Elementwise positive feature maps: they commute with transposes, so they apply to K or K^T alike."""
    if name == "elu":
        return op.Add(op.Elu(x), const(op, 1.0, x))
    if name == "relu":
        return op.Relu(x)
    raise ValueError(f"feature_map: {name!r} has no ONNX lowering (supported: {', '.join(FEATURE_MAPS)})")


def _normalize(op, numerator, denominator):
    """As the reference: only an exactly zero denominator (a query that sees no key) is guarded, to 0."""
    zero = const(op, 0.0, denominator)
    return op.Div(numerator, op.Where(op.Equal(denominator, zero), const(op, 1.0, denominator), denominator))


def linear_attention_bidirectional(op, phi_q, phi_k_t, v):
    """Two MatMuls: phi_q @ (phi_k^T @ v), over phi_q @ sum_s phi_k^T. phi_k_t is [..., F, S]; any rank."""
    kv = op.MatMul(phi_k_t, v)
    k_sum = op.ReduceSum(phi_k_t, const(op, [-1]), keepdims=1)
    return _normalize(op, op.MatMul(phi_q, kv), op.MatMul(phi_q, k_sum))


def _to_chunks(op, x, chunk_size: int):
    """[N, T, F] -> [N, T/C, C, F], zero-padding T up to a multiple of C (zeros add nothing to sums)."""
    chunk = const(op, [chunk_size])
    padded = pad_end(op, x, 1, op.Mod(op.Sub(chunk, op.Mod(_time_length(op, x), chunk)), chunk))
    return op.Reshape(padded, op.Concat(const(op, [0, -1, chunk_size]), shape_of(op, x, 2), axis=0))


def _flatten_batch(op, x):
    """[..., A, B] -> [N, A, B]: the chunked form then needs no rank, which legacy exports often lack."""
    return op.Reshape(x, op.Concat(const(op, [-1]), shape_of(op, x, -2), axis=0))


def _time_length(op, x):
    return shape_of(op, x, -2, -1)


def linear_attention_causal(op, phi_q, phi_k_t, v, chunk_size: int):
    """Chunked causal form: quadratic inside a chunk, an exclusive CumSum of per-chunk states across chunks.

    phi_q [..., Tq, F], phi_k_t [..., F, Tk], v [..., Tk, D] with Tq <= Tk and equal leading dims; queries
    align to the keys' end (as in the reference), done by left-padding phi_q with zero rows that are sliced
    off after. Cost O(T * C * (F + D) + T * F * D); no T x T matrix.
    """
    lead = shape_of(op, phi_q, 0, -2)
    num_queries, num_keys = _time_length(op, phi_q), _time_length(op, v)
    phi_q = pad_front(op, _flatten_batch(op, phi_q), 1, op.Sub(num_keys, num_queries))
    phi_k = op.Transpose(_flatten_batch(op, phi_k_t), perm=[0, 2, 1])
    q, k, vc = (_to_chunks(op, t, chunk_size) for t in (phi_q, phi_k, _flatten_batch(op, v)))
    k_t = op.Transpose(k, perm=[0, 1, 3, 2])
    chunk_axis = const(op, 1)
    past_kv = op.CumSum(op.MatMul(k_t, vc), chunk_axis, exclusive=1)
    past_k_sum = op.CumSum(op.ReduceSum(k_t, const(op, [-1]), keepdims=1), chunk_axis, exclusive=1)
    lower = const(op, np.tril(np.ones((chunk_size, chunk_size), dtype=np.float32)), phi_q)
    scores = op.Mul(op.MatMul(q, k_t), lower)
    numerator = op.Add(op.MatMul(q, past_kv), op.MatMul(scores, vc))
    denominator = op.Add(op.MatMul(q, past_k_sum), op.ReduceSum(scores, const(op, [-1]), keepdims=1))
    out = _normalize(op, numerator, denominator)
    flat = op.Reshape(out, op.Concat(const(op, [0, -1]), shape_of(op, v, -1), axis=0))
    kept = op.Slice(flat, op.Sub(num_keys, num_queries), num_keys, const(op, [1]))
    return op.Reshape(kept, op.Concat(lead, num_queries, shape_of(op, v, -1), axis=0))


def linear_attention(op, phi_q, phi_k, v, key_mask, causal: bool, chunk_size: int):
    """The linear_attention op: masked keys' features zeroed, then the chunked causal or bidirectional form."""
    phi_k_t = op.Transpose(masked_keys(op, phi_k, key_mask), perm=[0, 1, 3, 2])
    if causal:
        return linear_attention_causal(op, phi_q, phi_k_t, v, chunk_size)
    return linear_attention_bidirectional(op, phi_q, phi_k_t, v)


def mapped_linear_attention(op, q, k, v, key_mask, causal: bool, chunk_size: int, name: str, scale: float):
    """The mapped_linear_attention op: the map of q, k times sqrt(scale), then linear attention."""
    root = const(op, math.sqrt(scale), q)
    phi_q, phi_k = (feature_map(op, op.Mul(x, root), name) for x in (q, k))
    return linear_attention(op, phi_q, phi_k, v, key_mask, causal, chunk_size)


def _positions(op, q, k):
    """(query offsets from each key [Tq, Tk], as int64): queries align to the keys' end."""
    return _offsets(op, *(op.Squeeze(_time_length(op, t)) for t in (q, k)))


def _offsets(op, num_queries, num_keys):
    one = const(op, 1)
    query_pos = op.Range(op.Sub(num_keys, num_queries), num_keys, one)
    key_pos = op.Range(const(op, 0), num_keys, one)
    return op.Sub(op.Unsqueeze(query_pos, const(op, [1])), op.Unsqueeze(key_pos, const(op, [0])))


def _visible(op, offset, key_mask, causal: bool):
    """bool [B or 1, 1, Tq, Tk]: which keys each query may see (the reference's `visible_keys`)."""
    visible = op.GreaterOrEqual(offset, const(op, 0)) if causal else op.Equal(offset, offset)
    visible = op.Unsqueeze(visible, const(op, [0, 1]))
    if key_mask is not None:
        visible = op.And(visible, op.Unsqueeze(op.Cast(key_mask, to=ir.DataType.BOOL), const(op, [1, 2])))
    return visible


def _weighted_sum(op, weights, v):
    return _normalize(op, op.MatMul(weights, v), op.ReduceSum(weights, const(op, [-1]), keepdims=1))


def _sink_keys(op, k, key_mask, sinks: int):
    """bool [B or 1, 1, 1, Tk]: the first `sinks` attendable keys of each sequence (the reference's `sink_keys`)."""
    if key_mask is None:
        positions = op.Range(const(op, 0), op.Squeeze(_time_length(op, k)), const(op, 1))
        return op.Unsqueeze(op.Less(positions, const(op, sinks)), const(op, [0, 1, 2]))
    attendable = op.Cast(key_mask, to=ir.DataType.BOOL)
    rank = op.CumSum(op.Cast(attendable, to=ir.DataType.INT64), const(op, -1))
    return op.Unsqueeze(op.And(attendable, op.LessOrEqual(rank, const(op, sinks))), const(op, [1, 2]))


def hybrid_attention_quadratic(op, q, k, v, phi_q, phi_k, gate, key_mask, causal: bool, window: int,
                               scale: float, sinks: int = 0, balance=None):
    """The reference's hybrid (softmax in the window and over the sinks + gated linear outside, one
    normalization, the linear part weighed by the reference's `linear_factor`), built with explicit [Tq, Tk]
    weights: exact, but quadratic in time."""
    offset = _positions(op, q, k)
    visible = _visible(op, offset, key_mask, causal)
    reach = offset if causal else op.Abs(offset)
    in_window = op.Less(reach, const(op, window))
    if causal:
        in_window = op.And(in_window, op.GreaterOrEqual(offset, const(op, 0)))
    near = op.Unsqueeze(in_window, const(op, [0, 1]))
    if sinks:
        near = op.Or(near, _sink_keys(op, k, key_mask, sinks))
    windowed = op.And(visible, near)
    scores = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), const(op, scale, q))
    scores = op.Where(windowed, scores, const(op, -np.inf, scores))
    top = op.ReduceMax(scores, const(op, [-1]), keepdims=1)
    top = op.Where(op.IsInf(top), const(op, 0.0, top), top)
    softmax_part = op.Exp(op.Sub(scores, top))
    outside = op.And(visible, op.Not(windowed))
    linear_part = op.MatMul(phi_q, op.Transpose(phi_k, perm=[0, 1, 3, 2]))
    linear_part = op.Where(outside, linear_part, const(op, 0.0, linear_part))
    factor = op.Unsqueeze(op.Sigmoid(op.CastLike(gate, q)), const(op, [0, 2, 3]))
    if balance is not None:
        factor = op.Mul(factor, op.Exp(_balance_exponent(op, op.CastLike(balance, q), top, softmax_part,
                                                        linear_part)))
    return _weighted_sum(op, op.Add(softmax_part, op.Mul(factor, linear_part)), v)


def _balance_exponent(op, balance, top, softmax_part, linear_part):
    """balance[h] . (m_i, log W_i, log L_i), [B, H, Tq, 1], as the reference's `linear_factor` computes it."""
    one = const(op, 1.0, top)
    window_mass = op.ReduceSum(softmax_part, const(op, [-1]), keepdims=1)
    linear_mass = op.ReduceSum(linear_part, const(op, [-1]), keepdims=1)
    features = [top, op.Log(op.Max(window_mass, one)),
                op.Log(op.Where(op.Greater(linear_mass, const(op, 0.0, top)), linear_mass, one))]
    exponent = None
    for column, feature in enumerate(features):
        weight = op.Unsqueeze(op.Gather(balance, const(op, column), axis=1), const(op, [0, 2, 3]))
        term = op.Mul(weight, feature)
        exponent = term if exponent is None else op.Add(exponent, term)
    return exponent


def gated_linear_attention_quadratic(op, phi_q, phi_k, v, log_decay, key_mask):
    """The reference's decaying causal linear attention in closed form: weights phi_q . phi_k_j *
    exp(L_p - L_j), L = cumsum(log_decay), masked keys neither contribute nor decay. Quadratic in time."""
    if key_mask is not None:
        keep = op.Unsqueeze(op.Cast(key_mask, to=ir.DataType.BOOL), const(op, [1]))
        log_decay = op.Where(keep, log_decay, const(op, 0.0, log_decay))
    total = op.CumSum(log_decay, const(op, -1))
    offset = _positions(op, phi_q, phi_k)
    num_queries, num_keys = _time_length(op, phi_q), _time_length(op, phi_k)
    total_at_query = op.Slice(total, op.Sub(num_keys, num_queries), num_keys, const(op, [-1]))
    exponent = op.Sub(op.Unsqueeze(total_at_query, const(op, [-1])), op.Unsqueeze(total, const(op, [-2])))
    exponent = op.Where(_visible(op, offset, key_mask, True), exponent, const(op, -np.inf, exponent))
    weights = op.Mul(op.MatMul(phi_q, op.Transpose(phi_k, perm=[0, 1, 3, 2])), op.Exp(exponent))
    return _weighted_sum(op, weights, v)


def bidirectional_gated_linear_attention_quadratic(op, phi_q, phi_k, v, log_decay_before, log_decay_after,
                                                   key_mask):
    """The reference's decaying linear attention in both directions, in closed form: key j <= p weighs
    exp(B_p - B_j), key j > p exp(A_j - A_p), B = cumsum(log_decay_before), A the exclusive cumsum of
    log_decay_after; masked keys neither contribute nor decay. Queries no more than keys. Quadratic in time."""
    if key_mask is not None:
        keep = op.Unsqueeze(op.Cast(key_mask, to=ir.DataType.BOOL), const(op, [1]))
        log_decay_before, log_decay_after = (op.Where(keep, x, const(op, 0.0, x))
                                             for x in (log_decay_before, log_decay_after))
    total_before = op.CumSum(log_decay_before, const(op, -1))
    total_after = op.CumSum(log_decay_after, const(op, -1), exclusive=1)
    offset = _positions(op, phi_q, phi_k)
    num_queries, num_keys = _time_length(op, phi_q), _time_length(op, phi_k)

    def at_query(total):
        return op.Unsqueeze(op.Slice(total, op.Sub(num_keys, num_queries), num_keys, const(op, [-1])),
                            const(op, [-1]))

    key_before, key_after = (op.Unsqueeze(t, const(op, [-2])) for t in (total_before, total_after))
    exponent = op.Where(op.GreaterOrEqual(offset, const(op, 0)), op.Sub(at_query(total_before), key_before),
                        op.Sub(key_after, at_query(total_after)))
    exponent = op.Where(_visible(op, offset, key_mask, False), exponent, const(op, -np.inf, exponent))
    weights = op.Mul(op.MatMul(phi_q, op.Transpose(phi_k, perm=[0, 1, 3, 2])), op.Exp(exponent))
    return _weighted_sum(op, weights, v)


def _allowed(op, mask, kind: str):
    """The boolean keep-matrix of a mask of `kind` (attention_masks.allowed_from)."""
    if kind == "additive":
        return op.Equal(mask, const(op, 0.0, mask))
    if kind == "fill":
        return op.Not(op.Cast(mask, to=ir.DataType.BOOL))
    if kind == "keep" or mask.dtype == ir.DataType.BOOL:
        return op.Cast(mask, to=ir.DataType.BOOL)
    return op.Not(op.Equal(mask, const(op, 0.0, mask)))  # kind "bool" on a float mask: nonzero keeps


def _any(op, x, axes):
    # a count, not ReduceMax: ReduceMax takes its axes as an input only from opset 18, ReduceSum from 13
    count = op.ReduceSum(op.Cast(x, to=ir.DataType.INT64), const(op, axes), keepdims=0)
    return op.Greater(count, const(op, 0))


def key_padding_guard(op, mask, kind: str, causal: bool, flag_causal: bool):
    """The key_padding_guard op: (key padding [B or 1, Tk] bool, poison float32). ONNX cannot raise, so a
    violated guard makes `poison` NaN instead, which the rewritten graph adds to the attention's output: the
    file answers NaN where the torch graph raises MaskChangedError, never a plausible wrong value."""
    shape = mask.shape  # None in an ONNX file whose shapes were not inferred: then assume [B, H, Tq, Tk]
    rank = 4 if shape is None else len(shape)
    one_row = shape is not None and (rank < 2 or shape[-2] == 1)  # broadcast over queries: key padding by its shape
    if rank < 4:
        mask = op.Unsqueeze(mask, const(op, list(range(4 - rank))))
    allowed = _allowed(op, mask, kind)
    keys = _any(op, op.Gather(allowed, const(op, -1), axis=2), [1])
    violations = []
    if kind == "additive":
        zero_or_dropped = op.Or(op.Equal(mask, const(op, 0.0, mask)), op.LessOrEqual(mask, const(op, -1e4, mask)))
        violations.append(op.Not(zero_or_dropped))
    if causal or not one_row:
        num_queries, num_keys = (op.Squeeze(shape_of(op, mask, i, i + 1)) for i in (2, 3))
        want = op.Unsqueeze(keys, const(op, [1, 2]))
        if causal:
            ordered = op.Unsqueeze(op.GreaterOrEqual(_offsets(op, num_queries, num_keys), const(op, 0)),
                                   const(op, [0, 1]))
            want = op.And(want, ordered)
            if flag_causal:
                allowed = op.And(allowed, ordered)
        real = op.Slice(keys, op.Unsqueeze(op.Sub(num_keys, num_queries), const(op, [0])),
                        const(op, [np.iinfo(np.int64).max]), const(op, [1]))  # padded queries' rows: not compared
        violations.append(op.And(op.Xor(allowed, want), op.Unsqueeze(real, const(op, [1, 3]))))
    poison = const(op, 0.0)
    for violated in violations:
        poison = op.Where(_any(op, violated, [0, 1, 2, 3]), const(op, float("nan")), poison)
    return keys, poison


def masked_keys(op, phi_k, key_mask):
    """Zero the features of masked keys ([B, S] bool) so they add nothing to numerator or denominator."""
    if key_mask is None:
        return phi_k
    return op.Mul(phi_k, op.CastLike(op.Unsqueeze(key_mask, const(op, [1, 3])), phi_k))


def low_rank_matmul(op, x, down_t, up_t, bias=None):
    """x @ down^T @ up^T (+ bias): two thin MatMuls; the factors are stored already transposed."""
    y = op.MatMul(op.MatMul(x, down_t), up_t)
    return y if bias is None else op.Add(y, bias)


def btt_grid(core1_shape, core2_shape) -> BlockGrid:
    """The grid of a BTT (or Monarch) pair from its cores' shapes: core1 [m1, n1*r, m2], core2 [n1, n2, r*m1]."""
    m1, _, m2 = (int(d) for d in core1_shape)
    n1, n2, rank_m1 = (int(d) for d in core2_shape)
    return BlockGrid(m1, m2, n1, n2, rank_m1 // m1)


def block_tensor_train_matmul(op, x, core1_t, core2_t, grid: BlockGrid, in_features: int, out_features: int):
    """x @ W'^T for W' in relinear's two-core BTT layout (Monarch included; see relinear.approx.btt).

    core1_t = core1^T [m1, m2, n1*r] and core2_t = core2^T [n1, r*m1, n2] are stored pre-transposed, so each
    stage is one batched MatMul over the blocks; between them a Reshape/Transpose is the permutation P.
    """
    lead = shape_of(op, x, 0, -1)
    padding = grid.m1 * grid.m2 - in_features
    if padding:
        x = pad_end(op, x, -1, const(op, [padding]))
    blocks = op.Transpose(op.Reshape(x, const(op, [-1, grid.m1, grid.m2])), perm=[1, 0, 2])
    stage1 = op.Reshape(op.MatMul(blocks, core1_t), const(op, [grid.m1, -1, grid.n1, grid.rank]))
    permuted = op.Reshape(op.Transpose(stage1, perm=[2, 1, 3, 0]), const(op, [grid.n1, -1, grid.rank * grid.m1]))
    stage2 = op.Transpose(op.MatMul(permuted, core2_t), perm=[1, 0, 2])
    y = op.Reshape(stage2, op.Concat(lead, const(op, [grid.n1 * grid.n2]), axis=0))
    if grid.n1 * grid.n2 != out_features:
        y = op.Slice(y, const(op, [0]), const(op, [out_features]), const(op, [-1]))
    return y
