"""Recognize a weight that already *is* a cheaper structure, so it can be stored and run as one at no error.

Checked forms, each exactly (up to the rounding of the weight's dtype):
- low rank: numerical rank r (singular values above `tolerance * s_max`) with r * (in + out) < in * out;
- 2:4: at most 2 nonzeros in every group of 4 consecutive inputs of a row;
- block-sparse: for the largest block size (64 down to 4) dividing both dims, at most half the blocks nonzero;
- Monarch: the closed-form projection with `nblocks` blocks reproduces the weight (cheapest nblocks first).
The cheapest form found (fewest stored parameters) wins; a weight with none is left alone with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from relinear.approx import monarch as monarch_math
from relinear.approx import sparse as sparse_math
from relinear.approx.low_rank import svd_factors

BLOCK_SIZES = (64, 32, 16, 8, 4)
MONARCH_BLOCKS = (64, 32, 16, 8, 4, 2)
KINDS = ("low_rank", "sparse24", "block_sparse", "monarch")


@dataclass(frozen=True)
class Structure:
    """An exact cheaper form of a weight: `tensors` are the arguments its op takes after x."""

    kind: str  # one of KINDS
    detail: str  # e.g. "rank=3", "block=16, density=0.25"
    params: int
    tensors: tuple[torch.Tensor, ...]
    setting: int = 0  # rank, block size or nblocks (0 for 2:4)


def tolerance(dtype: torch.dtype) -> float:
    """Relative size below which a difference is the dtype's rounding, not structure."""
    return 64 * torch.finfo(dtype).eps


def _relative_error(approx: torch.Tensor, weight: torch.Tensor) -> float:
    w = weight.to(torch.float64)
    return float(torch.linalg.matrix_norm(approx.to(torch.float64) - w) / torch.linalg.matrix_norm(w))


def _low_rank(weight: torch.Tensor, tol: float) -> tuple[Structure | None, str]:
    out_features, in_features = weight.shape
    singular = torch.linalg.svdvals(weight.to(torch.float64))
    rank = max(1, int((singular > tol * singular[0]).sum()))
    params = rank * (in_features + out_features)
    if params >= out_features * in_features:
        return None, f"numerical rank {rank} of {min(weight.shape)}"
    up, down = svd_factors(weight, rank)
    return Structure("low_rank", f"rank={rank}", params, (down, up), rank), ""


def _sparse24(weight: torch.Tensor) -> tuple[Structure | None, str]:
    out_features, in_features = weight.shape
    if in_features % 4:
        return None, f"in_features {in_features} is not a multiple of 4"
    crowded = int(((weight.reshape(out_features, -1, 4) != 0).sum(-1) > 2).sum())
    if crowded:
        return None, f"{crowded} groups of 4 hold more than 2 nonzeros"
    return Structure("sparse24", "2:4", out_features * in_features // 2, sparse_math.compress_24(weight)), ""


def _block_sparse(weight: torch.Tensor) -> tuple[Structure | None, str]:
    out_features, in_features = weight.shape
    reasons = []
    for block in BLOCK_SIZES:
        if out_features % block or in_features % block:
            continue
        nonzero = sparse_math.block_scores(weight.abs().to(torch.float64), block) > 0
        kept, total = int(nonzero.sum()), nonzero.numel()
        if 2 * kept > total:
            reasons.append(f"{kept} of {total} blocks of {block} nonzero")
            continue
        tensors = sparse_math.to_bsr(weight, nonzero, block)
        return Structure("block_sparse", f"block={block}, density={kept / total:.3g}", kept * block * block,
                         tensors, block), ""
    return None, "; ".join(reasons) or "no block size in 64..4 divides both dims"


def _monarch(weight: torch.Tensor, tol: float) -> tuple[Structure | None, str]:
    out_features, in_features = weight.shape
    # more blocks is not always cheaper (k^2 t (p + s) parameters is least near k = sqrt(n)): cheapest first
    costs = sorted((monarch_math.monarch_cost(in_features, out_features, k)[0], k)
                   for k in MONARCH_BLOCKS if k <= min(weight.shape))
    for params, nblocks in costs:
        if params >= out_features * in_features:
            break
        blocks = monarch_math.monarch_project(weight, nblocks)
        dense = monarch_math.monarch_to_dense(*blocks, in_features, out_features)
        if _relative_error(dense, weight) <= tol:
            return Structure("monarch", f"nblocks={nblocks}", params, blocks, nblocks), ""
    return None, "no Monarch projection reproduces it"


def detect_structure(weight: torch.Tensor) -> Structure | str:
    """The cheapest exact structure of `weight` [out, in], or a string saying why there is none."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be a matrix [out, in], got shape {tuple(weight.shape)}")
    weight = weight.detach()
    if not weight.any():
        return "the weight is all zeros"
    tol = tolerance(weight.dtype)
    found, reasons = [], []
    for kind, (structure, reason) in zip(KINDS, (_low_rank(weight, tol), _sparse24(weight), _block_sparse(weight),
                                                 _monarch(weight, tol)), strict=True):
        if structure is None:
            reasons.append(f"{kind}: {reason}")
        else:
            found.append(structure)
    if not found:
        return "no exact cheaper structure (" + "; ".join(reasons) + ")"
    return min(found, key=lambda s: s.params)  # min keeps the first of equals: KINDS order breaks ties
