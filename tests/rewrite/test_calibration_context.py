"""Calibration batches reach the data-aware fits: the context's input statistics at a node cover the example
and every batch (checked against the activations computed by hand), and a batch of the wrong structure is named."""

import pytest
import torch

from relinear.rewrite.context import GraphContext
from relinear.rewrite.offline import _flat_batches, trace


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def _second_input(gm):
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]
    return linears[1].args[0]


def test_stats_cover_the_example_and_every_batch():
    torch.manual_seed(0)
    model = TwoLayers().eval()
    example, batches = torch.randn(2, 4, 6), [torch.randn(1, n, 6) for n in (3, 5)]
    gm = trace(model, (example,), None)
    ctx = GraphContext(gm, [example], calibration=_flat_batches(batches, (example,), None), gram=True)
    node = _second_input(gm)
    ctx.record([node])
    stats = ctx.input_stats(node, with_gram=True)
    with torch.no_grad():
        rows = torch.cat([torch.relu(model.first(x)).reshape(-1, 8) for x in (example, *batches)]).double()
    assert stats.tokens == 8 + 3 + 5
    torch.testing.assert_close(stats.norms, rows.norm(dim=0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.gram, rows.T @ rows, rtol=1e-6, atol=1e-6)


def test_without_calibration_the_example_alone_counts():
    model = TwoLayers().eval()
    example = torch.randn(2, 4, 6)
    gm = trace(model, (example,), None)
    ctx = GraphContext(gm, [example])
    stats = ctx.input_stats(_second_input(gm))
    with torch.no_grad():
        expected = torch.relu(model.first(example)).reshape(-1, 8).double().norm(dim=0)
    assert stats.tokens == 8
    torch.testing.assert_close(stats.norms, expected, rtol=1e-6, atol=1e-6)


def test_a_batch_of_another_structure_is_named():
    example = torch.randn(2, 4, 6)
    with pytest.raises(ValueError, match="calibration batch 1 does not have the example inputs' structure"):
        _flat_batches([example, (example, example)], (example,), None)
    assert len(_flat_batches([{"x": example}], (), {"x": example})) == 1
