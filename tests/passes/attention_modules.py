"""Hand-written attention modules in the shapes users write them, for the attention rule's tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NanoGPTAttention(nn.Module):
    """nanoGPT's CausalSelfAttention, flash path: SDPA with is_causal, then `.transpose(1, 2).contiguous().view`."""

    def __init__(self, n_embd: int = 32, n_head: int = 4):
        super().__init__()
        self.n_head, self.n_embd = n_head, n_embd
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.size()  # noqa: N806 (nanoGPT's names)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MaskInputAttention(nn.Module):
    """Attention that takes its 4-D boolean mask [B, 1, T, T] (True = attend) as an input."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, mask):
        B, T, C = x.shape  # noqa: N806
        q, k, v = (t.reshape(B, T, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


def padding_mask(lengths: list[int], t: int, causal: bool) -> torch.Tensor:
    """[B, 1, T, T] bool: left padding to `t` keys [& causal]; a padded query's row sees the real keys only."""
    keys = torch.arange(t)[None, :] >= torch.tensor([t - n for n in lengths])[:, None]
    mask = keys[:, None, None, :].expand(len(lengths), 1, t, t)
    return mask & torch.ones(t, t, dtype=torch.bool).tril() if causal else mask.clone()
