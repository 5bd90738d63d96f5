"""CPU time of softmax attention (SDPA) vs relinear's LinearizedAttention, bidirectional and causal.

Times the whole LinearizedAttention forward (feature maps included) in inference mode at B1 H12 D32 fp32, for
elu and hedgehog linear attention and the hedgehog hybrid with a 64-key window (balance on, as the default);
prints a table and saves raw numbers to benchmarks/results/attention_cpu.json.

    .venv/bin/python benchmarks/bench_attention_cpu.py [--max-T 8192] [--chunk-size 32]
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from environment import save_result  # benchmarks/environment.py

from relinear.approx.linear_attention import DEFAULT_CHUNK_SIZE, LinearizedAttention

LENGTHS = (1024, 2048, 4096, 8192, 16384)
MODULES = {"elu": dict(feature_map="elu"), "hedgehog": dict(feature_map="hedgehog"),
           "hybrid": dict(feature_map="hedgehog", window=64)}
RESULTS = Path(__file__).parent / "results" / "attention_cpu.json"


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def best_ms(fns: dict, clock, rounds: int = 5, calls: int = 5) -> dict[str, float]:
    """Fastest time in ms of each function by `clock`, sampled interleaved: every round calls each function
    `calls` times (SDPA once: it is the slow one), after one warm-up call each.

    The fastest run, not the median: on a shared machine the others measure the neighbours' load. Interleaving
    spreads every function's samples over the same minutes, so a slow phase of the machine (runs here vary
    by up to 2x within minutes) cannot land on one side of a ratio only. With one thread, the process's CPU
    time (`--clock cpu`) also leaves out the time other processes held the core.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(1 if name == "sdpa" else calls):
                tick = clock()
                fn()
                times[name].append((clock() - tick) * 1e3)
    return {name: min(samples) for name, samples in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-T", type=int, default=16384, help="longest sequence timed")
    parser.add_argument("--chunk-size", type=int, default=None, help="default: the module's CPU default")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process CPU time")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu sums all threads' time: use it with --threads 1")
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    heads, head_dim = args.heads, args.head_dim
    args.chunk_size = args.chunk_size or DEFAULT_CHUNK_SIZE["cpu"]
    modules = {
        name: LinearizedAttention(heads, head_dim, chunk_size=args.chunk_size, **options).eval()
        for name, options in MODULES.items()
    }
    rows = []
    print(f"{'T':>6} {'mode':>6} {'sdpa ms':>9} " + " ".join(f"{n + ' ms':>11} {n + ' x':>8}" for n in MODULES))
    with torch.inference_mode():
        for length in (t for t in LENGTHS if t <= args.max_T):
            q, k, v = (torch.randn(1, heads, length, head_dim) for _ in range(3))
            for causal in (False, True):
                row = {"T": length, "causal": causal}
                fns = {"sdpa": partial(F.scaled_dot_product_attention, q, k, v, is_causal=causal)}
                fns |= {name: partial(module, q, k, v, causal=causal) for name, module in modules.items()}
                best = best_ms(fns, clock)
                row["sdpa_ms"] = best["sdpa"]
                for name in modules:
                    row[f"{name}_ms"], row[f"{name}_speedup"] = best[name], best["sdpa"] / best[name]
                rows.append(row)
                mode = "causal" if causal else "bidir"
                cells = " ".join(f"{row[f'{n}_ms']:>11.2f} {row[f'{n}_speedup']:>7.1f}x" for n in MODULES)
                print(f"{length:>6} {mode:>6} {row['sdpa_ms']:>9.2f} {cells}", flush=True)

    save_result(args.out, {"clock": args.clock, "shape": {"B": 1, "H": heads, "D": head_dim, "dtype": "float32"},
                           "chunk_size": args.chunk_size, "rows": rows})


if __name__ == "__main__":
    main()
