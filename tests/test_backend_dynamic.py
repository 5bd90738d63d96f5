"""The compile backend under changing shapes: Dynamo's automatic dynamic recompile, `dynamic=True`,
`mark_dynamic` and graph breaks, for every rule family; one decision per site whichever graph runs; training."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import relinear as rl
from tests.model_zoo import make_model, padded_batch

LENGTHS = [(16, 10), (24, 13), (9, 9), (31, 5), (20, 20), (12, 7)]  # padded batches of two: (longest, other)
EXACT = rl.Recipe([rl.LinearAttention(window=64), rl.LowRank(energy=1.0)])  # window over every key, full rank


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # compiled code of other tests' models must not count against the recompile limit
    yield
    torch._dynamo.reset()


class TinyBlock(torch.nn.Module):
    """A pre-norm-free transformer block over [B, T, 32] with a key-padding mask: attention, dense layers,
    GELU; `graph_break` splits it into two Dynamo graphs between attention and MLP."""

    def __init__(self, graph_break: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.out = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)
        self.up, self.down = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)
        self.graph_break = graph_break

    def forward(self, x, keep):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 16).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, 32))
        if self.graph_break:
            torch._dynamo.graph_break()
        return x + self.down(F.gelu(self.up(x)))


def tiny_batch(t: int, real: int):
    g = torch.Generator().manual_seed(t)
    keep = torch.ones(2, t, dtype=torch.bool)
    keep[1, real:] = False
    return torch.randn(2, t, 32, generator=g), keep


def _close_on_real_tokens(got, want, keep, tol=1e-5):
    torch.testing.assert_close(got[keep], want[keep], rtol=tol, atol=tol)


# --- every family on transformers models, six lengths -------------------------------------------------------

def _every_family(arch: str) -> rl.Recipe:
    """Both linear attention forms (hybrid in layer 0, pure in layer 1) and every dense family, each on its
    own layers, and the activation."""
    attention, up = {"bert": ("*attention*", "*intermediate*"), "llama": ("*self_attn*", "*up_proj")}[arch]
    return rl.Recipe([
        rl.LinearAttention(feature_map="hedgehog", window=4, where="*.0.*"),
        rl.LinearAttention(feature_map="hedgehog", where="*.1.*"),
        rl.LowRank(rank=8, where=attention), rl.Monarch(nblocks=4, where=up), rl.BTT(rank=2),
        rl.ActivationApprox(target="poly"),
    ])


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_six_lengths_two_compilations_every_family_equals_the_offline_rewrite(arch):
    """Graph 1 is static at the first length, graph 2 dynamic (Dynamo's automatic dynamic shapes); every later
    length runs graph 2. Both make the offline rewrite's decisions for the first example, with its weights.
    Regression: the second length used to fail, the recorder running the dynamic graph on SymInt sizes."""
    model = make_model(arch, "sdpa")
    recipe = _every_family(arch)
    ids, mask = padded_batch(arch, LENGTHS[0])
    fast, offline = rl.rewrite(model, (ids,), recipe, example_kwargs={"attention_mask": mask}, progress=False)
    assert set(offline.counts) == {"linear_attention", "low_rank", "monarch", "btt", "activation_approx"}
    counter = CompileCounterWithBackend(rl.backend(recipe))
    compiled = torch.compile(model, backend=counter)
    before = len(rl.reports())
    with torch.no_grad():
        for lengths in LENGTHS:
            ids, mask = padded_batch(arch, lengths)
            got = compiled(ids, attention_mask=mask).last_hidden_state
            _close_on_real_tokens(got, fast(ids, attention_mask=mask).last_hidden_state, mask.bool())
    assert counter.frame_count == 2
    first, second = rl.reports()[before:]
    assert first.counts == second.counts == offline.counts
    def described(report):  # `where=` reads the same paths; the same settings and sizes are reported
        return [(s.rule, s.where, s.detail, s.params_before, s.params_after) for s in report.sites]

    assert described(first) == described(second) == described(offline)
    assert second.graphs == first.graphs + 1 == len(rl.reports()) and rl.last_report() is second
    assert second.replayed == len(second.sites) + len(second.skipped) and first.replayed == 0


# --- dynamic=True, mark_dynamic, graph breaks (a small block: fast to compile) ---------------------------------

ALL_FAMILIES = rl.Recipe([
    rl.LinearAttention(feature_map="hedgehog", window=4), rl.LowRank(rank=8, where="qkv"),
    rl.Monarch(nblocks=4, where="up"), rl.BTT(rank=2), rl.ActivationApprox(target="poly"),
])


def _offline(model, recipe, t, real):
    x, keep = tiny_batch(t, real)
    fast, report = rl.rewrite(model, (x, keep), recipe, progress=False)
    return fast, report


@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
def test_dynamic_from_the_first_call_compiles_once(how):
    model = TinyBlock()
    fast, offline = _offline(model, ALL_FAMILIES, 12, 7)
    assert offline.counts == {"linear_attention": 1, "low_rank": 1, "monarch": 1, "btt": 2, "activation_approx": 1}
    counter = CompileCounterWithBackend(rl.backend(ALL_FAMILIES))
    compiled = torch.compile(model, backend=counter, dynamic=True if how == "dynamic=True" else None)
    with torch.no_grad():
        for t, real in [(12, 7), (20, 3), (7, 7)]:
            x, keep = tiny_batch(t, real)
            if how == "mark_dynamic":
                torch._dynamo.mark_dynamic(x, 1)
                torch._dynamo.mark_dynamic(keep, 1)
            _close_on_real_tokens(compiled(x, keep), fast(x, keep), keep)
    assert counter.frame_count == 1
    assert rl.last_report().counts == offline.counts


def test_graph_break_rewrites_both_graphs_at_every_length():
    model = TinyBlock(graph_break=True)
    counter = CompileCounterWithBackend(rl.backend(EXACT))
    compiled = torch.compile(model, backend=counter)
    before = len(rl.reports())
    with torch.no_grad():
        for t, real in [(12, 7), (20, 3), (7, 7)]:
            x, keep = tiny_batch(t, real)
            _close_on_real_tokens(compiled(x, keep), model(x, keep), keep, tol=1e-4)
    assert counter.frame_count == 4  # each of the two pieces: static, then dynamic
    counts = [r.counts for r in rl.reports()[before:]]
    assert counts == [{"linear_attention": 1, "low_rank": 2}, {"low_rank": 2}] * 2
    assert rl.last_report().graphs == len(rl.reports())


# --- one decision per site, weights computed once -------------------------------------------------------------

def test_a_decision_taken_on_the_first_length_holds_for_every_later_graph():
    """max_error between the attention's error at the first length and at the second: deciding again on the
    second example would skip the site, and the model would change function when Dynamo recompiles."""
    model = TinyBlock()
    elu = rl.LinearAttention(feature_map="elu")
    errors = {size: _offline(model, rl.Recipe([elu]), *size)[1].sites[0].error for size in [(12, 12), (24, 5)]}
    ((t1, real1), err1), ((t2, real2), err2) = sorted(errors.items(), key=lambda item: item[1])
    assert err1 < err2
    recipe = rl.Recipe([rl.LinearAttention(feature_map="elu", max_error=(err1 + err2) / 2)])
    fast, offline = _offline(model, recipe, t1, real1)
    assert offline.counts == {"linear_attention": 1}
    compiled = torch.compile(model, backend=rl.backend(recipe))
    with torch.no_grad():
        for t, real in [(t1, real1), (t2, real2), (9, 4)]:
            x, keep = tiny_batch(t, real)
            _close_on_real_tokens(compiled(x, keep), fast(x, keep), keep)
            assert rl.last_report().counts == {"linear_attention": 1}
    assert rl.last_report().replayed == 1


def test_new_weights_are_fitted_once_per_site(monkeypatch):
    from relinear.approx import low_rank

    fits = []
    svd_factors = low_rank.svd_factors
    monkeypatch.setattr(low_rank, "svd_factors", lambda w, r: fits.append(w) or svd_factors(w, r))
    compiled = torch.compile(TinyBlock(), backend=rl.backend(rl.Recipe([rl.LowRank(rank=8)])))
    with torch.no_grad():
        for t, real in LENGTHS:
            compiled(*tiny_batch(t, real))
    assert len(fits) == 4 and len({id(w) for w in fits}) == 4  # four layers, each fitted once


def test_a_weight_used_twice_keeps_one_replacement_in_every_graph(monkeypatch):
    from relinear.approx import low_rank

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(32, 32)

        def forward(self, x):
            return self.lin(torch.relu(self.lin(x)))

    model, recipe = Twice(), rl.Recipe([rl.LowRank(rank=4)])
    fast, offline = rl.rewrite(model, (torch.randn(2, 12, 32),), recipe, progress=False)
    fits = []
    svd_factors = low_rank.svd_factors
    monkeypatch.setattr(low_rank, "svd_factors", lambda w, r: fits.append(w) or svd_factors(w, r))
    compiled = torch.compile(model, backend=rl.backend(recipe))
    with torch.no_grad():
        for t in (12, 20, 5):
            x = torch.randn(2, t, 32)
            torch.testing.assert_close(compiled(x), fast(x), rtol=1e-5, atol=1e-5)
    assert len(fits) == 1 and rl.last_report().counts == offline.counts == {"low_rank": 2}


def test_changed_weights_are_fitted_again_after_a_reset():
    """Decisions are kept per weight version: weights changed in place are not served stale factors."""
    model = TinyBlock()
    recipe = rl.Recipe([rl.LowRank(energy=1.0)])
    x, keep = tiny_batch(12, 7)
    with torch.no_grad():
        torch.compile(model, backend=rl.backend(recipe))(x, keep)
        for p in model.parameters():
            p.mul_(0.5)
        torch._dynamo.reset()
        got = torch.compile(model, backend=rl.backend(recipe))(x, keep)
    assert rl.last_report().replayed == 0
    _close_on_real_tokens(got, model(x, keep), keep, tol=1e-4)


# --- training ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", [rl.Recipe([rl.LowRank(rank=8)]), rl.Recipe([rl.LinearAttention()])],
                         ids=["low_rank", "hedgehog attention"])
def test_backward_through_frozen_weights_raises(recipe):
    model = TinyBlock().train()
    compiled = torch.compile(model, backend=rl.backend(recipe))
    out = compiled(*tiny_batch(12, 7))  # the forward pass works: inference without no_grad is common
    with pytest.raises(RuntimeError, match=r"backward through .*computed when torch.compile.*rl\.rewrite"):
        out.sum().backward()


def test_backward_to_the_inputs_of_a_frozen_model_works(two_threads):
    """Parameters that do not require grad train nothing: gradients flow through the constants.
    Regression: on more than one thread the hybrid attention's input gradients were off by up to 0.34. Inductor
    compiled the backward that AOTAutograd traced from the op's torch form, and its CPU code for the gradient of
    `unfold` writes to doubled offsets (torch 2.13: benchmarks/repro_inductor_tile2d_atomic_add.py); each custom
    op's backward is now one opaque op."""
    model = TinyBlock().requires_grad_(False)
    compiled = torch.compile(model, backend=rl.backend(EXACT))
    x, keep = tiny_batch(12, 12)
    x.requires_grad_(True)
    compiled(x, keep).square().sum().backward()
    got, x.grad = x.grad, None
    model(x, keep).square().sum().backward()
    torch.testing.assert_close(got, x.grad, rtol=1e-4, atol=1e-4)


def test_an_activation_site_holds_no_weights_and_trains():
    model = TinyBlock().train()
    compiled = torch.compile(model, backend=rl.backend(rl.Recipe([rl.ActivationApprox(target="tanh")])))
    compiled(*tiny_batch(12, 7)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
