"""`rl.rewrite`'s tracing: the rewritten model takes other batch sizes and lengths than its example."""

from __future__ import annotations

import pytest
import torch

import relinear as rl
from tests.model_zoo import make_model, padded_batch

EXACT = rl.Recipe([rl.LinearAttention(window=64), rl.LowRank(energy=1.0)])  # window over every key, full rank


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_a_model_rewritten_from_one_example_serves_other_batch_sizes(arch):
    """torch.export alone would fix the batch at 1 (its 0/1 specialization)."""
    model = make_model(arch, "sdpa")
    ids, mask = padded_batch(arch, lengths=(10,))
    assert ids.shape[0] == 1
    fast, report = rl.rewrite(model, (ids, mask), EXACT)
    assert report.counts["linear_attention"] == 2
    for lengths in [(12, 9, 5), (7,), (16, 16)]:
        ids, mask = padded_batch(arch, lengths=lengths, generator_seed=len(lengths))
        real = mask.bool()
        want = model(ids, attention_mask=mask).last_hidden_state
        got = fast(ids, mask).last_hidden_state
        torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)


class _OneRowOnly(torch.nn.Module):
    """Written for a batch of one: its reshape fails at any other batch size."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        t = x.shape[1]
        return self.proj(x.reshape(t, 8)).reshape(1, t, 8)


def test_a_model_that_only_takes_a_batch_of_one_is_still_rewritten():
    model = _OneRowOnly().eval()
    x = torch.randn(1, 5, 8)
    fast, report = rl.rewrite(model, (x,), rl.Recipe([rl.LowRank(energy=1.0)]))
    assert report.counts == {"low_rank": 1}
    other = torch.randn(1, 9, 8)
    torch.testing.assert_close(fast(other), model(other), rtol=1e-5, atol=1e-5)
