"""Small random-weight transformers models (no hub access) with padded batches, for rule tests."""

from __future__ import annotations

import torch

VOCAB = 128


def make_model(arch: str, attn: str, layers: int = 2):
    import transformers as tf

    common = dict(vocab_size=VOCAB, num_hidden_layers=layers, attn_implementation=attn, use_cache=False)
    if arch == "bert":
        cfg = tf.BertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                            max_position_embeddings=128, **common)
        model = tf.BertModel(cfg)
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_head=4, n_positions=128, n_layer=layers, vocab_size=VOCAB,
                            use_cache=False, bos_token_id=1, eos_token_id=2,
                            attn_implementation=attn)
        model = tf.GPT2Model(cfg)
    elif arch in ("llama", "qwen2", "mistral"):
        kv = {"llama": 2, "qwen2": 1, "mistral": 2}[arch]  # GQA, MQA, GQA
        cls = {"llama": (tf.LlamaConfig, tf.LlamaModel), "qwen2": (tf.Qwen2Config, tf.Qwen2Model),
               "mistral": (tf.MistralConfig, tf.MistralModel)}[arch]
        cfg = cls[0](hidden_size=64, num_attention_heads=4, num_key_value_heads=kv, intermediate_size=128,
                     max_position_embeddings=128, **common)
        model = cls[1](cfg)
    else:
        raise ValueError(arch)
    torch.manual_seed(0)
    return model.eval()


def padded_batch(arch: str, lengths=(12, 9), generator_seed: int = 0):
    """input_ids and attention_mask, left padded for decoders, right padded for BERT."""
    g = torch.Generator().manual_seed(generator_seed)
    t = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), t), generator=g)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        if arch == "bert":
            mask[i, :n] = 1
        else:
            mask[i, t - n:] = 1
    return ids, mask
