"""Folders in crossrec's own schema: `items.*` + `interactions.*` (+ optional `identity.*`) as CSV, Parquet or JSONL.

A prepared crossrec dataset is itself such a folder (Parquet), so it can be prepared again or merged.
`--domain NAME` fills a missing `domain` column (one folder per domain).

Files are streamed (CSV in blocks, Parquet in batches of rows, JSONL in chunks of lines): the schema checks take them
piece by piece, so memory holds the validated columns, never a whole file as text or Python objects.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from crossrec.ingest.base import Source
from crossrec.ingest.jsonl import records
from crossrec.schema import DataError, SourceTable

__all__ = ["CSV", "PARQUET", "JSONL", "TableFolder", "CSV_BLOCK_BYTES", "JSONL_CHUNK_ROWS", "PARQUET_BATCH_ROWS"]

CSV_BLOCK_BYTES = 4 << 20  # CSV text parsed at a time; Arrow reads up to 32 blocks ahead (128 MiB)
JSONL_CHUNK_ROWS = 1 << 17  # JSON objects turned into Arrow at a time
PARQUET_BATCH_ROWS = 1 << 20  # Parquet rows decoded at a time


def _csv_header(path: Path) -> list[str]:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (no header, no rows)")
    # The header record alone (it may span lines inside quotes), decoded by itself: a bad byte further down is
    # reported with its row by the data reader, not blamed on the header.
    raw = b""
    with open(path, "rb") as f:
        for line in f:
            raw += line
            if raw.count(b'"') % 2 == 0:
                break
    try:
        # utf-8-sig: a byte-order mark must not become part of the first column's name (Arrow drops it too, and
        # the name must match for that column to be read as text: `0001` would become the integer 1).
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: header: not UTF-8 text ({e.reason}); save the file as UTF-8") from None
    header = next(csv.reader([text]), None)
    if not header:
        raise DataError(f"{path}: file is empty (no header, no rows)")
    return header


def _read_csv(path: Path) -> SourceTable:
    header = _csv_header(path)
    # Everything as text: ids like 0001 keep their zeros; the schema checks convert and name bad rows.
    convert = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in header}, strings_can_be_null=False, quoted_strings_can_be_null=False
    )

    def chunks() -> Iterator[pa.Table]:
        try:
            reader = pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                parse_options=pacsv.ParseOptions(newlines_in_values=True),
                convert_options=convert,
            )
            any_rows = False
            for batch in reader:
                if batch.num_rows:
                    any_rows = True
                    yield pa.Table.from_batches([batch])
            if not any_rows:
                yield reader.schema.empty_table()
        except pa.ArrowInvalid as e:
            if "UTF8" in str(e):
                raise DataError(_where_not_utf8(path, header)) from None
            raise DataError(f"{path}: not a valid CSV file: {e}") from None

    return SourceTable(None, str(path), chunks)


def _where_not_utf8(path: Path, header: list[str]) -> str:
    """The message for a CSV file with bytes that are not UTF-8, naming the first such record and column.
    Records are counted as the CSV reader does: a quoted field may span lines (odd number of quotes so far)."""
    done, pending = 0, b""
    with open(path, "rb") as f:
        for raw in f:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                text = (pending + raw).decode("utf-8", errors="replace").lstrip("\ufeff")
                fields = next(csv.reader([text]), [])
                col = next((header[i] for i, v in enumerate(fields) if "\ufffd" in v and i < len(header)), None)
                where = "header" if done == 0 else (f"column '{col}' " if col else "") + f"row {done}"
                return f"{path}: {where}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8"
            pending += raw
            if pending.count(b'"') % 2 == 0:
                done, pending = done + 1, b""
    return f"{path}: not UTF-8 text; save the file as UTF-8"


def _read_parquet(path: Path) -> SourceTable:
    try:
        pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a valid Parquet file: {e}") from None

    def chunks() -> Iterator[pa.Table]:
        f = pq.ParquetFile(path)
        any_rows = False
        # In batches, not whole row groups: a writer may have put millions of rows in one.
        for batch in f.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            if batch.num_rows:
                any_rows = True
                yield pa.Table.from_batches([batch])
        if not any_rows:
            yield f.schema_arrow.empty_table()

    return SourceTable(None, str(path), chunks)


def _read_jsonl(path: Path) -> SourceTable:
    def chunks() -> Iterator[pa.Table]:
        rows: list[dict] = []
        yielded = False
        for _, row in records(path):
            rows.append(row)
            if len(rows) >= JSONL_CHUNK_ROWS:
                yield _jsonl_table(path, rows)
                rows, yielded = [], True
        if rows or not yielded:
            yield _jsonl_table(path, rows)

    return SourceTable(None, str(path), chunks)


def _jsonl_table(path: Path, rows: list[dict]) -> pa.Table:
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"{path}: a column mixes types across rows: {e}") from None


@dataclass(frozen=True)
class TableFolder:
    suffix: str
    reader: Callable[[Path], SourceTable]

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
                raise DataError(
                    f"{f[name]}: missing ({f[name].parent} needs items{self.suffix} and interactions{self.suffix})"
                )
        items, inters = self.reader(f["items"]), self.reader(f["interactions"])
        if domain is not None:
            items, inters = (_with_domain(t, domain) for t in (items, inters))
        identity = self.reader(f["identity"]) if f["identity"].is_file() else None
        return Source(
            items=[items], interactions=[inters], identity=identity, description=f"{self.suffix[1:]} folder {path}"
        )


def _with_domain(src: SourceTable, domain: str) -> SourceTable:
    def fill(table: pa.Table) -> pa.Table:
        if "domain" in table.column_names:
            return table
        return table.append_column("domain", pa.array([domain] * table.num_rows, pa.string()))

    inner = src.chunks
    if inner is None:
        return SourceTable(fill(src.table), src.path)
    return SourceTable(None, src.path, lambda: (fill(t) for t in inner()))


CSV = TableFolder(".csv", _read_csv)
PARQUET = TableFolder(".parquet", _read_parquet)
JSONL = TableFolder(".jsonl", _read_jsonl)
