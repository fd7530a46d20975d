"""Folders in crossrec's own schema: `items.*` + `interactions.*` (+ optional `identity.*`) as CSV, Parquet or JSONL.

A prepared crossrec dataset is itself such a folder (Parquet), so it can be prepared again or merged.
`--domain NAME` fills a missing `domain` column (one folder per domain).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from crossrec.ingest.base import Source
from crossrec.schema import DataError, SourceTable

__all__ = ["CSV", "PARQUET", "JSONL", "TableFolder"]


def _read_csv(path: Path) -> pa.Table:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (no header, no rows)")
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise DataError(f"{path}: file is empty (no header, no rows)")
    # Everything as text: ids like 0001 keep their zeros; the schema checks convert and name bad rows.
    opts = pacsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                strings_can_be_null=False, quoted_strings_can_be_null=False)
    try:
        return pacsv.read_csv(path, convert_options=opts,
                              parse_options=pacsv.ParseOptions(newlines_in_values=True))
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: not a valid CSV file: {e}") from None


def _read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a valid Parquet file: {e}") from None


def _read_jsonl(path: Path) -> pa.Table:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: row {n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: row {n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: file is empty (no rows)")
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"{path}: a column mixes types across rows: {e}") from None


@dataclass(frozen=True)
class TableFolder:
    suffix: str
    reader: Callable[[Path], pa.Table]

    def files(self, path: Path) -> dict[str, Path]:
        folder = path if path.is_dir() else path.parent
        return {n: folder / f"{n}{self.suffix}" for n in ("items", "interactions", "identity")}

    def detect(self, path: Path) -> bool:
        f = self.files(path)
        return f["items"].is_file() and f["interactions"].is_file()

    def read(self, path: Path, domain: str | None) -> Source:
        f = self.files(path)
        for name in ("items", "interactions"):
            if not f[name].is_file():
                raise DataError(f"{f[name]}: missing ({f[name].parent} needs items{self.suffix} and "
                                f"interactions{self.suffix})")
        items = self.reader(f["items"])
        inters = self.reader(f["interactions"])
        if domain is not None:
            items, inters = (_with_domain(t, domain) for t in (items, inters))
        identity = SourceTable(self.reader(f["identity"]), str(f["identity"])) if f["identity"].is_file() else None
        return Source(items=[SourceTable(items, str(f["items"]))],
                      interactions=[SourceTable(inters, str(f["interactions"]))],
                      identity=identity, description=f"{self.suffix[1:]} folder {path}")


def _with_domain(table: pa.Table, domain: str) -> pa.Table:
    if "domain" in table.column_names:
        return table
    return table.append_column("domain", pa.array([domain] * table.num_rows, pa.string()))


CSV = TableFolder(".csv", _read_csv)
PARQUET = TableFolder(".parquet", _read_parquet)
JSONL = TableFolder(".jsonl", _read_jsonl)
