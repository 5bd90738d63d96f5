"""`relinear onnx | verify | report`: the ONNX front end on the command line.

Every bad input ends the same way: exit code 2, one line on stderr naming the file or the field, and no
output file left behind (writes are atomic, so a failed run never created one).
"""

from __future__ import annotations

import argparse
import json
import sys

BAD_INPUT = 2


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    rewrite = subparsers.add_parser("onnx", help="rewrite an .onnx file with a recipe")
    rewrite.add_argument("input", help="the .onnx file to rewrite (never modified)")
    rewrite.add_argument("-o", "--output", required=True, help="where to write the rewritten .onnx file")
    rewrite.add_argument("--recipe", required=True, help="recipe TOML: seed = 0 and [[rules]] tables")
    rewrite.set_defaults(run=_run_onnx)

    verify = subparsers.add_parser("verify", help="compare the outputs of two .onnx files on random inputs")
    verify.add_argument("a", help="the reference model")
    verify.add_argument("b", help="the model to check against it")
    verify.add_argument("--json", action="store_true", help="print the statistics as JSON")
    verify.set_defaults(run=_run_verify)

    report = subparsers.add_parser("report", help="print the rewrite report stored in an .onnx file")
    report.add_argument("model", help="an .onnx file written by relinear")
    report.add_argument("--json", action="store_true", help="print the stored JSON as is")
    report.set_defaults(run=_run_report)


def _fail(message: str) -> int:
    print(f"relinear: error: {message}", file=sys.stderr)
    return BAD_INPUT


def _guarded(run):
    """Bad files and recipes (ValueError / OSError with a message naming them) become exit code 2."""

    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (ValueError, OSError) as e:
            return _fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)

    return wrapper


class _Progress:
    """Bars over rules and rewritten sites, opened at the first rule: a file rejected on loading prints
    nothing but its one error line."""

    def __init__(self, num_rules: int):
        self.num_rules, self.rules, self.sites = num_rules, None, None

    def rule(self, config) -> None:
        from tqdm import tqdm

        if self.rules is None:
            self.rules = tqdm(total=self.num_rules, unit="rule", desc="rules", file=sys.stderr)
            self.sites = tqdm(unit="site", desc="sites", file=sys.stderr)
        self.rules.set_postfix_str(config.name)
        self.rules.update()

    def site(self) -> None:
        self.sites.update()

    def close(self) -> None:
        for bar in (self.sites, self.rules):
            if bar is not None:
                bar.close()


@_guarded
def _run_onnx(args: argparse.Namespace) -> int:
    from relinear.export.rewrite_onnx import rewrite_onnx
    from relinear.recipe import Recipe

    recipe = Recipe.from_toml(args.recipe)
    progress = _Progress(len(recipe.rules))
    try:
        report = rewrite_onnx(args.input, args.output, recipe, on_rule=progress.rule, on_site=progress.site)
    finally:
        progress.close()
    print(report)
    print(f"wrote {args.output}")
    return 0


@_guarded
def _run_verify(args: argparse.Namespace) -> int:
    from relinear.export import model_io, ort

    for path in (args.a, args.b):
        model_io.load_model(path)
    stats = ort.compare(args.a, args.b)
    if args.json:
        print(json.dumps(ort.stats_as_dicts(stats), indent=1))
    else:
        for s in stats:
            print(s)
    return 0


@_guarded
def _run_report(args: argparse.Namespace) -> int:
    from relinear.export import model_io
    from relinear.rewrite.report import RewriteReport

    text = model_io.read_report_json(args.model)
    if text is None:
        return _fail(f"{args.model}: no relinear report in metadata_props (not written by relinear)")
    print(text if args.json else RewriteReport.from_dict(json.loads(text)))
    return 0
