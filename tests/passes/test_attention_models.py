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
def test_sinks_covering_every_key_equal_softmax_attention(arch):
    """With as many sinks as keys every attendable key is exact, whatever the one-key window: through the
    pass, the padding masks (left padding for Llama) and the op."""
    model = make_model(arch, "sdpa")
    ids, mask = padded_batch(arch)
    recipe = rl.Recipe([rl.LinearAttention(feature_map="hedgehog", window=1, sinks=ids.shape[1])])
    fast, report = rl.rewrite(model, (ids,), recipe, example_kwargs={"attention_mask": mask}, progress=False)
    assert report.counts == {"linear_attention": model.config.num_hidden_layers}, report.skipped
    assert f"sinks={ids.shape[1]}" in str(report)
    keep = mask.bool()
    torch.testing.assert_close(_hidden(fast, ids, mask)[keep], _hidden(model, ids, mask)[keep],
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


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_decay_rewrites_every_layer_and_without_decay_is_the_pure_rewrite(arch):
    """BERT (bidirectional, right padding) and Llama (causal, left padding, GQA): one rewrite per layer, named
    in the report; with every rate at e^-100 the model computes what the pure linear rewrite does, with one
    rate per head and side and with three mixed by any weights."""
    from relinear.calibrate import attention_layers

    model = make_model(arch, "sdpa")
    ids, mask = padded_batch(arch)
    rewritten = {}
    for decay in (False, True, 3):
        rewritten[decay], report = rl.rewrite(model, (ids,), rl.Recipe([rl.LinearAttention(decay=decay)]),
                                              example_kwargs={"attention_mask": mask}, progress=False)
        assert report.counts == {"linear_attention": 2}
        assert ("decay" in str(report)) == bool(decay) and ("decay x3" in str(report)) == (decay == 3)
    keep = mask.bool()
    pure = _hidden(rewritten[False], ids, mask)[keep]
    for decay in (True, 3):
        with torch.no_grad():
            for layer in attention_layers(rewritten[decay]):
                layer.decay.fill_(-10.0)
                if layer.decay_mix is not None:
                    layer.decay_mix.copy_(torch.randn(layer.decay_mix.shape))
        torch.testing.assert_close(_hidden(rewritten[decay], ids, mask)[keep], pure, rtol=1e-6, atol=1e-6)


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


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_vit_attention_is_rewritten_exactly_with_a_covering_window(attn):
    import transformers as tf

    cfg = tf.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       image_size=32, patch_size=8, attn_implementation=attn)
    torch.manual_seed(0)
    model, x = tf.ViTModel(cfg).eval(), torch.randn(2, 3, 32, 32)
    fast, report = rl.rewrite(model, (x,), rl.Recipe([rl.LinearAttention(window=17)]), progress=False)
    assert report.counts == {"linear_attention": 2}
    torch.testing.assert_close(fast(x).last_hidden_state, model(x).last_hidden_state, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_t5_relative_position_bias_is_left_alone_with_reason(attn):
    import transformers as tf

    cfg = tf.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=128, use_cache=False,
                      attn_implementation=attn, decoder_start_token_id=0)
    model = tf.T5EncoderModel(cfg).eval()
    ids, mask = padded_batch("bert")
    fast, report = rl.rewrite(model, (ids, mask), rl.Recipe([rl.LinearAttention()]), progress=False)
    assert report.counts == {}
    assert len(report.skipped) == 2 and all("position bias" in why for _, _, why in report.skipped)
    torch.testing.assert_close(fast(ids, mask).last_hidden_state, model(ids, mask).last_hidden_state)


def test_several_additive_mask_terms_are_summed():
    class TwoMasks(torch.nn.Module):
        def forward(self, q, k, v, padding, causal):
            return torch.softmax(q @ k.mT * 0.5 + padding + causal, dim=-1) @ v

    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    padding = torch.zeros(2, 1, 1, 6)
    padding[1, ..., :2] = float("-inf")
    causal = torch.full((6, 6), float("-inf")).triu(1)
    model = TwoMasks()
    fast, report = rl.rewrite(model, (q, k, v, padding, causal), rl.Recipe([rl.LinearAttention(window=6)]),
                              progress=False)
    assert report.counts == {"linear_attention": 1} and "causal" in report.sites[0].detail
    got, want = fast(q, k, v, padding, causal), model(q, k, v, padding, causal)
    torch.testing.assert_close(got[1, :, 2:], want[1, :, 2:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_replaced_attention_leaves_no_dead_softmax_behind(arch):
    """A dead node in an fx graph still runs: the quadratic part must be gone, not just unused."""
    from relinear.rewrite.ops import canonical

    model = make_model(arch, "eager")
    ids, mask = padded_batch(arch)
    fast, report = rl.rewrite(model, (ids,), rl.Recipe([rl.LinearAttention(window=4)]),
                              example_kwargs={"attention_mask": mask}, progress=False)
    assert report.counts == {"linear_attention": 2}
    ops = [canonical(n) for n in fast.graph.nodes]
    assert ops.count("softmax") == 0 and ops.count("matmul") == 0


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_compile_backend_rewrites_attention_like_the_offline_front_end(arch):
    """`torch.compile(backend=...)`: learnable maps and window gates enter Dynamo's graph as constants."""
    model = make_model(arch, "sdpa")
    ids, mask = padded_batch(arch)
    recipe = rl.Recipe([rl.LinearAttention(feature_map="hedgehog", window=ids.shape[1])])
    compiled = torch.compile(model, backend=rl.backend(recipe), dynamic=False)
    got = _hidden(compiled, ids, mask)
    assert rl.last_report().counts == {"linear_attention": model.config.num_hidden_layers}
    keep = mask.bool()
    torch.testing.assert_close(got[keep], _hidden(model, ids, mask)[keep], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("field", ["window", "sinks"])
@pytest.mark.parametrize("value", [-1, True, 2.0, "4"])
def test_counts_must_be_integers(field, value):
    # a bool is an int to Python; window=True must not silently mean a window of 1
    with pytest.raises(rl.RecipeError, match=f"{field} must be an integer >= 0"):
        rl.LinearAttention(**{"window": 4, field: value})
    with pytest.raises(ValueError, match=f"attention_errors: {field} must be an integer >= 0"):
        rl.attention_errors(torch.nn.Linear(1, 1), [], **{field: value})


@pytest.mark.parametrize("value", [1, "yes", None])
def test_balance_must_be_a_bool(value):
    with pytest.raises(rl.RecipeError, match="balance must be True or False"):
        rl.LinearAttention(window=4, balance=value)


def test_bad_sinks_are_named():
    with pytest.raises(rl.RecipeError, match="sinks must be an integer >= 0"):
        rl.LinearAttention(window=4, sinks=-1)
    with pytest.raises(rl.RecipeError, match="need window > 0"):
        rl.LinearAttention(sinks=1)  # no window: nothing for the sinks to sit beside
    with pytest.raises(rl.RecipeError, match="need window > 0"):
        rl.LinearAttention(window=4, gate="liger", sinks=1)
    with pytest.raises(rl.RecipeError, match="chunk_size"):
        rl.LinearAttention(chunk_size=0)
