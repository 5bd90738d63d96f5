"""Detection of exact structure: weights built to be low-rank, 2:4, block-sparse or Monarch are found, stored
at zero error in the cheaper form; a generic dense weight is left alone with the reason."""

import pytest
import torch

from relinear.approx import sparse as sparse_math
from relinear.approx.detect import detect_structure
from relinear.approx.monarch import monarch_grid, monarch_to_dense
from relinear.kernels.block_sparse.reference import block_sparse_to_dense


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rank", [1, 3, 7])
def test_low_rank_weight(rank, dtype):
    gen = _gen(rank)
    weight = (torch.randn(48, rank, generator=gen, dtype=torch.float64)
              @ torch.randn(rank, 40, generator=gen, dtype=torch.float64)).to(dtype)
    found = detect_structure(weight)
    assert found.kind == "low_rank" and found.detail == f"rank={rank}" and found.params == rank * 88
    down, up = found.tensors
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(up @ down, weight, rtol=tol, atol=tol * weight.abs().max().item())


def test_24_weight():
    weight = torch.randn(32, 64, generator=_gen(0))
    weight = weight * sparse_math.mask_24(weight.abs())
    found = detect_structure(weight)
    assert found.kind == "sparse24" and found.params == 32 * 32
    assert torch.equal(sparse_math.dense_24(*found.tensors), weight)


def test_block_sparse_weight():
    gen = _gen(1)
    keep = torch.zeros(4, 4, dtype=torch.bool)
    keep[torch.arange(4), torch.randperm(4, generator=gen)] = True  # one block per block-row: a quarter
    weight = torch.randn(64, 64, generator=gen) * keep.repeat_interleave(16, 0).repeat_interleave(16, 1)
    found = detect_structure(weight)
    assert found.kind == "block_sparse" and found.setting == 16 and found.params == 4 * 16 * 16
    assert torch.equal(block_sparse_to_dense(*found.tensors, 64, 64), weight)


@pytest.mark.parametrize("nblocks", [4, 8])
def test_monarch_weight(nblocks):
    grid = monarch_grid(64, 64, nblocks)
    gen = _gen(nblocks)
    blocks = (torch.randn(*grid.core1_shape, generator=gen, dtype=torch.float64),
              torch.randn(*grid.core2_shape, generator=gen, dtype=torch.float64))
    weight = monarch_to_dense(*blocks, 64, 64)
    assert torch.linalg.matrix_rank(weight) == 64  # not low rank, not sparse: only Monarch can find it
    found = detect_structure(weight)
    assert found.kind == "monarch" and found.detail == f"nblocks={nblocks}" and found.params == grid.params
    torch.testing.assert_close(monarch_to_dense(*found.tensors, 64, 64), weight, rtol=1e-10, atol=1e-10)


def test_the_cheapest_structure_wins():
    # rank 1 and 2:4 at once: rank 1 stores 32 + 64 numbers, 2:4 stores 32 * 32
    column = torch.randn(64, generator=_gen(2))
    column = column * sparse_math.mask_24(column.abs()[None])[0]
    weight = torch.randn(32, 1, generator=_gen(3)) * column[None]
    assert detect_structure(weight).kind == "low_rank"


def test_a_generic_dense_weight_is_left_alone_with_reasons():
    reason = detect_structure(torch.randn(32, 64, generator=_gen(4)))
    assert isinstance(reason, str) and reason.startswith("no exact cheaper structure")
    for kind in ("low_rank: numerical rank 32 of 32", "sparse24: 512 groups of 4", "block_sparse:", "monarch:"):
        assert kind in reason
    assert detect_structure(torch.zeros(8, 8)) == "the weight is all zeros"
    with pytest.raises(ValueError, match="matrix"):
        detect_structure(torch.ones(3))
