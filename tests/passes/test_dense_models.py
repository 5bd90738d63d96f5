"""Dense rules end to end: transformers models, both front ends, budgets, bad settings, persistence."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import relinear as rl
from relinear.families import families
from tests.model_zoo import make_model, padded_batch


def _count_linears(model):
    return sum(isinstance(m, torch.nn.Linear) for m in model.modules())


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("config", [f.example for f in families() if f.dense is not None], ids=lambda c: c.name)
def test_every_linear_rewritten_and_parameters_fall(arch, config):
    model = make_model(arch, "sdpa")
    ids, mask = padded_batch(arch)
    fast, report = rl.rewrite(model, (ids,), rl.Recipe([config]), example_kwargs={"attention_mask": mask},
                              progress=False)
    assert report.counts == {config.name: _count_linears(model)}
    assert sum(s.params_after for s in report.sites) < sum(s.params_before for s in report.sites)
    assert sum(p.numel() for p in fast.parameters()) < sum(p.numel() for p in model.parameters())
    assert all(s.error is not None and s.error >= 0 for s in report.sites)
    out = fast(ids, attention_mask=mask).last_hidden_state
    assert out.shape == model(ids, attention_mask=mask).last_hidden_state.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_compile_backend_agrees_with_offline_rewrite(arch):
    model = make_model(arch, "sdpa")
    ids, mask = padded_batch(arch)
    recipe = rl.Recipe([rl.Monarch(nblocks=4), rl.LinearAttention(feature_map="elu")])
    fast, report = rl.rewrite(model, (ids,), recipe, example_kwargs={"attention_mask": mask}, progress=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="relinear", options={"recipe": recipe})
    with torch.no_grad():
        got = compiled(ids, attention_mask=mask).last_hidden_state
        want = fast(ids, attention_mask=mask).last_hidden_state
    assert rl.last_report().counts == report.counts
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_backend_recipe_change_recompiles():
    lin = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))
    x = torch.randn(4, 32)
    torch._dynamo.reset()
    exact = torch.compile(lin, backend="relinear", options={"recipe": rl.Recipe([rl.LowRank(rank=32)])})(x)
    torch.testing.assert_close(exact, lin(x), rtol=1e-4, atol=1e-4)
    rough = torch.compile(lin, backend="relinear", options={"recipe": rl.Recipe([rl.LowRank(rank=1)])})(x)
    assert not torch.allclose(rough, exact, atol=1e-3)  # a stale artifact would return the exact result
    assert rl.last_report().sites[0].detail == "rank=1"


def test_gpt2_conv1d_addmm_is_rewritten_with_its_transposed_weight():
    model = make_model("gpt2", "sdpa")
    ids, mask = padded_batch("gpt2")
    n_conv = sum(type(m).__name__ == "Conv1D" for m in model.modules())
    fast, report = rl.rewrite(model, (ids,), rl.Recipe([rl.LowRank(energy=1.0)]),
                              example_kwargs={"attention_mask": mask}, progress=False)
    assert report.counts["low_rank"] >= n_conv
    assert max(s.error for s in report.sites) < 1e-5  # all the energy: full rank, exact


def test_where_selects_layers_and_max_error_skips():
    model = make_model("bert", "sdpa")
    ids, mask = padded_batch("bert")
    recipe = rl.Recipe([rl.LowRank(rank=2, where="*intermediate*", max_error=1e-6)])
    _, report = rl.rewrite(model, (ids,), recipe, example_kwargs={"attention_mask": mask}, progress=False)
    assert report.counts == {}
    assert len(report.skipped) == 2 and all("max_error" in why for _, _, why in report.skipped)
    assert all("intermediate" in where for _, where, _ in report.skipped)


def test_auto_picks_cheapest_setting_within_budget():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 64)
    with torch.no_grad():  # exactly rank 8: the cheapest exact setting is rank 8
        lin.weight.copy_(torch.randn(64, 8) @ torch.randn(8, 64) / 8)
    x = torch.randn(16, 64)
    _, report = rl.rewrite(lin, (x,), rl.Recipe([rl.LowRank(rank="auto", max_error=1e-4)]), progress=False)
    (site,) = report.sites
    assert site.detail == "rank=8" and site.error < 1e-4


def test_rank_larger_than_matrix_is_reported_not_applied():
    lin = torch.nn.Linear(16, 8)
    _, report = rl.rewrite(lin, (torch.randn(2, 16),), rl.Recipe([rl.LowRank(rank=64)]), progress=False)
    assert report.counts == {}
    assert "rank=64" in report.skipped[0][2]


def test_rewritten_weights_are_trainable_and_round_trip_through_safetensors(tmp_path):
    model = make_model("bert", "sdpa")
    ids, mask = padded_batch("bert")
    fast, _ = rl.rewrite(model, (ids,), rl.Recipe([rl.Monarch(nblocks=4)]),
                         example_kwargs={"attention_mask": mask}, progress=False)
    new = [n for n, p in fast.named_parameters() if n.startswith("relinear.")]
    assert new and all(p.requires_grad for n, p in fast.named_parameters() if n.startswith("relinear."))
    out = fast(ids, attention_mask=mask)
    (out.last_hidden_state.sum() + out.pooler_output.sum()).backward()
    assert all(p.grad is not None for n, p in fast.named_parameters() if n.startswith("relinear."))
    state = {k: v.detach().contiguous() for k, v in fast.state_dict().items()}
    save_file(state, tmp_path / "fast.safetensors")
    again, _ = rl.rewrite(model, (ids,), rl.Recipe([rl.Monarch(nblocks=4)]),
                          example_kwargs={"attention_mask": mask}, progress=False)
    with torch.no_grad():
        for p in again.parameters():
            p.add_(1.0)  # make sure loading, not re-fitting, restores the values
    again.load_state_dict(load_file(tmp_path / "fast.safetensors"))
    torch.testing.assert_close(again(ids, attention_mask=mask).last_hidden_state,
                               fast(ids, attention_mask=mask).last_hidden_state)


def test_minilm_all_37_linears_found_by_both_front_ends(minilm):
    from relinear.demo import encode

    model, tokenizer = minilm
    args = encode(tokenizer)
    recipe = rl.Recipe([rl.LowRank(ratio=0.5)])
    _, report = rl.rewrite(model, args, recipe, progress=False)
    assert report.counts == {"low_rank": 37}
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="relinear", options={"recipe": recipe})(*args)
    assert rl.last_report().counts == {"low_rank": 37}


def test_untraceable_model_names_the_model():
    class Branchy(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x
            return -x

    with pytest.raises(rl.TraceError, match="Branchy"):
        rl.rewrite(Branchy(), (torch.randn(3),), rl.Recipe([rl.LowRank(rank=1)]), progress=False)


def test_bad_rule_fields_are_named():
    with pytest.raises(rl.RecipeError, match="nblocks"):
        rl.Monarch(nblocks=0)
    with pytest.raises(TypeError, match="nblock"):
        rl.Monarch(nblock=4)
    with pytest.raises(rl.RecipeError, match="frobnicate"):
        rl.Recipe.from_dict({"rules": [{"name": "monarch", "frobnicate": 1}]})


class Spellings(torch.nn.Module):
    """One dense layer per spelling users write: module, F.linear, x @ W.t(), x @ W.mT, x @ W ([in, out])."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(24, 24)
        self.w1, self.w2 = torch.nn.Parameter(torch.randn(24, 24)), torch.nn.Parameter(torch.randn(24, 24))
        self.w_in_out = torch.nn.Parameter(torch.randn(24, 24))
        self.b = torch.nn.Parameter(torch.randn(24))

    def forward(self, x):
        x = self.lin(x)
        x = torch.nn.functional.linear(x, self.w1, self.b)
        x = x @ self.w2.t()
        x = torch.matmul(x, self.w1.mT)
        return x @ self.w_in_out


def test_every_dense_spelling_is_found_exactly_at_full_rank_and_a_second_rewrite_changes_nothing():
    model, x = Spellings(), torch.randn(3, 5, 24)
    fast, report = rl.rewrite(model, (x,), rl.Recipe([rl.LowRank(energy=1.0)]), progress=False)
    assert report.counts == {"low_rank": 5}
    from relinear.rewrite.report import relative_error

    assert relative_error(fast(x).detach(), model(x).detach()) < 1e-5
    again, second = rl.rewrite(fast, (x,), rl.Recipe([rl.LowRank(energy=1.0)]), progress=False)
    assert second.counts == {} and second.skipped == []
    torch.testing.assert_close(again(x), fast(x))


def test_matmul_between_activations_is_not_a_dense_layer():
    class Gram(torch.nn.Module):
        def forward(self, a, b):
            return a @ b.mT

    _, report = rl.rewrite(Gram(), (torch.randn(4, 8), torch.randn(4, 8)), rl.Recipe([rl.Monarch()]), progress=False)
    assert report.counts == {} and report.skipped == []
