"""The spec of the 2:4 sparse linear layer: y = x W^T + b, W [out, in] with 2 of every 4 consecutive inputs
of a row stored.

Layout (relinear.approx.sparse.compress_24): values [out, 2g] in the weight's dtype, positions int8
[out, 2g] holding each value's offset (0..3) inside its group of 4; columns 2j, 2j+1 of the compact form
belong to group j, and g = ceil(in / 4) (a last partial group stores zeros past the input's end). The compact
form is 5/8 of the dense fp32 bytes (1/2 values + 1/8 int8 offsets).

On CPU the product scatters the compact form into the dense masked W and runs one GEMM: exact against the
dense masked product (the same matrix, the same GEMM), and as fast as dense (no CPU GEMM skips zeros).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from relinear.approx.sparse import dense_24


def check_layout(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
    """Raise ValueError naming the first argument that does not fit the 2:4 layout."""
    if values.dim() != 2 or positions.shape != values.shape or values.shape[1] % 2:
        raise ValueError(f"values and positions must both be [out, 2 * groups], got {tuple(values.shape)} and "
                         f"{tuple(positions.shape)}")
    if not 0 <= 2 * values.shape[1] - x.shape[-1] < 4:
        raise ValueError(f"x has {x.shape[-1]} features but the 2:4 weight stores {values.shape[1] // 2} groups of "
                         f"4 inputs")


def sparse24_linear_reference(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                              bias: torch.Tensor | None) -> torch.Tensor:
    check_layout(x, values, positions)
    bias = None if bias is None else bias.to(x.dtype)
    return F.linear(x, dense_24(values, positions, x.shape[-1]).to(x.dtype), bias)


def sparse24_linear_fake(x, values, positions, bias):
    return x.new_empty(*x.shape[:-1], values.shape[0])
