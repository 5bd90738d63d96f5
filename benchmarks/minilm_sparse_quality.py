"""Quality of sparse and structured MiniLM MLPs on real English, for the same parameter budget: the mean cosine
between the original and the rewritten sentence embeddings on held-out windows (standard-library docstrings no
calibration batch contains), with every MLP weight (intermediate 384 -> 1536 and output 1536 -> 384, 12 layers)
replaced at 50% and at 25% of its dense parameters. Two columns: the rewrite alone, fitted with the
calibration batches (Wanda's input norms, whitened low rank's input covariance), and the same rewrite after
`rl.calibrate` distillation over those batches (`--distill-steps`, 0 for none): the masks fixed, the kept weights
(and low-rank factors, Monarch blocks, biases) trained to match the original's last hidden states.

Forms whose size is not continuous (2:4 is 50% only, Monarch's parameter count jumps with nblocks) take the
largest setting within the budget; each row records the parameter fraction it really keeps.

    python benchmarks/minilm_sparse_quality.py [--length 128] [--eval 16] [--calibration 8] [--batch 4]
        [--distill-steps 30] [--distill-lr 1e-4]
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


def evaluate(name, config, model, held_out, calibration, reference, distill: dict) -> dict:
    start = time.perf_counter()
    rules = [dataclasses.replace(config, where=where) for where in MLP]
    example = (held_out[:2], torch.ones_like(held_out[:2]))
    with timing.settings(measure=False):  # quality only: no site is timed or left alone for speed
        fast, report = rl.rewrite(model, example, rl.Recipe(rules), calibration=calibration, progress=False)
    dense = sum(s.params_before for s in report.sites)
    row = {"recipe": name, "config": config.to_dict(), "rewrites": len(report.sites),
           "skipped": len(report.skipped), "params_fraction": sum(s.params_after for s in report.sites) / dense,
           "cosine": cosine(fast, held_out, reference)}
    if distill["steps"]:
        losses = rl.calibrate(fast, teacher=model, batches=calibration, distill_steps=distill["steps"],
                              tune_lr=distill["lr"], schedule=distill["schedule"], progress=False)
        row |= {"cosine_distilled": cosine(fast, held_out, reference), "distill_loss_first": losses[0],
                "distill_loss_last": losses[-1]}
    return row | {"seconds": round(time.perf_counter() - start, 1)}


def cosine(model, held_out, reference) -> float:
    return float((embed(model, held_out) * reference).sum(-1).mean())


def goals(rows: list[dict], column: str) -> dict[str, bool]:
    """Issue 25's goals in one column: Wanda >= magnitude for each pruning form, whitened >= plain low rank, at
    every budget measured."""
    cosines = {(r["budget"], r["recipe"]): r[column] for r in rows if column in r}
    pairs = {f"{form} wanda >= magnitude": (f"{form} wanda", f"{form} magnitude")
             for form in ("2:4", "block-sparse", "unstructured")}
    pairs["low-rank whitened >= plain"] = ("low-rank whitened", "low-rank plain")
    found = {}
    for budget in sorted({b for b, _ in cosines}, reverse=True):
        for goal, (better, worse) in pairs.items():
            if (budget, better) in cosines and (budget, worse) in cosines:
                found[f"{budget:.0%} {goal}"] = cosines[budget, better] >= cosines[budget, worse]
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--eval", type=int, default=16, help="held-out windows")
    ap.add_argument("--calibration", type=int, default=8, help="calibration batches")
    ap.add_argument("--batch", type=int, default=4, help="windows per calibration batch")
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.5, 0.25])
    ap.add_argument("--recipes", nargs="*", default=None, help="names to run (default: all)")
    ap.add_argument("--distill-steps", type=int, default=30, help="rl.calibrate distillation steps (0: none)")
    ap.add_argument("--distill-lr", type=float, default=1e-4, help="its learning rate (tune_lr)")
    ap.add_argument("--schedule", default="cosine", help="its learning-rate schedule")
    ap.add_argument("--out", default="benchmarks/results/minilm_sparse_quality_distilled.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    train_windows, held_out_windows = train_and_held_out(tokenizer, args.length)
    train = torch.tensor(train_windows[: args.calibration * args.batch])
    held_out = torch.tensor(held_out_windows[:: max(1, len(held_out_windows) // args.eval)][: args.eval])
    calibration = [(b, torch.ones_like(b)) for b in train.split(args.batch)]
    reference = embed(model, held_out)
    distill = {"steps": args.distill_steps, "lr": args.distill_lr, "schedule": args.schedule}
    rows = []
    for budget in args.budgets:
        for name, config in recipes(budget).items():
            if args.recipes and name not in args.recipes:
                continue
            row = {"budget": budget, **evaluate(name, config, model, held_out, calibration, reference, distill)}
            rows.append(row)
            after = f" -> {row['cosine_distilled']:.4f} distilled" if "cosine_distilled" in row else ""
            print(f"budget {budget:.0%} {name:22s} params {row['params_fraction']:.3f} rewrites {row['rewrites']} "
                  f"cosine {row['cosine']:.4f}{after} ({row['seconds']} s)", flush=True)
            # saved after every row: an interrupted run keeps what it measured
            save_result(args.out, {"length": args.length, "held_out_windows": len(held_out),
                                   "calibration_batches": len(calibration), "batch": args.batch,
                                   "distill_steps": args.distill_steps, "distill_lr": args.distill_lr,
                                   "distill_schedule": args.schedule, "distill_loss": "MSE of last_hidden_state",
                                   "goals_before": goals(rows, "cosine"),
                                   "goals_distilled": goals(rows, "cosine_distilled"), "rows": rows})
    for column in ("cosine", "cosine_distilled"):
        for goal, met in goals(rows, column).items():
            print(f"{column:16s} {goal}: {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
