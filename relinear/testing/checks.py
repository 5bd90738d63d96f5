"""Checks for rewrite rules, relinear's and users' alike: Hypothesis drives the inputs, the checks hold the
rewritten model to the original (dtype-aware for exact rules, the stated tolerance for approximate ones)
and to the graph contracts every rule must keep.

Every failure is an AssertionError whose message carries Hypothesis's falsifying example.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

from relinear.recipe import Recipe
from relinear.rewrite.offline import rewrite
from relinear.rewrite.ops import canonical
from relinear.rewrite.report import RewriteReport, relative_error
from relinear.rewrite.user_rule import UserRule
from relinear.testing.strategies import FLOAT_DTYPES, float_tensors

# few shapes, so that rewrites (one torch.export each) are shared across examples
DEFAULT_SHAPES = ((7,), (3, 5), (2, 3, 4), (1, 6))
ESCAPE_REASON = "also used elsewhere"


def for_all(strategy: st.SearchStrategy, check: Callable[[object], None], max_examples: int | None = None,
            shrink: bool = True) -> None:
    """Run `check` on examples of `strategy` under the loaded Hypothesis profile; any failure becomes an
    AssertionError that names the falsifying example (`shrink=False`: the first one found, unshrunk).

    Whatever the profile, there is no deadline and no too-slow health check: an example that traces a graph
    is slow the first time and fast when replayed, which Hypothesis's default 200 ms deadline reports as a
    FlakyFailure on a correct rule."""
    loaded = settings.default  # the profile's own suppressions stay
    overrides = {"deadline": None, "suppress_health_check": {*loaded.suppress_health_check, HealthCheck.too_slow}}
    if max_examples is not None:
        overrides["max_examples"] = max_examples
    if not shrink:
        overrides["phases"] = (Phase.explicit, Phase.reuse, Phase.generate)

    @settings(**overrides)
    @given(strategy)
    def holds(example):
        check(example)

    try:
        holds()
    except Exception as e:  # Hypothesis re-raises the (shrunk) failure with the example in its notes
        notes = "\n".join(getattr(e, "__notes__", ()))
        raise AssertionError(f"{type(e).__name__}: {e}\n{notes}") from e



def _leaves(value) -> list[torch.Tensor]:
    return [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]


def assert_same_layout(actual, expected) -> None:
    """Same output structure, shapes and dtypes."""
    got, want = _leaves(actual), _leaves(expected)
    assert len(got) == len(want), f"{len(got)} outputs, expected {len(want)}"
    for i, (a, e) in enumerate(zip(got, want, strict=True)):
        assert (a.shape, a.dtype) == (e.shape, e.dtype), \
            f"output {i}: {tuple(a.shape)} {a.dtype}, expected {tuple(e.shape)} {e.dtype}"


def check_equivalent(model_a: Callable, model_b: Callable, args: tuple, rtol: float | None = None,
                     atol: float | None = None) -> None:
    """`model_a(*args)` equals `model_b(*args)`: same structure, shapes and dtypes, values within rtol/atol
    (None: torch.testing's defaults for the dtype). NaNs must match NaNs."""
    if (rtol is None) != (atol is None):
        raise ValueError("check_equivalent: give both rtol and atol, or neither (dtype defaults)")
    args = args if isinstance(args, tuple) else (args,)
    with torch.no_grad():
        a, b = model_a(*args), model_b(*args)
    assert_same_layout(a, b)
    for got, want in zip(_leaves(a), _leaves(b), strict=True):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True)


