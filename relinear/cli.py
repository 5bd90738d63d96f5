"""The `relinear` command."""

from __future__ import annotations

import argparse
import sys

from relinear import __version__


class _Parser(argparse.ArgumentParser):
    """Bad arguments: exit code 2 and one line, not a usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="relinear", description="Rewrite models into cheaper ones.")
    parser.add_argument("--version", action="version", version=f"relinear {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    sub.add_parser("demo", help="rewrite the bundled MiniLM model and print the report")
    from relinear.export.cli import add_subcommands

    add_subcommands(sub)
    from relinear.bench import add_subcommand as add_bench

    add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("a command is required")
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 140)  # reports stay readable in logs and pipes
    if args.command == "demo":
        from relinear.demo import DemoUnavailable, run

        try:
            return run(console)
        except DemoUnavailable as e:
            print(f"relinear: error: {e}", file=sys.stderr)
            return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
