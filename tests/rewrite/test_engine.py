"""The engine on its own: canonical ops across front ends, escapes, fixed point, unchanged graphs."""

import torch
import torch.nn.functional as F

import relinear as rl
from relinear.rewrite.context import GraphContext
from relinear.rewrite.engine import Rule, Skip, apply_rules
from relinear.rewrite.offline import trace
from relinear.rewrite.ops import canonical
from relinear.rewrite.pattern import P, Var
from relinear.rewrite.report import Site

SILU = P("mul", Var("x"), P("sigmoid", Var("x")))


def _to_silu(m, ctx):
    with ctx.gm.graph.inserting_before(m.root):
        new = ctx.gm.graph.call_function(F.silu, (m["x"],))
    return new, Site("silu", m.root.name)


RULE = Rule("silu", SILU, _to_silu)


class Spellings(torch.nn.Module):
    def forward(self, x):
        a = x * torch.sigmoid(x)
        b = torch.mul(x, x.sigmoid())
        return a + b


class Escapes(torch.nn.Module):
    def forward(self, x):
        s = torch.sigmoid(x)
        return x * s, s


def _dynamo_graph(model, *args):
    graphs = []

    def capture(gm, example_inputs, **kw):
        graphs.append((gm, example_inputs))
        return gm

    torch._dynamo.reset()
    torch.compile(model, backend=capture, fullgraph=True)(*args)
    return graphs[0]


def _rewrite_both(model, x):
    gm_d, ex = _dynamo_graph(model, x)
    gm_e = trace(model, (x,))
    out = []
    for gm, inputs in ((gm_d, ex), (gm_e, [x])):
        report = apply_rules(gm, [RULE], GraphContext(gm, inputs), progress=False)
        out.append((gm, report))
    return out


def test_one_pattern_fires_on_dynamo_and_export_graphs():
    x = torch.randn(3, 5)
    for gm, report in _rewrite_both(Spellings(), x):
        assert report.counts == {"silu": 2}
        assert not any(canonical(n) == "sigmoid" for n in gm.graph.nodes)
        torch.testing.assert_close(gm(x) if not isinstance(gm(x), tuple) else gm(x)[0], 2 * F.silu(x))


def test_escaping_intermediate_is_left_alone_with_reason():
    x = torch.randn(4)
    for gm, report in _rewrite_both(Escapes(), x):
        assert report.counts == {}
        (rule, where, reason), = report.skipped
        assert rule == "silu" and "also used elsewhere" in reason
        assert any(canonical(n) == "sigmoid" for n in gm.graph.nodes)


def test_second_rewrite_changes_nothing_and_no_candidate_leaves_code_unchanged():
    x = torch.randn(2, 3)
    gm = trace(Spellings(), (x,))
    apply_rules(gm, [RULE], GraphContext(gm, [x]), progress=False)
    code = gm.code
    again = apply_rules(gm, [RULE], GraphContext(gm, [x]), progress=False)
    assert again.counts == {} and gm.code == code


def test_a_declining_rewrite_is_reported_and_graph_kept():
    x = torch.randn(2, 3)
    gm = trace(Spellings(), (x,))
    code = gm.code
    report = apply_rules(gm, [Rule("silu", SILU, lambda m, ctx: Skip("not today"))], GraphContext(gm, [x]),
                         progress=False)
    assert [r for _, _, r in report.skipped] == ["not today", "not today"]
    assert gm.code == code


def test_select_filters_by_module_path():
    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.keep = Spellings()
            self.swap = Spellings()

        def forward(self, x):
            return self.keep(x) + self.swap(x)

    x = torch.randn(3)
    gm = trace(Outer(), (x,))
    rule = Rule("silu", SILU, _to_silu, select=lambda path: path.startswith("swap"))
    report = apply_rules(gm, [rule], GraphContext(gm, [x]), progress=False)
    assert report.counts == {"silu": 2}
    torch.testing.assert_close(gm(x), Outer()(x))


def test_offline_rewrite_shares_the_weights_it_did_not_replace():
    """Documented in `rl.rewrite`: untouched weights alias the original's (no second copy), new ones do not."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    fast, report = rl.rewrite(model, (torch.randn(2, 8),), rl.Recipe([rl.LowRank(rank=2, where="2")]),
                              progress=False)
    assert report.counts == {"low_rank": 1}
    original = {p.data_ptr() for p in model.parameters()}
    shared = {name for name, p in fast.named_parameters() if p.data_ptr() in original}
    assert shared == {"0.weight", "0.bias"}
