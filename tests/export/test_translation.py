"""Each relinear op exported through `custom_translation_table` and run in ONNX Runtime matches the op's own
torch output (which the kernels' tests pin to the plain-torch reference)."""

from __future__ import annotations

import pytest
import torch

import relinear.kernels.linear_attention  # noqa: F401  (registers the ops)
from relinear.families import families
from tests.export.onnx_helpers import export_and_run, export_session, run_session


class CallOp(torch.nn.Module):
    """A module whose forward is one relinear op: the smallest thing the exporter can trace."""

    def __init__(self, op, **scalars):
        super().__init__()
        self.op, self.scalars = op, scalars

    def forward(self, *tensors):
        return self.op(*tensors, **self.scalars)


def _features(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) + 0.05  # positive, as a feature map's output


def _padding_mask(batch, length):
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[-1, length // 2 :] = False
    return mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("num_queries", [13, 5])
def test_linear_attention(causal, masked, num_queries):
    B, H, T, F, D = 2, 3, 13, 4, 5
    phi_q, phi_k, v = _features(B, H, num_queries, F), _features(B, H, T, F, seed=1), torch.randn(B, H, T, D)
    mask = _padding_mask(B, T) if masked else None
    op = CallOp(lambda q, k, v, m=None: torch.ops.relinear.linear_attention(q, k, v, m, causal, 4))
    args = (phi_q, phi_k, v) + ((mask,) if masked else ())
    got = export_and_run(op, args)
    torch.testing.assert_close(got, op(*args), atol=1e-5, rtol=1e-4)


def test_linear_attention_dynamic_length():
    """One exported graph serves other sequence lengths, including ones that are not a chunk multiple."""
    B, H, F, D = 1, 2, 4, 3
    op = CallOp(lambda q, k, v: torch.ops.relinear.linear_attention(q, k, v, None, True, 4))
    seq = torch.export.Dim("seq", min=2, max=64)
    example = (_features(B, H, 8, F), _features(B, H, 8, F), torch.randn(B, H, 8, D))
    session = export_session(op, example, dynamic_shapes=(({2: seq}, {2: seq}, {2: seq}),))
    for length in (3, 11):
        args = (_features(B, H, length, F, seed=2), _features(B, H, length, F, seed=3), torch.randn(B, H, length, D))
        torch.testing.assert_close(run_session(session, args), op(*args), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 3, 100])
@pytest.mark.parametrize("sinks", [0, 2])
def test_hybrid_attention(causal, window, sinks):
    B, H, T, D, F = 2, 2, 9, 4, 6
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    phi_q, phi_k, gate = _features(B, H, T, F, seed=4), _features(B, H, T, F, seed=5), torch.randn(H)
    mask = _padding_mask(B, T)
    op = CallOp(lambda *t: torch.ops.relinear.hybrid_attention(*t, causal, window, 0.5, 4, sinks))
    args = (q, k, v, phi_q, phi_k, gate, mask)
    torch.testing.assert_close(export_and_run(op, args), op(*args), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sinks", [0, 1])
def test_hybrid_attention_with_a_balance(causal, sinks):
    """The per-query balance (window max, log window sum, log linear sum) in plain ONNX ops; row 1 is half
    padding, so some queries' windows and outsides are empty."""
    B, H, T, D, F = 2, 2, 9, 4, 6
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    phi_q, phi_k, gate = _features(B, H, T, F, seed=8), _features(B, H, T, F, seed=9), torch.randn(H)
    balance = torch.tensor([[0.3, -0.5, 0.4], [-0.2, 0.7, -0.6]])
    op = CallOp(lambda q, k, v, pq, pk, gt, m, b: torch.ops.relinear.hybrid_attention(
        q, k, v, pq, pk, gt, m, causal, 2, 0.5, 4, sinks, b))
    args = (q, k, v, phi_q, phi_k, gate, _padding_mask(B, T), balance)
    expected = op(*args)
    assert (expected - op(*args[:-1], torch.zeros_like(balance))).abs().amax() > 1e-3  # the balance matters
    torch.testing.assert_close(export_and_run(op, args), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("padding", [None, "left"])
def test_hybrid_attention_sinks_follow_the_attendable_keys(padding):
    """Sinks are the first attendable keys: after left padding they are not at position 0. Without a mask
    the exported graph counts positions itself."""
    B, H, T, D, F = 2, 2, 11, 4, 6
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    phi_q, phi_k, gate = _features(B, H, T, F, seed=6), _features(B, H, T, F, seed=7), torch.randn(H)
    mask = None
    if padding == "left":
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[0, :4] = False
    op = CallOp(lambda q, k, v, pq, pk, gt, m=None: torch.ops.relinear.hybrid_attention(
        q, k, v, pq, pk, gt, m, True, 2, 0.5, 4, 2))
    args = (q, k, v, phi_q, phi_k, gate) + ((mask,) if mask is not None else ())
    torch.testing.assert_close(export_and_run(op, args), op(*args), atol=1e-5, rtol=1e-4)


def test_gated_linear_attention():
    B, H, T, D, F = 2, 2, 10, 3, 4
    phi_q, phi_k, v = _features(B, H, T, F), _features(B, H, T, F, seed=1), torch.randn(B, H, T, D)
    log_decay = -torch.rand(B, H, T)
    mask = _padding_mask(B, T)
    op = CallOp(lambda *t: torch.ops.relinear.gated_linear_attention(*t, 4))
    args = (phi_q, phi_k, v, log_decay, mask)
    torch.testing.assert_close(export_and_run(op, args), op(*args), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("queries", [10, 6])
def test_bidirectional_gated_linear_attention(queries):
    B, H, T, D, F = 2, 2, 10, 3, 4
    phi_q, phi_k, v = _features(B, H, queries, F), _features(B, H, T, F, seed=1), torch.randn(B, H, T, D)
    before, after = -torch.rand(B, H, T), -2 * torch.rand(B, H, T)
    mask = _padding_mask(B, T)
    op = CallOp(lambda *t: torch.ops.relinear.bidirectional_gated_linear_attention(*t, 4))
    args = (phi_q, phi_k, v, before, after, mask)
    torch.testing.assert_close(export_and_run(op, args), op(*args), atol=1e-5, rtol=1e-4)


DENSE = [f for f in families() if f.dense is not None and f.translations]


@pytest.mark.parametrize("family", DENSE, ids=lambda f: f.name)
def test_dense_ops(family):
    family.load_kernels()
    form = family.dense
    weight = torch.randn(9, 13, generator=torch.Generator().manual_seed(0))  # sizes that need block padding
    (setting,) = form.settings(family.example, weight)
    factors = form.fit(weight, setting)
    module = CallOp(lambda x, *t: form.call(x, t[:-1], t[-1], 9))
    args = (torch.randn(2, 5, 13), *factors, torch.randn(9))
    torch.testing.assert_close(export_and_run(module, args), module(*args), atol=1e-5, rtol=1e-4)
