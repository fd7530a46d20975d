"""Options that several commands share, declared once, and the small parsing helpers commands use."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = [
    "UsageError",
    "REPO",
    "VENDORED",
    "RECOMMENDED",
    "csv_list",
    "key_values",
    "add_data",
    "add_quiet",
    "add_ray_address",
    "add_dashboard_address",
    "add_bundle",
    "sample_users",
    "users_slice",
]

REPO = Path(__file__).resolve().parents[1]
VENDORED = REPO / "data"
RECOMMENDED = REPO / "configs" / "recommended.yaml"  # the pipeline docs/RESULTS.md's numbers measure


class UsageError(ValueError):
    """Bad arguments: reported as one line, exit code 2."""


def csv_list(text: str | None) -> list[str] | None:
    """ "a, b," -> ["a", "b"]; None stays None (the option was not given)."""
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
    p.add_argument("--address", help=f"Ray address{what} (default: $RAY_ADDRESS, else a local Ray started in-process)")


def add_dashboard_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="the head's dashboard, http://HEAD:8265 (default: $RAY_ADDRESS)")


def add_bundle(p: argparse.ArgumentParser, required: bool = True, help: str | None = None) -> None:
    p.add_argument(
        "--bundle",
        required=required,
        metavar="BUNDLE",
        help=help or "a bundle folder written by `crossrec train` (or `crossrec tune`: DIR/best)",
    )


def sample_users(src: Path, dst: Path, users: int) -> None:
    """Every k-th user of a prepared dataset with all their interactions and the items they touched, as a
    Parquet folder `prepare` reads: a demo-sized slice of real data (its catalog embeds in a minute)."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    inter = pq.read_table(src / "interactions.parquet")
    all_users = pc.unique(inter.column("user_id"))
    step = max(1, len(all_users) // users)
    keep = all_users.take(np.arange(0, len(all_users), step)[:users])
    dst.mkdir(parents=True, exist_ok=True)
    inter = inter.filter(pc.is_in(inter.column("user_id"), value_set=keep))
    items = pq.read_table(src / "items.parquet")
    pq.write_table(inter, dst / "interactions.parquet")
    pq.write_table(
        items.filter(pc.is_in(items.column("item_id"), value_set=pc.unique(inter.column("item_id")))),
        dst / "items.parquet",
    )


def users_slice(data: str | Path, out: Path, users: int) -> Path:
    """`--users N`: a prepared dataset of every k-th user of `data` (sample_users) at `out`, made once and reused
    when it exists (a re-run or `--resume` sees the same slice)."""
    from crossrec.dataset import Dataset, prepare

    if users < 1:
        raise UsageError(f"--users must be >= 1, got {users}")
    if not (out / "manifest.json").is_file():
        sample_users(Path(data), out.with_name(out.name + "-src"), users)
        prepare([out.with_name(out.name + "-src")], out, progress=False, force=True)
    Dataset.load(out)
    return out
