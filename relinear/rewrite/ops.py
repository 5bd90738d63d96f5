"""One canonical op vocabulary for torch.fx graphs from Dynamo (torch functions, Tensor methods, Python
operators) and from `torch.export` (ATen overloads), so that one pattern fires on both.

Why a table and not per-rule special cases: rules break when a transformers upgrade writes `x @ w` where it
used to write `torch.matmul(x, w)`; mapping every spelling to one name here keeps every rule immune to that.
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx
import torch.nn.functional as F

aten = torch.ops.aten

# canonical name -> spellings. Tensor methods are strings (fx `call_method` targets).
_SPELLINGS: dict[str, tuple] = {
    "linear": (F.linear, torch._C._nn.linear, aten.linear.default),
    "addmm": (torch.addmm, aten.addmm.default),
    "matmul": (torch.matmul, operator.matmul, aten.matmul.default, "matmul", torch.mm, aten.mm.default, "mm",
               torch.bmm, aten.bmm.default, "bmm"),
    "baddbmm": (torch.baddbmm, aten.baddbmm.default, "baddbmm"),
    "einsum": (torch.einsum, aten.einsum.default),
    "sdpa": (F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default),
    "softmax": (F.softmax, torch.softmax, aten.softmax.int, aten._softmax.default, "softmax",
                torch._C._nn.softmax if hasattr(torch._C._nn, "softmax") else F.softmax),
    "gelu": (F.gelu, aten.gelu.default),
    "transpose": (torch.transpose, aten.transpose.int, "transpose", torch.swapaxes, "swapaxes"),
    "t": (torch.t, aten.t.default, "t", aten.numpy_T.default),  # aten.numpy_T: `w.T` in torch.export graphs
    "permute": (torch.permute, aten.permute.default, "permute"),
    "mul": (operator.mul, torch.mul, aten.mul.Tensor, aten.mul.Scalar, "mul"),
    "div": (operator.truediv, torch.div, aten.div.Tensor, aten.div.Scalar, "div"),
    "add": (operator.add, torch.add, aten.add.Tensor, aten.add.Scalar, "add"),
    "masked_fill": (torch.masked_fill, aten.masked_fill.Scalar, aten.masked_fill.Tensor, "masked_fill"),
    "where": (torch.where, aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf),
    "dropout": (F.dropout, aten.dropout.default, torch.dropout),
    "to": ("to", "float", "type_as", aten.type_as.default, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default),
    "contiguous": ("contiguous", aten.contiguous.default, aten.clone.default, "clone"),
    "view": ("view", "reshape", aten.view.default, aten.reshape.default, aten._unsafe_view.default,
             torch.reshape),
}

_BY_TARGET: dict = {}
for _name, _targets in _SPELLINGS.items():
    for _t in _targets:
        _BY_TARGET.setdefault(_t, _name)


def canonical(node: fx.Node) -> str | None:
    """The canonical op name of `node`; None for placeholders, attributes, modules and outputs.

    Spellings in the table map to their canonical name; any other op is named by itself (`torch.sigmoid`,
    `Tensor.sigmoid` and `aten.sigmoid.default` are all "sigmoid"), so users' patterns need no table entry.
    """
    target = node.target
    if node.op == "call_method":
        return _BY_TARGET.get(target, target)
    if node.op != "call_function":
        return None
    if target is getattr and len(node.args) == 2 and node.args[1] in ("mT", "T"):
        return "t" if node.args[1] == "T" else "mT"
    try:
        name = _BY_TARGET.get(target)
    except TypeError:  # unhashable target
        name = None
    if name is not None:
        return name
    if isinstance(target, torch._ops.OpOverload):
        return target._overloadpacket.__name__
    return getattr(target, "__name__", None)


def is_op(node, *names: str) -> bool:
    return isinstance(node, fx.Node) and canonical(node) in names


def arg(node: fx.Node, index: int, name: str, default=None):
    """Argument `index` (positional) or `name` (keyword) of a call node, whatever spelling made it."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


_METADATA_CHECKS = {aten._assert_tensor_metadata.default}


def is_metadata_check(node: fx.Node) -> bool:
    """A node that only asserts a property of its input (torch.export inserts them around casts): it is no
    real use of the value, and it goes when the value goes."""
    return node.op == "call_function" and node.target in _METADATA_CHECKS


# the compiled module as a local of Dynamo's frame: `self`; `fn` for a module compiled without its own forward
# frame (nn.Sequential); `args[0]` when forward is wrapped by a decorator taking *args (transformers' Llama)
_DYNAMO_ROOT = re.compile(r"^L\['(?:self|fn)'\]\.?|^L\['args'\]\[0\]\.?|^L__self__\.?")
_INDEX = re.compile(r"\[['\"]?([^\]'\"]+)['\"]?\]")


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module that produced `node` (``encoder.layer.0.attention.self``).

    Dynamo spells paths ``L['self'].encoder.layer[0]``; torch.export spells them ``encoder.layer.0``.
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = _DYNAMO_ROOT.sub("", path)
    return _INDEX.sub(r".\1", path).strip(".")
