"""``bnlab`` entry point: builds the parser from the subcommand modules and dispatches."""

from __future__ import annotations

import argparse
import sys

import bnlab
from bnlab.cli import claims, compare, convert, data, demo, doctor, kernels, presets, runs, serve, train
from bnlab.errors import EXTRAS, BnlabError, StopRequested

# Each module exposes add_parser(subparsers) and run(args) -> int.
SUBCOMMANDS = [compare, claims, train, runs, presets, data, kernels, convert, doctor, demo, serve]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``bnlab: error: <reason> (see 'bnlab --help')``, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bnlab",
        description="Batch normalization, measured: layers, experiments and a live visualizer.",
    )
    parser.add_argument("--version", action="version", version=f"bnlab {bnlab.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except StopRequested as stop:
        print(f"\nbnlab: {stop}; progress is saved. Resume with the same command, or "
              "'bnlab runs list' then 'bnlab runs resume ID'.", file=sys.stderr)
        return 128 + stop.signum  # the shell's convention: 130 after Ctrl-C, 143 after SIGTERM
    except KeyboardInterrupt:
        print("\nbnlab: interrupted; resume from the last checkpoint with 'bnlab runs resume ID'", file=sys.stderr)
        return 130
    except BnlabError as exc:  # the user's to fix; anything else is a bug and keeps its traceback
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        print(f"{parser.prog}: error: '{args.command}' needs the {extra} extra ({exc.name} is not installed): "
              f"pip install 'bnlab[{extra}]'", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
