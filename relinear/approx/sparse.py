"""Sparse projections of a dense layer W [out, in]: which weights to keep, and in which storage.

Every family here keeps weights unchanged and zeroes the rest; the only question is which to keep. The
score of a weight is its magnitude |W|, or Wanda's |W| * ||x_j|| (Sun et al. 2023: the weight's share of
the output, with ||x_j|| the norm of input feature j over the calibration tokens). Ties go to the earlier
position, so a recipe gives the same mask in every front end. Scores are compared in float64.

- 2:4 (`mask_24`): in every group of 4 consecutive inputs of an output row, the 2 of largest score (a last
  partial group, when in is not a multiple of 4, keeps up to 2 of its inputs).
- unstructured (`mask_unstructured`): per output row the `round(density * in)` of largest score (Wanda's
  per-output comparison group, used for magnitude too, so that equal input norms give equal masks).
- blocks (`block_scores`, `block_mask`): a block's score is the sum of its squared scores (its
  Frobenius norm for magnitude); the `density` fraction of blocks of largest score is kept.
- sparse + low rank (`sparse_plus_low_rank`): W ~ S + U V by alternating projection.
"""

from __future__ import annotations

import torch

from relinear.approx.low_rank import svd_factors

SCORES = ("magnitude", "wanda")


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be a matrix [out, in], got shape {tuple(weight.shape)}")


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")


def scores(weight: torch.Tensor, score: str, norms: torch.Tensor | None = None) -> torch.Tensor:
    """The importance of each weight, float64 [out, in]: |W| ("magnitude") or |W| * ||x_j|| ("wanda"; the
    norms from `relinear.approx.inputs.InputStats`)."""
    _check_weight(weight)
    magnitude = weight.detach().to(torch.float64).abs()
    if score == "magnitude":
        return magnitude
    if score != "wanda":
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    if norms is None:
        raise ValueError("score='wanda' needs the input norms (example inputs or calibration batches)")
    if norms.shape != (weight.shape[1],):
        raise ValueError(f"input norms must have one entry per input feature ({weight.shape[1]}), "
                         f"got shape {tuple(norms.shape)}")
    return magnitude * norms.to(device=weight.device, dtype=torch.float64)[None, :]


def _top_mask(score: torch.Tensor, kept: int) -> torch.Tensor:
    """bool mask of the `kept` largest entries along the last dim; ties go to the earlier position."""
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :kept]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, order, True)


def _pad_to_groups(t: torch.Tensor, fill) -> torch.Tensor:
    """t [out, in] with `fill` columns appended up to a multiple of 4: the last group of a row whose width is
    not a multiple of 4 is a partial group, which keeps (up to) 2 of its real inputs."""
    return torch.nn.functional.pad(t, (0, -t.shape[1] % 4), value=fill)


def mask_24(score: torch.Tensor) -> torch.Tensor:
    """bool [out, in]: the 2 largest of every 4 consecutive inputs of each row (scores are >= 0)."""
    _check_weight(score)
    out_features, in_features = score.shape
    padded = _pad_to_groups(score, -1.0)  # below every real score: a padding column is never preferred
    keep = _top_mask(padded.reshape(out_features, -1, 4), 2).reshape(out_features, -1)
    return keep[:, :in_features]


def kept_per_row(in_features: int, density: float) -> int:
    """How many weights of each row an unstructured mask of `density` keeps (at least one)."""
    _check_density(density)
    return max(1, min(in_features, round(density * in_features)))


def mask_unstructured(score: torch.Tensor, density: float) -> torch.Tensor:
    """bool [out, in]: per row the `kept_per_row` entries of largest score."""
    _check_weight(score)
    return _top_mask(score, kept_per_row(score.shape[1], density))


def _check_block(shape: tuple[int, int], block: int) -> None:
    if block < 1 or shape[0] % block or shape[1] % block:
        raise ValueError(f"block {block} must divide both weight dims {shape}")


def block_scores(score: torch.Tensor, block: int) -> torch.Tensor:
    """[out/block, in/block]: the sum of the squared scores of each block."""
    _check_weight(score)
    _check_block(tuple(score.shape), block)
    rows, cols = score.shape[0] // block, score.shape[1] // block
    return score.reshape(rows, block, cols, block).pow(2).sum((1, 3))