class _Calls(torch.nn.Module):
    """A function as a module, so that torch.export can trace it."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _signature(args: tuple) -> tuple:
    return tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)


def _default_inputs(rule: UserRule) -> st.SearchStrategy[tuple]:
    n = len(rule.arg_names)
    layouts = st.tuples(st.sampled_from(DEFAULT_SHAPES), st.sampled_from(FLOAT_DTYPES))
    return layouts.flatmap(lambda layout: st.tuples(*[float_tensors(*layout)] * n))


def _inputs(rule: UserRule, inputs) -> st.SearchStrategy[tuple]:
    if inputs is None:
        return _default_inputs(rule)
    if isinstance(inputs, st.SearchStrategy):
        return inputs.map(lambda drawn: drawn if isinstance(drawn, tuple) else (drawn,))
    if isinstance(inputs, Sequence) and all(isinstance(s, st.SearchStrategy) for s in inputs):
        return st.tuples(*inputs)
    raise ValueError("check_rule: inputs must be a strategy of argument tuples or a sequence of strategies "
                     f"(one per pattern argument), got {inputs!r}")


def near_misses(fn: Callable) -> list[fx.GraphModule]:
    """`fn` that also returns an interior value (one per interior op): the rule must then leave it alone."""
    graph = fx.symbolic_trace(fn).graph
    (output,) = [n for n in graph.nodes if n.op == "output"]
    calls = [n for n in graph.nodes if n.op in ("call_function", "call_method")]
    interior = [n for n in calls if n is not output.args[0]]
    misses = []
    for node in interior:
        gm = fx.symbolic_trace(fn)
        copy = next(n for n in gm.graph.nodes if n.name == node.name)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        out.args = ((out.args[0], copy),)
        gm.recompile()
        misses.append(gm)
    return misses


class _RuleChecker:
    """One rule's checks; rewrites are shared by examples with the same argument shapes and dtypes."""

    def __init__(self, rule: UserRule):
        self.rule = rule
        self.recipe = Recipe([rule])
        self.rewritten: dict[tuple, torch.nn.Module | AssertionError] = {}
        self.near_misses_checked = False

    def _rewrite(self, model, args) -> tuple[torch.nn.Module, RewriteReport]:
        return rewrite(model, args, self.recipe, dynamic=False, progress=False)

    def _fired(self, report: RewriteReport) -> int:
        return report.counts.get(self.rule.name, 0)

    def rewritten_for(self, args: tuple) -> torch.nn.Module:
        key = _signature(args)
        if key not in self.rewritten:
            try:
                self.rewritten[key] = self._rewrite_checked(args)
            except AssertionError as e:  # remembered: shrinking replays examples, and exports are slow
                self.rewritten[key] = e
        if isinstance(self.rewritten[key], AssertionError):
            raise self.rewritten[key]
        return self.rewritten[key]

    def _rewrite_checked(self, args: tuple) -> torch.nn.Module:
        fast, report = self._rewrite(_Calls(self.rule.pattern_fn), args)
        assert self._fired(report), (f"rule {self.rule.name!r} did not fire on its own pattern "
                                     f"(left alone: {report.skipped or 'no match'})")
        _, again = self._rewrite(fast, args)
        assert not self._fired(again), (f"rule {self.rule.name!r} fired again on its own output: the "
                                        "replacement contains the pattern, so rewriting never settles")
        return fast

    def check_near_misses(self, args: tuple) -> None:
        for miss in near_misses(self.rule.pattern_fn):
            _, report = self._rewrite(miss, args)
            escaped = next(n.name for n in miss.graph.nodes if n.op == "output")
            assert not self._fired(report), (f"rule {self.rule.name!r} fired although an intermediate value "
                                             f"escapes ({escaped}): that value would be lost")
            reasons = [why for rule, _, why in report.skipped if rule == self.rule.name]
            assert any(ESCAPE_REASON in why for why in reasons), \
                f"rule {self.rule.name!r} left an escaping intermediate alone without saying why: {reasons}"

    def __call__(self, args: tuple) -> None:
        fast = self.rewritten_for(args)
        if not self.near_misses_checked:
            self.check_near_misses(args)
            self.near_misses_checked = True
        with torch.no_grad():
            expected = self.rule.pattern_fn(*args)
            actual = fast(*args)
        assert_same_layout(actual, expected)
        if self.rule.tier == "exact":
            torch.testing.assert_close(actual, expected, equal_nan=True,
                                       msg=lambda m: f"exact rule {self.rule.name!r} changed the output: {m}")
            return
        finite = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(actual), finite), \
            f"rule {self.rule.name!r} changed which outputs are finite"
        error = relative_error(actual[finite], expected[finite])
        assert error <= self.rule.tolerance, \
            f"rule {self.rule.name!r}: relative error {error:.3g} > its tolerance {self.rule.tolerance}"


def check_rule(rule: UserRule, inputs=None, max_examples: int | None = None) -> None:
    """Property-test a rule made by `relinear.rule`: on drawn inputs (default: small float32/float64 tensors,
    one per pattern argument) the pattern, rewritten by the rule through `relinear.rewrite`, keeps output
    shapes and dtypes and values (dtype-aware tolerances for an exact rule, the stated tolerance for an
    approximate one); the rule fires on its own pattern, does not fire again on its output, and leaves the
    pattern alone when an intermediate value is also returned. Raises AssertionError with the falsifying
    example."""
    if not isinstance(rule, UserRule):
        raise ValueError(f"check_rule: rule must be made by relinear.rule(...), got {type(rule).__name__}")
    for_all(_inputs(rule, inputs), _RuleChecker(rule), max_examples)


def count_candidates(gm: fx.GraphModule, *ops: str) -> int:
    """How many nodes of `gm` have canonical op in `ops` (e.g. candidates a rule family must account for)."""
    return sum(canonical(n) in ops for n in gm.graph.nodes)


def check_rewrite(model: torch.nn.Module, args: tuple, recipe: Recipe, *, rtol: float, atol: float,
                  compare: torch.Tensor | None = None, candidates: dict[str, int] | None = None
                  ) -> RewriteReport:
    """`relinear.rewrite(model, args, recipe)` keeps output layout and values (within rtol/atol; only where
    `compare`, a bool mask broadcast over the output, is True), and for each rule name in `candidates`
    every candidate site is either rewritten or left alone with a reason."""
    fast, report = rewrite(model, args, recipe, progress=False)
    with torch.no_grad():
        expected, actual = model(*args), fast(*args)
    assert_same_layout(actual, expected)
    if compare is not None:
        expected, actual = expected[compare.expand_as(expected)], actual[compare.expand_as(actual)]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    for name, expected_sites in (candidates or {}).items():
        skipped = [why for rule, _, why in report.skipped if rule == name]
        assert all(why.strip() for why in skipped), f"{name}: a site was left alone without a reason"
        accounted = report.counts.get(name, 0) + len(skipped)
        assert accounted == expected_sites, \
            f"{name}: {expected_sites} candidate sites, {accounted} rewritten or reported ({report.skipped})"
    return report


def linear_attention_formula(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                             feature_map: Callable[[torch.Tensor], torch.Tensor], scale: float
                             ) -> torch.Tensor:
    """Linear attention written out in float64, independent of relinear's kernels: weights
    phi(q sqrt(scale)) . phi(k sqrt(scale)) over the keys `keep` [B, 1, Tq, Tk] allows, normalized per query
    (0 where a query sees nothing). k, v may have fewer (grouped) heads than q."""
    q, k, v = (t.double() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    root = scale ** 0.5
    weights = (feature_map(q * root) @ feature_map(k * root).mT).masked_fill(~keep, 0.0)
    total = weights.sum(-1, keepdim=True)
    return (weights @ v) / torch.where(total == 0, torch.ones_like(total), total)
