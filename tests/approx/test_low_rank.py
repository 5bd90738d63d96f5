import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from relinear.approx.low_rank import dense_cost, low_rank_cost, rank_for_energy, rank_for_ratio, svd_factors

dims = st.integers(1, 24)


def _matrix(out_features, in_features, seed, rank=None):
    gen = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(out_features, in_features, generator=gen, dtype=torch.float64)
    left = torch.randn(out_features, rank, generator=gen, dtype=torch.float64)
    return left @ torch.randn(rank, in_features, generator=gen, dtype=torch.float64)


@pytest.mark.property
@settings(max_examples=25)
@given(out_features=dims, in_features=dims, seed=st.integers(0, 2**16), data=st.data())
def test_error_is_the_tail_of_the_spectrum(out_features, in_features, seed, data):
    weight = _matrix(out_features, in_features, seed)
    rank = data.draw(st.integers(1, min(out_features, in_features)))
    up, down = svd_factors(weight, rank)
    singular = np.linalg.svd(weight.numpy(), compute_uv=False)
    error = torch.linalg.matrix_norm(weight - up @ down).item()
    assert error == pytest.approx(np.sqrt((singular[rank:] ** 2).sum()), abs=1e-9)


@pytest.mark.property
@settings(max_examples=20)
@given(out_features=dims, in_features=dims, seed=st.integers(0, 2**16), data=st.data())
def test_exactly_low_rank_weight_is_returned(out_features, in_features, seed, data):
    rank = data.draw(st.integers(1, min(out_features, in_features)))
    weight = _matrix(out_features, in_features, seed, rank)
    up, down = svd_factors(weight, rank)
    assert up.shape == (out_features, rank) and down.shape == (rank, in_features)
    torch.testing.assert_close(up @ down, weight, rtol=0, atol=1e-9 * weight.abs().max().item())


def test_factors_are_balanced_and_signs_fixed():
    weight = _matrix(9, 7, 0)
    up, down = svd_factors(weight, 5)
    singular = torch.linalg.svdvals(weight)[:5]
    torch.testing.assert_close(up.norm(dim=0) ** 2, singular)
    torch.testing.assert_close(down.norm(dim=1) ** 2, singular)
    largest = up.gather(0, up.abs().argmax(dim=0, keepdim=True))
    assert (largest > 0).all()
    flipped_up, flipped_down = svd_factors(-weight, 5)
    torch.testing.assert_close(flipped_up @ flipped_down, -(up @ down))
    again = svd_factors(weight, 5)
    assert torch.equal(again[0], up) and torch.equal(again[1], down)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factors_keep_the_weight_dtype(dtype):
    weight = _matrix(12, 20, 1, rank=3).to(dtype)
    up, down = svd_factors(weight, 3)
    assert up.dtype == down.dtype == dtype
    torch.testing.assert_close((up.double() @ down.double()), weight.double(), rtol=0.05, atol=0.05)


def test_batched_factors_match_one_by_one():
    weights = torch.stack([_matrix(6, 5, seed) for seed in range(3)])
    up, down = svd_factors(weights, 2)
    for weight, u, d in zip(weights, up, down, strict=True):
        expected_up, expected_down = svd_factors(weight, 2)
        torch.testing.assert_close(u, expected_up)
        torch.testing.assert_close(d, expected_down)


@pytest.mark.parametrize("rank", [0, 6])
def test_bad_rank_is_rejected(rank):
    with pytest.raises(ValueError, match="rank"):
        svd_factors(_matrix(5, 8, 0), rank)


@pytest.mark.property
@settings(max_examples=25)
@given(seed=st.integers(0, 2**16), energy=st.floats(0.01, 1.0))
def test_rank_for_energy_is_the_smallest_sufficient_rank(seed, energy):
    weight = _matrix(10, 14, seed)
    squared = np.linalg.svd(weight.numpy(), compute_uv=False) ** 2
    rank = rank_for_energy(weight, energy)
    kept = squared[:rank].sum() / squared.sum()
    assert kept >= energy - 1e-9
    assert rank == 1 or squared[: rank - 1].sum() / squared.sum() < energy


def test_rank_for_energy_finds_the_exact_rank():
    assert rank_for_energy(_matrix(20, 16, 3, rank=4), 1.0) == 4
    with pytest.raises(ValueError, match="energy"):
        rank_for_energy(_matrix(4, 4, 0), 0.0)


@pytest.mark.property
@settings(max_examples=25)
@given(out_features=st.integers(1, 300), in_features=st.integers(1, 300), ratio=st.floats(0.001, 2.0))
def test_rank_for_ratio_is_the_largest_rank_within_budget(out_features, in_features, ratio):
    rank = rank_for_ratio(torch.empty(out_features, in_features), ratio)
    budget = ratio * out_features * in_features
    assert 1 <= rank <= min(out_features, in_features)
    fits = [
        r
        for r in range(1, min(out_features, in_features) + 1)
        if low_rank_cost(in_features, out_features, r)[0] <= budget
    ]
    assert rank == (max(fits) if fits else 1)


def test_costs_count_the_factor_entries():
    up, down = svd_factors(_matrix(30, 50, 0), 7)
    assert low_rank_cost(50, 30, 7) == (up.numel() + down.numel(), 2 * (up.numel() + down.numel()))
    assert dense_cost(50, 30) == (1500, 3000)
