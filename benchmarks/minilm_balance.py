"""Why the window hybrid weighs its linear part per query: on MiniLM after attention transfer with one gate per
head (`balance=False`), how much the linear part's ideal weight varies from query to query, and how much of
that a per-head fit on (window max, log window sum, log linear sum) -- what `balance=True` learns -- explains.

The hybrid's output is (A_i + f N_i) / (W_i + f L_i): A, W the window's softmax sums relative to the window max
m_i, N, L the linear part's. Exact attention would put sum_{j outside} exp(s_ij - m_i) where the linear part
puts L_i, so the ideal factor is c_i = that sum / L_i. Per layer this prints the spread of log c_i within a head,
the spread left after a least-squares fit per head, and the layer's relative output error with the learned
gate, with the fitted factor and with c_i itself (each layer fed the original model's activations).

    python benchmarks/minilm_balance.py [--steps 200] [--length 256] [--eval 8]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from environment import save_result  # benchmarks/environment.py

import relinear as rl
from relinear.calibrate import attention_call, attention_layers, forward_hooks, softmax_attention
from relinear.demo import load_minilm
from relinear.kernels.linear_attention.reference import exact_keys
from relinear.rewrite.report import relative_error
from relinear.text import train_and_held_out


def layer_statistics(module, q, k, v, scale) -> dict:
    """Spread of log c_i and the output errors of one bidirectional, unpadded hybrid layer."""
    target = softmax_attention(q, k, v, None, False, scale)
    length = q.shape[-2]
    near = exact_keys(None, False, module.window, module.sinks, length, length, q.device)[0]  # [1, T, T]
    scores = scale * q @ k.mT
    top = scores.masked_fill(~near, -math.inf).amax(-1, keepdim=True)
    weights = torch.exp(scores - top)
    window, outside = weights * near, weights * ~near
    root = math.sqrt(scale)
    linear = (module.feature_map_q.of_scaled(q, root) @ module.feature_map_k.of_scaled(k, root).mT) * ~near
    window_sum, linear_sum = window.sum(-1), linear.sum(-1)
    ideal = torch.log(outside.sum(-1) / linear_sum)  # log c_i, [B, H, T]
    features = torch.stack([torch.ones_like(top[..., 0]), top[..., 0], window_sum.log(), linear_sum.log()], -1)
    by_head = features.transpose(0, 1).flatten(1, 2).double()  # [H, B*T, 4]
    fit = torch.linalg.lstsq(by_head, ideal.transpose(0, 1).flatten(1).double()[..., None]).solution
    fitted = (by_head @ fit).view(ideal.shape[1], ideal.shape[0], -1).transpose(0, 1).float()

    def output(factor):  # factor [B, H, T]
        mixed = window + factor[..., None] * linear
        return mixed @ v / mixed.sum(-1, keepdim=True)

    gate = torch.sigmoid(module.window_gate)[None, :, None].expand_as(ideal)
    centred = ideal - ideal.mean((0, 2), keepdim=True)
    return {"log_factor_std": float(centred.std()), "log_factor_std_after_fit": float((fitted - ideal).std()),
            "error_gate": relative_error(output(gate), target),
            "error_fitted": relative_error(output(fitted.exp()), target),
            "error_ideal": relative_error(output(ideal.exp()), target)}


def main() -> int:
    # a quality benchmark: every site is rewritten, however fast (relinear.rewrite.timing)
    os.environ.setdefault("RELINEAR_TIMING", "off")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="attention-transfer steps before measuring")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--eval", type=int, default=8, help="held-out windows measured")
    ap.add_argument("--out", default="benchmarks/results/minilm_balance.json")
    args = ap.parse_args()
    if args.length < 2 * args.window:
        ap.error(f"--length must be at least twice --window (every query needs keys outside its window), got "
                 f"{args.length} and {args.window}")
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    train_windows, held_out_windows = train_and_held_out(tokenizer, args.length)
    held_out = torch.tensor(held_out_windows[:: max(1, len(held_out_windows) // args.eval)][: args.eval])
    batches = [(b, torch.ones_like(b)) for b in torch.tensor(train_windows).split(4)]
    rule = rl.LinearAttention(feature_map="hedgehog", window=args.window, balance=False)
    fast, _ = rl.rewrite(model, (held_out[:2], torch.ones_like(held_out[:2])), rl.Recipe([rule]), progress=False)
    rl.calibrate(fast, batches=batches, steps=args.steps, lr=1e-2, progress=False)
    layers = attention_layers(fast)
    rows = [None] * len(layers)

    def measure(module, call_args, kwargs, output):
        call = attention_call(module, call_args, kwargs)
        scale = call["scale"] or call["q"].shape[-1] ** -0.5
        with torch.no_grad():
            rows[layers.index(module)] = layer_statistics(module, call["q"], call["k"], call["v"], scale)
            return softmax_attention(call["q"], call["k"], call["v"], None, False, scale)  # the original's input

    with forward_hooks(layers, measure), torch.no_grad():
        fast(held_out, torch.ones_like(held_out))
    print("layer  std(log c)  after fit  error: gate   fitted   ideal c")
    for index, row in enumerate(rows):
        print(f"{index:5d}  {row['log_factor_std']:10.2f}  {row['log_factor_std_after_fit']:9.2f}  "
              f"{row['error_gate']:11.4f}  {row['error_fitted']:7.4f}  {row['error_ideal']:7.4f}")
    save_result(args.out, {"length": args.length, "window": args.window, "steps": args.steps,
                           "held_out_windows": len(held_out), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
