"""Coverage table: which attention and dense layers relinear finds, and whether each rewrite is exact at its
exact limit, on random-config transformers models and hand-written attention styles.

    python benchmarks/coverage.py                # every row -> docs/coverage.md, benchmarks/results/coverage.json
    python benchmarks/coverage.py --rows bert timm  # some rows, printed only (--json to keep them)
    python benchmarks/coverage.py --merge a.json b.json  # the table of parts run side by side

Per row: the model's attention modules; the attention sites the rule found (rewritten / left alone with the
reason); the relative error of the rewritten model on the real rows with a window covering every key and full-rank
dense factors (exact up to float error), at the traced length and at a second length and padding; the dense
layers found vs the model's nn.Linear / Conv1D; the torch.compile backend at both lengths; to_onnx in ONNX Runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import relinear as rl  # noqa: E402
from benchmarks.environment import save_result  # noqa: E402
from relinear.rewrite import timing  # noqa: E402
from tests import attention_styles as styles  # noqa: E402
from tests.model_zoo import ARCHITECTURES, arch_inputs, build_arch  # noqa: E402

EXACT = 1e-4  # relative error below this counts as exact (float32 through a different summation order)
LENGTHS = ((12, (12, 9)), (16, (16, 11)))  # (T, real lengths): traced at the first, called at the second
WINDOW = 64  # covers every key of both lengths


@dataclass
class Row:
    name: str
    attention_modules: int
    rewritten: int = 0
    left_alone: list[str] = field(default_factory=list)
    error: list[str] = field(default_factory=list)  # at the traced length, at the second length
    dense: str = ""
    backend: list[str] = field(default_factory=list)
    onnx: str = ""

    @property
    def found(self) -> int:
        return self.rewritten + len(self.left_alone)


def _rows_to_compare(out, rows):
    return out[rows] if rows is not None else out


def _relative(got, want, rows) -> float:
    got, want = _rows_to_compare(got, rows), _rows_to_compare(want, rows)
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def _verdict(err: float) -> str:
    return f"exact ({err:.0e})" if err < EXACT else f"**WRONG** ({err:.2g})"


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _attention_modules(model) -> int:
    """Leaf modules named *Attention (a wrapper holding a *SelfAttention counts once), nn.MultiheadAttention, and
    the hand-written styles (one attention each)."""
    def is_attention(m):
        name = type(m).__name__
        return isinstance(m, (torch.nn.MultiheadAttention, styles.Heads)) or name.endswith("Attention")

    return sum(1 for m in model.modules()
               if is_attention(m) and not any(is_attention(c) for c in m.modules() if c is not m))


def _linears(model) -> int:
    """nn.Linear, GPT-2's Conv1D, and nn.MultiheadAttention's packed input projection (a bare parameter)."""
    return sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") + \
        sum(1 for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention) and m.in_proj_weight is not None)


RECIPE = rl.Recipe([rl.LinearAttention(window=WINDOW), rl.LowRank(energy=1.0)])  # energy 1: full rank


def _short(e: Exception) -> str:
    e = getattr(e, "inner_exception", None) or e  # torch.compile wraps the backend's own error
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {_cell(first)[:90]}"


def _cell(text: str) -> str:
    """Text that stays inside one markdown table cell: no terminal colors, no column bars."""
    text = re.sub(r"\S+\.(?:cpp|h):\d+: ", "", text)  # a C++ source position says nothing to a reader here
    return re.sub(r"\x1b\[[0-9;]*m", "", text).replace("|", "/")


def run_case(name: str, model, inputs, *, backend: bool = True, onnx: bool = True) -> Row:
    """inputs(i) -> (args, rows) for the i-th length. backend / onnx: run those columns too. Rewrites are not
    timed: the table is about what is found and whether it is exact (a tiny model's replacement is rarely faster)."""
    with timing.settings(measure=False):
        return _run_case(name, model, inputs, backend=backend, onnx=onnx)


def _run_case(name: str, model, inputs, *, backend: bool, onnx: bool) -> Row:
    (args1, rows1), (args2, rows2) = inputs(0), inputs(1)
    row = Row(name, _attention_modules(model))
    recipe = RECIPE
    with torch.no_grad():
        want1, want2 = _first(model(*args1)), _first(model(*args2))
    try:
        fast, report = rl.rewrite(model, args1, recipe, progress=False)
    except Exception as e:  # a row that cannot be traced says so in the table
        row.error = [_short(e)]
        return row
    row.rewritten = report.counts.get("linear_attention", 0)
    row.left_alone = [why for rule, _, why in report.skipped if rule == "linear_attention"]
    row.dense = f"{report.counts.get('low_rank', 0)} / {_linears(model)}"
    for args, rows, want in ((args1, rows1, want1), (args2, rows2, want2)):
        try:
            with torch.no_grad():
                row.error.append(_verdict(_relative(_first(fast(*args)), want, rows)))
        except Exception as e:
            row.error.append(_short(e))
    if backend:
        row.backend = _backend(model, recipe, ((args1, rows1, want1), (args2, rows2, want2)))
    if onnx:
        row.onnx = _onnx(model, recipe, args1, rows1, want1)
    return row


def _backend(model, recipe, calls) -> list[str]:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=rl.backend(recipe))
    cells = []
    for args, rows, want in calls:
        try:
            with torch.no_grad():
                got = _first(compiled(*args))
            counts = rl.last_report().counts.get("linear_attention", 0) if rl.last_report() else 0
            cells.append(f"{counts} rewritten, {_verdict(_relative(got, want, rows))}")
        except Exception as e:
            cells.append(_short(e))
    return cells


