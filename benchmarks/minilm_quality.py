"""Quality of linearized MiniLM on real English: mean cosine between the original and the rewritten sentence
embeddings on held-out 256-token windows, before and after calibration (attention transfer).

    python benchmarks/minilm_quality.py [--steps 200] [--length 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from environment import run_info  # benchmarks/environment.py

import relinear as rl
from relinear.calibrate import attention_layers
from relinear.demo import load_minilm, mean_pool
from relinear.text import token_windows

RECIPES = {
    "hedgehog+window64": rl.LinearAttention(feature_map="hedgehog", window=64),
    "hedgehog": rl.LinearAttention(feature_map="hedgehog"),
    "elu": rl.LinearAttention(feature_map="elu"),
}


def embed(model, ids):
    mask = torch.ones_like(ids)
    with torch.no_grad():
        return mean_pool(model(ids, mask).last_hidden_state, mask)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--eval", type=int, default=16, help="held-out windows")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES))
    ap.add_argument("--out", default="benchmarks/results/minilm_quality.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    windows = torch.tensor(token_windows(tokenizer, args.length))
    held_out, train = windows[: args.eval], windows[args.eval:]
    batches = [(b, torch.ones_like(b)) for b in train.split(args.batch)]
    reference = embed(model, held_out)
    rows = []
    for name in args.recipes:
        start = time.perf_counter()
        example = (held_out[:2], torch.ones_like(held_out[:2]))
        fast, report = rl.rewrite(model, example, rl.Recipe([RECIPES[name]]), progress=False)
        before = float((embed(fast, held_out) * reference).sum(-1).mean())
        learnable = any(layer.trainable_parameters() for layer in attention_layers(fast))
        history = rl.calibrate(fast, teacher=model, batches=batches, steps=args.steps, lr=args.lr) if learnable \
            else [float("nan")]  # nothing to train: the feature map is fixed and there is no window gate
        after = float((embed(fast, held_out) * reference).sum(-1).mean())
        rows.append({"recipe": name, "rewrites": report.counts.get("linear_attention", 0), "cosine_before": before,
                     "cosine_after": after, "loss_first": history[0], "loss_last": history[-1],
                     "seconds": round(time.perf_counter() - start, 1)})
        print(f"{name:20s} rewrites={rows[-1]['rewrites']} cosine before={before:.4f} after={after:.4f} "
              f"(attention-transfer loss {history[0]:.3e} -> {history[-1]:.3e}, {rows[-1]['seconds']} s)", flush=True)
    result = {**run_info(), "length": args.length, "steps": args.steps,
              "lr": args.lr, "held_out_windows": args.eval, "train_windows": len(train), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
