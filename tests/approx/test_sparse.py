"""Sparse projections against written-out references (loops over rows and groups) and exact limits: density 1
keeps everything, a weight that already is 2:4 is kept as it is, Wanda with equal input norms is magnitude,
sparse + low rank with rank 0 is the sparse projection."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from relinear.approx import sparse as S
from relinear.approx.inputs import InputStats
from relinear.kernels.block_sparse.reference import block_sparse_to_dense


def _weight(out_features, in_features, seed, dtype=torch.float64):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _naive_top(values: list[float], kept: int) -> set[int]:
    """Indices of the `kept` largest values, ties to the earlier index."""
    return set(sorted(range(len(values)), key=lambda i: (-values[i], i))[:kept])


def _weight_24(out_features, groups, seed):
    """A weight with at most 2 nonzeros (never an exact zero where kept) in every group of 4."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, groups * 4, generator=gen, dtype=torch.float64)
    keep = torch.rand(out_features, groups, 4, generator=gen).argsort(-1) < torch.randint(
        0, 3, (out_features, groups, 1), generator=gen)
    return weight * keep.reshape(out_features, groups * 4)


@pytest.mark.property
@settings(max_examples=25)
@given(out_features=st.integers(1, 6), in_features=st.integers(1, 19), seed=st.integers(0, 2**16),
       ties=st.booleans())
def test_mask_24_keeps_the_two_largest_of_each_group(out_features, in_features, seed, ties):
    weight = _weight(out_features, in_features, seed)
    if ties:  # few distinct values: the tie rule decides
        weight = weight.round()
    mask = S.mask_24(weight.abs())
    for row in range(out_features):
        for start in range(0, in_features, 4):  # a last partial group keeps up to 2 of its inputs
            values = weight[row, start:start + 4].abs().tolist()
            kept = {i for i in range(len(values)) if mask[row, start + i]}
            assert kept == _naive_top(values, 2)


