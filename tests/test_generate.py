"""Generation with a recurrent state (`rl.generate`): its greedy tokens are those that repeated full forwards of
the same rewritten graph choose on the growing sequence (the reference), with left padding and batch > 1, for
linear, hybrid and decay attention on small random-config decoders; and its state does not grow with the
context."""

import functools

import pytest
import torch

import relinear as rl

VOCAB = 96
ARCHS = ["llama", "qwen2", "mistral", "gpt2"]
RECIPES = {
    "elu": rl.LinearAttention(feature_map="elu"),
    "hedgehog window 3": rl.LinearAttention(feature_map="hedgehog", window=3),
    "hedgehog decay": rl.LinearAttention(feature_map="hedgehog", decay=True),
}
SINKS = "hedgehog window 2 sinks 1"
RULES = {**RECIPES, SINKS: rl.LinearAttention(feature_map="hedgehog", window=2, sinks=1),
         "liger window 3": rl.LinearAttention(gate="liger", window=3)}
NEW_TOKENS = 6


def causal_lm(arch: str):
    """A 2-layer float64 causal LM with random weights (float64: no argmax ties between the two paths). Weights
    10x the usual initial scale: at 0.02 attention hardly moves the residual stream, the next token follows
    from the current one alone, and a state path that forgot the context would still pass."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, attn_implementation="sdpa", use_cache=False, initializer_range=0.2)
    if arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_head=4, n_positions=64, n_layer=2, **common))
    else:
        kv = {"llama": 2, "qwen2": 1, "mistral": 2}[arch]  # GQA, MQA, GQA
        config, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                             "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                             "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[arch]
        head_dim = {"mistral": 16}.get(arch, 8)  # Mistral: heads wider than hidden / heads, as its configs allow
        model = model_cls(config(hidden_size=32, num_attention_heads=4, num_key_value_heads=kv, intermediate_size=64,
                                 head_dim=head_dim, num_hidden_layers=2, max_position_embeddings=64, **common))
    return model.double().eval()


def prompt(lengths=(7, 4), seed=0):
    """Left-padded input_ids and attention_mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, max(lengths) - n:] = 1
    return ids, mask


def rewrite(model, recipe_rule):
    ids, mask = prompt()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    fast, report = rl.rewrite(model, (ids,), rl.Recipe([recipe_rule]),
                              example_kwargs={"attention_mask": mask, "position_ids": pos}, progress=False)
    assert report.counts == {"linear_attention": 2}, report.skipped
    return fast


@functools.cache
def rewritten(arch: str, variant: str):
    """A shared rewrite per (arch, variant) for the tests that only read it (traces cost seconds)."""
    return rewrite(causal_lm(arch), RULES[variant])


