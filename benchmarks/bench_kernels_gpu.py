"""GPU benchmark of relinear's Triton kernels against the dense/softmax forms they replace.

Measures, on one CUDA device:
- causal linear attention (Triton chunked scan), forward and forward+backward, at B x H x T x D in bf16,
  against torch SDPA (flash backend, causal) and flash-linear-attention's chunk kernel when `fla` imports;
- Monarch (fused Triton kernel) against a cuBLAS dense layer at 4096 and 8192 features;
- block-sparse (BSR, Triton) against the dense layer at 90% and 95% block sparsity.
Writes benchmarks/results/kernels_gpu_<device>.json (device, versions, command, timings in ms) and a PNG
plot of attention time vs T when matplotlib imports.

    python benchmarks/bench_kernels_gpu.py                      # the full set (a few minutes on an H100)
    python benchmarks/bench_kernels_gpu.py --lengths 1024 4096 --skip dense
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from environment import command  # benchmarks/environment.py

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024 * 2**i for i in range(7)],
                        help="sequence lengths T for attention (default 1k..64k)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128, help="D of q/k/v; the feature dim F equals it")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--features", type=int, nargs="+", default=[4096, 8192],
                        help="square layer sizes for the Monarch and block-sparse comparisons")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per dense-layer call")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95])
    parser.add_argument("--block-size", type=int, default=64, help="BSR block size (16..64)")
    parser.add_argument("--skip", choices=["attention", "dense"], nargs="*", default=[],
                        help="leave out a group of benchmarks")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and PNG")
    return parser.parse_args(argv)


def bench_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds per call (Triton's do_bench: warm-up, L2 flush, CUDA-event timing)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def try_bench(fn: Callable[[], object]) -> float | str:
    """Time `fn`, or the reason it could not run (out of memory, missing kernel) as a string."""
    try:
        return bench_ms(fn)
    except (RuntimeError, torch.cuda.OutOfMemoryError, TypeError, ValueError) as error:
        torch.cuda.empty_cache()
        return f"skipped: {type(error).__name__}: {str(error).splitlines()[0][:160]}"


def forward_backward(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], None]:
    def step():
        out = forward()
        torch.autograd.grad(out, leaves, torch.ones_like(out))

    return step


def fla_chunk_linear_attention() -> Callable | None:
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except ImportError:
        return None
    return chunk_linear_attn


def attention_row(args: argparse.Namespace, dtype: torch.dtype, length: int, fla: Callable | None) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import relinear.kernels.linear_attention  # noqa: F401  (registers torch.ops.relinear.*)
    from relinear.kernels.linear_attention.triton import linear_attention_cuda, linear_attention_triton

    shape = (args.batch, args.heads, length, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    # positive features, as a feature map gives; F = D
    phi_q, phi_k = (torch.rand(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    linear = lambda: linear_attention_triton(phi_q, phi_k, v, None, True, args.chunk_size)
    softmax = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    row: dict = {"T": length}
    with torch.no_grad():
        row["linear_fwd_ms"] = try_bench(lambda: linear_attention_cuda(phi_q, phi_k, v, None, True,
                                                                       args.chunk_size))
    row["linear_fwd_bwd_ms"] = try_bench(forward_backward(linear, [phi_q, phi_k, v]))
    # elu + 1 computed inside the kernels from q, k: what LinearizedAttention(feature_map="elu") runs
    mapped = lambda: torch.ops.relinear.mapped_linear_attention(q, k, v, None, True, args.chunk_size, "elu",
                                                                 args.head_dim**-0.5)
    with torch.no_grad():
        row["linear_elu_fused_fwd_ms"] = try_bench(mapped)
    row["linear_elu_fused_fwd_bwd_ms"] = try_bench(forward_backward(mapped, [q, k, v]))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        with torch.no_grad():
            row["sdpa_flash_fwd_ms"] = try_bench(softmax)
        row["sdpa_flash_fwd_bwd_ms"] = try_bench(forward_backward(softmax, [q, k, v]))
    if fla is not None:
        # fla takes [B, T, H, D]; normalize=True gives the same normalized attention as relinear's op
        fq, fk, fv = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (phi_q, phi_k, v))
        fla_call = lambda: fla(fq, fk, fv, scale=1.0, normalize=True)[0]
        with torch.no_grad():
            row["fla_chunk_fwd_ms"] = try_bench(fla_call)
        row["fla_chunk_fwd_bwd_ms"] = try_bench(forward_backward(fla_call, [fq, fk, fv]))
    return row


def bench_attention(args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    fla = fla_chunk_linear_attention()
    rows = []
    for length in args.lengths:
        rows.append(attention_row(args, dtype, length, fla))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    return rows


@torch.no_grad()
def dense_rows(args: argparse.Namespace, dtype: torch.dtype, features: int) -> list[dict]:
    from relinear.approx.monarch import monarch_grid
    from relinear.kernels.block_sparse.reference import block_sparse_from_dense
    from relinear.kernels.block_sparse.triton import block_sparse_linear_cuda
    from relinear.kernels.monarch.triton import monarch_linear_cuda

    x = torch.randn(args.tokens, features, device="cuda", dtype=dtype)
    weight = torch.randn(features, features, device="cuda", dtype=dtype) / math.sqrt(features)
    common = {"features": features, "tokens": args.tokens, "dense_ms": try_bench(lambda: F.linear(x, weight))}
    nblocks = round(math.sqrt(features))
    grid = monarch_grid(features, features, nblocks)
    blocks1 = torch.randn(grid.core1_shape, device="cuda", dtype=dtype)
    blocks2 = torch.randn(grid.core2_shape, device="cuda", dtype=dtype)
    rows = [{"kind": "monarch", **common, "nblocks": nblocks,
             "kernel_ms": try_bench(lambda: monarch_linear_cuda(x, blocks1, blocks2, None, features))}]
    for sparsity in args.sparsities:
        bsr = block_sparse_from_dense(weight, args.block_size, sparsity)
        launch = functools.partial(block_sparse_linear_cuda, x, *bsr, None, features, args.block_size)
        rows.append({"kind": "block_sparse", **common, "sparsity": sparsity, "block_size": args.block_size,
                     "kernel_ms": try_bench(launch)})
    return rows


def bench_dense_replacements(args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    rows = []
    for features in args.features:
        for row in dense_rows(args, dtype, features):
            print(json.dumps(row), flush=True)
            rows.append(row)
        torch.cuda.empty_cache()
    return rows


def plot_attention(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({k for row in rows for k in row if k.endswith("_ms")}):
        points = [(row["T"], row[key]) for row in rows if isinstance(row.get(key), float)]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=key.removesuffix("_ms"))
    ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel="ms per call",
           title="causal attention: relinear Triton linear attention vs softmax (SDPA flash)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels_gpu: no CUDA device is available; this benchmark times the Triton kernels on a "
              "GPU only (the CPU tests cover their correctness).", file=sys.stderr)
        return 2
    import triton

    dtype = DTYPES[args.dtype]
    device_name = torch.cuda.get_device_name()
    report = {
        "device": device_name,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "command": command(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "attention": [] if "attention" in args.skip else bench_attention(args, dtype),
        "dense": [] if "dense" in args.skip else bench_dense_replacements(args, dtype),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "kernels_gpu_" + "".join(c if c.isalnum() else "_" for c in device_name).strip("_").lower()
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=2))
    print(f"wrote {json_path}")
    if report["attention"] and plot_attention(report["attention"], args.out / f"{stem}_attention.png"):
        print(f"wrote {args.out / f'{stem}_attention.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