@pytest.mark.property
@settings(max_examples=25)
@given(out_features=st.integers(1, 6), groups=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_a_weight_that_already_is_24_is_unchanged(out_features, groups, seed):
    weight = _weight_24(out_features, groups, seed)
    for score in ("magnitude", "wanda"):
        norms = torch.rand(4 * groups, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1
        mask = S.mask_24(S.scores(weight, score, norms))
        assert torch.equal(weight * mask, weight)
    values, positions = S.compress_24(weight)
    assert torch.equal(S.dense_24(values, positions), weight)


@pytest.mark.property
@settings(max_examples=25)
@given(out_features=st.integers(1, 6), in_features=st.integers(1, 19), seed=st.integers(0, 2**16))
def test_compressed_24_round_trips_every_kept_weight(out_features, in_features, seed):
    weight = _weight(out_features, in_features, seed).round()  # rounding makes some kept weights exactly zero
    keep = S.mask_24(weight.abs())
    values, positions = S.compress_24_kept(weight, keep)
    groups = -(-in_features // 4)
    assert values.shape == positions.shape == (out_features, 2 * groups) and positions.dtype == torch.int8
    assert torch.equal(S.dense_24(values, positions, in_features), weight * keep)
    columns = S.columns_24(positions)
    assert torch.equal(torch.zeros(out_features, 4 * groups, dtype=torch.bool).scatter(1, columns, True)[
        :, :in_features], keep)


def test_compress_24_names_the_crowded_group():
    weight = torch.zeros(3, 8)
    weight[2, 4:7] = 1.0
    with pytest.raises(ValueError, match="row 2, inputs 4..7 hold 3 nonzeros"):
        S.compress_24(weight)


@pytest.mark.property
@settings(max_examples=25)
@given(out_features=st.integers(1, 6), in_features=st.integers(1, 12), density=st.floats(0.01, 1.0),
       seed=st.integers(0, 2**16))
def test_unstructured_mask_keeps_the_largest_of_each_row(out_features, in_features, density, seed):
    weight = _weight(out_features, in_features, seed).round(decimals=1)
    mask = S.mask_unstructured(weight.abs(), density)
    kept = max(1, min(in_features, round(density * in_features)))
    for row in range(out_features):
        values = weight[row].abs().tolist()
        assert {i for i in range(in_features) if mask[row, i]} == _naive_top(values, kept)


@pytest.mark.property
@settings(max_examples=25)
@given(rows=st.integers(1, 4), cols=st.integers(1, 4), block=st.sampled_from([1, 2, 4]), density=st.floats(0.05, 1.0),
       seed=st.integers(0, 2**16))
def test_block_mask_keeps_the_blocks_of_largest_norm(rows, cols, block, density, seed):
    weight = _weight(rows * block, cols * block, seed)
    keep = S.block_mask(weight.abs(), block, density)
    norms = [weight[r * block:(r + 1) * block, c * block:(c + 1) * block].norm().item()
             for r in range(rows) for c in range(cols)]
    kept = max(1, min(rows * cols, round(density * rows * cols)))
    assert {i for i in range(rows * cols) if keep.flatten()[i]} == _naive_top(norms, kept)
    values, crow, col = S.to_bsr(weight, keep, block)
    dense = torch.zeros_like(weight)
    for r in range(rows):
        for i in range(int(crow[r]), int(crow[r + 1])):
            c = int(col[i])
            dense[r * block:(r + 1) * block, c * block:(c + 1) * block] = values[i]
    assert torch.equal(dense, weight * keep.repeat_interleave(block, 0).repeat_interleave(block, 1))


@pytest.mark.parametrize("score", ["magnitude", "wanda"])
def test_density_one_keeps_every_weight(score):
    weight = _weight(8, 12, 0)
    norms = torch.rand(12, dtype=torch.float64) + 0.1
    scores = S.scores(weight, score, norms)
    assert S.mask_unstructured(scores, 1.0).all()
    assert S.block_mask(scores, 4, 1.0).all()
    sparse, up, down = S.sparse_plus_low_rank(weight, 1.0, 3)
    assert torch.equal(sparse, weight) and not (up @ down).any()


def test_wanda_with_equal_input_norms_is_magnitude():
    weight = _weight(8, 16, 1)
    magnitude = S.scores(weight, "magnitude")
    wanda = S.scores(weight, "wanda", torch.full((16,), 2.5, dtype=torch.float64))
    assert torch.equal(S.mask_24(wanda), S.mask_24(magnitude))
    assert torch.equal(S.mask_unstructured(wanda, 0.3), S.mask_unstructured(magnitude, 0.3))
    assert torch.equal(S.block_mask(wanda, 4, 0.5), S.block_mask(magnitude, 4, 0.5))


def test_wanda_scores_weigh_by_input_norms():
    weight = _weight(3, 4, 2)
    x = _weight(5, 4, 3).reshape(1, 5, 4)
    norms = InputStats.of(x).norms
    expected = torch.tensor([[abs(weight[i, j].item()) * sum(x[0, t, j].item() ** 2 for t in range(5)) ** 0.5
                              for j in range(4)] for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(S.scores(weight, "wanda", norms), expected, rtol=1e-12, atol=0)
    # a large input feature keeps its weights against larger magnitudes elsewhere
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert S.mask_24(S.scores(weight, "wanda", torch.tensor([100.0, 1.0, 1.0, 1.0]))).tolist() == [
        [True, False, False, True]]


def test_csr_matches_torch():
    weight = _weight(6, 9, 4) * (torch.rand(6, 9, generator=torch.Generator().manual_seed(5)) < 0.4)
    weight[2] = 0.0  # an empty row
    values, crow, col = S.to_csr(weight)
    csr = weight.to_sparse_csr()
    assert torch.equal(crow, csr.crow_indices()) and torch.equal(col, csr.col_indices())
    assert torch.equal(values, csr.values())
    assert torch.equal(S.csr_to_dense(values, crow, col, 9), weight)


def test_sparse_plus_low_rank_with_rank_zero_is_the_sparse_projection():
    weight = _weight(10, 12, 6)
    sparse, up, down = S.sparse_plus_low_rank(weight, 0.25, 0)
    assert up.shape == (10, 0) and down.shape == (0, 12)
    assert torch.equal(sparse, weight * S.mask_unstructured(weight.abs(), 0.25))


@pytest.mark.property
@settings(max_examples=15)
@given(out_features=st.integers(2, 10), in_features=st.integers(2, 10), density=st.floats(0.05, 0.9),
       seed=st.integers(0, 2**16), data=st.data())
def test_alternating_projection_never_increases_the_error(out_features, in_features, density, seed, data):
    weight = _weight(out_features, in_features, seed)
    rank = data.draw(st.integers(1, min(out_features, in_features)))

    def error(iterations):
        sparse, up, down = S.sparse_plus_low_rank(weight, density, rank, iterations)
        assert ((sparse != 0).sum(1) <= S.kept_per_row(in_features, density)).all()
        return torch.linalg.matrix_norm(weight - sparse - up @ down).item()

    sparse_only = torch.linalg.matrix_norm(weight - S.sparse_plus_low_rank(weight, density, 0)[0]).item()
    errors = [error(i) for i in (1, 2, 4)]
    assert errors[0] <= sparse_only + 1e-12
    assert errors[1] <= errors[0] + 1e-12 and errors[2] <= errors[1] + 1e-12


def test_an_exact_sparse_plus_rank_one_weight_is_recovered():
    gen = torch.Generator().manual_seed(7)
    low_rank = torch.randn(16, 1, generator=gen, dtype=torch.float64) @ torch.randn(1, 16, generator=gen,
                                                                                    dtype=torch.float64)
    spikes = torch.zeros(16, 16, dtype=torch.float64)
    spikes[torch.arange(16), torch.randperm(16, generator=gen)] = 50.0
    weight = low_rank + spikes
    sparse, up, down = S.sparse_plus_low_rank(weight, 1 / 16, 1, iterations=30)
    residual = torch.linalg.matrix_norm(weight - sparse - up @ down) / torch.linalg.matrix_norm(weight)
    assert residual < 1e-6


@pytest.mark.parametrize(("call", "match"), [
    (lambda w: S.scores(w, "random"), "score must be one of magnitude, wanda"),
    (lambda w: S.scores(w, "wanda"), "needs the input norms"),
    (lambda w: S.scores(w, "wanda", torch.ones(3)), "one entry per input feature"),
    (lambda w: S.mask_unstructured(w, 0.0), "density must be in"),
    (lambda w: S.block_mask(w, 3, 0.5), "block 3 must divide"),
    (lambda w: S.sparse_plus_low_rank(w, 0.5, 9), "rank must be in"),
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call(_weight(8, 8, 0))


def test_fits_store_exactly_the_kept_weights():
    weight = _weight(8, 16, 9).round()  # some kept weights are exactly zero: still stored
    norms = torch.rand(16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
    for score in ("magnitude", "wanda"):
        scores = S.scores(weight, score, norms)
        values, positions = S.fit_24(weight, score, norms)
        assert torch.equal(S.dense_24(values, positions), weight * S.mask_24(scores))
        values, crow, col = S.fit_unstructured(weight, 0.3, score, norms)
        assert values.numel() == 8 * S.kept_per_row(16, 0.3)
        assert torch.equal(S.csr_to_dense(values, crow, col, 16), weight * S.mask_unstructured(scores, 0.3))
        values, crow, col = S.fit_blocks(weight, 4, 0.5, score, norms)
        keep = S.block_mask(scores, 4, 0.5).repeat_interleave(4, 0).repeat_interleave(4, 1)
        assert values.shape == (4, 4, 4)
        assert torch.equal(block_sparse_to_dense(values, crow, col, 8, 16), weight * keep)
    values, crow, col, down, up = S.fit_sparse_low_rank(weight, 0.25, 2)
    sparse, up_ref, down_ref = S.sparse_plus_low_rank(weight, 0.25, 2)
    assert values.numel() == 8 * 4 and torch.equal(up, up_ref) and torch.equal(down, down_ref)
    assert torch.equal(S.csr_to_dense(values, crow, col, 16), sparse)
