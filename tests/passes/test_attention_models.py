"""The attention rule on transformers models as they are written today, eager and SDPA, with padding."""

import pytest
import torch

import relinear as rl
from tests.model_zoo import make_model, padded_batch

ARCHS = ["bert", "gpt2", "llama", "qwen2", "mistral"]


def _hidden(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_window_covering_every_key_equals_softmax_attention(arch, attn):
    model = make_model(arch, attn)
    ids, mask = padded_batch(arch)
    recipe = rl.Recipe([rl.LinearAttention(feature_map="hedgehog", window=ids.shape[1])])
    fast, report = rl.rewrite(model, (ids,), recipe, example_kwargs={"attention_mask": mask}, progress=False)
    assert report.counts == {"linear_attention": model.config.num_hidden_layers}, report.skipped
    keep = mask.bool()
    torch.testing.assert_close(_hidden(fast, ids, mask)[keep], _hidden(model, ids, mask)[keep],
                               rtol=1e-4, atol=1e-4)
    # other batch sizes and lengths than the example (dynamic dims), still exact while the window covers them
    ids2, mask2 = padded_batch(arch, lengths=(7, 5, 3), generator_seed=1)
    keep2 = mask2.bool()
    torch.testing.assert_close(_hidden(fast, ids2, mask2)[keep2], _hidden(model, ids2, mask2)[keep2],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_pure_linear_attention_reports_its_error(arch):
    model = make_model(arch, "sdpa")
    ids, mask = padded_batch(arch)
    fast, report = rl.rewrite(model, (ids,), rl.Recipe([rl.LinearAttention(feature_map="elu")]),
                              example_kwargs={"attention_mask": mask}, progress=False)
    assert report.counts == {"linear_attention": 2}
    assert all(0 < s.error < 1.5 for s in report.sites)
    assert torch.isfinite(_hidden(fast, ids, mask)).all()
    assert "linear_attention" in str(report) and "elu" in str(report)


def test_returned_probabilities_are_left_alone():
    class ReturnsProbs(torch.nn.Module):
        def forward(self, q, k, v):
            p = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)
            return p @ v, p

    q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
    fast, report = rl.rewrite(ReturnsProbs(), (q, k, v), rl.Recipe([rl.LinearAttention()]), progress=False)
    assert report.counts == {}
    assert "also used elsewhere" in report.skipped[0][2]
    torch.testing.assert_close(fast(q, k, v)[0], ReturnsProbs()(q, k, v)[0])


def test_softmax_over_another_axis_is_not_attention():
    class OtherAxis(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v

    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    _, report = rl.rewrite(OtherAxis(), (q, k, v), rl.Recipe([rl.LinearAttention()]), progress=False)
    assert report.counts == {} and report.skipped == []


def test_additive_bias_is_refused_with_reason():
    class Alibi(torch.nn.Module):
        def forward(self, q, k, v, bias):
            return torch.softmax(q @ k.transpose(-2, -1) * 0.25 + bias, dim=-1) @ v

    q, k, v = (torch.randn(1, 2, 6, 16) for _ in range(3))
    bias = -torch.arange(6.0).view(1, 1, 1, 6).expand(1, 2, 6, 6).contiguous()
    _, report = rl.rewrite(Alibi(), (q, k, v, bias), rl.Recipe([rl.LinearAttention()]), progress=False)
    assert report.counts == {}
    assert "bias" in report.skipped[0][2]


def test_active_dropout_is_refused():
    class Train(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.1)

    q, k, v = (torch.randn(1, 2, 6, 16) for _ in range(3))
    _, report = rl.rewrite(Train(), (q, k, v), rl.Recipe([rl.LinearAttention()]), progress=False)
    assert report.counts == {} and "dropout" in report.skipped[0][2]
