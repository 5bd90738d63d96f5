"""Input statistics add up over batches exactly as over the concatenated tokens."""

import pytest
import torch

from relinear.approx.inputs import InputStats


def test_batches_add_up_to_the_concatenation():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, n, 5, generator=gen) for n in (3, 7, 1)]
    stats = InputStats(5, with_gram=True)
    for batch in batches:
        stats.update(batch)
    rows = torch.cat([b.reshape(-1, 5) for b in batches]).double()
    assert stats.tokens == 22
    torch.testing.assert_close(stats.norms, rows.norm(dim=0), rtol=1e-12, atol=0)
    torch.testing.assert_close(stats.gram, rows.T @ rows, rtol=1e-12, atol=1e-12)
    assert InputStats.of(rows).gram is None


def test_wrong_width_is_named():
    with pytest.raises(ValueError, match="input statistics of 5 features cannot take a tensor of shape"):
        InputStats(5).update(torch.ones(2, 4))
