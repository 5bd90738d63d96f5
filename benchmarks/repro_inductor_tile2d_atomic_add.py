"""Standalone repro (torch only, no relinear) of the Inductor CPU bug behind relinear's wrong input gradients
under the compile backend with more than one thread.

Inductor's CPU code generator tiles a transposed read into 16 x 16 blocks (`transpose_mxn`). When the store is
an accumulating scatter (`index_put(..., accumulate=True)`, which is also how the gradient of `unfold` is
computed) and the kernel runs on more than one thread, the store goes through `atomic_add_vec` and the tile's
inner offset is applied twice: row `r` of the tile is written to row `2 r`. On one thread a plain store is
generated instead, and the result is right. Seen on torch 2.13.0 (CPU wheel). Reported upstream as
pytorch/pytorch issue 191837 (pull request 191861 applies the offset once).

Case `index_put`: the scatter lands inside its buffer, so the result is silently wrong. Case `unfold backward`:
the gradient of a chunked `unfold` writes past its buffer (heap corruption: a crash, or silently wrong). Each
case runs in its own process, so a crash is reported rather than fatal.

relinear avoids the path: each custom op's backward is one opaque op (`relinear::<name>_backward`,
relinear/kernels/_library.py) that Inductor calls instead of compiling the torch form's decomposed backward.

    python benchmarks/repro_inductor_tile2d_atomic_add.py     # prints one line per case and thread count
"""

from __future__ import annotations

import subprocess
import sys

import torch


def index_put_case() -> float:
    def scatter(x):
        # 32 rows of 16 read from a transposed [16, 32] tile, accumulated into the first 32 of 64 rows
        return torch.ops.aten.index_put(torch.zeros(4, 64, 16), [None, torch.arange(32)], x.transpose(1, 2), True)

    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(0))
    return (torch.compile(scatter)(x) - scatter(x)).abs().max().item()


def unfold_backward_case() -> float:
    def chunked(x, y):
        return x.unfold(-2, 32, 32) @ y  # chunks of 32 rows, rows last: [4, 1, 16, 32]

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, 16, generator=g, requires_grad=True)
    y, grad = torch.randn(4, 1, 32, 32, generator=g), torch.randn(4, 1, 16, 32, generator=g)
    want, = torch.autograd.grad(chunked(x, y), x, grad)
    got, = torch.autograd.grad(torch.compile(chunked)(x, y), x, grad)
    return (got - want).abs().max().item()


CASES = {"index_put": index_put_case, "unfold_backward": unfold_backward_case}


def main() -> None:
    if len(sys.argv) == 3:  # a child: one case at one thread count
        torch.set_num_threads(int(sys.argv[2]))
        print(f"{CASES[sys.argv[1]]():.3g}")
        return
    print(f"torch {torch.__version__}: max abs difference, torch.compile vs eager")
    for case in CASES:
        for threads in (1, 2):
            run = subprocess.run([sys.executable, __file__, case, str(threads)], capture_output=True, text=True)
            result = run.stdout.strip() if run.returncode == 0 else f"crashed (exit code {run.returncode})"
            print(f"  {case:16s} {threads} thread(s): {result}")


if __name__ == "__main__":
    main()
