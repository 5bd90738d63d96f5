import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from relinear.approx.low_rank import dense_cost
from relinear.approx.monarch import monarch_cost, monarch_grid, monarch_project, monarch_to_dense

dims = st.integers(1, 48)


def _matrix(out_features, in_features, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=gen, dtype=torch.float64)


@st.composite
def shapes(draw):
    out_features, in_features = draw(dims), draw(dims)
    return out_features, in_features, draw(st.integers(1, min(out_features, in_features)))


@pytest.mark.property
@settings(max_examples=25)
@given(shapes(), st.integers(0, 2**16))
def test_an_exact_monarch_is_returned(shape, seed):
    out_features, in_features, nblocks = shape
    grid = monarch_grid(in_features, out_features, nblocks)
    gen = torch.Generator().manual_seed(seed)
    blocks1 = torch.randn(grid.core1_shape, generator=gen, dtype=torch.float64)
    blocks2 = torch.randn(grid.core2_shape, generator=gen, dtype=torch.float64)
    weight = monarch_to_dense(blocks1, blocks2, in_features, out_features)
    projected = monarch_to_dense(*monarch_project(weight, nblocks), in_features, out_features)
    torch.testing.assert_close(projected, weight, rtol=0, atol=1e-9 * max(1.0, weight.abs().max().item()))


@pytest.mark.property
@settings(max_examples=15)
@given(shapes(), st.integers(0, 2**16))
def test_projection_beats_random_monarchs_of_any_scale(shape, seed):
    out_features, in_features, nblocks = shape
    weight = _matrix(out_features, in_features, seed)
    best = torch.linalg.matrix_norm(
        weight - monarch_to_dense(*monarch_project(weight, nblocks), in_features, out_features)
    )
    grid = monarch_grid(in_features, out_features, nblocks)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(3):
        random = monarch_to_dense(
            torch.randn(grid.core1_shape, generator=gen, dtype=torch.float64),
            torch.randn(grid.core2_shape, generator=gen, dtype=torch.float64),
            in_features,
            out_features,
        )
        # The best multiple of a random Monarch is still a Monarch: the projection must beat it too.
        scale = (weight * random).sum() / (random * random).sum().clamp_min(1e-300)
        assert best <= torch.linalg.matrix_norm(weight - scale * random) + 1e-12


def test_one_block_is_exact():
    weight = _matrix(13, 9, 0)
    torch.testing.assert_close(monarch_to_dense(*monarch_project(weight, 1), 9, 13), weight, rtol=0, atol=1e-10)


def test_sqrt_blocks_give_the_classic_rank_one_monarch():
    weight = _matrix(64, 64, 1)
    blocks1, blocks2 = monarch_project(weight, 8)
    assert blocks1.shape == blocks2.shape == (8, 8, 8)
    dense = monarch_to_dense(blocks1, blocks2, 64, 64).view(8, 8, 8, 8)
    assert all(torch.linalg.matrix_rank(dense[v, :, i, :]) == 1 for v in range(8) for i in range(8))


@pytest.mark.parametrize(("in_features", "out_features"), [(4096, 4096), (384, 1536), (1536, 384), (100, 37)])
def test_cost_counts_the_blocks_and_falls_with_more_blocks(in_features, out_features):
    params = []
    for nblocks in (4, 8):
        grid = monarch_grid(in_features, out_features, nblocks)
        assert monarch_cost(in_features, out_features, nblocks) == (grid.params, 2 * grid.params)
        # The middle width never caps the rank below min(in, out).
        assert nblocks * nblocks * grid.rank >= min(in_features, out_features)
        params.append(grid.params)
    assert params[0] < dense_cost(in_features, out_features)[0]
    assert params == sorted(params, reverse=True)


def test_costs_are_the_block_sizes_for_4096():
    assert monarch_cost(4096, 4096, 64) == (2 * 64**3, 4 * 64**3)
    assert monarch_cost(4096, 4096, 4)[0] == 2 * 4 * 1024 * 1024


@pytest.mark.parametrize("nblocks", [0, 10])
def test_bad_nblocks_is_rejected(nblocks):
    with pytest.raises(ValueError, match="nblocks"):
        monarch_project(_matrix(9, 12, 0), nblocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projection_keeps_the_weight_dtype(dtype):
    blocks1, blocks2 = monarch_project(_matrix(24, 20, 0).to(dtype), 4)
    assert blocks1.dtype == blocks2.dtype == dtype
