"""A few nodes of a graph as a module of their own, so the engine can time a matched site and its replacement
alone, on the example values of their inputs."""

from __future__ import annotations

import torch
import torch.fx as fx


def inputs_of(nodes) -> list[fx.Node]:
    """The nodes outside `nodes` whose values they read (weights read by get_attr count as inside)."""
    inside = set(nodes)
    found: dict[fx.Node, None] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in inside and arg.op != "get_attr":
                found[arg] = None
    return list(found)


def extract(gm: fx.GraphModule, nodes, output: fx.Node) -> tuple[fx.GraphModule, list[fx.Node]]:
    """(module computing `output` from the subgraph `nodes`, the outside nodes its placeholders stand for).

    The module shares `gm`'s parameters and submodules; the get_attr nodes the subgraph reads come along."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    inside = sorted(set(nodes) | {a for n in nodes for a in n.all_input_nodes if a.op == "get_attr"},
                    key=order.__getitem__)
    outside = inputs_of(inside)
    graph = fx.Graph()
    env = {node: graph.placeholder(f"in_{i}") for i, node in enumerate(outside)}
    for node in inside:
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[output])
    return fx.GraphModule(gm, graph), outside


def nodes_added(before: set[fx.Node], graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n not in before]


def op_names(nodes) -> str:
    """The ops of a subgraph in order, for a timing key: "linear", "matmul+div+softmax+matmul"."""
    from relinear.rewrite.ops import canonical

    names = []
    for node in nodes:
        if node.op == "call_module":
            names.append(str(node.target).rsplit(".", 1)[-1].split("_", 1)[0])
        elif node.op == "call_function":
            names.append(canonical(node) or str(node.target))
        elif node.op == "call_method":
            names.append(str(node.target))
    return "+".join(names)


def tensors(values) -> list[torch.Tensor]:
    return [v for v in values if isinstance(v, torch.Tensor)]
