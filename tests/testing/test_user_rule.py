"""`rl.rule`: a user's pattern function becomes a rule that fires on torch.export and Dynamo graphs alike."""

import pytest
import torch
import torch.nn.functional as F

import relinear as rl
from relinear.rewrite.engine import Rule
from relinear.rewrite.ops import canonical
from relinear.rewrite.user_rule import UserRule, rule

SILU = rule(lambda x: x * torch.sigmoid(x), F.silu, name="silu_fusion")


class Spellings(torch.nn.Module):
    """Every spelling of x * sigmoid(x), operands in both orders."""

    def forward(self, x):
        return x * x.sigmoid() + torch.sigmoid(x) * x + torch.mul(F.sigmoid(x), x)


class Escapes(torch.nn.Module):
    def forward(self, x):
        s = torch.sigmoid(x)
        return x * s, s


class Mixed(torch.nn.Module):
    """One silu site, and one whose sigmoid reads another tensor (a different computation)."""

    def forward(self, x, y):
        return x * torch.sigmoid(x) + x * torch.sigmoid(y)


def _compiled_report(model, *args, user_rule=SILU):
    torch._dynamo.reset()
    out = torch.compile(model, backend=rl.backend(rl.Recipe([user_rule])), fullgraph=True)(*args)
    return out, rl.last_report()


def _sigmoids(gm) -> int:
    return sum(canonical(n) == "sigmoid" for n in gm.graph.nodes)


def test_rule_is_an_engine_rule_carrying_its_functions():
    assert isinstance(SILU, UserRule) and isinstance(SILU, Rule)
    assert SILU.replacement_fn is F.silu and SILU.pattern_fn(torch.ones(1)).shape == (1,)
    assert (SILU.tier, SILU.tolerance, SILU.arg_names) == ("exact", None, ("x",))


def test_fires_on_every_spelling_in_offline_rewrite():
    x = torch.randn(3, 4)
    fast, report = rl.rewrite(Spellings(), (x,), rl.Recipe([SILU]), progress=False)
    assert report.counts == {"silu_fusion": 3} and _sigmoids(fast) == 0
    torch.testing.assert_close(fast(x), 3 * F.silu(x))
    torch.testing.assert_close(fast(torch.randn(5, 2)).shape, torch.Size([5, 2]))  # dynamic shapes kept


def test_fires_on_every_spelling_in_the_compile_backend():
    x = torch.randn(3, 4)
    out, report = _compiled_report(Spellings(), x)
    assert report.counts == {"silu_fusion": 3}
    torch.testing.assert_close(out, 3 * F.silu(x))


def test_escaping_intermediate_is_left_alone_with_reason_in_both_front_ends():
    x = torch.randn(4)
    fast, offline = rl.rewrite(Escapes(), (x,), rl.Recipe([SILU]), progress=False)
    (out, s), compiled = _compiled_report(Escapes(), x)
    for report in (offline, compiled):
        assert report.counts == {}
        (name, _, reason), = report.skipped
        assert name == "silu_fusion" and "also used elsewhere" in reason
    assert _sigmoids(fast) == 1
    torch.testing.assert_close(out, F.silu(x))
    torch.testing.assert_close(s, torch.sigmoid(x))


def test_a_repeated_argument_must_be_the_same_value():
    x, y = torch.randn(3), torch.randn(3)
    fast, report = rl.rewrite(Mixed(), (x, y), rl.Recipe([SILU]), progress=False)
    assert report.counts == {"silu_fusion": 1}
    torch.testing.assert_close(fast(x, y), F.silu(x) + x * torch.sigmoid(y))


