"""The bench's results as files: report.md (tables from the very numbers in results.json) and PNG plots,
written into a temporary folder beside the target and moved into place whole, so a failed run leaves the
previous report as it was."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

PLOTS = {"pareto": "pareto.png", "sequence": "sequence.png", "per_layer_error": "per_layer_error.png"}


def number(x: float) -> str:
    """Four significant digits: what every table shows of a measured value."""
    return f"{x:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both speed-up and cosine, by speed-up."""
    front = [i for i, (s, c) in enumerate(points)
             if not any(s2 >= s and c2 >= c and (s2, c2) != (s, c) for s2, c2 in points)]
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    qs = results["quality_speed"]
    fig, axes = plt.subplots(1, len(qs["speed_lengths"]), figsize=(11, 4.5), squeeze=False)
    for ax, length in zip(axes[0], qs["speed_lengths"], strict=True):
        points = [(row["speedup"][str(length)], row["cosine"]) for row in qs["rows"]]
        for row, (s, c) in zip(qs["rows"], points, strict=True):
            ax.scatter(s, c)
            ax.annotate(row["recipe"], (s, c), fontsize=7, xytext=(4, 4), textcoords="offset points")
        front = _pareto_front(points)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "k--", lw=0.8, label="Pareto front")
        ax.axvline(1.0, color="grey", lw=0.5)
        ax.set(xlabel=f"speed-up over the original at {length} tokens (x)",
               ylabel="held-out embedding cosine", title=f"MiniLM, {length} tokens")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sequence(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    seq = results["sequence"]
    panels = [("prefill", "length", "ms", "prefill time (ms)"), ("prefill", "length", "peak_bytes", "prefill peak "
              "tensor memory (bytes)"), ("decode", "context", "ms_per_token", "decode time per token (ms)"),
              ("decode", "context", "cache_bytes", "KV cache / recurrent state (bytes)")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (part, x, y, label) in zip(axes.flat, panels, strict=True):
        for variant in dict.fromkeys(r["variant"] for r in seq[part]):
            rows = [r for r in seq[part] if r["variant"] == variant]
            ax.plot([r[x] for r in rows], [r[y] for r in rows], marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set(yscale="log", xlabel=f"{x} (tokens)", ylabel=label)
        ax.legend(fontsize=8)
    fig.suptitle(f"{seq['model']['family']}, {seq['model']['num_hidden_layers']} layers, hidden "
                 f"{seq['model']['hidden_size']}, batch 1, fp32")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_layer_error(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    errors = results["quality_speed"]["per_layer_error"]
    series = {(recipe, rule): [s for s in sites if s["rule"] == rule]
              for recipe, sites in errors.items() for rule in dict.fromkeys(s["rule"] for s in sites)}
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(1, len(series))
    for k, ((recipe, rule), sites) in enumerate(series.items()):
        ax.bar([s["layer"] + k * width for s in sites], [s["error"] for s in sites], width, label=f"{recipe}: {rule}")
    ax.set(xlabel="layer", ylabel="relative output error of the site", title="per-site error of each rewrite "
           "(MiniLM, rewrite report, example windows)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict) -> str:
    qs, seq, env = results["quality_speed"], results["sequence"], results["machine"]
    short, long = qs["speed_lengths"]
    calibrated = (f"after {qs['calibrate_steps']} steps of attention transfer (`rl.calibrate`) on training "
                  "windows from other modules" if qs["calibrate_steps"] else
                  "**without calibration** (the feature maps as initialized; `--calibrate-steps N` runs attention "
                  "transfer first)")
    quality = _table(
        ["recipe", "held-out cosine", f"original ms @{short}", f"rewritten ms @{short}", f"speed-up @{short}",
         f"original ms @{long}", f"rewritten ms @{long}", f"speed-up @{long}"],
        [[row["recipe"], number(row["cosine"])]
         + [number(v) for length in (short, long) for v in (row["ms"][str(length)]["original"],
                                                            row["ms"][str(length)]["rewritten"],
                                                            row["speedup"][str(length)])]
         for row in qs["rows"]])
    errors = _table(["recipe", "rule", "layer", "where", "relative error"],
                    [[recipe, s["rule"], str(s["layer"]), f"`{s['where']}`", number(s["error"])]
                     for recipe, sites in qs["per_layer_error"].items() for s in sites])
    prefill = _table(["length", "variant", "ms", "peak bytes"],
                     [[str(r["length"]), r["variant"], number(r["ms"]), str(r["peak_bytes"])] for r in seq["prefill"]])
    decode = _table(["context", "variant", "ms per token", "cache / state bytes"],
                    [[str(r["context"]), r["variant"], number(r["ms_per_token"]), str(r["cache_bytes"])]
                     for r in seq["decode"]])
    machine = _table(["what", "value"], [[k, str(v)] for k, v in env.items()])
    model = ", ".join(f"{k} {v}" for k, v in seq["model"].items() if k != "family")
    took = (f"This run took {number(results['run_seconds']['wall'])} s wall clock and "
            f"{number(results['run_seconds']['cpu'])} s of CPU time (this process, all threads), with "
            f"{env['threads']} torch thread(s) on {env['cores']} cores whose load average was "
            f"{env['load_average_at_start'][0]} when it started: other processes slowed it, both sides of every "
            "ratio alike.")
    return f"""# relinear bench

Regenerate with:

```
{results['command']}
```

{took}

Every number below is in `results.json` beside this file; the tables are printed from it. Times are wall
milliseconds on the machine below, fp32, batch 1, inference mode. A speed-up is the ratio of the fastest of
{results['sizes']['rounds']} samples of the original and of the rewrite, all recipes and the original taken in
turn in one run (a loaded machine slows both sides alike). Every rewrite keeps every site (`min_speedup=0`):
the speed-up is the recipe's.

## Quality against speed (MiniLM)

Held-out cosine: mean cosine between the original and the rewritten sentence embeddings of all-MiniLM-L6-v2
(real weights) on {qs['held_out_windows']} held-out {qs['quality_length']}-token windows of English text
(`relinear.text`: standard-library docstrings), {calibrated}.

Speed at {short} tokens: the real model. At {long} tokens: MiniLM's architecture with {long} positions and random
weights (the real model stops at 512 positions; time does not depend on the weights).

![quality against speed](pareto.png)

{quality}

## Time and memory against sequence length (decoder)

A random-config Llama ({model}): the original (softmax attention, SDPA, transformers' KV cache), `linear`
(hedgehog linear attention) and `hybrid` (hedgehog + a window of the 64 most recent keys + 1 sink). Prefill:
fastest of {results['sizes']['rounds']} interleaved samples; peak bytes of live tensors during one prefill
(weights included; torch's MemTracker). Decode: median ms per token over {seq['decode_steps']} steps taken in
turn after one warm-up step each (`rl.RecurrentDecoder` for the rewrites); bytes held by the KV cache or the
recurrent state after them.

![time and memory against sequence length](sequence.png)

{prefill}

{decode}

## Per-layer error (rewrite report)

The relative output error of every rewritten site of MiniLM, as the rewrite report measures it on the
rewrite's example (two of the held-out windows), before any calibration.

![per-layer error](per_layer_error.png)

{errors}

## Machine

{machine}
"""


def write_report(results: dict, out: Path, plots: dict[str, Callable[[dict, Path], None]] | None = None) -> None:
    """results.json, report.md and the plots into `out`, all or none: built in a temporary folder beside it,
    then swapped in (an earlier report in `out` is replaced whole, and kept if anything fails)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    if plots is None:
        plots = {"pareto": plot_pareto, "sequence": plot_sequence, "per_layer_error": plot_per_layer_error}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        (partial / "results.json").write_text(json.dumps(results, indent=1))
        (partial / "report.md").write_text(markdown(results))
        for name, draw in plots.items():
            draw(results, partial / PLOTS[name])
        previous = out.with_name(f".{out.name}.previous") if out.exists() else None
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
            out.rename(previous)
        partial.rename(out)
        if previous is not None:
            shutil.rmtree(previous)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
