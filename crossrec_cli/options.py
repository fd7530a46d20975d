"""Options that several commands share, declared once, and the small parsing helpers commands use."""
from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["UsageError", "REPO", "VENDORED", "RECOMMENDED", "csv_list", "key_values", "add_data", "add_quiet",
           "add_ray_address", "add_dashboard_address", "add_bundle"]

REPO = Path(__file__).resolve().parents[1]
VENDORED = REPO / "data"
RECOMMENDED = REPO / "configs" / "recommended.yaml"  # the pipeline the README's numbers measure


class UsageError(ValueError):
    """Bad arguments: reported as one line, exit code 2."""


def csv_list(text: str | None) -> list[str] | None:
    """"a, b," -> ["a", "b"]; None stays None (the option was not given)."""
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


def key_values(pairs: list[str] | None, option: str) -> dict[str, str]:
    """["K=V", ...] -> {K: V}, refusing an entry without `=` naming the option."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{option} {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="DATASET", help="a prepared dataset (`crossrec prepare`)")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_ray_address(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument("--address", help=f"Ray address{what} (default: $RAY_ADDRESS, else a local Ray started "
                                     "in-process)")


def add_dashboard_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the head's dashboard, http://HEAD:8265 (default: $RAY_ADDRESS)")


def add_bundle(p: argparse.ArgumentParser, required: bool = True, help: str | None = None) -> None:
    p.add_argument("--bundle", required=required, metavar="BUNDLE",
                   help=help or "a bundle folder written by `crossrec train` (or `crossrec tune`: DIR/best)")
