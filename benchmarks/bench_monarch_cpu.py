"""CPU time of a 4096x4096 dense layer vs its Monarch and same-parameter low-rank replacements.

Prints a table and writes the raw numbers to benchmarks/results/monarch_cpu.json. Weights are random
blocks of the right shapes: the time of these ops does not depend on the values.

    python benchmarks/bench_monarch_cpu.py [--tokens 2048] [--features 4096] [--repeats 9] [--dtype float32]
        [--threads N] [--out PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from environment import cpu_model, save_result  # benchmarks/environment.py

import relinear.kernels.low_rank
import relinear.kernels.monarch  # noqa: F401  (registers the ops)
from relinear.approx.monarch import monarch_grid
from relinear.kernels.monarch.reference import monarch_linear_reference

NBLOCKS = (4, 8, 16, 32, 64)
RESULTS = Path(__file__).parent / "results" / "monarch_cpu.json"


def median_ms(repeats: int, candidates: dict[str, tuple]) -> dict[str, float]:
    """Median wall time of each `(fn, *args)`, run round-robin so that load from other processes on a
    shared machine falls on all candidates alike."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn, *fn_args in candidates.values():
        fn(*fn_args)  # warm-up: first-call allocations and library initialisation
    for _ in range(repeats):
        for name, (fn, *fn_args) in candidates.items():
            start = time.perf_counter()
            fn(*fn_args)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(samples) for name, samples in times.items()}




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.features
    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.tokens, n, dtype=dtype)
    dense_weight = torch.randn(n, n, dtype=dtype)
    with torch.inference_mode():
        rows = []
        for nblocks in NBLOCKS:
            grid = monarch_grid(n, n, nblocks)
            blocks1, blocks2 = torch.randn(grid.core1_shape, dtype=dtype), torch.randn(grid.core2_shape, dtype=dtype)
            rank = grid.params // (2 * n)
            down, up = torch.randn(rank, n, dtype=dtype), torch.randn(n, rank, dtype=dtype)
            ms = median_ms(
                args.repeats,
                {
                    "dense": (F.linear, x, dense_weight),
                    "monarch": (torch.ops.relinear.monarch_linear, x, blocks1, blocks2, None, n),
                    "monarch_reference": (monarch_linear_reference, x, blocks1, blocks2, None, n),
                    "low_rank": (torch.ops.relinear.low_rank_linear, x, down, up, None),
                },
            )
            rows.append(
                {
                    "nblocks": nblocks,
                    "monarch_params": grid.params,
                    "dense_ms": ms["dense"],
                    "monarch_ms": ms["monarch"],
                    "monarch_reference_ms": ms["monarch_reference"],
                    "low_rank_rank": rank,
                    "low_rank_ms": ms["low_rank"],
                    "dense_over_monarch": ms["dense"] / ms["monarch"],
                    "flop_ratio": n * n / grid.params,
                }
            )
    header = (
        f"dense {n}x{n}, {args.tokens} tokens, {args.dtype}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {cpu_model()}, median of {args.repeats} round-robin runs"
    )
    print(header)
    columns = (
        "nblocks",
        "params",
        "dense ms",
        "monarch ms",
        "spec bmm ms",
        "dense/monarch",
        "rank",
        "low-rank ms",
    )
    print(" ".join(f"{name:>13}" for name in columns))
    for row in rows:
        cells = (
            row["nblocks"],
            row["monarch_params"],
            f"{row['dense_ms']:.1f}",
            f"{row['monarch_ms']:.1f}",
            f"{row['monarch_reference_ms']:.1f}",
            f"{row['dense_over_monarch']:.1f}x",
            row["low_rank_rank"],
            f"{row['low_rank_ms']:.1f}",
        )
        print(" ".join(f"{cell:>13}" for cell in cells))
    save_result(args.out, {"tokens": args.tokens, "features": n, "dtype": args.dtype, "repeats": args.repeats,
                          "rows": rows})


if __name__ == "__main__":
    main()
