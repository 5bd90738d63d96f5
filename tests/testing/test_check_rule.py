"""`relinear.testing.check_rule` passes correct rules and catches subtly wrong ones."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import relinear.testing as rt
from relinear.rewrite.user_rule import rule

SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


def gelu_tanh_form(x):
    return 0.5 * x * (1 + torch.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))


def test_passes_silu_fusion():
    rt.check_rule(rule(lambda x: x * torch.sigmoid(x), F.silu, name="silu_fusion"))


def test_passes_gelu_tanh_form():
    rt.check_rule(rule(gelu_tanh_form, lambda x: F.gelu(x, approximate="tanh"), name="gelu_tanh"))


def test_passes_an_approximate_rule_within_its_tolerance():
    # relative error of the whole output: over 64 values in [-4, 4] it stays near 1% (a few values all
    # deep in the negative tail could exceed any tolerance; that is not what this rule promises)
    quick = rule(lambda x: F.gelu(x), lambda x: x * torch.sigmoid(1.702 * x), name="quick_gelu",
                 tier="approximate", tolerance=0.05)
    rt.check_rule(quick, inputs=rt.float_tensors((64,), dtype=(torch.float32, torch.float64)))


def test_passes_with_user_inputs_of_two_arguments():
    fused = rule(lambda x, y: x * torch.sigmoid(y), lambda x, y: x / (1 + torch.exp(-y)), name="glu")
    pair = st.tuples(rt.float_tensors((2, 3)), rt.float_tensors((2, 3)))
    rt.check_rule(fused, inputs=pair, max_examples=5)


def test_fails_a_constant_off_by_a_tenth_of_a_percent():
    with pytest.raises(AssertionError, match="changed the output"):
        rt.check_rule(rule(lambda x: x * torch.sigmoid(1.001 * x), F.silu, name="silu_off"))


def test_fails_a_wrong_replacement():
    wrong = rule(gelu_tanh_form, lambda x: F.gelu(x), name="gelu_exact_for_tanh")  # erf, not tanh
    with pytest.raises(AssertionError, match="Failing test case|Falsifying"):
        rt.check_rule(wrong)


def test_fails_an_approximate_rule_beyond_its_tolerance():
    # Outside the stated tolerance the rewrite leaves the site alone, so the rule never fires on its pattern.
    loose = rule(lambda x: F.gelu(x), lambda x: torch.relu(x), name="relu_for_gelu", tier="approximate",
                 tolerance=1e-3)
    with pytest.raises(AssertionError, match="did not fire"):
        rt.check_rule(loose)


def test_fails_a_rule_whose_replacement_contains_its_pattern():
    loop = rule(lambda x: x * torch.sigmoid(x), lambda x: torch.sigmoid(x) * x, name="loop")
    with pytest.raises(AssertionError, match="fired again"):
        rt.check_rule(loop, max_examples=2)


def test_fails_a_rule_whose_pattern_cannot_match_itself():
    # torch.export writes `1 - x` as rsub, which the pattern (sub) never matches: the rule is useless.
    never = rule(lambda x: 1 - torch.sigmoid(x), lambda x: torch.sigmoid(-x), name="never")
    with pytest.raises(AssertionError, match="did not fire"):
        rt.check_rule(never, max_examples=2)


def test_check_equivalent():
    x = torch.randn(4, 5)
    rt.check_equivalent(F.silu, lambda t: t * torch.sigmoid(t), (x,))
    with pytest.raises(AssertionError):
        rt.check_equivalent(F.silu, lambda t: t * torch.sigmoid(1.001 * t), (x,))
    with pytest.raises(AssertionError, match="expected \\(2, 5\\)"):
        rt.check_equivalent(F.silu, lambda t: F.silu(t)[:2], (x,))
    with pytest.raises(ValueError, match="rtol"):
        rt.check_equivalent(F.silu, F.silu, (x,), rtol=1e-3)


def test_check_rule_rejects_other_rules():
    from relinear.passes import rules_for
    from relinear.recipe import LowRank, Recipe

    with pytest.raises(ValueError, match="relinear.rule"):
        rt.check_rule(rules_for(Recipe([LowRank(rank=1)]))[0])


def test_passes_a_correct_rule_under_hypothesis_default_profile(monkeypatch):
    """A user's plain script or own suite has Hypothesis's default profile (a 200 ms deadline): the first
    example of each shape traces a graph, which takes longer (here made to, as on a slow machine), and must
    not be reported as a FlakyFailure."""
    import time

    from hypothesis import settings

    import relinear.testing.checks as checks
    from relinear.testing.profiles import load_profile

    traced = checks.rewrite

    def slow_rewrite(*args, **kwargs):
        time.sleep(0.25)
        return traced(*args, **kwargs)

    monkeypatch.setattr(checks, "rewrite", slow_rewrite)
    settings.load_profile("default")
    try:
        rt.check_rule(rule(lambda x: x * torch.sigmoid(x), F.silu, name="silu_fusion"), max_examples=5)
    finally:
        load_profile()
