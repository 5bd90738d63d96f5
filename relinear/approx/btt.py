"""Block Tensor-Train (BTT) with two cores (Qiu et al. 2024, "Compute Better Spent"), and the layout that
Monarch shares.

Layout. The input is zero-padded to m1*m2 and split as (i, j), i < m1 the block, j < m2 inside it; the
output is padded to n1*n2 and split as (v, c). With TT-rank r:

    W[(v, c), (i, j)] = sum_a core2[v, c, a*m1 + i] * core1[i, v*r + a, j]

core1 [m1, n1*r, m2] and core2 [n1, n2, r*m1] are both block-diagonal factors: the layer is
`blockdiag(core2) . P . blockdiag(core1)`, where P sends stage-1 channel (i, v, a) to stage-2 channel
(v, a, i). These orders let the CPU kernel write stage 1 straight into stage 2's layout (no copy).

Fit. For one block pair (v, i) the sub-block W[v, :, i, :] is sum_a core2[v, :, a*m1+i] core1[i, v*r+a, :],
a rank-r matrix whose parameters appear in no other pair. So the Frobenius-optimal projection is the
truncated SVD of every sub-block, done in closed form; no ALS refinement can improve on it. At full rank
(r = min(m2, n2)) every sub-block is kept exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from relinear.approx.low_rank import svd_factors


@dataclass(frozen=True)
class BlockGrid:
    """Factorization of in_features = m1*m2 (padded) and out_features = n1*n2 (padded), and the rank."""

    m1: int
    m2: int
    n1: int
    n2: int
    rank: int

    @property
    def core1_shape(self) -> tuple[int, int, int]:
        return (self.m1, self.n1 * self.rank, self.m2)

    @property
    def core2_shape(self) -> tuple[int, int, int]:
        return (self.n1, self.n2, self.rank * self.m1)

    @property
    def params(self) -> int:
        return math.prod(self.core1_shape) + math.prod(self.core2_shape)


def balanced_factors(size: int) -> tuple[int, int]:
    """(blocks, block size) with blocks*size >= `size`, both near sqrt(size).

    An exact divisor pair is used when it is no more than 2x away from square; otherwise (primes and
    prime-ish sizes) the size is padded to ceil(sqrt)^2-ish, which wastes less than one block.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    root = math.isqrt(size)
    divisor = max(d for d in range(1, root + 1) if size % d == 0)
    if 2 * divisor >= root:
        return divisor, size // divisor
    blocks = math.ceil(math.sqrt(size))
    return blocks, math.ceil(size / blocks)


def _check_factors(name: str, factors: tuple[int, int], size: int) -> tuple[int, int]:
    blocks, block = factors
    if blocks < 1 or block < 1 or blocks * block < size:
        raise ValueError(f"{name}={factors} must be two positive ints whose product covers {size}")
    return blocks, block


def btt_grid(
    in_features: int,
    out_features: int,
    rank: int,
    *,
    in_factors: tuple[int, int] | None = None,
    out_factors: tuple[int, int] | None = None,
) -> BlockGrid:
    """The grid `btt_fit` uses: factors near sqrt unless given as (blocks, block size)."""
    m1, m2 = _check_factors("in_factors", in_factors or balanced_factors(in_features), in_features)
    n1, n2 = _check_factors("out_factors", out_factors or balanced_factors(out_features), out_features)
    if not 1 <= rank <= min(m2, n2):
        raise ValueError(f"rank must be in [1, {min(m2, n2)}] for blocks of {n2}x{m2}, got {rank}")
    return BlockGrid(m1, m2, n1, n2, rank)


def grid_of(core1: torch.Tensor, core2: torch.Tensor) -> BlockGrid:
    """Read the grid back from the cores' shapes, checking that they fit together."""
    if core1.dim() != 3 or core2.dim() != 3:
        raise ValueError(f"cores must be 3-D, got {tuple(core1.shape)} and {tuple(core2.shape)}")
    m1, n1_rank, m2 = core1.shape
    n1, n2, rank_m1 = core2.shape
    rank = rank_m1 // m1
    if rank < 1 or rank * m1 != rank_m1 or n1 * rank != n1_rank:
        raise ValueError(f"core1 {tuple(core1.shape)} and core2 {tuple(core2.shape)} do not form a BTT pair")
    return BlockGrid(m1, m2, n1, n2, rank)


def project_onto_grid(weight: torch.Tensor, grid: BlockGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """The closed-form optimal cores of `weight` [out, in] on `grid` (per-block-pair truncated SVD)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if grid.m1 * grid.m2 < in_features or grid.n1 * grid.n2 < out_features:
        raise ValueError(f"{grid} does not cover a weight of shape {tuple(weight.shape)}")
    padded = F.pad(weight, (0, grid.m1 * grid.m2 - in_features, 0, grid.n1 * grid.n2 - out_features))
    pairs = padded.view(grid.n1, grid.n2, grid.m1, grid.m2).permute(0, 2, 1, 3)  # [v, i, c, j]
    up, down = svd_factors(pairs, grid.rank)  # [v, i, c, a], [v, i, a, j]
    core1 = down.permute(1, 0, 2, 3).reshape(grid.core1_shape)  # [i, (v, a), j]
    core2 = up.permute(0, 2, 3, 1).reshape(grid.core2_shape)  # [v, c, (a, i)]
    return core1, core2


def btt_fit(
    weight: torch.Tensor,
    rank: int,
    *,
    in_factors: tuple[int, int] | None = None,
    out_factors: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal two-core BTT `(core1, core2)` of TT-rank `rank` for `weight` [out, in]."""
    out_features, in_features = weight.shape
    grid = btt_grid(in_features, out_features, rank, in_factors=in_factors, out_factors=out_factors)
    return project_onto_grid(weight, grid)


def btt_to_dense(core1: torch.Tensor, core2: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """The dense [out, in] matrix the cores stand for (padding sliced off)."""
    g = grid_of(core1, core2)
    blocks = torch.einsum(
        "vcai,ivaj->vcij",
        core2.reshape(g.n1, g.n2, g.rank, g.m1),
        core1.reshape(g.m1, g.n1, g.rank, g.m2),
    )
    return blocks.reshape(g.n1 * g.n2, g.m1 * g.m2)[:out_features, :in_features]


def btt_cost(in_features: int, out_features: int, rank: int) -> tuple[int, int]:
    """(parameters, FLOPs per token) of the BTT `btt_fit` builds: one multiply-add per weight per token."""
    params = btt_grid(in_features, out_features, rank).params
    return params, 2 * params
