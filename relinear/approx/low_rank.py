"""Low-rank factorization of a dense layer: W [out, in] ~ up [out, r] @ down [r, in].

Truncated SVD is the Eckart-Young optimum in Frobenius and spectral norm. It is computed in float64 so
that the factors do not depend on the weight's storage precision, and returned in the weight's dtype.
`svd_factors` takes batches of matrices too: the Monarch and BTT projections are batches of small SVDs.
"""

from __future__ import annotations

import torch


def _check_matrix(weight: torch.Tensor) -> None:
    if weight.dim() < 2:
        raise ValueError(f"weight must be a matrix [out, in] (or a batch of them), got shape {tuple(weight.shape)}")


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors `(up [..., out, r], down [..., r, in])` with `up @ down ~ weight`.

    The singular values are split as sqrt into both factors so they have equal scale (better conditioned
    for later training). Signs are fixed so the largest-magnitude entry of each column of `up` is positive:
    the SVD's sign ambiguity would otherwise make the factors depend on the LAPACK build.
    """
    _check_matrix(weight)
    max_rank = min(weight.shape[-2:])
    if not 1 <= rank <= max_rank:
        raise ValueError(f"rank must be in [1, {max_rank}] for a weight of shape {tuple(weight.shape)}, got {rank}")
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
    pivot = u.abs().argmax(dim=-2, keepdim=True)
    sign = torch.where(torch.gather(u, -2, pivot) < 0, -1.0, 1.0).to(u.dtype)
    root = s.sqrt()
    up = u * (sign * root.unsqueeze(-2))
    down = vh * (sign.transpose(-1, -2) * root.unsqueeze(-1))
    return up.to(weight.dtype), down.to(weight.dtype)


def rank_for_energy(weight: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep at least `energy` of the sum of squared singular values."""
    _check_matrix(weight)
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    squared = torch.linalg.svdvals(weight.detach().to(torch.float64)) ** 2
    total = squared.sum()
    if total == 0:
        return 1
    kept = torch.cumsum(squared, 0) / total
    # The tolerance keeps energy=1.0 from asking for ranks that only round-off "needs".
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype)).item()) + 1


def rank_for_ratio(weight: torch.Tensor, ratio: float) -> int:
    """Largest rank whose factors hold at most `ratio` of the dense parameters (at least 1)."""
    _check_matrix(weight)
    if ratio <= 0:
        raise ValueError(f"ratio must be positive, got {ratio}")
    out_features, in_features = weight.shape[-2:]
    rank = int(ratio * out_features * in_features // (out_features + in_features))
    return max(1, min(rank, out_features, in_features))


def dense_cost(in_features: int, out_features: int) -> tuple[int, int]:
    """(parameters, FLOPs per token) of a dense layer; a FLOP counts a multiply or an add, bias left out."""
    params = in_features * out_features
    return params, 2 * params


def low_rank_cost(in_features: int, out_features: int, rank: int) -> tuple[int, int]:
    """(parameters, FLOPs per token) of `up @ (down @ x)`."""
    params = rank * (in_features + out_features)
    return params, 2 * params
