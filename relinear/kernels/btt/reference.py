"""Plain-torch `btt_linear` (also Monarch's): y = x @ W.T + bias for W in the BTT layout of
relinear.approx.btt, core1 [m1, n1*r, m2], core2 [n1, n2, r*m1], `out_features` <= n1*n2.

Two forms with the same result:
- `btt_linear_reference`: the spec, two bmm's; differentiable and free of Python loops over sizes.
- `btt_linear_cpu`: what runs on CPU. With small blocks it runs token chunks that stay in cache, reads x
  through strided views (no copy), writes stage 1 straight into the layout stage 2 reads and stage 2
  straight into the output: 17 ms vs 66 ms for the reference at 4096 features, 2048 tokens, 64 blocks on
  2 cores. Large blocks are efficient GEMMs already, and chunking would re-read their weights once per
  chunk, so they (and anything autograd records: bmm's out= is not differentiable) run the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Tokens per chunk are chosen so a chunk of x holds about this many elements (8 MB in fp32): measured
# fastest on 2-core Xeon for 4096 features (512-token chunks: 15 ms vs 23 ms unchunked, output excluded).
_CHUNK_ELEMENTS = 1 << 21
# Above this many weight elements the reference form is as fast or faster (4096 features, 4 blocks: 135 ms
# vs 136 ms quiet, 269 ms vs 368 ms under load); 8 blocks sit at the limit and gain from chunks (70 vs 98 ms).
_MAX_CHUNKED_WEIGHTS = 2 * _CHUNK_ELEMENTS


def _grid(core1: torch.Tensor, core2: torch.Tensor) -> tuple[int, int, int, int, int]:
    m1, _, m2 = core1.shape
    n1, n2, rank_m1 = core2.shape
    return m1, m2, n1, n2, rank_m1 // m1


def _padded_rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """x as a [tokens, width] matrix, zero-padding the features when the blocks do not divide them."""
    rows = x.reshape(-1, x.shape[-1])
    return F.pad(rows, (0, width - rows.shape[-1])) if rows.shape[-1] != width else rows


def btt_linear_reference(
    x: torch.Tensor,
    core1: torch.Tensor,
    core2: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    m1, m2, n1, n2, rank = _grid(core1, core2)
    rows = _padded_rows(x, m1 * m2)
    tokens = rows.shape[0]
    stage1 = torch.bmm(rows.view(tokens, m1, m2).transpose(0, 1), core1.to(x.dtype).transpose(1, 2))
    mixed = stage1.view(m1, tokens, n1, rank).permute(2, 1, 3, 0).reshape(n1, tokens, rank * m1)
    stage2 = torch.bmm(mixed, core2.to(x.dtype).transpose(1, 2))  # [n1, tokens, n2]
    y = stage2.transpose(0, 1).reshape(tokens, n1 * n2)[:, :out_features]
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], out_features)


def _records_autograd(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def btt_linear_cpu(
    x: torch.Tensor,
    core1: torch.Tensor,
    core2: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    if _records_autograd(x, core1, core2, bias) or core1.numel() + core2.numel() > _MAX_CHUNKED_WEIGHTS:
        return btt_linear_reference(x, core1, core2, bias, out_features)
    m1, m2, n1, n2, rank = _grid(core1, core2)
    rows = _padded_rows(x, m1 * m2)
    tokens = rows.shape[0]
    core1, core2 = core1.to(x.dtype), core2.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    chunk = max(1, min(tokens, _CHUNK_ELEMENTS // (m1 * m2)))
    y = x.new_empty(tokens, n1 * n2)
    # mixed[v, (a, i), t] is stage 2's input; seen as [i, (v, a), t] it is stage 1's output.
    mixed = x.new_empty(n1, rank * m1, chunk)
    for start in range(0, tokens, chunk):
        stop = min(start + chunk, tokens)
        width = stop - start
        block_in = rows[start:stop].view(width, m1, m2).permute(1, 2, 0)  # [i, j, t]
        stage2_in = mixed[..., :width]
        stage1_out = stage2_in.view(n1, rank, m1, width).permute(2, 0, 1, 3).view(m1, n1 * rank, width)
        torch.bmm(core1, block_in, out=stage1_out)
        out = y[start:stop]
        torch.bmm(core2, stage2_in, out=out.view(width, n1, n2).permute(1, 2, 0))
        if bias is not None:
            out[:, :out_features] += bias
    if out_features != n1 * n2:
        y = y[:, :out_features].contiguous()
    return y.view(*x.shape[:-1], out_features)


def btt_linear_fake(
    x: torch.Tensor,
    core1: torch.Tensor,
    core2: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """Shape only: keeps symbolic token counts symbolic under torch.export / torch.compile."""
    return x.new_empty(*x.shape[:-1], out_features)
