"""The parser (each command group registers its subcommands) and `main`, which turns bad input into one line and
exit code 2."""

from __future__ import annotations

import argparse
import sys

import crossrec

# Submodules by their full names: `from crossrec_cli import ...` would tie this module to the package's
# __init__, which imports it.
import crossrec_cli.adapt as adapt
import crossrec_cli.bundles as bundles
import crossrec_cli.cluster as cluster
import crossrec_cli.data as data
import crossrec_cli.demo as demo
import crossrec_cli.evaluate as evaluate
import crossrec_cli.recommend as recommend
import crossrec_cli.serve as serve
import crossrec_cli.train as train
from crossrec.schema import DataError
from crossrec_cli.options import UsageError
from crossrec_cli.parser import Parser

__all__ = ["build_parser", "main"]

GROUPS = (data, evaluate, train, adapt, recommend, bundles, cluster, serve, demo)  # order of `crossrec --help`


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="crossrec",
        description="LLM-enhanced cross-domain recommendation on Ray: prepare logs, train, tune, evaluate, serve.",
        epilog="Run `crossrec COMMAND --help` for a command's options. Data contract: docs/REFERENCE.md.",
    )
    p.add_argument("--version", action="version", version=f"crossrec {crossrec.__version__}")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own logs (INFO) and progress bars; quiet (WARNING) by default. Also accepted after COMMAND",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in GROUPS:
        group.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in argv[1:] and "--" not in argv[: argv.index("--verbose")]:  # `crossrec train ... --verbose`
        argv.remove("--verbose")
        argv.insert(0, "--verbose")
    args = parser.parse_args(argv)
    if args.verbose:  # read by trainers.runtime.log_level and crossrec.progress.verbose, here and in Ray workers
        import os

        os.environ["CROSSREC_VERBOSE"] = "1"
        os.environ.setdefault("CROSSREC_RAY_LOG_LEVEL", "INFO")
    # Commands that run or check other commands (demo, submit) get the dispatcher and the parser through
    # `args`, so no command module imports this one back.
    args.run, args.parser = main, parser
    try:
        return args.func(args)
    except (DataError, UsageError, ValueError, FileNotFoundError) as e:
        print(f"crossrec {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"crossrec {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
