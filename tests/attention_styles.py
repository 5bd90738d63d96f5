"""Hand-written softmax attention in the spellings real code bases use, each a small module with its inputs.

Each style is plain softmax attention (optionally with key padding and a causal mask), so a rewrite with a
window covering every key must reproduce it exactly on the real positions. `STYLES` maps a name to a
builder returning (module, example args, a boolean [B, T] of the real output rows or None).
Used by the matcher tests and by `benchmarks/coverage.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

B, H, T, D = 2, 4, 10, 8
C = H * D
LENGTHS = (10, 7)  # the second sequence is padded (right padding)


def padding(t: int = T, lengths=LENGTHS) -> torch.Tensor:
    """[B, t] bool, True = a real token; right padded."""
    keep = torch.zeros(len(lengths), t, dtype=torch.bool)
    for i, n in enumerate(lengths):
        keep[i, :min(n, t)] = True
    return keep


def _x(t: int = T, seed: int = 1, b: int = B) -> torch.Tensor:
    return torch.randn(b, t, C, generator=torch.Generator().manual_seed(seed))


class Heads(nn.Module):
    """q, k, v projections split into [B, H, T, D] heads, and the output projection."""

    def __init__(self, kv_heads: int = H):
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(C, C)
        self.kv = nn.Linear(C, 2 * kv_heads * D)
        self.proj = nn.Linear(C, C)
        self.kv_heads = kv_heads

    def split(self, x, context=None):
        b, t, _ = x.shape
        src = x if context is None else context
        k, v = self.kv(src).chunk(2, dim=-1)
        q = self.q(x).view(b, t, H, D).transpose(1, 2)
        k, v = (z.view(b, src.shape[1], self.kv_heads, D).transpose(1, 2) for z in (k, v))
        return q, k, v

    def merge(self, out):
        b, _, t, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, t, C))


class TimmAttention(Heads):
    """timm's ViT Attention (fused_attn off): q * scale, q @ k.transpose(-2, -1), softmax, attn @ v."""

    def forward(self, x):
        q, k, v = self.split(x)
        attn = (q * D**-0.5) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        return self.merge(attn @ v)


class NanoGPT(Heads):
    """nanoGPT's CausalSelfAttention, the slow path: masked_fill with a registered causal buffer."""

    def __init__(self, flash: bool = False):
        super().__init__()
        self.flash = flash
        self.register_buffer("bias", torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64))

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.split(x)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.proj(y)


class XTransformers(Heads):
    """x-transformers: einsum for both products, key padding by masked_fill with -finfo.max."""

    def forward(self, x, keep):
        q, k, v = self.split(x)
        sim = torch.einsum("b h i d, b h j d -> b h i j", q, k) * D**-0.5
        sim = sim.masked_fill(~keep[:, None, None, :], -torch.finfo(sim.dtype).max)
        attn = sim.softmax(dim=-1)
        return self.merge(torch.einsum("b h i j, b h j d -> b h i d", attn, v))


class LatentDiffusion(Heads):
    """ldm's CrossAttention: heads folded into the batch, einsum('b i d, b j d -> b i j'), optional context."""

    def forward(self, x, context=None):
        q, k, v = self.split(x, context)
        q, k, v = (z.reshape(-1, z.shape[-2], D) for z in (q, k, v))
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * D**-0.5
        attn = sim.softmax(dim=-1)
        out = torch.einsum("b i j, b j d -> b i d", attn, v)
        return self.merge(out.view(x.shape[0], H, x.shape[1], D))


class MatmulThenEinsum(Heads):
    """matmul scores, einsum product."""

    def forward(self, x):
        q, k, v = self.split(x)
        attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D), dim=-1)
        return self.merge(torch.einsum("bhij,bhjd->bhid", attn, v))


class WhereFullLike(Heads):
    """where(keep, s, full_like(s, finfo.min)) (keep = key padding & causal)."""

    def forward(self, x, keep):
        q, k, v = self.split(x)
        t = x.shape[1]
        allowed = keep[:, None, None, :] & torch.ones(t, t, dtype=torch.bool).tril()
        s = q @ k.transpose(-2, -1) * D**-0.5
        s = torch.where(allowed, s, torch.full_like(s, torch.finfo(s.dtype).min))
        return self.merge(s.softmax(-1) @ v)


class WhereTensorInf(Heads):
    """where(keep, s, torch.tensor(-inf))."""

    def forward(self, x, keep):
        q, k, v = self.split(x)
        s = q @ k.transpose(-2, -1) * D**-0.5
        s = torch.where(keep[:, None, None, :], s, torch.tensor(float("-inf")))
        return self.merge(s.softmax(-1) @ v)


class TwoMaskedFills(Heads):
    """Padding, then causal: two masked_fills in a row."""

    def forward(self, x, keep):
        q, k, v = self.split(x)
        t = x.shape[1]
        s = q @ k.transpose(-2, -1) * D**-0.5
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        return self.merge(s.softmax(-1) @ v)


class FloatUpcast(Heads):
    """softmax(s.float()).type_as(q): a float32 softmax cast back."""

    def forward(self, x):
        q, k, v = self.split(x)
        s = torch.matmul(q, k.transpose(2, 3)) * D**-0.5
        p = F.softmax(s.float(), dim=-1).type_as(q)
        return self.merge(torch.matmul(p, v))


