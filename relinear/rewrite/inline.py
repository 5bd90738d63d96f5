"""Expand calls that Dynamo keeps whole into the ATen ops `torch.export` records for them, so that one rule fires
on both front ends' graphs.

Dynamo puts `F.multi_head_attention_forward` (what `nn.MultiheadAttention` calls) into its graph as one opaque
node, while `torch.export` traces through it to projections, head reshapes and `scaled_dot_product_attention`
(or softmax between two products when the weights are asked for). The backend would see no attention at all.
Each such call is traced alone with `make_fx` at the pre-dispatch level (the level `torch.export` uses), on
tensors of the example's shapes with symbolic sizes (the expansion reads its sizes from its inputs, so it
holds at other lengths too), and spliced in place of the call.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

EXPANDED = (F.multi_head_attention_forward,)


def _hint(value: torch.Tensor) -> torch.Tensor:
    """A concrete stand-in for a node's example value: zeros of its shape (the hints Dynamo records for symbolic
    sizes). make_fx traces symbolic sizes from it again; no value is read."""
    shape = [int(s) if not isinstance(s, torch.SymInt) else s.node.hint for s in value.shape]
    return torch.zeros(shape, dtype=value.dtype)


def _expansion(node: fx.Node) -> tuple[fx.GraphModule, list[fx.Node]] | None:
    flat, spec = pytree.tree_flatten((node.args, node.kwargs))
    positions = [i for i, a in enumerate(flat) if isinstance(a, fx.Node)]
    examples = [flat[i].meta.get("example_value") for i in positions]
    if not all(isinstance(v, torch.Tensor) for v in examples):
        return None  # a size or a probability computed at run time: the expansion could not honor it

    def call(*tensors):
        filled = list(flat)
        for i, t in zip(positions, tensors, strict=True):
            filled[i] = t
        args, kwargs = pytree.tree_unflatten(filled, spec)
        return node.target(*args, **kwargs)

    try:
        with torch._guards.tracing(None):  # its own symbols, not Dynamo's: they must not become Dynamo's guards
            sub = make_fx(call, pre_dispatch=True, tracing_mode="symbolic")(*(_hint(v) for v in examples))
    except Exception:  # an argument combination make_fx cannot trace: the call stays whole, as Dynamo left it
        return None
    return sub, [flat[i] for i in positions]


def expand_opaque_calls(gm: fx.GraphModule) -> None:
    """Replace every call in `EXPANDED` by its ATen expansion; leave a call whose arguments are not all tensors or
    constants as it is."""
    graph = gm.graph
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in EXPANDED]:
        found = _expansion(node)
        if found is None:
            continue
        sub, inputs = found
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        val_map = dict(zip(placeholders, inputs, strict=True))
        with graph.inserting_before(node):
            outputs = graph.graph_copy(sub.graph, val_map)
        for old, new in val_map.items():  # the expansion belongs to the module that made the call
            if old.op != "placeholder":
                new.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        for user in list(node.users):
            if user.target is not operator.getitem:
                raise AssertionError(f"{node.target.__name__} result used by {user.format_node()}: expected an index")
            user.replace_all_uses_with(outputs[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