def _onnx(model, recipe, args, rows, want) -> str:
    from relinear.export import ort as ort_io
    from relinear.export import to_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        try:
            to_onnx(model, args, path, recipe)
            session = ort_io.make_session(path, threads=1)
            feed = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=False)}
            got = torch.from_numpy(session.run(None, feed)[0])
        except Exception as e:
            return _short(e)
    return _verdict(_relative(got, want, rows))


def arch_cases():
    for name, spec in ARCHITECTURES.items():
        for attn in spec.attn:
            lengths = LENGTHS if spec.window is None else ((spec.window - 2, (spec.window - 2, spec.window - 5)),
                                                           (spec.window + 6, (spec.window + 6, spec.window + 1)))
            yield f"{name}/{attn}", lambda n=name, a=attn: build_arch(n, a), \
                lambda i, n=name, ls=lengths: arch_inputs(n, ls[i][0], ls[i][1], seed=i)


def style_cases():
    for name in styles.STYLES:
        def inputs(i, n=name):
            t, lengths = LENGTHS[i]
            _, args, rows = styles.build(n, t=t, lengths=lengths, seed=i + 1)
            return args, rows

        yield name, lambda n=name: styles.build(n)[0], inputs


def all_cases():
    return [*arch_cases(), *style_cases()]


def run(names: list[str] | None = None, save=None, **columns) -> list[Row]:
    """The rows named (all by default); `save(rows)` after each one, so a long run keeps what it has done."""
    rows = []
    for name, build, inputs in all_cases():
        if names and name not in names and name.split("/")[0] not in names:
            continue
        print(f"coverage: {name}", file=sys.stderr, flush=True)
        rows.append(run_case(name, build(), inputs, **columns))
        if save is not None:
            save(rows)
    return rows


def _kind(cell: str) -> str:
    """What a cell claims, without its float noise: "exact", "WRONG", or the error's type."""
    return cell.split(" (")[0].split(":")[0].strip("* ")


def claims(row: Row) -> dict:
    """What the table says about a row, in a form a test can compare: counts, verdicts and reasons."""
    return {"modules": row.attention_modules, "found": row.found, "rewritten": row.rewritten,
            "exact": [_kind(_cell(c)) for c in row.error], "dense": row.dense,
            "backend": [_kind(_cell(c).split(" rewritten, ", 1)[-1]) for c in row.backend], "backend_rewritten":
            [c.split(" rewritten")[0] for c in row.backend if " rewritten" in c], "onnx": _kind(_cell(row.onnx)),
            "left_alone": sorted({_cell(why) for why in row.left_alone})}


def rows_not_run(text: str) -> list[str]:
    line = next((line for line in text.splitlines() if line.startswith(NOT_RUN)), None)
    return line[len(NOT_RUN):].split(" (")[0].split(", ") if line else []


