"""What the opaque backward op costs a compiled training step of the hybrid attention on CPU.

Each relinear op's gradient is one op, `relinear::<name>_backward`, that Inductor calls: autograd through the
op's torch form, run eagerly (relinear/kernels/_library.py). Before, AOTAutograd traced that backward into the
graph and Inductor compiled it, which torch 2.13 miscompiles on more than one thread
(benchmarks/repro_inductor_tile2d_atomic_add.py). This times, for `relinear::hybrid_attention` at a BERT-size
call (bidirectional, window 64, chunk 32, hedgehog features), a forward + backward step:
- `eager`: the op in eager torch;
- `compiled`: torch.compile of the op (its backward the opaque op);
- `compiled, traced backward`: torch.compile of the same torch form registered the old way, its backward
  differentiated at the autograd level so that AOTAutograd traces it (wrong gradients on more than one thread:
  the figure is a speed, and the script reports the gradient error it saw).
Samples are interleaved, the fastest of each kept; also the first call's seconds (compilation). Saves
benchmarks/results/backward_op_cpu_<threads>threads.json.

    python benchmarks/backward_op_cpu.py [--length 512] [--heads 12] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from environment import save_result  # benchmarks/environment.py

import relinear.kernels.linear_attention  # noqa: F401  (registers the ops)
from relinear.bench.measure import interleaved_ms
from relinear.kernels.linear_attention.banded import hybrid_attention_cpu

RESULTS = Path(__file__).parent / "results"
HYBRID = torch.ops.relinear.hybrid_attention.default
WINDOW, CHUNK = 64, 32


def traced_backward_op():
    """`hybrid_attention_cpu` as an op whose backward autograd runs at its own level, differentiating the torch
    form: the registration relinear had before the backward op, which AOTAutograd traces into the graph."""
    schema = HYBRID._schema
    op = torch.library.custom_op("relinear_bench::hybrid_attention_traced_backward", hybrid_attention_cpu,
                                 mutates_args=(), schema=str(schema)[len(schema.name):])
    op.register_fake(lambda q, k, v, *rest: v.new_empty(*q.shape[:-1], v.shape[-1]))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:6])
        ctx.rest = inputs[6:]

    def backward(ctx, grad):
        leaves = [t.detach().requires_grad_(True) for t in ctx.saved_tensors]
        with torch.enable_grad():
            grads = torch.autograd.grad(hybrid_attention_cpu(*leaves, *ctx.rest), leaves, grad)
        return (*grads, *([None] * len(ctx.rest)))

    op.register_autograd(backward, setup_context=setup_context)
    return op


def inputs(heads: int, length: int, dim: int = 32):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, dim, generator=g) for _ in range(3))
    phi_q, phi_k = (torch.rand(1, heads, length, 2 * dim, generator=g) for _ in range(2))
    gate = torch.randn(heads, generator=g)
    tensors = [t.requires_grad_(True) for t in (q, k, v, phi_q, phi_k, gate)]
    return tensors, torch.randn(1, heads, length, dim, generator=g)


def step(op, tensors, grad_out):
    """Forward + backward; returns the gradients."""
    out = op(*tensors, None, False, WINDOW, tensors[0].shape[-1] ** -0.5, CHUNK)
    return torch.autograd.grad(out, tensors, grad_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tensors, grad_out = inputs(args.heads, args.length)
    variants = {"eager": HYBRID, "compiled": torch.compile(HYBRID, dynamic=False),
                "compiled, traced backward": torch.compile(traced_backward_op(), dynamic=False)}
    reference = step(HYBRID, tensors, grad_out)
    first_call_s, gradient_error = {}, {}
    for name, op in variants.items():
        start = time.perf_counter()
        grads = step(op, tensors, grad_out)
        first_call_s[name] = time.perf_counter() - start
        gradient_error[name] = max((g - r).abs().max().item() for g, r in zip(grads, reference, strict=True))
    samples = interleaved_ms({name: (lambda op=op: step(op, tensors, grad_out)) for name, op in variants.items()},
                             args.rounds)
    best = {name: min(s) for name, s in samples.items()}
    for name in variants:
        print(f"{name:26s} step {best[name]:8.1f} ms  first call {first_call_s[name]:6.1f} s  "
              f"max gradient error vs eager {gradient_error[name]:.2g}")
    ratio = best["compiled, traced backward"] / best["compiled"]
    print(f"traced backward / opaque backward step time: {ratio:.2f}")
    shape = {"batch": 1, "heads": args.heads, "length": args.length, "dim": 32, "features": 64, "window": WINDOW,
             "chunk": CHUNK, "causal": False}
    save_result(RESULTS / f"backward_op_cpu_{args.threads}threads.json",
                {"shape": shape, "rounds": args.rounds, "best_ms": best, "samples_ms": samples,
                 "first_call_s": first_call_s, "max_gradient_error_vs_eager": gradient_error,
                 "traced_over_opaque": ratio})


if __name__ == "__main__":
    main()
