"""Which sites of MiniLM (real weights) a recipe rewrites once every site is timed, and what each one measured.

`rl.rewrite` times every matched site and its replacement on the example inputs (median of repeats) and leaves
alone a site that is not `--min-speedup` times faster; this prints the report (time per site, totals, the
sites left alone with their times) and saves it with the machine and versions. No timing cache is read or
written: every time is measured in this run. Site times on a loaded machine are noisy; the decisions are
only as good as they are.

    python benchmarks/site_timing.py [--tokens 128] [--batch 8] [--min-speedup 1.0] [--threads 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from environment import save_result  # benchmarks/environment.py

import relinear as rl
from relinear.demo import load_minilm
from relinear.rewrite import timing

RESULTS = Path(__file__).parent / "results" / "site_timing_minilm.json"
RECIPES = {  # the demo's recipe, and the structured one the speed issue measured
    "demo": [rl.LinearAttention(feature_map="hedgehog", window=32, sinks=1), rl.ActivationApprox(target="tanh"),
             rl.Monarch(nblocks="auto", max_error=0.2, where="*intermediate*")],
    "elu+monarch8": [rl.LinearAttention(feature_map="elu"), rl.Monarch(nblocks=8)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--min-speedup", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_minilm()
    ids = torch.randint(1000, 20000, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    example = (ids, torch.ones_like(ids))
    rows = []
    for name in args.recipes:
        with timing.settings(measure=True, min_speedup=args.min_speedup, cache=None):
            _, report = rl.rewrite(model, example, rl.Recipe(RECIPES[name]), progress=False)
        print(f"recipe {name}")
        print(report)
        rows.append({"recipe": name, "counts": report.counts, "time_before_s": report.time_before,
                     "time_after_s": report.time_after, "report": report.to_dict()})
    save_result(args.out, {"tokens": args.tokens, "batch": args.batch, "min_speedup": args.min_speedup,
                           "timing_versions": timing.versions(), "rows": rows})


if __name__ == "__main__":
    main()
