"""Per-token decoding cost at long context: transformers' generation with its KV cache against relinear's
recurrent state (`rl.RecurrentDecoder`), on one random-config Llama, CPU, fp32, batch 1.

For each context length the original model builds its KV cache in one prefill call (SDPA, causal) and the
rewritten graph builds its state in one prefill call; then both decode the same number of tokens, one step of
each in turn (interleaved: a slow phase of a shared machine lands on both sides of the ratio). Prints per-token
milliseconds (median of the timed steps), bytes of KV cache / state, and the ratios; saves
benchmarks/results/generate_cpu.json.

    .venv/bin/python benchmarks/bench_generate_cpu.py [--contexts 1024 4096 16384] [--steps 8]
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
RECIPES = {
    "hedgehog": rl.LinearAttention(feature_map="hedgehog"),
    "hedgehog+window64": rl.LinearAttention(feature_map="hedgehog", window=64),
    "elu": rl.LinearAttention(feature_map="elu"),
}


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


def bench_context(model, decoders: dict, context: int, args) -> dict:
    ids = torch.randint(3, args.vocab, (1, context), generator=torch.Generator().manual_seed(context))
    out, hf_prefill_ms = timed(model, ids, use_cache=True, logits_to_keep=1)
    cache, hf_token = out.past_key_values, out.logits[:, -1].argmax(-1)
    row = {"context": context, "hf_prefill_ms": hf_prefill_ms, "hf_cache_bytes": kv_cache_bytes(cache),
           "hf_ms": [], "relinear": {}}
    states = {}
    for name, decoder in decoders.items():
        (logits, state), prefill_ms = timed(decoder.prefill, ids)
        states[name] = [state, logits.argmax(-1)]
        row["relinear"][name] = {"prefill_ms": prefill_ms, "state_bytes": state.nbytes, "ms": []}
    for i in range(args.warmup + args.steps):
        position = torch.tensor([[context + i]])
        out, ms = timed(model, hf_token[:, None], cache=cache, position_ids=position, use_cache=True,
                        logits_to_keep=1)
        cache, hf_token = out.past_key_values, out.logits[:, -1].argmax(-1)
        if i >= args.warmup:
            row["hf_ms"].append(ms)
        for name, decoder in decoders.items():
            state, token = states[name]
            logits, ms = timed(decoder.step, token, state)
            states[name][1] = logits.argmax(-1)
            if i >= args.warmup:
                row["relinear"][name]["ms"].append(ms)
        assert all(state.nbytes == row["relinear"][name]["state_bytes"] for name, (state, _) in states.items())
    return row


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

    rows = []
    print(f"{'context':>8} {'path':>22} {'ms/token':>9} {'bytes':>12} {'x faster':>9} {'x smaller':>10}")
    with torch.inference_mode():
        for context in args.contexts:
            row = bench_context(model, decoders, context, args)
            row["hf_ms_median"] = statistics.median(row["hf_ms"])
            print(f"{context:>8} {'transformers KV cache':>22} {row['hf_ms_median']:>9.2f} "
                  f"{row['hf_cache_bytes']:>12,}")
            for name, result in row["relinear"].items():
                result["ms_median"] = statistics.median(result["ms"])
                result["speedup"] = row["hf_ms_median"] / result["ms_median"]
                result["smaller"] = row["hf_cache_bytes"] / result["state_bytes"]
                print(f"{context:>8} {'relinear ' + name:>22} {result['ms_median']:>9.2f} "
                      f"{result['state_bytes']:>12,} {result['speedup']:>9.2f} {result['smaller']:>10.1f}")
            rows.append(row)
    flat = {name: rows[-1]["relinear"][name]["ms_median"] / rows[0]["relinear"][name]["ms_median"]
            for name in args.recipes}
    for name, ratio in flat.items():
        print(f"relinear {name}: per-token time at {args.contexts[-1]} / at {args.contexts[0]} = {ratio:.2f}")
    save_result(args.out, {"model": {k: getattr(args, k) for k in ("layers", "hidden", "heads", "intermediate",
                                                                      "vocab")},
                           "dtype": "float32", "batch": 1, "steps": args.steps, "warmup": args.warmup,
                           "rows": rows, "relinear_flatness": flat})


if __name__ == "__main__":
    main()