class SoftmaxViewBmm(Heads):
    """Scores on [B, H, T, T] plus a mask, softmax, then a view to [B*H, T, T] and bmm (OPT, BART)."""

    def forward(self, x, keep):
        q, k, v = self.split(x)
        b, t = x.shape[:2]
        s = q @ k.transpose(-1, -2) * D**-0.5
        s = s + torch.zeros(b, 1, 1, t).masked_fill(~keep[:, None, None, :], torch.finfo(x.dtype).min)
        p = s.softmax(-1).view(b * H, t, t)
        out = torch.bmm(p, v.reshape(b * H, t, D))
        return self.merge(out.view(b, H, t, D))


class RepeatInterleaveGQA(Heads):
    """Grouped-query attention by repeat_interleave of 2 key/value heads to 4."""

    def __init__(self):
        super().__init__(kv_heads=2)

    def forward(self, x):
        q, k, v = self.split(x)
        k, v = (z.repeat_interleave(H // 2, dim=1) for z in (k, v))
        return self.merge(torch.softmax(q @ k.transpose(-2, -1) * D**-0.5, -1) @ v)


class BaddbmmFlat(Heads):
    """transformers' style on flattened heads: baddbmm(empty, q, k^T, beta=0, alpha) viewed to 4-D, + the
    mask, softmax, viewed back, bmm."""

    def forward(self, x, keep):
        q, k, v = self.split(x)
        b, t = x.shape[:2]
        qf, kf, vf = (z.reshape(b * H, t, D) for z in (q, k, v))
        empty = torch.empty(b * H, t, t, dtype=x.dtype)
        s = torch.baddbmm(empty, qf, kf.transpose(1, 2), beta=0, alpha=D**-0.5).view(b, H, t, t)
        s = s + torch.zeros(b, 1, 1, t).masked_fill(~keep[:, None, None, :], torch.finfo(x.dtype).min)
        p = s.softmax(-1).view(b * H, t, t)
        return self.merge(torch.bmm(p, vf).view(b, H, t, D))


class PerceiverLatents(Heads):
    """Perceiver: a few learned latents attend to the inputs (Tq != Tk), with key padding."""

    def __init__(self, latents: int = 3):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, latents, C))

    def forward(self, x, keep):
        lat = self.latents.expand(x.shape[0], -1, -1)
        q, k, v = self.split(lat, context=x)
        s = q @ k.transpose(-2, -1) * D**-0.5
        s = s.masked_fill(~keep[:, None, None, :], torch.finfo(s.dtype).min)
        return self.merge(s.softmax(-1) @ v)


class TorchMHA(nn.Module):
    """nn.MultiheadAttention, batch-first or time-first, with a causal float mask."""

    def __init__(self, batch_first: bool, need_weights: bool, causal: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(C, H, batch_first=batch_first)
        self.batch_first, self.need_weights, self.causal = batch_first, need_weights, causal

    def forward(self, x):
        t = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t) if self.causal else None
        x = x if self.batch_first else x.transpose(0, 1)
        out, _ = self.mha(x, x, x, attn_mask=mask, need_weights=self.need_weights)
        return out if self.batch_first else out.transpose(0, 1)


class FunctionalMHA(nn.Module):
    """F.multi_head_attention_forward, time-first, with key padding."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(C, H)

    def forward(self, x, keep):
        m = self.mha
        xt = x.transpose(0, 1)
        out, _ = F.multi_head_attention_forward(
            xt, xt, xt, C, H, m.in_proj_weight, m.in_proj_bias, None, None, False, 0.0, m.out_proj.weight,
            m.out_proj.bias, training=False, key_padding_mask=~keep, need_weights=False)
        return out.transpose(0, 1)


class ReturnsWeights(TorchMHA):
    """nn.MultiheadAttention whose averaged weights are returned: the probabilities must stay."""

    def forward(self, x):
        out, weights = self.mha(x, x, x, need_weights=True)
        return out, weights


# name -> (builder, its second input: False (none), True (the padding vector) or "context" (cross-attention))
STYLES: dict[str, tuple] = {
    "timm": (TimmAttention, False),
    "nanogpt": (NanoGPT, False),
    "nanogpt_flash": (lambda: NanoGPT(flash=True), False),
    "x_transformers": (XTransformers, True),
    "latent_diffusion": (LatentDiffusion, False),
    "latent_diffusion_cross": (LatentDiffusion, "context"),
    "matmul_einsum": (MatmulThenEinsum, False),
    "where_full_like": (WhereFullLike, True),
    "where_tensor_inf": (WhereTensorInf, True),
    "two_masked_fills": (TwoMaskedFills, True),
    "float_upcast": (FloatUpcast, False),
    "softmax_view_bmm": (SoftmaxViewBmm, True),
    "gqa_repeat_interleave": (RepeatInterleaveGQA, False),
    "baddbmm_flat": (BaddbmmFlat, True),
    "perceiver_latents": (PerceiverLatents, True),
    "mha_batch_first": (lambda: TorchMHA(True, False), False),
    "mha_time_first": (lambda: TorchMHA(False, False), False),
    "mha_need_weights": (lambda: TorchMHA(True, True), False),
    "mha_functional": (FunctionalMHA, True),
}


def build(name: str, t: int = T, lengths=LENGTHS, seed: int = 1):
    """(module in eval mode, example args, [B, T] bool of the real output rows or None = all rows)."""
    make, extra = STYLES[name]
    model = make().eval()
    x = _x(t, seed, b=len(lengths))
    if extra == "context":
        return model, (x, _x(t + 3, seed + 1, b=len(lengths))), None
    if extra:
        keep = padding(t, lengths)
        rows = None if isinstance(model, PerceiverLatents) else keep
        return model, (x, keep), rows
    return model, (x,), None
