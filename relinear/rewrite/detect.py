"""Find what relinear could rewrite in a graph, without rewriting it: the `detect` rule of reports and demos."""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
import torch.fx as fx

from relinear.rewrite.ops import canonical, module_path

ATTENTION_OPS = ("sdpa",)
DENSE_OPS = ("linear", "addmm")
ACTIVATION_OPS = ("gelu",)


@dataclass(frozen=True)
class Candidate:
    kind: str  # "attention" | "dense" | "activation"
    node: str
    path: str


def _is_weight(node, example_values: dict | None) -> bool:
    """A graph input that holds a parameter: get_attr (torch.export) or a Parameter placeholder (Dynamo)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "get_attr":
        return True
    if node.op == "placeholder" and example_values is not None:
        return isinstance(example_values.get(node), torch.nn.Parameter)
    return False


def find_candidates(gm: fx.GraphModule, example_values: dict | None = None) -> list[Candidate]:
    """Attention calls (SDPA, and softmax between two matmuls), dense layers, activations, in graph order."""
    found = []
    for node in gm.graph.nodes:
        op = canonical(node)
        kind = None
        if op in ATTENTION_OPS:
            kind = "attention"
        elif op == "softmax" and any(canonical(u) == "matmul" for u in node.users):
            kind = "attention"
        elif op in DENSE_OPS:
            kind = "dense"
        elif op == "matmul" and any(_is_weight(a, example_values) for a in node.args[:2]):
            kind = "dense"
        elif op in ACTIVATION_OPS:
            kind = "activation"
        if kind:
            found.append(Candidate(kind, node.name, module_path(node)))
    return found


def count_candidates(candidates: list[Candidate]) -> dict[str, int]:
    counts = collections.Counter(c.kind for c in candidates)
    return {k: counts.get(k, 0) for k in ("attention", "dense", "activation")}
