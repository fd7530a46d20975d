"""Ingest adapters: each turns one source format into the canonical tables of `crossrec.schema`.

One module per format, each with `detect(path) -> bool` and `read(path, domain) -> Source`.
`read_source` picks the format (`auto` tries them in order, the generic table formats last).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crossrec.ingest import amazon2023, recbole, tables
from crossrec.ingest.base import Source
from crossrec.schema import DataError, check_domain

__all__ = ["FORMATS", "Source", "read_source", "detect_format"]

# Order matters for `auto`: specific layouts first, the generic items/interactions folder last.
# name -> adapter (a module or object with `detect(path)` and `read(path, ...)`)
FORMATS: dict[str, Any] = {
    "recbole": recbole,
    "amazon2023": amazon2023,
    "csv": tables.CSV,
    "parquet": tables.PARQUET,
    "jsonl": tables.JSONL,
}


def detect_format(path: Path) -> str:
    for name, adapter in FORMATS.items():
        if adapter.detect(path):
            return name
    raise DataError(
        f"{path}: cannot tell its format; expected a folder with items.csv + interactions.csv "
        "(or .parquet/.jsonl), RecBole/UniSRec atomic files (.inter with .item or .text), or "
        "Amazon Reviews 2023 JSONL (reviews + meta_*.jsonl); pass --format to choose one of: " + ", ".join(FORMATS)
    )


def read_source(path: str | Path, fmt: str = "auto", domain: str | None = None) -> Source:
    """Reads one source (a folder or a file) in format `fmt` (`auto` or one of FORMATS)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if domain is not None and (why := check_domain(domain)) is not None:
        raise DataError(f"--domain: {why}")
    if fmt == "auto":
        fmt = detect_format(path)
    elif fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r} (accepted: auto, {', '.join(FORMATS)})")
    return FORMATS[fmt].read(path, domain)
