"""`relinear bench`: quality against speed of named recipes on MiniLM, time and memory against sequence length
of a rewritten decoder, and per-layer errors, written as a markdown report with PNG plots and the JSON of
every number in it. `--quick` runs tiny sizes in seconds (the smoke test's mode)."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path("docs") / "report"


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="measure recipes and write a report with plots (docs/report/)")
    bench.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report folder (default {DEFAULT_OUT})")
    bench.add_argument("--quick", action="store_true", help="tiny sizes: seconds, for smoke tests")
    bench.add_argument("--calibrate-steps", type=int, default=0, metavar="N",
                       help="attention-transfer steps before measuring quality (default 0: none)")
    bench.set_defaults(run=run)


def command(args: argparse.Namespace) -> str:
    """The command that regenerates this report, as typed from the repository root."""
    words = ["relinear", "bench", "--out", str(args.out)]
    words += ["--quick"] if args.quick else []
    words += ["--calibrate-steps", str(args.calibrate_steps)] if args.calibrate_steps else []
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    if args.calibrate_steps < 0:
        print(f"relinear: error: --calibrate-steps must be >= 0, got {args.calibrate_steps}", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401  (checked first: the plots come after minutes of measuring)
    except ImportError:
        print("relinear: error: the report's plots need matplotlib: pip install 'relinear[bench]'", file=sys.stderr)
        return 2
    import torch

    from relinear.bench.environment import machine
    from relinear.bench.report import write_report
    from relinear.bench.suite import FULL, QUICK, run_all
    from relinear.demo import DemoUnavailable

    torch.manual_seed(0)
    started, cpu_started = time.perf_counter(), time.process_time()
    results = {"command": command(args), "machine": machine()}
    try:
        results |= run_all(QUICK if args.quick else FULL, args.calibrate_steps)
    except DemoUnavailable as e:  # the bundled MiniLM is missing
        print(f"relinear: error: {e}", file=sys.stderr)
        return 2
    results["run_seconds"] = {"wall": time.perf_counter() - started, "cpu": time.process_time() - cpu_started}
    write_report(results, args.out)
    print(f"wrote {args.out / 'report.md'}")
    return 0