def read_table(text: str) -> dict[str, dict]:
    """The claims of every row of docs/coverage.md, by row name."""
    rows: dict[str, Row] = {}
    main, _, alone = text.partition("## Left alone")
    for line in main.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 9 or cells[0] in ("model", "---"):
            continue
        name, modules, _, rewritten, error, dense, b1, b2, onnx = cells
        rows[name] = Row(name, int(modules), int(rewritten), [], error.split("; ") if error else [], dense,
                         [b for b in (b1, b2) if b], onnx)
    for line in alone.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in rows:
            rows[cells[0]].left_alone += [cells[2]] * int(cells[1])
    return {name: claims(r) for name, r in rows.items()}


NOT_RUN = "Not run for this table: "


def markdown(rows: list[Row], not_run: list[str] = ()) -> str:
    lines = [
        "# Coverage",
        "",
        "Generated by `python benchmarks/coverage.py` (random-config models: 2 layers, hidden 32; hand-written "
        "styles from `tests/attention_styles.py`). Recipe: `LinearAttention(window=64)` (a window covering every "
        "key) + `LowRank(energy=1.0)` (full rank): both exact limits, so every rewritten row must be exact up to "
        f"float error (relative error < {EXACT:g} on the real rows). Traced at the first length, called at a second "
        "length and padding. Models with a sliding window / local attention are run below and above it.",
        "",
        "Columns: *attention modules* counts the model's attention modules (one per hand-written style; ALBERT "
        "shares one module between its layers, so it has more call sites than modules); *found* = sites the "
        "attention rule saw, rewritten or left alone with a reason (the reasons are listed below); *exact* is the "
        "rewritten model against the original on the real (unpadded) rows, **WRONG** marks a silent wrong answer; "
        "*dense* counts the dense layers the low-rank rule rewrote against the model's `nn.Linear` / `Conv1D` (and "
        "`nn.MultiheadAttention`'s packed input projection); *backend* is `torch.compile(backend=rl.backend(...))` "
        "called at both lengths (the second call recompiles with dynamic sizes); *to_onnx* is the exported file "
        "in ONNX Runtime at the traced length. A cell that holds an error names what was raised.",
        "",
        "| model | attention modules | found | rewritten | exact (T1, T2) | dense found / linears | backend T1 | "
        "backend T2 | to_onnx in ORT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        backend = " | ".join(_cell(c) for c in r.backend or ["", ""])
        lines.append(f"| {r.name} | {r.attention_modules} | {r.found} | {r.rewritten} | "
                     f"{'; '.join(_cell(c) for c in r.error)} | {r.dense} | {backend} | {_cell(r.onnx)} |")
    if not_run:
        lines += ["", NOT_RUN + ", ".join(not_run) + " (regenerate the table to add them)."]
    lines += ["", "## Left alone", "", "| model | sites | reason |", "|---|---|---|"]
    for r in rows:
        for reason in dict.fromkeys(r.left_alone):
            lines.append(f"| {r.name} | {r.left_alone.count(reason)} | {_cell(reason)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", help="row names (bert/sdpa) or model names (bert); default: all")
    parser.add_argument("--out", default=None, help="markdown file (default: docs/coverage.md for a full run)")
    parser.add_argument("--json", default=None, help="JSON results (default: benchmarks/results/coverage.json)")
    parser.add_argument("--merge", nargs="*", help="JSON files of runs over parts of the rows: write their table")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if args.merge:  # parts run side by side on a machine with cores to spare
        parts = [json.loads(Path(p).read_text())["rows"] for p in args.merge]
        done = {r["name"]: Row(**r) for part in parts for r in part}
        rows = [done[name] for name, _, _ in all_cases() if name in done]
        not_run = [name for name, _, _ in all_cases() if name not in done]
    full = not args.rows
    out_json = args.json or (ROOT / "benchmarks" / "results" / "coverage.json" if full and not args.merge else None)

    def save(rows):
        save_result(out_json, {"rows": [asdict(r) for r in rows]})

    if not args.merge:
        rows, not_run = run(args.rows, save=save if out_json else None), []
    text = markdown(rows, not_run)
    print(text)
    out = args.out or (ROOT / "docs" / "coverage.md" if full else None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
