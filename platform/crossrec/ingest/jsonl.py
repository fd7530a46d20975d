"""The one JSON-lines reader of ingest: records one at a time, with their line numbers, plain or gzipped.

Lines are decoded one by one, so a byte that is not UTF-8 is reported with its file and row, and a UTF-8
byte-order mark before the first record is skipped (editors on Windows write one).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crossrec.schema import DataError

__all__ = ["records"]


def records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of `path` (`.gz`: gzip)."""
    try:
        with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{path}: row {n}: not UTF-8 text ({e.reason} at byte {e.start} of the line); "
                        "save the file as UTF-8"
                    ) from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: row {n}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{path}: row {n}: expected a JSON object, got {type(rec).__name__}")
                yield n, rec
    except (OSError, EOFError) as e:  # gzip.BadGzipFile, truncated archives
        raise DataError(f"{path}: cannot read: {e}") from None
