"""Monarch matrices (Dao et al. 2022): M = P2 . blockdiag(blocks2) . P1 . blockdiag(blocks1).

relinear's Monarch with `nblocks` = k has k blocks in each factor, the convention of the reference
MonarchLinear: the input is padded to k*p (p = ceil(in/k)), the output to k*s (s = ceil(out/k)), and
the stage-1 blocks are (about) square, so k*k*t >= min(in, out) middle channels, t = ceil(min(p, s)/k).
Every block pair (stage-2 block v, stage-1 block i) is then linked by t channels: with k = sqrt(n) that is
one channel (t = 1) and this is the classic Monarch, whose projection is the rank-1 SVD of each reshaped
sub-block; fewer, larger blocks give t > 1 and the projection keeps the rank-t SVD of each sub-block.

A Monarch matrix is therefore a two-core BTT on the grid (k, p) x (k, s) with TT-rank t, and shares
its layout (see relinear.approx.btt): blocks1 [k, k*t, p], blocks2 [k, s, t*k].
"""

from __future__ import annotations

import math

import torch

from relinear.approx.btt import BlockGrid, btt_to_dense, project_onto_grid


def monarch_grid(in_features: int, out_features: int, nblocks: int) -> BlockGrid:
    if not 1 <= nblocks <= min(in_features, out_features):
        raise ValueError(
            f"nblocks must be in [1, {min(in_features, out_features)}] for a {out_features}x{in_features} "
            f"weight, got {nblocks}"
        )
    in_block = math.ceil(in_features / nblocks)
    out_block = math.ceil(out_features / nblocks)
    channels = math.ceil(min(in_block, out_block) / nblocks)
    return BlockGrid(nblocks, in_block, nblocks, out_block, channels)


def monarch_project(weight: torch.Tensor, nblocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Frobenius-optimal Monarch `(blocks1, blocks2)` with `nblocks` blocks for `weight` [out, in]."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    return project_onto_grid(weight, monarch_grid(in_features, out_features, nblocks))


def monarch_to_dense(blocks1: torch.Tensor, blocks2: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """The dense [out, in] matrix of a Monarch pair (padding sliced off)."""
    return btt_to_dense(blocks1, blocks2, in_features, out_features)


def monarch_cost(in_features: int, out_features: int, nblocks: int) -> tuple[int, int]:
    """(parameters, FLOPs per token) of the Monarch `monarch_project` builds."""
    params = monarch_grid(in_features, out_features, nblocks).params
    return params, 2 * params