@torch.no_grad()
def reference_tokens(fast, ids, mask, steps: int) -> torch.Tensor:
    """Greedy tokens of repeated full forwards of `fast` on the growing sequence: O(T) work per token."""
    for _ in range(steps):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # each row counts its own tokens; padding's position is unused
        token = fast(ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


@pytest.mark.parametrize("variant", sorted(RECIPES))
@pytest.mark.parametrize("arch", ARCHS)
def test_state_path_chooses_the_tokens_of_full_forwards(arch, variant):
    fast = rewritten(arch, variant)
    ids, mask = prompt()
    got = rl.generate(fast, ids, mask, max_new_tokens=NEW_TOKENS)
    assert torch.equal(got, reference_tokens(fast, ids, mask, NEW_TOKENS))


def test_steps_reproduce_the_logits_of_full_forwards():
    """Stronger than equal argmaxes: every step's logits equal the full forward's last logits (float64)."""
    fast = rewritten("llama", SINKS)
    ids, mask = prompt()
    decoder = rl.RecurrentDecoder(fast)
    assert decoder.sites == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    logits, state = decoder.prefill(ids, mask)
    for _ in range(4):
        token = logits.argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
        logits = decoder.step(token[:, 0], state)
        with torch.no_grad():
            want = fast(ids, attention_mask=mask, position_ids=rl.positions(mask)).logits[:, -1]
        torch.testing.assert_close(logits, want, rtol=1e-9, atol=1e-9)


def test_a_padded_row_generates_what_it_generates_alone():
    """Left padding changes nothing for a row: its positions follow the mask and padded keys are invisible."""
    fast = rewritten("llama", "hedgehog window 3")
    ids, mask = prompt()
    batch = rl.generate(fast, ids, mask, max_new_tokens=NEW_TOKENS)
    short = int(mask[1].sum())
    alone = rl.generate(fast, ids[1:, -short:], max_new_tokens=NEW_TOKENS)
    assert torch.equal(batch[1, -short - NEW_TOKENS:], alone[0])


def test_calibrated_weights_carry_over():
    """Changed LinearizedAttention parameters reach generation: tokens follow the changed rewritten model
    (still equal to its full forwards) and differ from the tokens before the change."""
    fast = rewrite(causal_lm("llama"), RECIPES["hedgehog decay"])
    ids, mask = prompt()
    before = rl.generate(fast, ids, mask, max_new_tokens=NEW_TOKENS)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in fast.named_parameters():
            if name.startswith("relinear."):
                p.add_(2.0 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    after = rl.generate(fast, ids, mask, max_new_tokens=NEW_TOKENS)
    assert torch.equal(after, reference_tokens(fast, ids, mask, NEW_TOKENS))
    assert not torch.equal(after, before)


@pytest.mark.parametrize("variant", ["elu", "hedgehog decay", SINKS])
def test_state_size_does_not_grow_with_the_context(variant):
    fast = rewritten("llama", variant)
    decoder = rl.RecurrentDecoder(fast)
    sizes = []
    for length in (5, 40):
        ids = torch.randint(3, VOCAB, (1, length))
        logits, state = decoder.prefill(ids)
        size = state.nbytes
        for token in range(3, 6):
            decoder.step(torch.tensor([token]), state)
            assert state.nbytes == size
        sizes.append(size)
    assert sizes[0] == sizes[1] > 0
    if RULES[variant].window:  # O(window + sinks): the exact keys of 2 + 1 positions per head
        window = state.caches["model.layers.0.self_attn"].window
        assert window.keys.shape[2] == 2 and window.sink_keys.shape[2] == 1


def test_liger_generates_the_tokens_of_full_forwards():
    fast = rewritten("qwen2", "liger window 3")
    ids, mask = prompt()
    assert torch.equal(rl.generate(fast, ids, mask, max_new_tokens=NEW_TOKENS),
                       reference_tokens(fast, ids, mask, NEW_TOKENS))


def test_a_chooser_other_than_greedy():
    """`choose` picks each token from the logits: here a seeded sampler, whose draws from the full forwards'
    logits (same seed) give the same tokens."""
    fast = rewritten("qwen2", "hedgehog window 3")
    ids, mask = prompt()

    def sampler(seed):
        g = torch.Generator().manual_seed(seed)
        return lambda logits: torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0]

    got = rl.generate(fast, ids, mask, max_new_tokens=NEW_TOKENS, choose=sampler(5))
    want, draw = ids, sampler(5)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            full_mask = torch.cat([mask, torch.ones_like(want[:, ids.shape[1]:])], 1)
            logits = fast(want, attention_mask=full_mask, position_ids=rl.positions(full_mask)).logits[:, -1]
            want = torch.cat([want, draw(logits)[:, None]], 1)
    assert torch.equal(got, want)
    assert not torch.equal(got, rl.generate(fast, ids, mask, max_new_tokens=NEW_TOKENS))  # not greedy


def test_eos_stops_a_row_and_pads_it():
    fast = rewritten("llama", "elu")
    ids, mask = prompt()
    n = ids.shape[1]
    free = rl.generate(fast, ids, mask, max_new_tokens=NEW_TOKENS)[:, n:]
    eos = int(free[0, 1])  # a token row 0 produces early
    got = rl.generate(fast, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)[:, n:]
    for row in range(2):
        hits = (free[row] == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else NEW_TOKENS  # tokens up to and including the first eos
        assert torch.equal(got[row, :stop], free[row, :stop])
        assert (got[row, stop:] == 0).all()
    assert got.shape[1] == NEW_TOKENS or (got == eos).any(-1).all()  # stops early only once every row ended


# --- what it refuses ------------------------------------------------------------------------------------

def test_refuses_a_model_whose_attention_was_not_rewritten():
    model = causal_lm("llama")
    ids, mask = prompt()
    kwargs = {"attention_mask": mask, "position_ids": rl.positions(mask)}
    fast, _ = rl.rewrite(model, (ids,), rl.Recipe([rl.LowRank(rank=4)]), example_kwargs=kwargs, progress=False)
    with pytest.raises(rl.GenerationError, match="no rewritten attention"):
        rl.generate(fast, ids, mask, max_new_tokens=2)
    partly, report = rl.rewrite(model, (ids,), rl.Recipe([rl.LinearAttention(feature_map="elu", where="*layers.0*")]),
                                example_kwargs=kwargs, progress=False)
    assert report.counts == {"linear_attention": 1}
    with pytest.raises(rl.GenerationError, match=r"not rewritten at model\.layers\.1\.self_attn"):
        rl.generate(partly, ids, mask, max_new_tokens=2)


def test_refuses_a_graph_without_positions():
    ids, mask = prompt()
    fast, _ = rl.rewrite(causal_lm("llama"), (ids,), rl.Recipe([RECIPES["elu"]]),
                         example_kwargs={"attention_mask": mask}, progress=False)
    with pytest.raises(rl.GenerationError, match="does not take position_ids"):
        rl.generate(fast, ids, mask, max_new_tokens=2)


def test_refuses_a_bidirectional_model_and_right_padding():
    from tests.model_zoo import make_model, padded_batch

    bert = make_model("bert", "sdpa")
    ids, mask = padded_batch("bert")
    fast, _ = rl.rewrite(bert, (ids,), rl.Recipe([RECIPES["elu"]]), example_kwargs={"attention_mask": mask},
                         progress=False)
    with pytest.raises(rl.GenerationError, match="bidirectional"):
        rl.RecurrentDecoder(fast)
    decoder = rl.RecurrentDecoder(rewritten("llama", "elu"))
    ids, mask = prompt()
    with pytest.raises(rl.GenerationError, match="left padded"):
        decoder.prefill(ids, mask.flip(-1))


def test_refuses_a_sliding_window_the_rewrite_read_as_padding():
    """Mistral's sliding window is invisible on an example shorter than the window; on a longer prompt the
    graph's key mask drops old tokens for every query, which no recurrent state reproduces."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.MistralForCausalLM(tf.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        num_hidden_layers=2, sliding_window=4, attn_implementation="sdpa", use_cache=False)).double().eval()
    ids, mask = prompt(lengths=(4, 3))
    fast, report = rl.rewrite(model, (ids,), rl.Recipe([RECIPES["elu"]]), progress=False,
                              example_kwargs={"attention_mask": mask, "position_ids": rl.positions(mask)})
    assert report.counts == {"linear_attention": 2}
    decoder = rl.RecurrentDecoder(fast)
    decoder.prefill(ids, mask)  # within the window: the mask is padding only
    long_ids, long_mask = prompt(lengths=(9, 6))
    with pytest.raises(rl.GenerationError, match=r"model\.layers\.0\.self_attn masks prompt tokens that are not"):
        decoder.prefill(long_ids, long_mask)


def test_refuses_one_attention_module_called_twice():
    import torch.fx as fx

    fast = rewritten("llama", "elu")
    graph = fx.Graph()
    graph.output(graph.graph_copy(fast.graph, {}))
    first, second = (n for n in graph.nodes if n.op == "call_module" and n.target.startswith("relinear."))
    second.target = first.target
    with pytest.raises(rl.GenerationError, match="called at several places"):
        rl.RecurrentDecoder(fx.GraphModule(fast, graph))
