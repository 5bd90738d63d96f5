"""Small random-weight transformers models (no hub access) with padded batches, for rule tests."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    elif arch == "falcon":
        cfg = tf.FalconConfig(hidden_size=64, num_attention_heads=4, **common)
        model = tf.FalconModel(cfg)
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


# --- every architecture of the coverage table (docs/coverage.md): tiny random configs ------------------------

HIDDEN, HEADS, LAYERS = 32, 4, 2
_TEXT = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=LAYERS,
             intermediate_size=64, max_position_embeddings=128)
_DECODER = dict(_TEXT, num_key_value_heads=2, use_cache=False)
_ENCODER_DECODER = dict(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=128, use_cache=False)
_VISION = dict(hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=LAYERS, intermediate_size=64,
               image_size=32, patch_size=8)


@dataclass(frozen=True)
class Arch:
    """One row family of the coverage table: how to build the model and what it reads.

    kind: "encoder" (ids + mask, right padding), "decoder" (ids + mask, left padding), "seq2seq" (ids + mask +
    decoder ids), "speech" (Whisper: features + decoder ids), "vision" (pixels). window: the sliding window or
    local attention configured, whose rows run below and above it.
    """

    config: str
    model: str
    kind: str
    kwargs: dict = field(default_factory=dict)
    attn: tuple[str, ...] = ("eager", "sdpa")
    window: int | None = None


ARCHITECTURES: dict[str, Arch] = {
    "bert": Arch("BertConfig", "BertModel", "encoder", _TEXT),
    "roberta": Arch("RobertaConfig", "RobertaModel", "encoder", dict(_TEXT, pad_token_id=1)),
    "distilbert": Arch("DistilBertConfig", "DistilBertModel", "encoder",
                       dict(vocab_size=VOCAB, dim=HIDDEN, n_heads=HEADS, n_layers=LAYERS, hidden_dim=64)),
    "albert": Arch("AlbertConfig", "AlbertModel", "encoder", dict(_TEXT, embedding_size=16)),
    "electra": Arch("ElectraConfig", "ElectraModel", "encoder", dict(_TEXT, embedding_size=16)),
    "deberta_v2": Arch("DebertaV2Config", "DebertaV2Model", "encoder", dict(_TEXT, relative_attention=True,
                       pos_att_type=["p2c", "c2p"], max_relative_positions=16), attn=("eager",)),
    "modernbert": Arch("ModernBertConfig", "ModernBertModel", "encoder",
                       dict(_TEXT, local_attention=8, global_attn_every_n_layers=2, pad_token_id=0), window=8),
    "gpt2": Arch("GPT2Config", "GPT2Model", "decoder",
                 dict(vocab_size=VOCAB, n_embd=HIDDEN, n_head=HEADS, n_layer=LAYERS, n_positions=128, use_cache=False)),
    "gpt_neox": Arch("GPTNeoXConfig", "GPTNeoXModel", "decoder", dict(_TEXT, use_cache=False)),
    "gptj": Arch("GPTJConfig", "GPTJModel", "decoder",
                 dict(vocab_size=VOCAB, n_embd=HIDDEN, n_head=HEADS, n_layer=LAYERS, n_positions=128, rotary_dim=4,
                      use_cache=False)),
    "opt": Arch("OPTConfig", "OPTModel", "decoder", dict(vocab_size=VOCAB, hidden_size=HIDDEN,
                num_attention_heads=HEADS, num_hidden_layers=LAYERS, ffn_dim=64, word_embed_proj_dim=HIDDEN,
                max_position_embeddings=128, use_cache=False)),
    "falcon": Arch("FalconConfig", "FalconModel", "decoder", dict(vocab_size=VOCAB, hidden_size=HIDDEN,
                   num_attention_heads=HEADS, num_hidden_layers=LAYERS, use_cache=False)),
    "phi": Arch("PhiConfig", "PhiModel", "decoder", _DECODER),
    "phi3": Arch("Phi3Config", "Phi3Model", "decoder", dict(_DECODER, pad_token_id=0)),
    "llama": Arch("LlamaConfig", "LlamaModel", "decoder", _DECODER),
    "mistral": Arch("MistralConfig", "MistralModel", "decoder", dict(_DECODER, sliding_window=8), window=8),
    "mixtral": Arch("MixtralConfig", "MixtralModel", "decoder", dict(_DECODER, num_local_experts=2)),
    "qwen2": Arch("Qwen2Config", "Qwen2Model", "decoder", _DECODER),
    "qwen3": Arch("Qwen3Config", "Qwen3Model", "decoder", dict(_DECODER, head_dim=8)),
    "gemma": Arch("GemmaConfig", "GemmaModel", "decoder", dict(_DECODER, head_dim=8)),
    "gemma2": Arch("Gemma2Config", "Gemma2Model", "decoder", dict(_DECODER, head_dim=8, sliding_window=8), window=8,
                   attn=("eager",)),
    "stablelm": Arch("StableLmConfig", "StableLmModel", "decoder", _DECODER),
    "t5": Arch("T5Config", "T5Model", "seq2seq", dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64,
               num_layers=LAYERS, num_heads=HEADS, use_cache=False, decoder_start_token_id=0)),
    "bart": Arch("BartConfig", "BartModel", "seq2seq", _ENCODER_DECODER),
    "whisper": Arch("WhisperConfig", "WhisperModel", "speech", dict(_ENCODER_DECODER, num_mel_bins=8,
                    max_source_positions=16, max_target_positions=64, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)),
    "clip_text": Arch("CLIPTextConfig", "CLIPTextModel", "decoder", dict(_TEXT, projection_dim=HIDDEN)),
    "clip_vision": Arch("CLIPVisionConfig", "CLIPVisionModel", "vision", _VISION),
    "vit": Arch("ViTConfig", "ViTModel", "vision", _VISION),
    "deit": Arch("DeiTConfig", "DeiTModel", "vision", _VISION),
    "swin": Arch("SwinConfig", "SwinModel", "vision", dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                 num_heads=[2, 4], window_size=4), attn=("eager",)),
}


class Adapter(torch.nn.Module):
    """A model called with positional tensors, returning its last hidden state: one signature for every front
    end (rl.rewrite, torch.compile, to_onnx)."""

    def __init__(self, model, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors):
        return self.model(**dict(zip(self.names, tensors, strict=True))).last_hidden_state


def build_arch(name: str, attn: str) -> Adapter:
    import transformers as tf

    spec = ARCHITECTURES[name]
    cfg = getattr(tf, spec.config)(**spec.kwargs)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = getattr(tf, spec.model)(cfg).eval()
    names = {"encoder": ("input_ids", "attention_mask"), "decoder": ("input_ids", "attention_mask"),
             "seq2seq": ("input_ids", "attention_mask", "decoder_input_ids"),
             "speech": ("input_features", "decoder_input_ids"), "vision": ("pixel_values",)}[spec.kind]
    return Adapter(model, names).eval()


def arch_inputs(name: str, t: int, lengths: tuple[int, ...], seed: int = 0):
    """(example args, [B, T'] bool of the output rows to compare or None for all): a padded batch where the
    model takes a mask (the shorter sequences padded), a decoder prompt for encoder-decoders."""
    spec = ARCHITECTURES[name]
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    if spec.kind == "vision":
        return (torch.randn(b, 3, 32, 32, generator=g),), None
    decoder_ids = torch.randint(3, VOCAB, (b, 5), generator=g)
    if spec.kind == "speech":
        cfg = spec.kwargs
        return (torch.randn(b, cfg["num_mel_bins"], 2 * cfg["max_source_positions"], generator=g), decoder_ids), None
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    mask = torch.zeros(b, t, dtype=torch.long)
    for i, n in enumerate(lengths):
        if spec.kind == "decoder":
            mask[i, t - n:] = 1
        else:
            mask[i, :n] = 1
    if spec.kind == "seq2seq":
        return (ids, mask, decoder_ids), None
    return (ids, mask), mask.bool()
