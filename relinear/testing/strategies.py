"""Hypothesis strategies for the inputs relinear's rewrites see: tensors, attention problems, dense weights.

Tensor values come from a drawn seed, not element by element: drawing thousands of floats one at a time
is slow and shrinks poorly, while the properties that matter (shapes, masks, dtypes, scales, structure)
are drawn as data and shrink to the smallest failing case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

FLOAT_DTYPES = (torch.float32, torch.float64)
SEEDS = st.integers(0, 2**31 - 1)
# the spread of values activations meet: unit scale, a wide range (saturation), near zero (cancellation)
ACTIVATION_RANGES = (4.0, 30.0, 1e-3)


def _drawn(value, default):
    """`value` as a strategy: strategies pass through, plain values become `just`, None means `default`."""
    if value is None:
        return default
    return value if isinstance(value, st.SearchStrategy) else st.just(value)


def _ints(value, low: int, high: int) -> st.SearchStrategy:
    """An int, an inclusive (low, high) range, or a strategy."""
    if isinstance(value, tuple):
        return st.integers(*value)
    return _drawn(value, st.integers(low, high))


def _dtypes(dtypes) -> st.SearchStrategy:
    if isinstance(dtypes, (tuple, list)):
        return st.sampled_from(dtypes)
    return _drawn(dtypes, st.just(torch.float32))


def _seeded(shape, seed: int, low: float, high: float, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low
    return values.to(dtype)


def float_tensors(shape, dtype=torch.float32, min_value: float = -4.0, max_value: float = 4.0
                  ) -> st.SearchStrategy[torch.Tensor]:
    """Tensors of `shape` (a tuple or a strategy of tuples) and `dtype` (a dtype, a tuple to choose from, or a
    strategy), values uniform in [min_value, max_value]."""
    if not min_value < max_value:
        raise ValueError(f"float_tensors: min_value must be < max_value, got {min_value} >= {max_value}")
    return st.builds(lambda s, d, seed: _seeded(s, seed, min_value, max_value, d),
                     _drawn(shape, None) if isinstance(shape, st.SearchStrategy) else st.just(tuple(shape)),
                     _dtypes(dtype), SEEDS)


def shapes(min_dims: int = 1, max_dims: int = 3, min_side: int = 1, max_side: int = 5
           ) -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(st.integers(min_side, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


@st.composite
def activation_inputs(draw, shape=None, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """Inputs to an activation function: a drawn range (unit, wide, tiny), with exact zeros and the range's
    extremes planted at drawn positions, where approximations of activations tend to break."""
    shape = draw(_drawn(shape, shapes()))
    dtype = draw(_dtypes(dtypes))
    bound = draw(st.sampled_from(ACTIVATION_RANGES))
    values = _seeded(shape, draw(SEEDS), -bound, bound, torch.float64).flatten()
    if values.numel():
        planted = st.tuples(st.integers(0, values.numel() - 1), st.sampled_from((0.0, -bound, bound)))
        specials = draw(st.lists(planted, max_size=3))
        for index, special in specials:
            values[index] = special
    return values.reshape(shape).to(dtype)


@dataclass
class AttentionCase:
    """One attention problem. q [B, H, T, D]; k, v [B, Hk, T, D] (GQA when Hk < H).

    `key_padding` [B, T] is True for real tokens (None: no padding); `mask_kind` says how the padding (and a
    causal triangle, when `causal`) reaches attention: None (no mask; causality as `is_causal`), "bool"
    (True = keep) or "additive" (0 = keep, `fill` = drop). `real_queries` [B, T] marks the positions whose
    output means something: padded queries' outputs differ between implementations and are never compared.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    key_padding: torch.Tensor | None
    mask_kind: str | None
    fill: float
    scale: float | None

    @property
    def tokens(self) -> int:
        return self.q.shape[-2]

    @property
    def real_queries(self) -> torch.Tensor:
        if self.key_padding is None:
            return torch.ones(self.q.shape[0], self.tokens, dtype=torch.bool)
        return self.key_padding

    @property
    def keep(self) -> torch.Tensor:
        """bool [B, 1, T, T]: which key each query may attend."""
        return keep_matrix(self.key_padding, self.causal, self.q.shape[0], self.tokens)

    @property
    def attn_mask(self) -> torch.Tensor | None:
        """The mask as the model passes it (`mask_kind`); None when causality goes by `is_causal`."""
        if self.mask_kind is None:
            return None
        if self.mask_kind == "bool":
            return self.keep
        zero = torch.zeros((), dtype=self.q.dtype)
        return torch.where(self.keep, zero, torch.full((), self.fill, dtype=self.q.dtype))

    @property
    def is_causal(self) -> bool:
        return self.causal and self.mask_kind is None

    def sdpa(self) -> torch.Tensor:
        """The reference output: softmax attention by `F.scaled_dot_product_attention`."""
        return F.scaled_dot_product_attention(self.q, self.k, self.v, attn_mask=self.attn_mask,
                                              is_causal=self.is_causal, scale=self.scale,
                                              enable_gqa=self.k.shape[1] != self.q.shape[1])


