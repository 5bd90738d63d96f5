"""What `relinear bench` measures: named recipes on MiniLM (quality on real held-out text, speed-up at a short and
a long length) and original / linear / hybrid attention on a random-config Llama (prefill and decode time and
memory against the sequence length). Every function returns plain JSON-ready values; `report.py` draws them.

Every rule here has `min_speedup=0`: the rewrite keeps every site, so a speed-up measured is the recipe's own,
not that of whichever sites happened to be faster on the rewrite's small example.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import asdict, dataclass
from functools import partial

import torch
from tqdm.auto import tqdm

import relinear as rl
from relinear.bench.measure import interleaved_ms, peak_bytes
from relinear.calibrate import attention_layers
from relinear.demo import load_minilm, mean_pool, stretched_minilm
from relinear.text import HELD_OUT_MODULES, docstrings, token_windows, train_and_held_out


def _hybrid(window: int) -> rl.LinearAttention:
    return rl.LinearAttention(feature_map="hedgehog", window=window, sinks=1, min_speedup=0)


# The named recipes on MiniLM, cheapest attention first; the last adds Monarch MLPs (4 blocks) to the hybrid.
MINILM_RECIPES = {
    "elu": (rl.LinearAttention(feature_map="elu", min_speedup=0),),
    "hedgehog": (rl.LinearAttention(feature_map="hedgehog", min_speedup=0),),
    "hedgehog+decay": (rl.LinearAttention(feature_map="hedgehog", decay=True, min_speedup=0),),
    "hedgehog+window64+sink": (_hybrid(64),),
    "hedgehog+window64+sink+monarch4": (_hybrid(64), rl.Monarch(nblocks=4, where="*intermediate*", min_speedup=0)),
}
QUICK_MINILM_RECIPES = ("elu", "hedgehog+window64+sink+monarch4")
# The decoder's attention: softmax (original), pure linear, and the hybrid with a window of 64 recent keys.
DECODER_VARIANTS = {"linear": (rl.LinearAttention(feature_map="hedgehog", min_speedup=0),),
                    "hybrid": (_hybrid(64),)}


@dataclass(frozen=True)
class Sizes:
    recipes: tuple[str, ...]
    quality_length: int  # tokens per held-out window (MiniLM takes at most 512)
    held_out_windows: int
    speed_lengths: tuple[int, int]  # short (the real MiniLM), long (MiniLM's shape with more positions)
    rounds: int  # interleaved timing samples per call
    llama: dict  # the random-config decoder
    prefill_lengths: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    decode_steps: int


FULL = Sizes(recipes=tuple(MINILM_RECIPES), quality_length=256, held_out_windows=16, speed_lengths=(256, 4096),
             rounds=5, llama={"hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 4,
                              "intermediate_size": 688, "vocab_size": 2048},
             prefill_lengths=(512, 1024, 2048, 4096, 8192), decode_contexts=(512, 2048, 8192), decode_steps=8)
QUICK = Sizes(recipes=QUICK_MINILM_RECIPES, quality_length=32, held_out_windows=2, speed_lengths=(32, 64),
              rounds=1, llama={"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2,
                               "intermediate_size": 64, "vocab_size": 128},
              prefill_lengths=(32, 64), decode_contexts=(32, 64), decode_steps=2)


def embeddings(model, ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    with torch.no_grad():
        return mean_pool(model(ids, mask).last_hidden_state, mask)


def _every_site_kept(report: rl.RewriteReport) -> rl.RewriteReport:
    """min_speedup=0 keeps every site; a skip here is a failed precondition the numbers must not hide."""
    if report.skipped:
        raise RuntimeError(f"the bench's rewrite left sites alone: {report.skipped}")
    return report


def _rewrite(model, ids: torch.Tensor, rules: tuple) -> tuple[torch.nn.Module, rl.RewriteReport]:
    fast, report = rl.rewrite(model, (ids, torch.ones_like(ids)), rl.Recipe(list(rules)), progress=False)
    return fast, _every_site_kept(report)


def _layer(where: str, index: int) -> int:
    """The layer number in a module path (``encoder.layer.3.attention.self`` -> 3), else the site's index."""
    found = re.search(r"\.(\d+)(\.|$)", where)
    return int(found.group(1)) if found else index


