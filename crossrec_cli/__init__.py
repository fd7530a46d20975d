"""The `crossrec` command line: one module per command group over the core library, the trainers and serving.

It is the outermost layer: it may import `crossrec`, `trainers` and `serving`; none of them imports it. Commands
that need Ray import `trainers` / `serving` only when they run, so `crossrec prepare` and `--help` start fast.
"""

from crossrec_cli.main import build_parser, main

__all__ = ["main", "build_parser"]