@st.composite
def attention_inputs(draw, batch=(1, 2), heads=(1, 4), tokens=(1, 8), head_dim=(1, 8), causal=None,
                     masks=(None, "bool", "additive"), padding: bool = True, allow_fully_masked: bool = False,
                     gqa: bool = True, dtypes=(torch.float32,), scales=True) -> AttentionCase:
    """Attention problems: causal or not, key padding on either side (a whole row padded when
    `allow_fully_masked`), boolean or additive masks (filled with -inf or the dtype's min), grouped-query
    heads, an explicit `scale` or SDPA's default 1/sqrt(D). Ranges are inclusive (low, high) tuples."""
    b, h, t, d = (draw(_ints(v, 1, 8)) for v in (batch, heads, tokens, head_dim))
    dtype = draw(_dtypes(dtypes))
    kv_heads = draw(st.sampled_from([g for g in range(1, h + 1) if h % g == 0])) if gqa else h
    is_causal = draw(st.booleans()) if causal is None else causal
    mask_kind = draw(st.sampled_from(masks))
    key_padding = None
    if padding and mask_kind is not None and draw(st.booleans()):
        lengths = draw(st.lists(st.integers(0 if allow_fully_masked else 1, t), min_size=b, max_size=b))
        left = draw(st.booleans())
        positions = torch.arange(t)
        key_padding = torch.stack([positions >= t - n if left else positions < n for n in lengths])
    fill = draw(st.sampled_from((float("-inf"), torch.finfo(dtype).min)))
    scale = draw(st.floats(0.05, 1.0)) if scales and draw(st.booleans()) else None
    seed = draw(SEEDS)
    q = _seeded((b, h, t, d), seed, -2.0, 2.0, dtype)
    k = _seeded((b, kv_heads, t, d), seed + 1, -2.0, 2.0, dtype)
    v = _seeded((b, kv_heads, t, d), seed + 2, -2.0, 2.0, dtype)
    return AttentionCase(q, k, v, is_causal, key_padding, mask_kind, fill, scale)


@dataclass
class DenseWeight:
    """A weight [out, in] with known structure: "dense" (generic), or exactly of a dense family's form with
    `size` its knob's value (e.g. "low_rank" of rank `size`, "monarch" with `size` blocks)."""

    weight: torch.Tensor
    structure: str
    size: int | None


def _dense_forms() -> dict:
    from relinear.families import families

    return {f.name: f.dense for f in families() if f.dense is not None}


STRUCTURES = ("dense", *_dense_forms())


def exactly_structured(form, out_features: int, in_features: int, size, seed: int,
                       dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A weight that is exactly of `form` at knob value `size`: random factors of the shapes its fit makes,
    multiplied out by its `dense`."""
    shapes = [f.shape for f in form.fit(torch.ones(out_features, in_features, dtype=torch.float64), size)]
    bound = 1 / math.sqrt(in_features)
    factors = tuple(_seeded(shape, seed + i, -bound, bound, torch.float64) for i, shape in enumerate(shapes))
    return form.dense(factors, in_features, out_features).to(dtype)


@st.composite
def dense_weights(draw, out_features=(1, 24), in_features=(1, 24), structures=STRUCTURES, dtype=torch.float32
                  ) -> DenseWeight:
    """Weights of any (also prime, non-divisible) shape, generic or exactly of a registered dense family's form."""
    unknown = set(structures) - set(STRUCTURES)
    if unknown:
        raise ValueError(f"dense_weights: unknown structure(s) {sorted(unknown)}; known: {STRUCTURES}")
    out_f, in_f = draw(_ints(out_features, 1, 24)), draw(_ints(in_features, 1, 24))
    structure = draw(st.sampled_from(structures))
    seed = draw(SEEDS)
    if structure == "dense":
        bound = 1 / math.sqrt(in_f)
        return DenseWeight(_seeded((out_f, in_f), seed, -bound, bound, dtype), structure, None)
    form = _dense_forms()[structure]
    size = draw(st.sampled_from(list(form.sizes(out_f, in_f))))
    return DenseWeight(exactly_structured(form, out_f, in_f, size, seed, dtype), structure, size)


ATTENTION_SPELLINGS = ("sdpa", "mul", "div")  # SDPA, or by hand with the scale multiplied / divided in
ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu}


