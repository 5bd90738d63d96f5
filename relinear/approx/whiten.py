"""Activation-aware low rank (SVD-LLM, Wang et al. 2024): the rank-r W' that minimizes the output error on
the data, ||X W'^T - X W^T||_F (C from `relinear.approx.inputs.InputStats`), rather than the weight error ||W' - W||_F.

With the input Gram matrix C = X^T X = L L^T (Cholesky), ||X A^T||_F = ||A L||_F for any A, so the optimum is
W' L = the truncated SVD of W L (Eckart-Young), i.e. W' = U_r S_r V_r^T L^{-1}. A singular C (fewer tokens than
features, or dead features) is damped by `damping` times its mean diagonal: the result then minimizes
output error + damping' * weight error, whose output error is still at most that of plain SVD (plain SVD
minimizes the second term, so the first cannot be larger).
"""

from __future__ import annotations

import torch

from relinear.approx.low_rank import svd_factors

DAMPING = 1e-6


def whitening_factor(gram_matrix: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Lower-triangular L with L L^T = C + damping * mean(diag C) * I (float64)."""
    if gram_matrix.dim() != 2 or gram_matrix.shape[0] != gram_matrix.shape[1]:
        raise ValueError(f"the input Gram matrix must be square [in, in], got shape {tuple(gram_matrix.shape)}")
    c = gram_matrix.to(torch.float64)
    scale = c.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    factor, info = torch.linalg.cholesky_ex(c + damping * scale * eye)
    if info:
        raise ValueError("the input Gram matrix is not positive semi-definite (it holds NaN or inf?)")
    return factor


def whitened_svd_factors(weight: torch.Tensor, gram_matrix: torch.Tensor, rank: int,
                         damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in]) with up @ down the rank-r W' of least output error on inputs of Gram C."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be a matrix [out, in], got shape {tuple(weight.shape)}")
    if gram_matrix.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"the input Gram matrix must be [{weight.shape[1]}, {weight.shape[1]}] for a weight of "
                         f"shape {tuple(weight.shape)}, got {tuple(gram_matrix.shape)}")
    factor = whitening_factor(gram_matrix, damping)
    up, down_whitened = svd_factors(weight.detach().to(torch.float64) @ factor, rank)
    # down = down_whitened @ L^{-1}: a triangular solve of L^T down^T = down_whitened^T
    down = torch.linalg.solve_triangular(factor.T, down_whitened.T, upper=True).T
    return up.to(weight.dtype), down.to(weight.dtype)
