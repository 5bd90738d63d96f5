"""Plain-torch `low_rank_linear`: y = (x @ down.T) @ up.T + bias, down [r, in], up [out, r].

Two F.linear calls already run as two GEMMs on the flattened tokens with the bias fused into the second;
the rank-r intermediate is the only extra memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def low_rank_linear_reference(
    x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    bias = None if bias is None else bias.to(x.dtype)
    return F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype), bias)
