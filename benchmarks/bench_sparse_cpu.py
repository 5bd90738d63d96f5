"""CPU time of each sparse op against the dense layer it replaces, at 4096x4096 and MiniLM's MLP sizes
(384 -> 1536 and 1536 -> 384), densities 50%, 10% and 5% (2:4 only at its 50%).

Prints a table of dense/op ratios (above 1: the op is faster) and writes benchmarks/results/sparse_cpu.json.
Weights are random with random masks: these ops' time depends on where the nonzeros are only through their
count (and, for block-sparse, the block size). `sparse (CSR matmul)` forces torch's CSR product at every
density, to show where `sparse_linear` is right to fall back to the dense form.

    python benchmarks/bench_sparse_cpu.py [--tokens 256] [--repeats 15] [--threads 1] [--out PATH]

One thread by default: on a shared machine a two-thread GEMM waits for its slower thread, which made medians of
the small MiniLM shapes swing by 10x between neighbouring rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_monarch_cpu import median_ms  # benchmarks/bench_monarch_cpu.py: round-robin medians
from environment import cpu_model, save_result  # benchmarks/environment.py

import relinear.kernels.block_sparse
import relinear.kernels.sparse
import relinear.kernels.sparse24
import relinear.kernels.sparse_low_rank  # noqa: F401  (registers the ops)
from relinear.approx import sparse as S
from relinear.kernels.sparse import reference as sparse_reference

SHAPES = ((4096, 4096), (1536, 384), (384, 1536))  # (out, in)
DENSITIES = (0.5, 0.1, 0.05)
BLOCK = 32
RANK = 16
RESULTS = Path(__file__).parent / "results" / "sparse_cpu.json"


def _csr_matmul(x, values, crow, col):
    """sparse_linear's torch form with the CSR product forced (whatever the density)."""
    saved = sparse_reference.SPARSE_MATMUL_MAX_DENSITY
    sparse_reference.SPARSE_MATMUL_MAX_DENSITY = 1.0
    try:
        return sparse_reference.sparse_linear_reference(x, values, crow, col, None)
    finally:
        sparse_reference.SPARSE_MATMUL_MAX_DENSITY = saved


def candidates(x, out_features, in_features, density):
    weight = torch.randn(out_features, in_features)
    scores = torch.rand(out_features, in_features, dtype=torch.float64)
    ops = {"dense": (F.linear, x, weight)}
    csr = S.to_csr(weight * S.mask_unstructured(scores, density))
    ops["sparse"] = (torch.ops.relinear.sparse_linear, x, *csr, None)
    ops["sparse (CSR matmul)"] = (_csr_matmul, x, *csr)
    bsr = S.to_bsr(weight, S.block_mask(scores, BLOCK, density), BLOCK)
    ops[f"block_sparse (block {BLOCK})"] = (torch.ops.relinear.block_sparse_linear, x, *bsr, None, out_features,
                                           BLOCK)
    ops[f"sparse_low_rank (rank {RANK})"] = (torch.ops.relinear.sparse_low_rank_linear, x, *csr,
                                             torch.randn(RANK, in_features), torch.randn(out_features, RANK), None)
    if density == 0.5:
        ops["sparse24"] = (torch.ops.relinear.sparse24_linear, x, *S.compress_24_kept(weight, S.mask_24(scores)),
                           None)
    return ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{args.tokens} tokens, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}, "
          f"median of {args.repeats} round-robin runs; ratio = dense ms / op ms")
    with torch.inference_mode():
        for out_features, in_features in SHAPES:
            x = torch.randn(args.tokens, in_features)
            for density in DENSITIES:
                ms = median_ms(args.repeats, candidates(x, out_features, in_features, density))
                for op, op_ms in ms.items():
                    if op == "dense":
                        continue
                    row = {"out": out_features, "in": in_features, "density": density, "op": op,
                           "dense_ms": ms["dense"], "op_ms": op_ms, "dense_over_op": ms["dense"] / op_ms}
                    rows.append(row)
                    print(f"{out_features:>5}x{in_features:<5} density {density:<5} {op:<28} dense "
                          f"{ms['dense']:8.2f} ms  op {op_ms:8.2f} ms  ratio {row['dense_over_op']:5.2f}x")
    save_result(args.out, {"tokens": args.tokens, "dtype": "float32", "repeats": args.repeats, "block": BLOCK,
                           "rank": RANK, "rows": rows})


if __name__ == "__main__":
    main()
