"""rl.attention_errors: per-head error and exact-window mass against an independent per-query loop, exact limits,
the model left as it was, bad calls named."""

import math

import pytest
import torch

import relinear as rl
from relinear.approx.linear_attention import LinearizedAttention
from tests.model_zoo import make_model, padded_batch


class _Holder(torch.nn.Module):
    """A model whose only layer is one rewritten attention, called the way a rewritten model calls it."""

    def __init__(self, attention, causal, scale):
        super().__init__()
        self.attention, self.causal, self.scale = attention, causal, scale

    def forward(self, q, k, v, key_mask):
        return self.attention(q, k, v, key_mask, self.causal, self.scale)  # positional; rewrites pass keywords


def _loop_reference(q, k, v, key_mask, causal, scale, out, window, sinks):
    """Per head: (squared error / squared softmax norm, mean exact-window mass), one query at a time."""
    b_, h_, tq, _ = q.shape
    tk, group = k.shape[2], h_ // k.shape[1]
    errors, norms, mass, queries = [0.0] * h_, [0.0] * h_, [0.0] * h_, [0] * h_
    for b in range(b_):
        attendable = [j for j in range(tk) if key_mask[b, j]]
        sink_set = set(attendable[:sinks])
        for h in range(h_):
            for i in range(tq):
                pos = tk - tq + i
                keys = [j for j in attendable if not causal or j <= pos]
                target = torch.zeros(v.shape[-1], dtype=torch.float64)
                if keys:
                    logits = [scale * float(q[b, h, i].double() @ k[b, h // group, j].double()) for j in keys]
                    top = max(logits)
                    w = [math.exp(s - top) for s in logits]
                    total = sum(w)
                    for wj, j in zip(w, keys, strict=True):
                        target += wj / total * v[b, h // group, j].double()
                    near = [abs(pos - j) < window if not causal else 0 <= pos - j < window for j in keys]
                    mass[h] += sum(wj / total for wj, j, n in zip(w, keys, near, strict=True) if n or j in sink_set)
                    queries[h] += 1
                errors[h] += float((out[b, h, i].double() - target).pow(2).sum())
                norms[h] += float(target.pow(2).sum())
    return [(errors[h] / norms[h], mass[h] / queries[h]) for h in range(h_)]


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("window,sinks", [(2, 0), (3, 1), (0, 2)])
def test_matches_a_per_query_loop(causal, window, sinks):
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 4, 7, 5, generator=g), torch.randn(2, 2, 7, 5, generator=g)
    v = torch.randn(2, 2, 7, 3, generator=g)
    key_mask = torch.tensor([[True] * 7, [False, False] + [True] * 5])  # left padding: early causal rows see nothing
    attention = LinearizedAttention(4, 5, feature_map="hedgehog", generator=g)
    model = _Holder(attention, causal, scale=0.7)
    with torch.no_grad():
        out = attention(q, k, v, key_mask=key_mask, causal=causal, scale=0.7)
    rows = rl.attention_errors(model, [(q, k, v, key_mask)], window=window, sinks=sinks)
    want = _loop_reference(q, k, v, key_mask, causal, 0.7, out, window, sinks)
    assert [(r.layer, r.head) for r in rows] == [("attention", h) for h in range(4)]
    for row, (error, mass) in zip(rows, want, strict=True):
        assert row.relative_error == pytest.approx(error, rel=1e-5)
        assert row.exact_mass == pytest.approx(mass, rel=1e-9, abs=1e-12)
    assert all(r.relative_error > 0 for r in rows)  # linear attention is not softmax attention here


def test_exact_limits_on_bert():
    model = make_model("bert", "sdpa")
    ids, mask = padded_batch("bert", lengths=(16, 11))
    # a window covering every key is softmax attention: no error, and all weight on exact keys
    covered, _ = rl.rewrite(model, (ids, mask), rl.Recipe([rl.LinearAttention(window=16)]), progress=False)
    rows = rl.attention_errors(covered, [(ids, mask)], window=16)
    assert len(rows) == 2 * 4
    assert max(r.relative_error for r in rows) < 1e-10
    assert min(r.exact_mass for r in rows) == pytest.approx(1.0, abs=1e-12)
    # no window and no sinks hold nothing exact
    pure, _ = rl.rewrite(model, (ids, mask), rl.Recipe([rl.LinearAttention()]), progress=False)
    rows = rl.attention_errors(pure, [(ids, mask)], window=0)
    assert all(r.exact_mass == 0 for r in rows) and min(r.relative_error for r in rows) > 0
    assert {r.layer for r in rows} <= {name for name, _ in pure.named_modules()}


def test_leaves_the_model_as_it_was():
    model = make_model("bert", "eager")
    ids, mask = padded_batch("bert", lengths=(12, 9))
    fast, _ = rl.rewrite(model, (ids, mask), rl.Recipe([rl.LinearAttention()]), progress=False)
    with torch.no_grad():
        before = fast(ids, mask).last_hidden_state
    rl.attention_errors(fast, [(ids, mask), (ids.flip(0), mask.flip(0))])
    with torch.no_grad():
        torch.testing.assert_close(fast(ids, mask).last_hidden_state, before, rtol=0, atol=0)


def test_bad_calls_say_what_is_wrong():
    model = make_model("bert", "sdpa")
    ids, mask = padded_batch("bert")
    fast, _ = rl.rewrite(model, (ids, mask), rl.Recipe([rl.LinearAttention()]), progress=False)
    with pytest.raises(ValueError, match="window must be an integer >= 0, got -1"):
        rl.attention_errors(fast, [(ids, mask)], window=-1)
    with pytest.raises(ValueError, match="sinks must be an integer >= 0, got True"):
        rl.attention_errors(fast, [(ids, mask)], sinks=True)
    with pytest.raises(ValueError, match="batches is empty"):
        rl.attention_errors(fast, [])
    with pytest.raises(ValueError, match="no rewritten attention"):
        rl.attention_errors(model, [(ids, mask)])
