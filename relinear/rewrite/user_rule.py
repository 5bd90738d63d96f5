"""`rl.rule`: a user's own rewrite, written as two plain Python functions over tensors.

    rl.rule(lambda x: x * torch.sigmoid(x), F.silu, name="silu_fusion")

The pattern function is traced once with torch.fx; its graph becomes a pattern in canonical op names
(`ops.py`), so it fires on Dynamo graphs (torch functions, Tensor methods, operators) and on torch.export
graphs (ATen overloads) alike. Arguments are compared by parameter name after normalizing each call against
its signature, so `torch.softmax(x, -1)`, `x.softmax(dim=-1)` and `aten.softmax.int(x, -1)` are one pattern,
and an argument the pattern leaves out must hold its default (a pattern `F.gelu(x)` does not match the tanh
form). `mul` and `add` match in either operand order. The rewrite inserts one call to the replacement
function, which torch.compile and torch.export trace through.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from relinear.rewrite.context import GraphContext
from relinear.rewrite.engine import Rule, Skip, site_of
from relinear.rewrite.ops import canonical
from relinear.rewrite.pattern import AnyOf, Match, Pattern, Var
from relinear.rewrite.report import Site, relative_error

TIERS = ("exact", "approximate")
COMMUTATIVE = ("mul", "add")
_OUT = "__out__"  # the capture that holds the matched root, recorded to measure the rewrite's error
_ALIASES = {"self": "input"}  # ATen schemas call the first tensor `self`, Python signatures `input`
_EXAMPLE = torch.empty(())
_ABSENT = object()  # a defaulted pattern parameter that the matched node's signature does not have


@dataclass(frozen=True)
class Literal(Pattern):
    """A Python constant of the pattern, matched exactly (1.001 is not 1.0, True is not 1)."""

    value: object

    def match(self, value, m: Match) -> bool:
        if isinstance(value, bool) or isinstance(self.value, bool):
            return value is self.value
        if isinstance(value, numbers.Number) and isinstance(self.value, numbers.Number):
            return value == self.value
        return type(value) is type(self.value) and value == self.value


@dataclass(frozen=True)
class Arguments:
    values: dict[str, object]  # every parameter by name, defaults filled in
    given: frozenset[str]  # the parameters the call spelled out


def named_arguments(node: fx.Node) -> Arguments | None:
    """A call node's arguments by parameter name; None when the signature is unknown (Python operators,
    ambiguous overloads) and arguments can only be compared by position."""
    target = getattr(torch, node.target, None) if node.op == "call_method" else node.target
    if target is None:
        return None
    # a graph value stands in as an example tensor, which is all overload resolution needs to know
    args = tuple(_EXAMPLE if isinstance(a, fx.Node) else a for a in node.args)
    kwargs = {k: _EXAMPLE if isinstance(a, fx.Node) else a for k, a in node.kwargs.items()}
    try:
        normalized = normalize_function(target, args, kwargs, normalize_to_only_use_kwargs=True)
    except Exception:  # raised for unsupported targets; same meaning as None
        normalized = None
    if normalized is None or len(node.args) > len(normalized.kwargs):
        return None
    names = list(normalized.kwargs)
    given = {**dict(zip(names, node.args, strict=False)), **node.kwargs}
    values = {_ALIASES.get(k, k): given.get(k, default) for k, default in normalized.kwargs.items()}
    return Arguments(values, frozenset(_ALIASES.get(k, k) for k in given))


@dataclass(frozen=True)
class Call(Pattern):
    """A call node of canonical op `op` whose arguments match `params`.

    By name when both signatures are known: a pattern parameter left at its default may be absent from the
    node, and a node parameter the pattern lacks must not be spelled out (other than as None). By position
    otherwise, with exactly as many arguments as the pattern.
    """

    op: str
    params: tuple[tuple[str | None, Pattern], ...]  # (parameter name, or None when unknown; pattern)
    defaulted: frozenset[str] = frozenset()  # pattern parameters the pattern did not spell out

    def _arguments(self, node: fx.Node) -> list | None:
        named = named_arguments(node) if self.params and self.params[0][0] is not None else None
        if named is None:
            return self._by_position(node)
        mine = {name for name, _ in self.params}
        extra = named.given - mine
        if any(named.values[k] is not None for k in extra):
            return None
        out = []
        for name, _ in self.params:
            if name not in named.values:
                if name not in self.defaulted:
                    return None
                out.append(_ABSENT)
            else:
                out.append(named.values[name])
        return out

    def _by_position(self, node: fx.Node) -> list | None:
        """Positional arguments only; trailing pattern parameters left at their default may be absent."""
        missing = [name for name, _ in self.params[len(node.args):]]
        if node.kwargs or len(node.args) > len(self.params) or not set(missing) <= self.defaulted:
            return None
        return [*node.args, *[_ABSENT] * len(missing)]

    def match(self, value, m: Match) -> bool:
        if not isinstance(value, fx.Node) or canonical(value) != self.op:
            return False
        values = self._arguments(value)
        if values is None:
            return False
        for (_, pattern), v in zip(self.params, values, strict=True):
            if v is not _ABSENT and not pattern.match(v, m):
                return False
        if value is not m.root:
            m.interior.append(value)
        return True


def _swapped(call: Call) -> Call:
    (first, a), (second, b) = call.params
    return Call(call.op, ((first, b), (second, a)), call.defaulted)


def pattern_from_function(fn: Callable) -> tuple[Pattern, tuple[str, ...]]:
    """(pattern, argument names): the fx graph of `fn` as a pattern; each argument becomes a `Var`."""
    try:
        graph = fx.symbolic_trace(fn).graph
    except Exception as e:
        raise ValueError(f"rule: pattern could not be traced by torch.fx ({type(e).__name__}: {e}); "
                         "write it as a function of tensors without data-dependent control flow") from e
    names = tuple(n.target for n in graph.nodes if n.op == "placeholder")
    if not names:
        raise ValueError("rule: pattern must take at least one tensor argument")
    (output,) = [n for n in graph.nodes if n.op == "output"]
    result = output.args[0]
    if not isinstance(result, fx.Node):
        raise ValueError("rule: pattern must return one tensor; it returns several values or a constant")
    if result.op == "placeholder":
        raise ValueError("rule: pattern returns its argument unchanged; it must compute something")
    used = {n.target for n in graph.nodes if n.op == "placeholder" and n.users}
    unused = [n for n in names if n not in used]
    if unused:
        raise ValueError(f"rule: pattern argument(s) {unused} are not used by the pattern")
    return _to_pattern(result), names


def _to_pattern(value) -> Pattern:
    if isinstance(value, fx.Node):
        if value.op == "placeholder":
            return Var(value.target)
        if value.op in ("call_function", "call_method"):
            return _call_pattern(value)
        raise ValueError(f"rule: pattern reads {value.op} {value.target!r}; pass tensors as arguments")
    if isinstance(value, (list, tuple)) and any(isinstance(v, fx.Node) for v in value):
        raise ValueError(f"rule: pattern passes a sequence of tensors {value!r} to an op; not supported")
    return Literal(value)


def _call_pattern(node: fx.Node) -> Pattern:
    op = canonical(node)
    named = named_arguments(node)
    if named is not None:
        call = Call(op, tuple((name, _to_pattern(v)) for name, v in named.values.items()),
                    frozenset(named.values) - named.given)
    else:
        if node.kwargs:
            raise ValueError(f"rule: keyword arguments of {op} cannot be matched (its signature is unknown)")
        call = Call(op, tuple((None, _to_pattern(a)) for a in node.args))
    if op in COMMUTATIVE and len(call.params) == 2:
        return AnyOf(call, _swapped(call))
    return call


@dataclass(frozen=True)
class UserRule(Rule):
    pattern_fn: Callable | None = None
    replacement_fn: Callable | None = None
    arg_names: tuple[str, ...] = ()
    tier: str = "exact"
    tolerance: float | None = None


def rule(pattern: Callable, replacement: Callable, name: str | None = None, tier: str = "exact",
         tolerance: float | None = None) -> UserRule:
    """A rewrite rule from two functions over tensors: every match of `pattern` becomes a call of
    `replacement` with the same arguments. `tier="approximate"` needs `tolerance`: the largest relative
    output error it may make; a site whose measured error exceeds it is left alone (and
    `relinear.testing.check_rule` holds the rule to it)."""
    if not callable(pattern):
        raise ValueError(f"rule: pattern must be a function of tensors, got {pattern!r}")
    if not callable(replacement):
        raise ValueError(f"rule: replacement must be a function of tensors, got {replacement!r}")
    if tier not in TIERS:
        raise ValueError(f"rule: tier must be one of {TIERS}, got {tier!r}")
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and 0 < tolerance < math.inf):
        raise ValueError(f"rule: tolerance must be a positive number, got {tolerance!r}")
    if tier == "approximate" and tolerance is None:
        raise ValueError("rule: tier='approximate' needs tolerance (the largest relative error it may make)")
    name = name or getattr(pattern, "__name__", "user_rule")
    if not isinstance(name, str) or not name or name == "<lambda>":
        raise ValueError(f"rule: give the rule a name (name=...), got {name!r}")
    _check_arity(replacement, pattern)
    tree, arg_names = pattern_from_function(pattern)
    return UserRule(name, functools.partial(_find, tree),
                    functools.partial(_rewrite, name, _graph_callable(replacement, name), arg_names, tier,
                                      tolerance),
                    needs=(*arg_names, _OUT), pattern_fn=pattern, replacement_fn=replacement,
                    arg_names=arg_names, tier=tier, tolerance=tolerance)


def _check_arity(replacement: Callable, pattern: Callable) -> None:
    try:
        inspect.signature(replacement).bind(*inspect.signature(pattern).parameters)
    except TypeError as e:
        raise ValueError(f"rule: replacement cannot take the pattern's arguments: {e}") from None
    except ValueError:  # a builtin without a signature: checked when the rule first fires
        pass


def _graph_callable(fn: Callable, rule_name: str) -> Callable:
    """`fn` under a name generated code can refer to: fx names a lambda by reading its source, which
    does not exist for code typed at a prompt or run by exec."""
    if getattr(fn, "__name__", "<lambda>").isidentifier():
        return fn

    def replacement(*args):
        return fn(*args)

    replacement.__name__ = replacement.__qualname__ = re.sub(r"\W", "_", f"{rule_name}_replacement")
    return replacement


def _find(tree: Pattern, node: fx.Node, ctx: GraphContext) -> Match | None:
    m = tree(node)
    if m is not None:
        m.captures[_OUT] = node
    return m


def _rewrite(name: str, replacement: Callable, arg_names: tuple[str, ...], tier: str, tolerance: float | None,
             m: Match, ctx: GraphContext):
    args = tuple(m[a] for a in arg_names)
    with torch.no_grad():
        before = ctx.activation(m[_OUT])
        after = replacement(*(ctx.activation(a) for a in args))
    if not isinstance(after, torch.Tensor) or (after.shape, after.dtype) != (before.shape, before.dtype):
        got = (tuple(after.shape), after.dtype) if isinstance(after, torch.Tensor) else type(after).__name__
        want = (tuple(before.shape), before.dtype)
        return Skip(f"replacement returns {got} where the pattern gives {want}")
    error = relative_error(after, before)
    if tolerance is not None and error > tolerance:
        return Skip(f"relative error {error:.3g} > tolerance={tolerance}")
    with ctx.gm.graph.inserting_before(m.root):
        new = ctx.gm.graph.call_function(replacement, args)
    return new, Site(name, site_of(m.root), error=error, detail=tier)