def quality_and_speed(sizes: Sizes, calibrate_steps: int) -> dict:
    """Per recipe: held-out embedding cosine of the rewritten MiniLM (optionally after `calibrate_steps` of
    attention transfer), speed-up over the original at both `speed_lengths`, and each site's relative error."""
    model, tokenizer = load_minilm()
    if calibrate_steps:
        train_windows, held_out_windows = train_and_held_out(tokenizer, sizes.quality_length)
        batches = [(b, torch.ones_like(b)) for b in torch.tensor(train_windows).split(4)]
    else:  # the held-out text alone (the training text takes a parse of the whole standard library)
        held_out_windows = token_windows(tokenizer, sizes.quality_length, docstrings(HELD_OUT_MODULES))
    step = max(1, len(held_out_windows) // sizes.held_out_windows)
    held_out = torch.tensor(held_out_windows[::step][: sizes.held_out_windows])
    reference = embeddings(model, held_out)
    short, long = sizes.speed_lengths
    speed_models = {short: model, long: stretched_minilm(model, long)}
    inputs = {length: torch.randint(1000, tokenizer.vocab_size, (1, length),
                                    generator=torch.Generator().manual_seed(length)) for length in speed_models}
    rows, errors, rewritten = [], {}, {}
    for name in tqdm(sizes.recipes, desc="MiniLM recipes", unit="recipe"):
        rules = MINILM_RECIPES[name]
        fast, report = _rewrite(model, held_out[:2], rules)
        if calibrate_steps and any(layer.trainable_parameters() for layer in attention_layers(fast)):
            rl.calibrate(fast, batches=batches, steps=calibrate_steps, lr=1e-2, progress=False)
        rows.append({"recipe": name, "rules": [repr(rule) for rule in rules], "rewrites": report.counts,
                     "cosine": float((embeddings(fast, held_out) * reference).sum(-1).mean()), "ms": {},
                     "speedup": {}})
        errors[name] = [{"rule": s.rule, "where": s.where, "layer": _layer(s.where, i), "error": s.error}
                        for i, s in enumerate(report.sites)]
        rewritten[name] = fast
    for length, original in tqdm(speed_models.items(), desc="MiniLM speed", unit="length"):
        ids = inputs[length]
        mask = torch.ones_like(ids)
        fasts = rewritten if original is model else {
            name: _rewrite(original, ids[:, :64], MINILM_RECIPES[name])[0] for name in sizes.recipes}
        calls = {"original": partial(original, ids, mask)} | {name: partial(f, ids, mask) for name, f in fasts.items()}
        with torch.inference_mode():  # every recipe and the original in turn: one set of samples of the original
            best = {name: min(ms) for name, ms in interleaved_ms(calls, sizes.rounds).items()}
        for row in rows:
            row["ms"][str(length)] = {"original": best["original"], "rewritten": best[row["recipe"]]}
            row["speedup"][str(length)] = best["original"] / best[row["recipe"]]
    return {"quality_length": sizes.quality_length, "held_out_windows": len(held_out),
            "calibrate_steps": calibrate_steps, "speed_lengths": list(sizes.speed_lengths), "rows": rows,
            "per_layer_error": errors}


def _llama(sizes: Sizes):
    import transformers as tf

    torch.manual_seed(0)
    longest = max(*sizes.prefill_lengths, *sizes.decode_contexts) + sizes.decode_steps + 2
    config = tf.LlamaConfig(**sizes.llama, num_key_value_heads=sizes.llama["num_attention_heads"],
                            max_position_embeddings=longest, attn_implementation="sdpa")
    return tf.LlamaForCausalLM(config).eval()


def _decoders(model, vocab: int) -> dict[str, tuple[torch.nn.Module, rl.RecurrentDecoder]]:
    """{variant: (rewritten graph, its recurrent decoder)}."""
    example = torch.randint(3, vocab, (1, 64))
    mask = torch.ones_like(example)
    kwargs = {"attention_mask": mask, "position_ids": rl.positions(mask), "logits_to_keep": 1, "use_cache": False}
    decoders = {}
    for name, rules in DECODER_VARIANTS.items():
        fast, report = rl.rewrite(model, (example,), rl.Recipe(list(rules)), example_kwargs=kwargs, progress=False)
        _every_site_kept(report)
        decoders[name] = (fast, rl.RecurrentDecoder(fast))
    return decoders


def _kv_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _step_ms(call) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e3


def sequence_scaling(sizes: Sizes) -> dict:
    """Prefill (best interleaved ms, peak tensor bytes) and decode (median ms per token over `decode_steps`
    steps taken in turn, after one warm-up step each; bytes of KV cache or recurrent state) of the original
    Llama and its rewrites."""
    model = _llama(sizes)
    vocab = sizes.llama["vocab_size"]
    rewrites = _decoders(model, vocab)

    def prompt(length):
        return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(length))

    prefill, decode = [], []
    with torch.inference_mode():
        for length in tqdm(sizes.prefill_lengths, desc="prefill lengths", unit="length"):
            ids = prompt(length)
            calls = {"original": (model, partial(model, ids, use_cache=True, logits_to_keep=1))}
            calls |= {name: (fast, partial(decoder.prefill, ids)) for name, (fast, decoder) in rewrites.items()}
            samples = interleaved_ms({name: call for name, (_, call) in calls.items()}, sizes.rounds)
            prefill += [{"length": length, "variant": name, "ms": min(samples[name]),
                         "peak_bytes": peak_bytes(call, module)} for name, (module, call) in calls.items()]
        token = torch.tensor([3])
        for context in tqdm(sizes.decode_contexts, desc="decode contexts", unit="context"):
            ids = prompt(context)
            cache = model(ids, use_cache=True, logits_to_keep=1).past_key_values
            states = {name: decoder.prefill(ids)[1] for name, (_, decoder) in rewrites.items()}
            times = {name: [] for name in ("original", *rewrites)}
            for i in range(1 + sizes.decode_steps):  # the caches and states grow by one token per step
                position = torch.tensor([[context + i]])
                times["original"].append(_step_ms(partial(model, token[:, None], cache=cache,
                                                          position_ids=position, use_cache=True, logits_to_keep=1)))
                for name, (_, decoder) in rewrites.items():
                    times[name].append(_step_ms(partial(decoder.step, token, states[name])))
            held = {"original": _kv_bytes(cache)} | {name: state.nbytes for name, state in states.items()}
            decode += [{"context": context, "variant": name, "ms_per_token": statistics.median(ms[1:]),
                        "cache_bytes": held[name]} for name, ms in times.items()]
    return {"model": {"family": "Llama (random weights)", **sizes.llama}, "batch": 1, "dtype": "float32",
            "decode_steps": sizes.decode_steps, "prefill": prefill, "decode": decode}


def run_all(sizes: Sizes, calibrate_steps: int = 0) -> dict:
    return {"sizes": asdict(sizes), "quality_speed": quality_and_speed(sizes, calibrate_steps),
            "sequence": sequence_scaling(sizes)}
