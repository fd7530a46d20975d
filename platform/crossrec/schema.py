"""The canonical tables of a crossrec dataset and the checks every ingested file goes through.

Every ingest adapter turns its format into `SourceTable`s with these columns; `validate_items` and
`validate_interactions` then refuse anything that does not fit, naming the file, column and row
(rows are 1-based records of the file: a CSV data row, a JSONL line, a Parquet row).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "DataError",
    "SourceTable",
    "ITEM_REQUIRED",
    "INTERACTION_REQUIRED",
    "IDENTITY_REQUIRED",
    "SCHEMA_VERSION",
    "validate_items",
    "validate_interactions",
    "iter_interactions",
    "conform_interactions",
    "validate_identity",
    "DOMAIN_PATTERN",
    "check_domain",
]

SCHEMA_VERSION = 1
ITEM_REQUIRED = ("item_id", "domain", "title")
INTERACTION_REQUIRED = ("user_id", "item_id", "domain", "timestamp")
IDENTITY_REQUIRED = ("platform", "platform_user_id", "user_id")
# Text-like item columns kept as strings; list<float> columns are feature vectors (multimodal fusion).
_STRING_INTERACTION_OPTIONAL = ("event", "platform")


# Domain names become file names (a bundle's `items/DOMAIN.parquet`, adapter folders), so they are refused unless
# they are plain names: no separator, no `..`, no leading dot or dash, and short enough for any file system.
DOMAIN_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_DOMAIN_RE = re.compile(DOMAIN_PATTERN)


class DataError(ValueError):
    """Input that does not fit the schema. The message names the file, column and row."""


def check_domain(name: object) -> str | None:
    """Why `name` cannot be a domain name (it becomes part of file paths), or None when it can."""
    if not isinstance(name, str) or not _DOMAIN_RE.match(name) or ".." in name:
        return f"domain {name!r} must match {DOMAIN_PATTERN} without '..'"
    return None


@dataclass
class SourceTable:
    """A table read from one file; row r of the table is record `offset` + r + 1 of `path`.

    Either whole (`table`) or streamed: `chunks()` returns a fresh iterator over consecutive pieces of the file,
    so a big file is read piece by piece and never held whole as text or Python objects. A stream yields at least
    one table (an empty one with the file's columns when it has no rows)."""

    table: pa.Table | None
    path: str
    chunks: Callable[[], Iterator[pa.Table]] | None = None
    offset: int = 0

    def whole(self) -> pa.Table:
        """The table of a whole file, or of one piece of a stream (each piece is a SourceTable of its own)."""
        if self.table is None:
            raise ValueError(f"{self.path}: a stream; read it piece by piece with chunks()")
        return self.table

    def where(self, row: int, column: str | None = None) -> str:
        col = f" column '{column}'" if column else ""
        return f"{self.path}:{col} row {self.offset + row + 1}"

    def pieces(self, max_rows: int | None = None) -> Iterator[SourceTable]:
        """Whole SourceTables of consecutive pieces, each with its row offset in the file; a piece longer than
        `max_rows` is cut into slices of at most that many rows (zero-copy)."""
        if self.chunks is None:
            assert self.table is not None
            tables: Iterator[pa.Table] = iter([self.table])
        else:
            tables = self.chunks()
        offset = self.offset
        for table in tables:
            step = max_rows or table.num_rows or 1
            for start in range(0, max(table.num_rows, 1), step):
                piece = table.slice(start, step) if step < table.num_rows else table
                yield SourceTable(piece, self.path, offset=offset + start)
            offset += table.num_rows


def _require_columns(src: SourceTable, required: tuple[str, ...], first: bool = True) -> None:
    """The first piece of a file must hold every required column and at least one row. A later piece of a
    stream (JSONL: a key can be absent from a whole chunk) lacking one has an empty value at its first row."""
    if first and src.whole().num_rows == 0:
        raise DataError(f"{src.path}: file is empty (no rows)")
    have = src.whole().column_names
    missing = [c for c in required if c not in have]
    if missing and first:
        raise DataError(
            f"{src.path}: missing column '{missing[0]}' (required: {', '.join(required)}; found: {', '.join(have)})"
        )
    if missing:
        raise DataError(f"{src.where(0, missing[0])}: empty value")


def _as_string(src: SourceTable, name: str, allow_null: bool = False) -> pa.ChunkedArray:
    """The column as non-empty strings; integers are accepted (ids are often numeric in JSON)."""
    col = src.whole().column(name)
    t = col.type
    if pa.types.is_dictionary(t):
        col = col.cast(t.value_type)
        t = col.type
    if pa.types.is_integer(t):
        col = col.cast(pa.string())
    elif pa.types.is_large_string(t) or pa.types.is_string_view(t):
        col = col.cast(pa.string())
    elif not pa.types.is_string(t) and not pa.types.is_null(t):
        raise DataError(f"{src.path}: column '{name}' has type {t}, expected string")
    if pa.types.is_null(col.type):
        col = col.cast(pa.string())
    if not allow_null:
        bad = pc.or_(pc.is_null(col), pc.equal(pc.utf8_trim_whitespace(col), ""))
        bad = pc.fill_null(bad, True)
        if pc.any(bad).as_py():
            row = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{src.where(row, name)}: empty value")
    return col


def _as_timestamp(src: SourceTable) -> pa.ChunkedArray:
    """int64 timestamps. Strings must be whole numbers; floats must be integral."""
    name = "timestamp"
    col = src.whole().column(name)
    t = col.type
    if pa.types.is_integer(t):
        out = col.cast(pa.int64())
    elif pa.types.is_floating(t):
        vals = col.to_numpy(zero_copy_only=False)
        bad = np.isnan(vals) | (vals != np.floor(vals))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"{src.where(row, name)}: expected an integer, got {vals[row].item()!r}")
        out = pa.chunked_array([pa.array(vals.astype(np.int64))])
    elif pa.types.is_timestamp(t):
        out = col.cast(pa.timestamp("s")).cast(pa.int64())
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            # Arrow's parser accepts a strict subset of what int() does (plain [-]digits), with the same values.
            out = col.cast(pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            vals = col.to_pylist()  # the slow path, only for what Arrow refuses: int() decides and names the row
            parsed = np.empty(len(vals), dtype=np.int64)
            for r, v in enumerate(vals):
                try:
                    parsed[r] = int(v)
                except (TypeError, ValueError, OverflowError):
                    raise DataError(f"{src.where(r, name)}: expected an integer, got {v!r}") from None
            out = pa.chunked_array([pa.array(parsed)])
    else:
        raise DataError(f"{src.path}: column '{name}' has type {t}, expected int64")
    if out.null_count:
        row = int(np.flatnonzero(pc.is_null(out).to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{src.where(row, name)}: empty value")
    return out


def _check_domains(src: SourceTable, dom: pa.ChunkedArray) -> None:
    """Every distinct domain of a piece is checked once; the first bad one is named with its first row."""
    for name in pc.unique(dom).to_pylist():
        why = check_domain(name)
        if why is not None:
            row = int(np.flatnonzero(pc.equal(dom, name).to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{src.where(row, 'domain')}: {why}")


def _item_columns(src: SourceTable) -> pa.Table:
    """One piece of an item file in canonical types: ids and domain non-empty strings, text columns strings
    ("" for missing), list columns float32 feature vectors."""
    cols = {c: _as_string(src, c) for c in ("item_id", "domain")}
    _check_domains(src, cols["domain"])
    cols["title"] = pc.fill_null(_as_string(src, "title", allow_null=True), "")
    for name in src.whole().column_names:
        if name in cols:
            continue
        col = src.whole().column(name)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            if not pa.types.is_floating(col.type.value_type) and not pa.types.is_integer(col.type.value_type):
                raise DataError(
                    f"{src.path}: column '{name}' is a list of {col.type.value_type}, "
                    "expected a list of floats (feature vector)"
                )
            cols[name] = col.cast(pa.list_(pa.float32()))
        else:
            cols[name] = pc.fill_null(_as_string(src, name, allow_null=True), "")
    return pa.table(cols)


def _fill_strings(table: pa.Table) -> pa.Table:
    """Pieces or files without an optional text column leave nulls after concatenation: they mean ""."""
    for name in table.column_names:
        if table.column(name).null_count and pa.types.is_string(table.column(name).type):
            table = table.set_column(table.column_names.index(name), name, pc.fill_null(table.column(name), ""))
    return table


def validate_items(sources: list[SourceTable]) -> tuple[pa.Table, dict]:
    """Checks and concatenates item tables. Exact duplicate rows are merged and counted;
    the same item_id with different text is an error naming both rows.

    Duplicates are found with Arrow hashing; only the rows whose id occurs more than once are compared in
    Python, so a catalog of millions of items is never turned into Python objects."""
    report = {"duplicate_item_rows_merged": 0}
    kept: list[pa.Table] = []  # kept rows of earlier pieces
    where: list[tuple[SourceTable, np.ndarray]] = []  # their piece and rows in it, to name the first occurrence
    for src in sources:
        for i, piece in enumerate(src.pieces()):
            _require_columns(piece, ITEM_REQUIRED, first=i == 0)
            table = _item_columns(piece)
            keep = _merge_duplicates(piece, table, kept, where, report)
            rows = np.flatnonzero(keep)
            kept.append(table if len(rows) == table.num_rows else table.take(pa.array(rows)))
            where.append((piece, rows))
    return _fill_strings(pa.concat_tables(kept, promote_options="default")), report


def _merge_duplicates(
    src: SourceTable, table: pa.Table, kept: list[pa.Table], where: list[tuple[SourceTable, np.ndarray]], report: dict
) -> np.ndarray:
    """Which rows of `table` to keep: all but exact repeats of an item seen before (in it or in `kept`)."""
    ids = table.column("item_id")
    keep = np.ones(table.num_rows, dtype=bool)
    counts = pc.value_counts(ids)
    repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    prev_ids = (
        pa.chunked_array([t.column("item_id") for t in kept], pa.string()).combine_chunks()
        if kept
        else pa.array([], pa.string())
    )
    candidate = pc.or_(pc.is_in(ids, value_set=prev_ids), pc.is_in(ids, value_set=repeated))
    rows = np.flatnonzero(candidate.to_numpy(zero_copy_only=False))
    if not len(rows):
        return keep
    text_cols = [c for c in table.column_names if c != "item_id"]
    prev_at = pc.index_in(pc.take(ids, pa.array(rows)), value_set=prev_ids).to_pylist()
    starts = np.cumsum([0] + [t.num_rows for t in kept])
    seen: dict[str, tuple[str, dict]] = {}  # item_id -> (where it was first seen, its row)
    for r, content, at in zip(rows.tolist(), table.take(pa.array(rows)).to_pylist(), prev_at):
        iid = content["item_id"]
        if iid not in seen and at is not None:
            k = int(np.searchsorted(starts, at, side="right") - 1)
            first_src, first_rows = where[k]
            seen[iid] = (
                first_src.where(int(first_rows[at - starts[k]])),
                kept[k].slice(at - starts[k], 1).to_pylist()[0],
            )
        if iid not in seen:
            seen[iid] = (src.where(r), content)
            continue
        other, prev = seen[iid]
        diff = next(
            (c for c in text_cols + [c for c in prev if c not in content] if content.get(c, "") != prev.get(c, "")),
            None,
        )
        if diff is not None:
            raise DataError(
                f"{src.where(r, 'item_id')}: item_id {iid!r} appears again with different {diff} than at {other}"
            )
        keep[r] = False
        report["duplicate_item_rows_merged"] += 1
    return keep


def validate_interactions(sources: list[SourceTable], items: pa.Table) -> pa.Table:
    """Checks interaction tables against the items: known domain, known item, same domain as the item.
    Streamed sources are checked piece by piece: only the validated columns are kept, never the raw text."""
    pieces = list(iter_interactions(sources, items))
    return conform_interactions(
        pa.concat_tables(pieces, promote_options="default"), pa.unify_schemas([t.schema for t in pieces])
    )


def iter_interactions(sources: list[SourceTable], items: pa.Table, max_rows: int | None = None) -> Iterator[pa.Table]:
    """`validate_interactions` piece by piece, in input order, each piece at most `max_rows` long: what a caller
    that must not hold every interaction at once (`crossrec.dataset.prepare`) consumes. Pieces keep the columns
    their file has; `conform_interactions` gives them the columns of all pieces together."""
    item_ids = items.column("item_id").combine_chunks()
    item_dom = items.column("domain").combine_chunks()
    domains = sorted(set(item_dom.to_pylist()))
    domain_set = pa.array(domains, pa.string())
    for src in sources:
        for i, piece in enumerate(src.pieces(max_rows)):
            _require_columns(piece, INTERACTION_REQUIRED, first=i == 0)
            yield _interaction_columns(piece, item_ids, item_dom, domains, domain_set)


def conform_interactions(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` (validated pieces) with the columns of `schema` (`pa.unify_schemas` of all pieces, in input order:
    the columns `concat_tables` would give them), in its order; an optional text column a piece lacks is ""."""
    out = []
    for field in schema:
        col = table.column(field.name) if field.name in table.column_names else pa.nulls(table.num_rows, field.type)
        if field.name in _STRING_INTERACTION_OPTIONAL and col.null_count:
            col = pc.fill_null(col, "")
        out.append(col)
    return pa.table(out, schema=schema)


def _interaction_columns(
    src: SourceTable, item_ids: pa.Array, item_dom: pa.Array, domains: list[str], domain_set: pa.Array
) -> pa.Table:
    cols = {
        "user_id": _as_string(src, "user_id"),
        "item_id": _as_string(src, "item_id"),
        "domain": _as_string(src, "domain"),
        "timestamp": _as_timestamp(src),
    }
    if "rating" in src.whole().column_names:
        try:
            cols["rating"] = src.whole().column("rating").cast(pa.float32())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DataError(f"{src.path}: column 'rating' is not numeric") from None
    for name in _STRING_INTERACTION_OPTIONAL:
        if name in src.whole().column_names:
            cols[name] = pc.fill_null(_as_string(src, name, allow_null=True), "")
    dom = cols["domain"]
    unknown = pc.invert(pc.is_in(dom, value_set=domain_set))
    if pc.any(unknown).as_py():
        row = int(np.flatnonzero(unknown.to_numpy(zero_copy_only=False))[0])
        raise DataError(
            f"{src.where(row, 'domain')}: unknown domain {dom[row].as_py()!r} (domains in items: {', '.join(domains)})"
        )
    idx = pc.index_in(cols["item_id"], value_set=item_ids)
    if idx.null_count:
        row = int(np.flatnonzero(pc.is_null(idx).to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{src.where(row, 'item_id')}: item_id {cols['item_id'][row].as_py()!r} is not in the items")
    wrong = pc.not_equal(pc.take(item_dom, idx), dom)
    if pc.any(wrong).as_py():
        row = int(np.flatnonzero(wrong.to_numpy(zero_copy_only=False))[0])
        iid = cols["item_id"][row].as_py()
        raise DataError(
            f"{src.where(row, 'domain')}: domain {dom[row].as_py()!r} differs from item "
            f"{iid!r}'s domain {item_dom[idx[row].as_py()].as_py()!r} in the items"
        )
    return pa.table(cols)


def validate_identity(src: SourceTable) -> pa.Table:
    """(platform, platform_user_id) -> user_id; a key mapped to two different users is an error."""
    pieces = []
    for i, piece in enumerate(src.pieces()):
        _require_columns(piece, IDENTITY_REQUIRED, first=i == 0)
        pieces.append(
            SourceTable(pa.table({c: _as_string(piece, c) for c in IDENTITY_REQUIRED}), src.path, offset=piece.offset)
        )
    cols = pa.concat_tables([p.table for p in pieces])
    seen: dict[tuple[str, str], tuple[int, str]] = {}
    users = cols.column("user_id").to_pylist()
    for r, key in enumerate(zip(cols.column("platform").to_pylist(), cols.column("platform_user_id").to_pylist())):
        user = users[r]
        if key in seen and seen[key][1] != user:
            raise DataError(
                f"{src.where(r, 'user_id')}: {key[0]}/{key[1]} is mapped to {user!r} here "
                f"and to {seen[key][1]!r} at row {seen[key][0] + 1}"
            )
        seen[key] = (r, user)
    return cols
