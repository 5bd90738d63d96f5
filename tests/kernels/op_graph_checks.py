"""Checks shared by the op tests: a module of relinear ops compiles with dynamic tokens, and torch.export keeps
each op as one node, opcheck of an op and its backward op, the backward graph torch.compile builds."""

import operator

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func


def check_torch_compile(layers: torch.nn.Module, in_features: int) -> None:
    compiled = torch.compile(layers, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for tokens in (5, 11):
            x = torch.randn(2, tokens, in_features)
            torch.testing.assert_close(compiled(x), layers(x))


def check_export_keeps_one_node_per_op(layers: torch.nn.Module, in_features: int, ops: list) -> None:
    tokens = torch.export.Dim("tokens", min=2, max=4096)
    exported = torch.export.export(layers, (torch.randn(2, 7, in_features),), dynamic_shapes=({1: tokens},))
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    for op in ops:
        assert targets.count(op) == 1
    x = torch.randn(2, 33, in_features)
    torch.testing.assert_close(exported.module()(x), layers(x))


def backward_graph_calls(fn, args: tuple) -> list:
    """The calls (getitems left out) of the backward graph that AOTAutograd builds when torch.compile compiles
    fn(*args), the graph Inductor would compile."""
    graphs = []

    def keep_backward(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=lambda gm, example_inputs: make_boxed_func(gm.forward),
                           bw_compiler=keep_backward)
    torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*args).sum().backward()
    return [n.target for n in graphs[0].graph.nodes if n.op == "call_function" and n.target is not operator.getitem]


def opcheck_with_backward(op, args: tuple, **options) -> None:
    """torch.library.opcheck of the op and, when an input requires grad, of its backward op
    (`relinear::<name>_backward`) on the gradient of a random output."""
    op = getattr(op, "default", op)  # an OpOverloadPacket's overload
    torch.library.opcheck(op, args, **options)
    wanted = [isinstance(a, torch.Tensor) and a.requires_grad for a in args]
    if any(wanted):
        out = op(*args)
        grad = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(0))
        detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        backward = getattr(torch.ops.relinear, f"{op._schema.name.removeprefix('relinear::')}_backward").default
        torch.library.opcheck(backward, ([grad], wanted, *detached), **options)