def test_constants_match_exactly():
    quick_gelu = rule(lambda x: x * torch.sigmoid(1.702 * x), lambda x: F.gelu(x), name="quick_gelu",
                      tier="approximate", tolerance=0.1)

    class Two(torch.nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(1.702 * x) + x * torch.sigmoid(x * 1.7)

    x = torch.randn(8)
    fast, report = rl.rewrite(Two(), (x,), rl.Recipe([quick_gelu]), progress=False)
    assert report.counts == {"quick_gelu": 1}
    torch.testing.assert_close(fast(x), F.gelu(x) + x * torch.sigmoid(1.7 * x))


def test_arguments_left_out_of_the_pattern_must_hold_their_default():
    to_tanh = rule(lambda x: F.gelu(x), lambda x: F.gelu(x, approximate="tanh"), name="gelu_to_tanh",
                   tier="approximate", tolerance=1e-2)
    x = torch.randn(6)
    for model, fires in ((torch.nn.GELU(), 1), (torch.nn.GELU(approximate="tanh"), 0)):
        _, offline = rl.rewrite(model, (x,), rl.Recipe([to_tanh]), progress=False)
        _, compiled = _compiled_report(model, x, user_rule=to_tanh)
        assert offline.counts.get("gelu_to_tanh", 0) == fires
        assert compiled.counts.get("gelu_to_tanh", 0) == fires


def test_keyword_and_positional_spellings_match():
    stable = rule(lambda x: torch.softmax(x, -1), lambda x: torch.softmax(x.double(), -1).to(x.dtype),
                  name="softmax64")

    class Kw(torch.nn.Module):
        def forward(self, x):
            return x.softmax(dim=-1) + F.softmax(x, dim=0)  # dim=0 is a different op

    x = torch.randn(3, 3)
    _, report = _compiled_report(Kw(), x, user_rule=stable)
    assert report.counts == {"softmax64": 1}
    _, report = rl.rewrite(Kw(), (x,), rl.Recipe([stable]), progress=False)
    assert report.counts == {"softmax64": 1}


def test_approximate_rule_beyond_its_tolerance_is_left_alone():
    rough = rule(lambda x: torch.tanh(x), lambda x: x.clamp(-1, 1), name="rough_tanh", tier="approximate",
                 tolerance=1e-3)
    x = torch.linspace(-3, 3, 50)
    _, report = rl.rewrite(torch.nn.Tanh(), (x,), rl.Recipe([rough]), progress=False)
    (name, _, reason), = report.skipped
    assert report.counts == {} and "tolerance" in reason


@pytest.mark.parametrize("kwargs, message", [
    (dict(pattern=lambda x: (x.sin(), x.cos()), replacement=torch.sin), "several values"),
    (dict(pattern=lambda x: x, replacement=torch.sin), "unchanged"),
    (dict(pattern=lambda x, y: x.sin(), replacement=lambda x, y: x), "not used"),
    (dict(pattern=lambda x: x.sin(), replacement=lambda x, y: x), "replacement cannot take"),
    (dict(pattern=lambda x: x.sin(), replacement=torch.sin, tier="approximate"), "needs tolerance"),
    (dict(pattern=lambda x: x.sin(), replacement=torch.sin, tier="close"), "tier"),
    (dict(pattern=lambda x: x.sin(), replacement=torch.sin, tolerance=-1.0), "tolerance"),
    (dict(pattern=lambda x: x.sin() if x.sum() > 0 else x, replacement=torch.sin), "traced"),
])
def test_bad_rules_raise_value_errors_naming_the_problem(kwargs, message):
    kwargs.setdefault("name", "r")
    with pytest.raises(ValueError, match=message):
        rule(**kwargs)


def test_a_lambda_pattern_needs_a_name():
    with pytest.raises(ValueError, match="name"):
        rule(lambda x: x.sin(), torch.sin)


def test_a_user_rule_and_a_dense_rule_on_adjacent_nodes_both_apply():
    """silu reads the output of a Linear the LowRank rule replaces: both rewrites must land, in order."""

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(6, 8), torch.nn.Linear(8, 6)

        def forward(self, x):
            h = self.up(x)
            return self.down(h * torch.sigmoid(h))

    model, x = MLP(), torch.randn(3, 6)
    fast, report = rl.rewrite(model, (x,), rl.Recipe([SILU, rl.LowRank(energy=1.0)]), progress=False)
    assert report.counts == {"silu_fusion": 1, "low_rank": 2}
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_replacement_lambda_without_source_code_still_rewrites():
    namespace = {"torch": torch, "rule": rule}
    exec("made = rule(lambda x: x * torch.sigmoid(x), lambda x: x / (1 + torch.exp(-x)), name='typed')",
         namespace)  # as typed at a prompt: inspect cannot find the lambda's source
    x = torch.randn(5)
    fast, report = rl.rewrite(Spellings(), (x,), rl.Recipe([namespace["made"]]), progress=False)
    assert report.counts == {"typed": 3}
    torch.testing.assert_close(fast(x), 3 * F.silu(x))
