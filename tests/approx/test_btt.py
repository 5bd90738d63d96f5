import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from relinear.approx.btt import (
    BlockGrid,
    balanced_factors,
    btt_cost,
    btt_fit,
    btt_grid,
    btt_to_dense,
    grid_of,
    project_onto_grid,
)
from relinear.approx.monarch import monarch_grid, monarch_project

dims = st.integers(1, 40)


def _matrix(out_features, in_features, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=gen, dtype=torch.float64)


def _blockwise_tail_error(weight, grid):
    """Independent optimum: loop over the block pairs of the padded weight, sum their SVD tails."""
    padded = np.zeros((grid.n1 * grid.n2, grid.m1 * grid.m2))
    padded[: weight.shape[0], : weight.shape[1]] = weight.numpy()
    squared = 0.0
    for v in range(grid.n1):
        for i in range(grid.m1):
            block = padded[v * grid.n2 : (v + 1) * grid.n2, i * grid.m2 : (i + 1) * grid.m2]
            squared += (np.linalg.svd(block, compute_uv=False)[grid.rank :] ** 2).sum()
    return math.sqrt(squared)


@st.composite
def weights_and_grids(draw):
    """A weight and a BTT grid (any rank) or a Monarch grid (any nblocks) for it."""
    out_features, in_features = draw(dims), draw(dims)
    weight = _matrix(out_features, in_features, draw(st.integers(0, 2**16)))
    if draw(st.booleans()):
        nblocks = draw(st.integers(1, min(out_features, in_features)))
        return weight, monarch_grid(in_features, out_features, nblocks)
    grid = btt_grid(in_features, out_features, 1)
    return weight, btt_grid(in_features, out_features, draw(st.integers(1, min(grid.m2, grid.n2))))


@pytest.mark.property
@settings(max_examples=25)
@given(weights_and_grids())
def test_projection_error_is_the_blockwise_optimum(case):
    weight, grid = case
    core1, core2 = project_onto_grid(weight, grid)
    assert core1.shape == grid.core1_shape and core2.shape == grid.core2_shape
    approx = btt_to_dense(core1, core2, weight.shape[1], weight.shape[0])
    error = torch.linalg.matrix_norm(weight - approx).item()
    assert error == pytest.approx(_blockwise_tail_error(weight, grid), abs=1e-9)


@pytest.mark.property
@settings(max_examples=15)
@given(weights_and_grids(), st.integers(0, 2**16))
def test_perturbed_cores_are_never_better(case, seed):
    weight, grid = case
    core1, core2 = project_onto_grid(weight, grid)
    gen = torch.Generator().manual_seed(seed)
    best = torch.linalg.matrix_norm(weight - btt_to_dense(core1, core2, weight.shape[1], weight.shape[0]))
    for scale in (1e-3, 1e-1):
        noisy1 = core1 + scale * torch.randn(core1.shape, generator=gen, dtype=core1.dtype)
        noisy2 = core2 + scale * torch.randn(core2.shape, generator=gen, dtype=core2.dtype)
        error = torch.linalg.matrix_norm(weight - btt_to_dense(noisy1, noisy2, weight.shape[1], weight.shape[0]))
        assert best <= error + 1e-12


@pytest.mark.property
@settings(max_examples=25)
@given(out_features=dims, in_features=dims, seed=st.integers(0, 2**16))
def test_full_rank_btt_is_exact(out_features, in_features, seed):
    weight = _matrix(out_features, in_features, seed)
    grid = btt_grid(in_features, out_features, 1)
    core1, core2 = btt_fit(weight, min(grid.m2, grid.n2))
    torch.testing.assert_close(btt_to_dense(core1, core2, in_features, out_features), weight, rtol=0, atol=1e-10)


@pytest.mark.property
@settings(max_examples=20)
@given(out_features=dims, in_features=dims, seed=st.integers(0, 2**16), data=st.data())
def test_an_exact_btt_is_returned(out_features, in_features, seed, data):
    grid = btt_grid(in_features, out_features, 1)
    grid = btt_grid(in_features, out_features, data.draw(st.integers(1, min(grid.m2, grid.n2))))
    gen = torch.Generator().manual_seed(seed)
    core1 = torch.randn(grid.core1_shape, generator=gen, dtype=torch.float64)
    core2 = torch.randn(grid.core2_shape, generator=gen, dtype=torch.float64)
    weight = btt_to_dense(core1, core2, in_features, out_features)
    fitted = btt_to_dense(*btt_fit(weight, grid.rank), in_features, out_features)
    torch.testing.assert_close(fitted, weight, rtol=0, atol=1e-9 * max(1.0, weight.abs().max().item()))


def test_btt_to_dense_follows_the_documented_formula():
    grid = BlockGrid(m1=2, m2=3, n1=3, n2=2, rank=2)
    core1 = _matrix(grid.m1 * grid.n1 * grid.rank, grid.m2, 0).view(grid.core1_shape)
    core2 = _matrix(grid.n1 * grid.n2, grid.rank * grid.m1, 1).view(grid.core2_shape)
    dense = btt_to_dense(core1, core2, 6, 6)
    for v, c, i, j in np.ndindex(grid.n1, grid.n2, grid.m1, grid.m2):
        entry = sum(core2[v, c, a * grid.m1 + i] * core1[i, v * grid.rank + a, j] for a in range(grid.rank))
        assert dense[v * grid.n2 + c, i * grid.m2 + j] == pytest.approx(entry.item())


@pytest.mark.parametrize("side", [2, 3, 8])
def test_rank_one_btt_is_the_sqrt_monarch(side):
    weight = _matrix(side * side, side * side, side)
    btt_cores = btt_fit(weight, 1)
    monarch_blocks = monarch_project(weight, side)
    for core, block in zip(btt_cores, monarch_blocks, strict=True):
        torch.testing.assert_close(core, block)


def test_error_shrinks_as_rank_grows():
    weight = _matrix(36, 48, 7)
    errors = [torch.linalg.matrix_norm(weight - btt_to_dense(*btt_fit(weight, r), 48, 36)) for r in range(1, 7)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-10


@pytest.mark.parametrize("size", [1, 2, 7, 13, 64, 97, 384, 1000, 4096, 2 * 97])
def test_balanced_factors_cover_the_size_near_sqrt(size):
    blocks, block = balanced_factors(size)
    assert blocks * block >= size
    assert blocks * block < size + max(blocks, block)
    assert max(blocks, block) <= 2 * math.isqrt(size) + 2 or min(blocks, block) == 1


def test_cost_and_grid_checks():
    weight = _matrix(20, 30, 0)
    core1, core2 = btt_fit(weight, 2)
    assert btt_cost(30, 20, 2) == (core1.numel() + core2.numel(), 2 * (core1.numel() + core2.numel()))
    assert grid_of(core1, core2) == btt_grid(30, 20, 2)
    with pytest.raises(ValueError, match="rank"):
        btt_fit(weight, 100)
    with pytest.raises(ValueError, match="in_factors"):
        btt_fit(weight, 1, in_factors=(4, 4))
    with pytest.raises(ValueError, match="BTT pair"):
        grid_of(core1, core2[:, :, :-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fit_keeps_the_weight_dtype(dtype):
    core1, core2 = btt_fit(_matrix(16, 16, 0).to(dtype), 2)
    assert core1.dtype == core2.dtype == dtype
