"""The Triton backward kernels behind the ops' autograd: on the forced kernel path (CPU tensors under
TRITON_INTERPRET=1), each op's gradients equal those of differentiating its torch form, and the op's
backward kernel is the one that ran."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from kernel_path import assert_kernel_gradients_match, forbid_hybrid_fallback  # noqa: E402

import relinear.kernels.btt  # noqa: E402,F401
import relinear.kernels.linear_attention  # noqa: E402,F401
import relinear.kernels.monarch  # noqa: E402,F401
from relinear.approx.btt import btt_grid  # noqa: E402
from relinear.approx.monarch import monarch_grid  # noqa: E402


def _leaf(*shape, gen):
    return torch.randn(*shape, generator=gen).requires_grad_()


@pytest.mark.parametrize("kind", ["monarch", "btt"])
@pytest.mark.parametrize(("in_features", "out_features", "with_bias"), [(13, 11, True), (10, 17, False)])
def test_structured_linear_backward_kernel(kind, in_features, out_features, with_bias, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    if kind == "monarch":
        grid = monarch_grid(in_features, out_features, 3)
    else:
        grid = btt_grid(in_features, out_features, 2)
    x = _leaf(2, 3, in_features, gen=gen)
    core1, core2 = _leaf(*grid.core1_shape, gen=gen), _leaf(*grid.core2_shape, gen=gen)
    bias = _leaf(out_features, gen=gen) if with_bias else None
    op = getattr(torch.ops.relinear, f"{kind}_linear")
    assert_kernel_gradients_match(op, (x, core1, core2, bias), (out_features,), f"{kind}_linear_backward_cuda",
                                   monkeypatch)


@pytest.mark.parametrize(("length", "causal", "sinks"), [(1, True, 0), (37, True, 0), (37, False, 0), (37, True, 2),
                                                         (37, False, 2)])
def test_hybrid_attention_backward_kernel(length, causal, sinks, monkeypatch):
    """With sinks the CUDA path differentiates the torch form (no sink kernel yet): still the same gradients."""
    gen = torch.Generator().manual_seed(length)
    heads, dim, features, v_dim = 2, 8, 6, 5
    q, k = (_leaf(2, heads, length, dim, gen=gen) for _ in range(2))
    v = _leaf(2, heads, length, v_dim, gen=gen)
    phi_q, phi_k = (torch.rand(2, heads, length, features, generator=gen).requires_grad_() for _ in range(2))
    gate = _leaf(heads, gen=gen)
    key_mask = torch.rand(2, length, generator=gen) > 0.2
    key_mask[:, -1] = True
    key_mask[1, :3] = False
    inputs = (q, k, v, phi_q, phi_k, gate, key_mask)
    assert_kernel_gradients_match(torch.ops.relinear.hybrid_attention, inputs, (causal, 8, dim**-0.5, 16, sinks),
                                   "hybrid_attention_backward_cuda", monkeypatch)


def test_gated_linear_attention_backward_kernel(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    phi_q, phi_k = (torch.rand(2, 2, 37, 6, generator=gen).requires_grad_() for _ in range(2))
    v = _leaf(2, 2, 37, 5, gen=gen)
    log_decay = (-torch.rand(2, 2, 37, generator=gen)).requires_grad_()
    key_mask = torch.rand(2, 37, generator=gen) > 0.2
    key_mask[1, :3] = False
    assert_kernel_gradients_match(torch.ops.relinear.gated_linear_attention, (phi_q, phi_k, v, log_decay, key_mask),
                                   (16,), "gated_linear_attention_backward_cuda", monkeypatch)


@pytest.mark.parametrize("causal", [True, False])
def test_hybrid_attention_with_a_balance_backward(causal, monkeypatch):
    """With a balance the backward kernels run (no autograd through the chunked form) and give the balance its
    gradient too; batch 1's first keys are masked, so early causal queries have an empty window."""
    gen = torch.Generator().manual_seed(5)
    heads, dim, features, v_dim, length = 2, 8, 6, 5, 37
    q, k = (_leaf(2, heads, length, dim, gen=gen) for _ in range(2))
    v = _leaf(2, heads, length, v_dim, gen=gen)
    phi_q, phi_k = (torch.rand(2, heads, length, features, generator=gen).requires_grad_() for _ in range(2))
    gate, balance = _leaf(heads, gen=gen), (0.3 * torch.randn(heads, 3, generator=gen)).requires_grad_()
    key_mask = torch.rand(2, length, generator=gen) > 0.2
    key_mask[:, -1] = True
    key_mask[1, :3] = False

    forbid_hybrid_fallback(monkeypatch)

    def op(q, k, v, phi_q, phi_k, gate, key_mask, balance, *args):
        return torch.ops.relinear.hybrid_attention(q, k, v, phi_q, phi_k, gate, key_mask, *args, 0, balance)

    inputs = (q, k, v, phi_q, phi_k, gate, key_mask, balance)
    assert_kernel_gradients_match(op, inputs, (causal, 8, dim**-0.5, 16), "hybrid_attention_backward_cuda",
                                  monkeypatch)
