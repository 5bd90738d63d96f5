"""Activation-aware (whitened) low rank: never worse than plain SVD in output error on the data, at every rank;
equal to the Eckart-Young bound of the output itself; plain SVD when the inputs are white; exact at full rank."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from relinear.approx.inputs import InputStats
from relinear.approx.low_rank import svd_factors
from relinear.approx.whiten import whitened_svd_factors, whitening_factor


def gram(x):
    return InputStats.of(x, with_gram=True).gram


def _data(tokens, in_features, out_features, seed):
    """Correlated, anisotropic inputs (as activations are) and a weight."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(in_features, in_features, generator=gen, dtype=torch.float64)
    scales = torch.logspace(0, 2, in_features, dtype=torch.float64)
    x = torch.randn(tokens, in_features, generator=gen, dtype=torch.float64) @ (mixing * scales)
    return x, torch.randn(out_features, in_features, generator=gen, dtype=torch.float64)


def _output_error(x, weight, approx):
    return torch.linalg.matrix_norm(x @ (approx - weight).T).item()


@pytest.mark.property
@settings(max_examples=20)
@given(in_features=st.integers(2, 12), out_features=st.integers(2, 12), extra_tokens=st.integers(0, 20),
       seed=st.integers(0, 2**16))
def test_whitened_is_never_worse_than_plain_svd_on_the_data(in_features, out_features, extra_tokens, seed):
    x, weight = _data(in_features + extra_tokens, in_features, out_features, seed)
    c = gram(x)
    for rank in range(1, min(in_features, out_features) + 1):
        up, down = whitened_svd_factors(weight, c, rank)
        plain_up, plain_down = svd_factors(weight, rank)
        whitened, plain = _output_error(x, weight, up @ down), _output_error(x, weight, plain_up @ plain_down)
        assert whitened <= plain * (1 + 1e-9) + 1e-9
        # with full-column-rank data it reaches the bound: the tail of the output's own spectrum
        # (up to the damping, 1e-6 of the Gram matrix's scale)
        singular = torch.linalg.svdvals(x @ weight.T)
        tail = singular[rank:].pow(2).sum().sqrt().item()
        assert whitened == pytest.approx(tail, rel=1e-4, abs=1e-5 * singular.norm().item())


def test_fewer_tokens_than_features_still_beats_plain_svd():
    x, weight = _data(5, 12, 9, 3)  # singular Gram matrix: the damping keeps Cholesky defined
    for rank in range(1, 10):
        up, down = whitened_svd_factors(weight, gram(x), rank)
        plain_up, plain_down = svd_factors(weight, rank)
        assert _output_error(x, weight, up @ down) <= _output_error(x, weight, plain_up @ plain_down) + 1e-9


def test_white_inputs_give_plain_svd():
    q, _ = torch.linalg.qr(torch.randn(40, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    x = 3.0 * q  # Gram = 9 I
    weight = _data(10, 10, 7, 1)[1]
    up, down = whitened_svd_factors(weight, gram(x), 4)
    plain_up, plain_down = svd_factors(weight, 4)
    torch.testing.assert_close(up @ down, plain_up @ plain_down, rtol=1e-8, atol=1e-8)


def test_full_rank_reproduces_the_weight():
    x, weight = _data(30, 8, 11, 2)
    up, down = whitened_svd_factors(weight, gram(x), 8)
    torch.testing.assert_close(up @ down, weight, rtol=1e-8, atol=1e-8)


def test_factor_and_shapes_are_checked():
    c = gram(_data(20, 6, 4, 0)[0])
    factor = whitening_factor(c, damping=0.0)
    torch.testing.assert_close(factor @ factor.T, c)
    with pytest.raises(ValueError, match=r"Gram matrix must be \[6, 6\]"):
        whitened_svd_factors(torch.randn(4, 6), c[:5, :5], 2)
    with pytest.raises(ValueError, match="must be square"):
        whitening_factor(torch.ones(3, 4))
    with pytest.raises(ValueError, match="rank must be in"):
        whitened_svd_factors(torch.randn(4, 6, dtype=torch.float64), c, 5)