def kept_blocks(num_blocks: int, density: float) -> int:
    _check_density(density)
    return max(1, min(num_blocks, round(density * num_blocks)))


def block_mask(score: torch.Tensor, block: int, density: float) -> torch.Tensor:
    """bool [out/block, in/block]: the `density` fraction of blocks of largest score (ties: row-major first)."""
    per_block = block_scores(score, block)
    keep = _top_mask(per_block.flatten(), kept_blocks(per_block.numel(), density))
    return keep.reshape(per_block.shape)


def _row_pointers(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Compressed row pointers [num_rows + 1] of entries listed row by row (`rows` ascending)."""
    crow = torch.zeros(num_rows + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=num_rows).cumsum(0)
    return crow


def to_bsr(weight: torch.Tensor, keep: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values [nnz, block, block], crow_indices, col_indices) of the kept blocks, in the layout of
    relinear.kernels.block_sparse (block-rows ascending, block-columns ascending within a row)."""
    _check_block(tuple(weight.shape), block)
    rows, cols = keep.shape
    blocks = weight.reshape(rows, block, cols, block).transpose(1, 2)
    block_row, block_col = keep.nonzero(as_tuple=True)
    return blocks[block_row, block_col].contiguous(), _row_pointers(block_row, rows), block_col


def to_csr_kept(weight: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values [nnz], crow_indices [out + 1], col_indices [nnz]) of the weights `keep` marks, zeros included."""
    _check_weight(weight)
    rows, cols = keep.nonzero(as_tuple=True)
    return weight[rows, cols].contiguous(), _row_pointers(rows, weight.shape[0]), cols


def to_csr(masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CSR triple of the nonzeros of `masked` [out, in]."""
    return to_csr_kept(masked, masked != 0)


def csr_rows(crow_indices: torch.Tensor, nnz: int) -> torch.Tensor:
    """The row of each stored value, expanded from the compressed row pointers."""
    counts = crow_indices[1:] - crow_indices[:-1]
    rows = torch.arange(counts.shape[0], device=crow_indices.device)
    return torch.repeat_interleave(rows, counts, output_size=nnz)


def csr_to_dense(values: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                 in_features: int) -> torch.Tensor:
    """The dense [out, in] that a CSR triple stores; differentiable in `values`."""
    out_features = crow_indices.shape[0] - 1
    flat = csr_rows(crow_indices, values.shape[0]) * in_features + col_indices  # a 1-D copy: the fastest here
    return values.new_zeros(out_features * in_features).index_copy(0, flat, values).view(out_features, in_features)


def compress_24(masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [out, g*2], positions int8 [out, g*2]) of a weight with at most 2 nonzeros in every group of 4
    (g = ceil(in / 4) groups; a last partial group counts as padded with zeros).

    Each group keeps two slots, in ascending position; `positions` is the offset (0..3) inside the group. A
    group with fewer than two nonzeros stores zeros at the first free positions, so every weight that a 2:4
    mask kept, zero or not, is stored where it was."""
    _check_weight(masked)
    groups = _pad_to_groups(masked, 0).reshape(masked.shape[0], -1, 4)
    nonzeros = (groups != 0).sum(-1)
    if (nonzeros > 2).any():
        row, group = (nonzeros > 2).nonzero()[0].tolist()
        raise ValueError(f"weight is not 2:4 sparse: row {row}, inputs {4 * group}..{4 * group + 3} hold "
                         f"{int(nonzeros[row, group])} nonzeros")
    return compress_24_kept(masked, masked != 0)


def compress_24_kept(weight: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`compress_24` for an explicit mask `keep` with at most 2 True in every group of 4 (filled up to 2)."""
    out_features = weight.shape[0]
    groups = _pad_to_groups(keep, False).reshape(out_features, -1, 4)
    # Rank positions: kept ones first (ascending), then free ones; the first two are the stored slots. A
    # padding column is never kept, so it can only be a free slot, which stores its zero.
    rank = (~groups).to(torch.int64) * 4 + torch.arange(4, device=weight.device)
    slots = torch.sort(torch.sort(rank, dim=-1).indices[..., :2], dim=-1).values
    values = torch.gather(_pad_to_groups(weight, 0).reshape(out_features, -1, 4), -1, slots)
    return values.reshape(out_features, -1), slots.reshape(out_features, -1).to(torch.int8)


def columns_24(positions: torch.Tensor) -> torch.Tensor:
    """int64 [out, g*2]: the input column of each stored 2:4 value (group start + offset)."""
    half = positions.shape[-1]
    group_start = torch.arange(half, device=positions.device) // 2 * 4
    return positions.to(torch.int64) + group_start


def dense_24(values: torch.Tensor, positions: torch.Tensor, in_features: int | None = None) -> torch.Tensor:
    """The dense [out, in] of a compressed 2:4 weight (in: 2 * g unless given, for a last partial group);
    differentiable in `values`."""
    out_features, stored = values.shape
    groups = values.new_zeros(out_features, stored // 2, 4)  # scattering within each group: 2x a 2-D scatter
    dense = groups.scatter(2, positions.view(out_features, -1, 2).long(), values.view(out_features, -1, 2))
    dense = dense.view(out_features, 2 * stored)
    return dense if in_features is None else dense[:, :in_features]


def sparse_plus_low_rank(weight: torch.Tensor, density: float, rank: int, iterations: int = 10,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S [out, in] with `kept_per_row(in, density)` nonzeros per row, up [out, rank], down [rank, in]) with
    W ~ S + up @ down, by alternating projection (as in GoDec / robust PCA without noise term).

    Starts from the magnitude projection S0 of W, then alternates L = best rank-r of W - S and S = best
    sparse of W - L. Each step is an exact projection, so the error ||W - S - L|| never grows, and after the
    first step it is at most the pure sparse projection's. rank 0 returns that projection (empty factors).
    """
    _check_weight(weight)
    if not 0 <= rank <= min(weight.shape):
        raise ValueError(f"rank must be in [0, {min(weight.shape)}] for a weight of shape {tuple(weight.shape)}, "
                         f"got {rank}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    w = weight.detach().to(torch.float64)

    def sparse_part(residual: torch.Tensor) -> torch.Tensor:
        return residual * mask_unstructured(residual.abs(), density)

    sparse = sparse_part(w)
    up, down = w.new_zeros(w.shape[0], 0), w.new_zeros(0, w.shape[1])
    if rank:
        for _ in range(iterations):
            up, down = svd_factors(w - sparse, rank)
            sparse = sparse_part(w - up @ down)
    return sparse.to(weight.dtype), up.to(weight.dtype), down.to(weight.dtype)


# The fits of the sparse families: weight (+ input norms for Wanda) -> the tensors their ops take.

def fit_24(weight: torch.Tensor, score: str = "magnitude", norms: torch.Tensor | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [out, in/2], positions int8 [out, in/2]): the 2 of each 4 inputs of largest score, unchanged."""
    return compress_24_kept(weight.detach(), mask_24(scores(weight, score, norms)))


def fit_unstructured(weight: torch.Tensor, density: float, score: str = "magnitude",
                     norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR (values, crow_indices, col_indices) of the kept weights, every kept weight stored even if zero."""
    return to_csr_kept(weight.detach(), mask_unstructured(scores(weight, score, norms), density))


def fit_blocks(weight: torch.Tensor, block: int, density: float, score: str = "magnitude",
               norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BSR (values [nnz, block, block], crow_indices, col_indices) of the blocks of largest score."""
    return to_bsr(weight.detach(), block_mask(scores(weight, score, norms), block, density), block)


def fit_sparse_low_rank(weight: torch.Tensor, density: float, rank: int, iterations: int = 10,
                        ) -> tuple[torch.Tensor, ...]:
    """(values, crow_indices, col_indices, down [r, in], up [out, r]) of `sparse_plus_low_rank`: the CSR of S
    keeps its support (`kept_per_row` per row) even where S is zero."""
    sparse, up, down = sparse_plus_low_rank(weight, density, rank, iterations)
    return (*to_csr_kept(sparse, mask_unstructured(sparse.abs().to(torch.float64), density)), down, up)


def sparse_cost(stored: int) -> tuple[int, int]:
    """(parameters, FLOPs per token) of a product with `stored` weights; indices are not parameters."""
    return stored, 2 * stored
