"""The hybrid op's two CPU inference forms against each other and against SDPA: where the dense form pays.

`hybrid_attention_cpu` picks the dense form when the keys are few next to a query chunk's band
(`banded.dense_is_cheaper`); this times both forms (and SDPA, for scale) on the op's inputs at the shapes where
the choice matters, interleaved, median of `--rounds`, and records which form the rule picks, so a reader can
check it picks the faster one. Feature maps are not timed (the op's inputs are given).

    python benchmarks/bench_hybrid_forms_cpu.py [--threads 1] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from environment import save_result  # benchmarks/environment.py

from relinear.bench.measure import interleaved_ms
from relinear.kernels.linear_attention.banded import dense_is_cheaper, hybrid_attention_banded
from relinear.kernels.linear_attention.dense import hybrid_attention_dense

RESULTS = Path(__file__).parent / "results" / "hybrid_forms_cpu.json"
HEADS, HEAD_DIM, FEATURES, CHUNK = 12, 32, 64, 32
# (batch, length, window, sinks): MiniLM's demo recipe at its lengths, the end-to-end hybrid case, longer ones
CASES = ((8, 128, 32, 1), (8, 256, 32, 1), (8, 512, 32, 1), (8, 256, 64, 0), (8, 512, 64, 0), (1, 1024, 64, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        for (batch, length, window, sinks) in CASES:
            q, k, v = (torch.randn(batch, HEADS, length, HEAD_DIM) for _ in range(3))
            phi_q, phi_k = (torch.rand(batch, HEADS, length, FEATURES) for _ in range(2))
            gate, balance = torch.zeros(HEADS), torch.zeros(HEADS, 3)
            for causal in (False, True):
                op_args = (q, k, v, phi_q, phi_k, gate, None, causal, window, HEAD_DIM**-0.5)
                calls = {
                    "sdpa": partial(F.scaled_dot_product_attention, q, k, v, is_causal=causal),
                    "banded": partial(hybrid_attention_banded, *op_args, CHUNK, sinks, balance),
                    "dense": partial(hybrid_attention_dense, *op_args, sinks, balance),
                }
                ms = {name: statistics.median(s) for name, s in interleaved_ms(calls, args.rounds).items()}
                picked = "dense" if dense_is_cheaper(length, causal, window, CHUNK) else "banded"
                faster = min(("dense", "banded"), key=ms.get)
                row = {"B": batch, "T": length, "window": window, "sinks": sinks, "causal": causal,
                       **{f"{name}_ms": value for name, value in ms.items()},
                       "dense_speedup_over_banded": ms["banded"] / ms["dense"], "picked": picked, "faster": faster}
                rows.append(row)
                print(f"B{batch} T={length:<5} window {window:<3} sinks {sinks} {'causal' if causal else 'bidir':>6}  "
                      f"sdpa {ms['sdpa']:7.1f}  banded {ms['banded']:7.1f}  dense {ms['dense']:7.1f} ms  "
                      f"dense/banded {row['dense_speedup_over_banded']:.2f}x  picked {picked}"
                      f"{'' if picked == faster else ' (not the faster)'}", flush=True)
    save_result(args.out, {"rounds": args.rounds, "statistic": "median of interleaved wall-clock samples",
                           "shape": {"H": HEADS, "D": HEAD_DIM, "F": FEATURES, "chunk": CHUNK, "dtype": "float32"},
                           "load_average_after": os.getloadavg(), "rows": rows})


if __name__ == "__main__":
    main()
