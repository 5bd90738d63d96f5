"""Quality of sparse and structured MiniLM MLPs on real English, for the same parameter budget: the mean cosine
between the original and the rewritten sentence embeddings on held-out windows (standard-library docstrings no
calibration batch contains), with every MLP weight (intermediate 384 -> 1536 and output 1536 -> 384, 12 layers)
replaced at 50% and at 25% of its dense parameters. No distillation: the rewrite alone, fitted with the
calibration batches (Wanda's input norms, whitened low rank's input covariance).

Forms whose size is not continuous (2:4 is 50% only, Monarch's parameter count jumps with nblocks) take the
largest setting within the budget; each row records the parameter fraction it really keeps.

    python benchmarks/minilm_sparse_quality.py [--length 128] [--eval 16] [--calibration 8] [--batch 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch
from environment import save_result  # benchmarks/environment.py

import relinear as rl
from relinear.demo import load_minilm, mean_pool
from relinear.rewrite import timing
from relinear.text import train_and_held_out

MLP = ("*intermediate.dense", "encoder.layer.[0-9].output.dense")  # not the attention's output.dense
HIDDEN, INTERMEDIATE = 384, 1536
SPARSE_LOW_RANK_RANK = 32
BLOCK = 32
MONARCH_BLOCKS = (2, 4, 8, 16)


def _fraction_low_rank(rank: int) -> float:
    return rank * (HIDDEN + INTERMEDIATE) / (HIDDEN * INTERMEDIATE)


def _monarch_blocks(budget: float) -> int:
    """The Monarch nblocks with the most parameters within `budget` (fewer blocks = more parameters)."""
    from relinear.approx.monarch import monarch_cost

    fits = [k for k in MONARCH_BLOCKS if monarch_cost(HIDDEN, INTERMEDIATE, k)[0] <= budget * HIDDEN * INTERMEDIATE]
    return min(fits)


def recipes(budget: float) -> dict[str, object]:
    """name -> the config applied to every MLP weight."""
    rank = int(budget * HIDDEN * INTERMEDIATE / (HIDDEN + INTERMEDIATE))
    sparse_density = budget - _fraction_low_rank(SPARSE_LOW_RANK_RANK)
    found = {}
    if budget == 0.5:
        found["2:4 magnitude"] = rl.Sparse24(score="magnitude")
        found["2:4 wanda"] = rl.Sparse24(score="wanda")
    for score in ("magnitude", "wanda"):
        found[f"block-sparse {score}"] = rl.BlockSparse(block=BLOCK, density=budget, score=score)
        found[f"unstructured {score}"] = rl.Sparse(density=budget, score=score)
    found["sparse+low-rank"] = rl.SparseLowRank(density=sparse_density, rank=SPARSE_LOW_RANK_RANK)
    found["low-rank plain"] = rl.LowRank(rank=rank)
    found["low-rank whitened"] = rl.LowRank(rank=rank, whiten=True)
    found["monarch"] = rl.Monarch(nblocks=_monarch_blocks(budget))
    return found


def embed(model, ids):
    mask = torch.ones_like(ids)
    with torch.no_grad():
        return mean_pool(model(ids, mask).last_hidden_state, mask)


def evaluate(name, config, model, held_out, calibration, reference) -> dict:
    start = time.perf_counter()
    rules = [dataclasses.replace(config, where=where) for where in MLP]
    example = (held_out[:2], torch.ones_like(held_out[:2]))
    with timing.settings(measure=False):  # quality only: no site is timed or left alone for speed
        fast, report = rl.rewrite(model, example, rl.Recipe(rules), calibration=calibration, progress=False)
    dense = sum(s.params_before for s in report.sites)
    cosine = float((embed(fast, held_out) * reference).sum(-1).mean())
    return {"recipe": name, "config": config.to_dict(), "rewrites": len(report.sites),
            "skipped": len(report.skipped), "params_fraction": sum(s.params_after for s in report.sites) / dense,
            "cosine": cosine, "seconds": round(time.perf_counter() - start, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--eval", type=int, default=16, help="held-out windows")
    ap.add_argument("--calibration", type=int, default=8, help="calibration batches")
    ap.add_argument("--batch", type=int, default=4, help="windows per calibration batch")
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.5, 0.25])
    ap.add_argument("--recipes", nargs="*", default=None, help="names to run (default: all)")
    ap.add_argument("--out", default="benchmarks/results/minilm_sparse_quality.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    train_windows, held_out_windows = train_and_held_out(tokenizer, args.length)
    train = torch.tensor(train_windows[: args.calibration * args.batch])
    held_out = torch.tensor(held_out_windows[:: max(1, len(held_out_windows) // args.eval)][: args.eval])
    calibration = [(b, torch.ones_like(b)) for b in train.split(args.batch)]
    reference = embed(model, held_out)
    rows = []
    for budget in args.budgets:
        for name, config in recipes(budget).items():
            if args.recipes and name not in args.recipes:
                continue
            row = {"budget": budget, **evaluate(name, config, model, held_out, calibration, reference)}
            rows.append(row)
            print(f"budget {budget:.0%} {name:22s} params {row['params_fraction']:.3f} rewrites {row['rewrites']} "
                  f"cosine {row['cosine']:.4f} ({row['seconds']} s)", flush=True)
            # saved after every row: an interrupted run keeps what it measured
            save_result(args.out, {"length": args.length, "held_out_windows": len(held_out),
                                   "calibration_batches": len(calibration), "batch": args.batch, "distill_steps": 0,
                                   "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
