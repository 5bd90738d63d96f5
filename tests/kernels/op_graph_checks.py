"""Checks shared by the op tests: a module of relinear ops compiles with dynamic tokens, and torch.export keeps
each op as one node."""

import torch


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