class TinyTransformer(torch.nn.Module):
    """Pre-norm transformer layers, small enough to fuzz: attention spelled as `spelling`, a GELU/SiLU MLP.

    forward(x [B, T, W], mask) where mask is None, bool [B, 1, T, T] (True = keep) or additive.
    """

    def __init__(self, width: int, heads: int, layers: int, spelling: str, activation: str, causal: bool):
        super().__init__()
        self.heads, self.spelling, self.causal = heads, spelling, causal
        self.activation = ACTIVATIONS[activation]
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({
            "norm": torch.nn.LayerNorm(width),
            "q": torch.nn.Linear(width, width), "k": torch.nn.Linear(width, width),
            "v": torch.nn.Linear(width, width), "o": torch.nn.Linear(width, width),
            "up": torch.nn.Linear(width, 2 * width), "down": torch.nn.Linear(2 * width, width),
        }) for _ in range(layers))

    def _heads(self, x):
        b, t, w = x.shape
        return x.view(b, t, self.heads, w // self.heads).transpose(1, 2)

    def _attention(self, q, k, v, mask):
        d = q.shape[-1]
        if self.spelling == "sdpa":
            causal = self.causal and mask is None
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        product = q @ k.transpose(-2, -1)
        scores = product * d ** -0.5 if self.spelling == "mul" else product / d ** 0.5
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        elif mask is not None:
            scores = scores + mask
        return torch.softmax(scores, dim=-1) @ v

    def forward(self, x, mask=None):
        for block in self.blocks:
            h = block["norm"](x)
            q, k, v = (self._heads(block[n](h)) for n in ("q", "k", "v"))
            a = self._attention(q, k, v, mask).transpose(1, 2).reshape(x.shape)
            x = x + block["o"](a)
            x = x + block["down"](self.activation(block["up"](x)))
        return x


@dataclass
class TransformerCase:
    model: TinyTransformer
    args: tuple
    real_tokens: torch.Tensor  # bool [B, T]: outputs at padded positions are not compared

    @property
    def dense_layers(self) -> int:
        return sum(isinstance(m, torch.nn.Linear) for m in self.model.modules())


def keep_matrix(key_padding: torch.Tensor | None, causal: bool, batch: int, tokens: int) -> torch.Tensor:
    """bool [B, 1, T, T]: which key each query may attend, from key padding [B, T] and causality."""
    keep = torch.ones(batch, 1, tokens, tokens, dtype=torch.bool)
    if causal:
        keep = keep & torch.ones(tokens, tokens, dtype=torch.bool).tril()
    if key_padding is not None:
        keep = keep & key_padding[:, None, None, :]
    return keep


@st.composite
def tiny_transformers(draw, batch=(1, 2), tokens=(2, 6), heads=(1, 2), head_dim=(1, 4), layers=(1, 2),
                      structures=("dense", "low_rank")) -> TransformerCase:
    """Random small transformers: attention spelling, causal or not, padding masks (bool or additive, with
    fully masked rows unmasked as transformers does), GELU or SiLU, dense weights of a drawn structure."""
    b, t, h, d, n = (draw(_ints(v, 1, 8)) for v in (batch, tokens, heads, head_dim, layers))
    spelling = draw(st.sampled_from(ATTENTION_SPELLINGS))
    causal = draw(st.booleans())
    mask_kind = draw(st.sampled_from(("bool", "additive") if spelling != "sdpa" and causal
                                     else (None, "bool", "additive")))
    model = TinyTransformer(h * d, h, n, spelling, draw(st.sampled_from(tuple(ACTIVATIONS))), causal).eval()
    with torch.no_grad():
        for linear in (m for m in model.modules() if isinstance(m, torch.nn.Linear)):
            out_f, in_f = linear.weight.shape
            linear.weight.copy_(draw(dense_weights(out_f, in_f, structures)).weight)
            linear.bias.copy_(_seeded((out_f,), draw(SEEDS), -0.5, 0.5, torch.float32))
    padding = None
    if mask_kind is not None:
        lengths = draw(st.lists(st.integers(0, t), min_size=b, max_size=b))
        left = draw(st.booleans())
        positions = torch.arange(t)
        padding = torch.stack([positions >= t - length if left else positions < length for length in lengths])
    x = _seeded((b, t, h * d), draw(SEEDS), -2.0, 2.0, torch.float32)
    real = padding if padding is not None else torch.ones(b, t, dtype=torch.bool)
    if mask_kind is None:
        return TransformerCase(model, (x,), real)
    keep = keep_matrix(padding, causal, b, t)
    keep = keep | ~keep.any(-1, keepdim=True)  # a row that may see nothing sees everything (no NaN)
    dropped = torch.finfo(x.dtype).min
    mask = keep if mask_kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, dropped)
    return TransformerCase(model, (x, mask), real)
