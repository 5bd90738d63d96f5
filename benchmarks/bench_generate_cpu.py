"""Per-token decoding cost at long context: transformers' generation with its KV cache against relinear's
recurrent state (`rl.RecurrentDecoder`), on one random-config Llama, CPU, fp32, batch 1.

For each context length the original model builds its KV cache in one prefill call (SDPA, causal); a
`StaticCache` (preallocated, written in place) is filled from it too, next to transformers' default
`DynamicCache` (which concatenates the whole cache at every token). The rewritten graph builds its state in
one prefill call. Then every path decodes the same number of tokens, one step of each in turn (interleaved:
a slow phase of a shared machine lands on all sides of a ratio). Last, relinear's states of all the context
lengths step in turn with nothing else in between: whether its per-token time depends on the context.
Prints per-token milliseconds (median of the timed steps), bytes of KV cache / state, and the ratios; saves
benchmarks/results/generate_cpu.json.

    .venv/bin/python benchmarks/bench_generate_cpu.py [--contexts 1024 4096 16384] [--steps 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from environment import save_result  # benchmarks/environment.py

import relinear as rl

RESULTS = Path(__file__).parent / "results" / "generate_cpu.json"
# min_speedup=0: the speed check times the 64-token example forward, not decoding, which is what is measured
RECIPES = {
    "hedgehog": rl.LinearAttention(feature_map="hedgehog", min_speedup=0),
    "hedgehog+window64": rl.LinearAttention(feature_map="hedgehog", window=64, min_speedup=0),
    "elu": rl.LinearAttention(feature_map="elu", min_speedup=0),
}
KV_CACHES = ("dynamic", "static")  # transformers' default cache, and its preallocated one


def llama(args):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_attention_heads=args.heads,
                            num_key_value_heads=args.heads, intermediate_size=args.intermediate,
                            num_hidden_layers=args.layers, max_position_embeddings=max(args.contexts) + args.steps + 8,
                            attn_implementation="sdpa")
    return tf.LlamaForCausalLM(config).eval()


def kv_cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def timed(fn, *args, **kwargs):
    """(fn(*args, **kwargs), wall milliseconds it took)."""
    tick = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - tick) * 1e3


def kv_caches(model, ids, args) -> tuple[dict, torch.Tensor, float]:
    """({"dynamic": cache, "static": cache} after the prompt, the first token, prefill ms): one prefill call."""
    import transformers as tf

    out, prefill_ms = timed(model, ids, use_cache=True, logits_to_keep=1)
    dynamic = out.past_key_values
    static = tf.StaticCache(config=model.config, max_cache_len=ids.shape[1] + args.warmup + args.steps)
    for index, layer in enumerate(dynamic.layers):
        static.update(layer.keys, layer.values, index)
    return {"dynamic": dynamic, "static": static}, out.logits[:, -1].argmax(-1), prefill_ms


def bench_context(model, decoders: dict, context: int, args) -> tuple[dict, dict]:
    """One context length, every path interleaved; returns (row, relinear's states after it)."""
    ids = torch.randint(3, args.vocab, (1, context), generator=torch.Generator().manual_seed(context))
    caches, first, prefill_ms = kv_caches(model, ids, args)
    row = {"context": context, "hf_prefill_ms": prefill_ms, "hf_cache_bytes": kv_cache_bytes(caches["dynamic"]),
           "hf_ms": {name: [] for name in KV_CACHES}, "relinear": {}}
    tokens = {name: first for name in KV_CACHES}
    states = {}
    for name, decoder in decoders.items():
        (logits, state), prefill_ms = timed(decoder.prefill, ids)
        states[name], tokens[name] = state, logits.argmax(-1)
        row["relinear"][name] = {"prefill_ms": prefill_ms, "state_bytes": state.nbytes, "ms": []}
    for i in range(args.warmup + args.steps):
        position = torch.tensor([[context + i]])
        for name in KV_CACHES:  # the caches grow in place
            out, ms = timed(model, tokens[name][:, None], cache=caches[name], position_ids=position, use_cache=True,
                            logits_to_keep=1)
            tokens[name] = out.logits[:, -1].argmax(-1)
            if i >= args.warmup:
                row["hf_ms"][name].append(ms)
        for name, decoder in decoders.items():
            logits, ms = timed(decoder.step, tokens[name], states[name])
            tokens[name] = logits.argmax(-1)
            if i >= args.warmup:
                row["relinear"][name]["ms"].append(ms)
            assert states[name].nbytes == row["relinear"][name]["state_bytes"]
    return row, states


def relinear_alone(decoders: dict, states: dict, args) -> dict:
    """{recipe: {context: [ms]}}: relinear's steps at every context length in turn, nothing else in between."""
    times = {name: {context: [] for context in states} for name in decoders}
    token = torch.tensor([3])
    for i in range(args.warmup + args.steps):
        for context, by_recipe in states.items():
            for name, decoder in decoders.items():
                _, ms = timed(decoder.step, token, by_recipe[name])
                if i >= args.warmup:
                    times[name][context].append(ms)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--steps", type=int, default=8, help="timed decoding steps per context and path")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["hedgehog"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=1376, help="MLP width (Llama's ~8/3 x hidden)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = llama(args)
    example = torch.randint(3, args.vocab, (1, 64))
    mask = torch.ones_like(example)
    decoders = {}
    for name in args.recipes:
        fast, report = rl.rewrite(model, (example,), rl.Recipe([RECIPES[name]]), progress=False,
                                  example_kwargs={"attention_mask": mask, "position_ids": rl.positions(mask),
                                                  "logits_to_keep": 1, "use_cache": False})
        assert report.counts == {"linear_attention": args.layers}, report.skipped
        decoders[name] = rl.RecurrentDecoder(fast)

    rows, states = [], {}
    print(f"{'context':>8} {'path':>26} {'ms/token':>9} {'bytes':>12} "
          + " ".join(f"{'x faster than ' + c:>22}" for c in KV_CACHES) + f" {'x smaller':>10}")
    with torch.inference_mode():
        for context in args.contexts:
            row, states[context] = bench_context(model, decoders, context, args)
            row["hf_ms_median"] = {name: statistics.median(ms) for name, ms in row["hf_ms"].items()}
            for cache in KV_CACHES:
                print(f"{context:>8} {'transformers ' + cache + ' cache':>26} {row['hf_ms_median'][cache]:>9.2f} "
                      f"{row['hf_cache_bytes']:>12,}")
            for name, result in row["relinear"].items():
                result["ms_median"] = statistics.median(result["ms"])
                result["speedup"] = {c: row["hf_ms_median"][c] / result["ms_median"] for c in KV_CACHES}
                result["smaller"] = row["hf_cache_bytes"] / result["state_bytes"]
                print(f"{context:>8} {'relinear ' + name:>26} {result['ms_median']:>9.2f} {result['state_bytes']:>12,} "
                      + " ".join(f"{result['speedup'][c]:>22.2f}" for c in KV_CACHES) + f" {result['smaller']:>10.1f}")
            rows.append(row)
        alone = relinear_alone(decoders, states, args)
    first, last = args.contexts[0], args.contexts[-1]
    flatness = {}
    for name, by_context in alone.items():
        medians = {context: statistics.median(ms) for context, ms in by_context.items()}
        flatness[name] = {"ms_median": medians, "last_over_first": medians[last] / medians[first],
                          "interleaved_with_transformers": rows[-1]["relinear"][name]["ms_median"]
                          / rows[0]["relinear"][name]["ms_median"]}
        print(f"relinear {name} alone: " + ", ".join(f"{c}: {m:.2f} ms" for c, m in medians.items())
              + f"; {last} / {first} = {flatness[name]['last_over_first']:.2f} (interleaved with transformers' "
              f"steps: {flatness[name]['interleaved_with_transformers']:.2f})")
    save_result(args.out, {"model": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "intermediate",
                                                                      "vocab")},
                           "dtype": "float32", "batch": 1, "steps": args.steps, "warmup": args.warmup,
                           "rows": rows, "relinear_alone": flatness})


if __name__ == "__main__":
    main()
