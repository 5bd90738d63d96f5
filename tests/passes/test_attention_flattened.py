"""Attention written on flattened heads, [batch * heads, tokens, dim], with bmm or baddbmm (as OPT, Bloom and
GPT-2's upcast path spell it): rewritten with every (batch, head) row treated as a batch of one head."""

import pytest
import torch

import relinear as rl

B, H, T, D = 2, 3, 7, 8


class FlatHeads(torch.nn.Module):
    """Projections, heads folded into the batch, bmm scores (or baddbmm), additive padding mask."""

    def __init__(self, spelling: str):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(H * D, 3 * H * D)
        self.spelling = spelling

    def forward(self, x, padding):  # x [B, T, H * D], padding [B, T] bool (True = real)
        q, k, v = (t.reshape(B, T, H, D).transpose(1, 2).reshape(B * H, T, D) for t in self.qkv(x).chunk(3, -1))
        bias = torch.zeros(B, 1, 1, T).masked_fill(~padding[:, None, None, :], torch.finfo(x.dtype).min)
        bias = bias.expand(B, H, T, T).reshape(B * H, T, T)
        if self.spelling == "bmm":
            scores = torch.bmm(q * D**-0.5, k.transpose(1, 2)) + bias
        elif self.spelling == "baddbmm":
            scores = torch.baddbmm(bias, q, k.transpose(1, 2), beta=1.0, alpha=D**-0.5)
        else:  # GPT-2's upcast path: baddbmm on an empty tensor with beta=0, then the mask
            empty = torch.empty(B * H, T, T, dtype=x.dtype)
            scores = torch.baddbmm(empty, q, k.transpose(1, 2), beta=0, alpha=D**-0.5) + bias
        out = torch.bmm(torch.softmax(scores, dim=-1), v)
        return out.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)


def _inputs():
    x = torch.randn(B, T, H * D, generator=torch.Generator().manual_seed(1))
    padding = torch.ones(B, T, dtype=torch.bool)
    padding[1, 5:] = False  # right padding in the second sequence
    return x, padding


def _elu_linear_attention_float64(model, x, padding):
    """Independent formula: per (batch, head) row, weights (elu(q s) + 1) . (elu(k s) + 1) over real keys."""
    x = x.double()
    qkv = torch.nn.functional.linear(x, model.qkv.weight.double(), model.qkv.bias.double())
    q, k, v = (t.reshape(B, T, H, D).transpose(1, 2) for t in qkv.chunk(3, -1))
    root = D**-0.25
    phi_q, phi_k = (torch.nn.functional.elu(t * root) + 1 for t in (q, k))
    weights = (phi_q @ phi_k.mT) * padding[:, None, None, :]
    out = (weights @ v) / weights.sum(-1, keepdim=True)
    return out.transpose(1, 2).reshape(B, T, H * D)


@pytest.mark.parametrize("spelling", ["bmm", "baddbmm", "baddbmm_beta0"])
def test_flattened_heads_with_a_covering_window_equal_softmax_attention(spelling):
    model, (x, padding) = FlatHeads(spelling).eval(), _inputs()
    fast, report = rl.rewrite(model, (x, padding), rl.Recipe([rl.LinearAttention(window=T)]), progress=False)
    assert report.counts == {"linear_attention": 1}, report.skipped
    assert "heads flattened" in report.sites[0].detail
    real = padding[:, :, None].expand(B, T, H * D)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, padding)[real], model(x, padding)[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spelling", ["bmm", "baddbmm"])
def test_flattened_heads_pure_linear_attention_matches_an_independent_formula(spelling):
    model, (x, padding) = FlatHeads(spelling).eval(), _inputs()
    fast, report = rl.rewrite(model, (x, padding), rl.Recipe([rl.LinearAttention(feature_map="elu")]),
                              progress=False)
    assert report.counts == {"linear_attention": 1}, report.skipped
    with torch.no_grad():
        got = fast(x, padding).double()
    want = _elu_linear_attention_float64(model, x, padding)
    real = padding[:, :, None].expand(B, T, H * D)
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_baddbmm_with_a_position_bias_is_left_alone_with_reason():
    class Alibi(torch.nn.Module):
        def forward(self, q, k, v):
            bias = -torch.arange(T, dtype=q.dtype).expand(B * H, T, T)
            return torch.bmm(torch.softmax(torch.baddbmm(bias, q, k.mT, alpha=0.3), -1), v)

    q, k, v = (torch.randn(B * H, T, D) for _ in range(3))
    fast, report = rl.rewrite(Alibi(), (q, k, v), rl.Recipe([rl.LinearAttention()]), progress=False)
    assert report.counts == {}
    assert "bias" in report.skipped[0][2]
    torch.testing.assert_close(fast(q, k, v), Alibi()(q, k, v))


def test_flattened_heads_through_the_compile_backend():
    model, (x, padding) = FlatHeads("baddbmm").eval(), _inputs()
    compiled = torch.compile(model, backend=rl.backend(rl.Recipe([rl.LinearAttention(window=T)])))
    with torch.no_grad():
        got, want = compiled(x, padding), model(x, padding)
    assert rl.last_report().counts == {"linear_attention": 1}
    torch.testing.assert_close(got[padding], want[padding], rtol=1e-5, atol=1e-5)
