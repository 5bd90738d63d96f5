"""The custom ops: registration contracts (opcheck), torch.compile and torch.export, gradients."""

from __future__ import annotations

import pytest
import torch
from op_graph_checks import backward_graph_calls, opcheck_with_backward
from test_linear_attention import make_inputs

import relinear.kernels.linear_attention  # noqa: F401  (registers the ops)
from relinear.kernels.linear_attention.reference import (
    bidirectional_gated_linear_attention_reference,
    gated_linear_attention_reference,
    hybrid_attention_reference,
    linear_attention_reference,
)

ops = torch.ops.relinear


def _cases(x, causal: bool = True, window: int = 3, chunk_size: int = 4):
    """(op, args, reference form, args of the reference) for each op on the inputs x."""
    return [
        (
            ops.linear_attention.default,
            (x.phi_q, x.phi_k, x.v, x.key_mask, causal, chunk_size),
            linear_attention_reference,
            (x.phi_q, x.phi_k, x.v, x.key_mask, causal),
        ),
        (
            ops.hybrid_attention.default,
            (x.q, x.k, x.v, x.phi_q, x.phi_k, x.gate, x.key_mask, causal, window, 0.5, chunk_size),
            hybrid_attention_reference,
            (x.q, x.k, x.v, x.phi_q, x.phi_k, x.gate, x.key_mask, causal, window, 0.5),
        ),
        (
            ops.gated_linear_attention.default,
            (x.phi_q, x.phi_k, x.v, x.log_decay, x.key_mask, chunk_size),
            gated_linear_attention_reference,
            (x.phi_q, x.phi_k, x.v, x.log_decay, x.key_mask),
        ),
        (
            ops.bidirectional_gated_linear_attention.default,
            (x.phi_q, x.phi_k, x.v, x.log_decay, x.log_decay_after, x.key_mask, chunk_size),
            bidirectional_gated_linear_attention_reference,
            (x.phi_q, x.phi_k, x.v, x.log_decay, x.log_decay_after, x.key_mask),
        ),
    ]


def _requiring_grad(x):
    for name in ("q", "k", "v", "phi_q", "phi_k", "gate", "log_decay", "log_decay_after"):
        getattr(x, name).requires_grad_(True)
    return x


# Tracing the backward with dynamic shapes (test_aot_dispatch_dynamic) takes ~10 s per op on 2 cores: it
# runs on the most general case only (causal, masked, fewer queries than keys).
CHEAP_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize(
    "num_queries, num_keys, causal, masked, checks",
    [(3, 10, True, True, None), (9, 9, False, False, CHEAP_CHECKS), (10, 4, True, True, CHEAP_CHECKS)],
)
def test_opcheck(num_queries, num_keys, causal, masked, checks):
    x = _requiring_grad(make_inputs(0, num_queries=num_queries, num_keys=num_keys, masked=masked, dtype=torch.float32))
    for op, args, _, _ in _cases(x, causal):
        opcheck_with_backward(op, args, **({} if checks is None else {"test_utils": checks}))


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_autograd_through_the_reference(causal):
    x = _requiring_grad(make_inputs(1, num_queries=11, num_keys=11))
    for op, args, reference, reference_args in _cases(x, causal):
        tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        grad_out = torch.randn_like(reference(*reference_args), dtype=torch.float64)
        got = torch.autograd.grad(op(*args), tensors, grad_out)
        expected = torch.autograd.grad(reference(*reference_args), tensors, grad_out, allow_unused=True)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, torch.zeros_like(g) if e is None else e, rtol=1e-9, atol=1e-9)


def test_gradients_under_torch_compile_on_two_threads_match_the_reference(two_threads, fresh_dynamo):
    """Each op's backward under torch.compile (Inductor, CPU) against float64 autograd through the reference, at
    sizes where Inductor tiles the chunks (chunk 32, head dim 16) and on two threads.
    Regression: AOTAutograd traced the backward of the torch form into the graph and Inductor compiled it; its
    CPU code for the gradient of `unfold` writes to doubled offsets on more than one thread (torch 2.13), so the
    hybrid's input gradients were wrong (benchmarks/repro_inductor_tile2d_atomic_add.py). Each op's backward
    is now one opaque op, `relinear::<name>_backward`."""
    sizes = {"num_queries": 12, "num_keys": 12, "dim": 16, "features": 32}
    x32 = _requiring_grad(make_inputs(4, **sizes, dtype=torch.float32))
    x64 = _requiring_grad(make_inputs(4, **sizes))  # the same values: make_inputs draws in float64
    for (op, args, _, _), (_, _, reference, reference_args) in zip(_cases(x32, False, 64, 32),
                                                                   _cases(x64, False, 64, 32), strict=True):
        def wanted(arguments):
            return [a for a in arguments if isinstance(a, torch.Tensor) and a.requires_grad]

        grad_out = torch.randn(reference(*reference_args).shape, generator=torch.Generator().manual_seed(0))
        torch._dynamo.reset()
        got = torch.autograd.grad(torch.compile(op, fullgraph=True, dynamic=False)(*args), wanted(args), grad_out)
        expected = torch.autograd.grad(reference(*reference_args), wanted(reference_args), grad_out.double(),
                                       allow_unused=True)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g.double(), torch.zeros_like(g, dtype=torch.float64) if e is None else e,
                                       rtol=1e-4, atol=1e-4, msg=lambda m, op=op: f"{op}: {m}")


def test_torch_compile_runs_each_backward_as_one_op(fresh_dynamo):
    """The backward graph torch.compile hands to Inductor holds each op's backward op alone: Inductor compiles
    nothing of the torch form's backward (see the test above for why)."""
    x = _requiring_grad(make_inputs(5, num_queries=6, num_keys=6, dtype=torch.float32))
    for op, args, _, _ in _cases(x):
        backward = getattr(ops, f"{op._schema.name.removeprefix('relinear::')}_backward").default
        torch._dynamo.reset()
        assert backward_graph_calls(op, args) == [backward]


def test_ops_compile_on_cpu():
    x = make_inputs(2, num_queries=9, num_keys=9, dtype=torch.float32)
    for op, args, _, _ in _cases(x):
        compiled = torch.compile(op, fullgraph=True, dynamic=False)
        torch.testing.assert_close(compiled(*args), op(*args))


_TENSOR_SLOT = object()


class _OpCall(torch.nn.Module):
    """Calls `op` on its tensor inputs, put in the `_TENSOR_SLOT`s of `template` (the rest fixed)."""

    def __init__(self, op, template):
        super().__init__()
        self.op, self.template = op, template

    def forward(self, *tensors):
        given = iter(tensors)
        return self.op(*(next(given) if a is _TENSOR_SLOT else a for a in self.template))


def test_export_keeps_one_node_per_op():
    x = make_inputs(3, num_queries=9, num_keys=9, dtype=torch.float32)
    for op, args, _, _ in _cases(x):
        tensors = tuple(a for a in args if isinstance(a, torch.Tensor))
        template = [_TENSOR_SLOT if isinstance(a, torch.Tensor) else a for a in args]
        graph = torch.export.export(_OpCall(op, template), tensors).graph
        calls = [node for node in graph.nodes if node.op == "call_function"]
        assert [node.target for node in calls] == [op]
