"""The canonical tables of a crossrec dataset and the checks every ingested file goes through.

Every ingest adapter turns its format into `SourceTable`s with these columns; `validate_items` and
`validate_interactions` then refuse anything that does not fit, naming the file, column and row
(rows are 1-based records of the file: a CSV data row, a JSONL line, a Parquet row).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "DataError", "SourceTable", "ITEM_REQUIRED", "INTERACTION_REQUIRED", "IDENTITY_REQUIRED",
    "SCHEMA_VERSION", "validate_items", "validate_interactions", "validate_identity",
]

SCHEMA_VERSION = 1
ITEM_REQUIRED = ("item_id", "domain", "title")
INTERACTION_REQUIRED = ("user_id", "item_id", "domain", "timestamp")
IDENTITY_REQUIRED = ("platform", "platform_user_id", "user_id")
# Text-like item columns kept as strings; list<float> columns are feature vectors (multimodal fusion).
_STRING_INTERACTION_OPTIONAL = ("event", "platform")


class DataError(ValueError):
    """Input that does not fit the schema. The message names the file, column and row."""


@dataclass
class SourceTable:
    """A table read from one file; row r of `table` is record r + 1 of `path`."""

    table: pa.Table
    path: str

    def where(self, row: int, column: str | None = None) -> str:
        col = f" column '{column}'" if column else ""
        return f"{self.path}:{col} row {row + 1}"


def _require_columns(src: SourceTable, required: tuple[str, ...]) -> None:
    if src.table.num_rows == 0:
        raise DataError(f"{src.path}: file is empty (no rows)")
    have = src.table.column_names
    missing = [c for c in required if c not in have]
    if missing:
        raise DataError(f"{src.path}: missing column '{missing[0]}' (required: {', '.join(required)}; "
                        f"found: {', '.join(have)})")


def _as_string(src: SourceTable, name: str, allow_null: bool = False) -> pa.ChunkedArray:
    """The column as non-empty strings; integers are accepted (ids are often numeric in JSON)."""
    col = src.table.column(name)
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
    col = src.table.column(name)
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
        vals = col.to_pylist()
        parsed = np.empty(len(vals), dtype=np.int64)
        for r, v in enumerate(vals):
            try:
                parsed[r] = int(v)
            except (TypeError, ValueError):
                raise DataError(f"{src.where(r, name)}: expected an integer, got {v!r}") from None
        out = pa.chunked_array([pa.array(parsed)])
    else:
        raise DataError(f"{src.path}: column '{name}' has type {t}, expected int64")
    if out.null_count:
        row = int(np.flatnonzero(pc.is_null(out).to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{src.where(row, name)}: empty value")
    return out


def validate_items(sources: list[SourceTable]) -> tuple[pa.Table, dict]:
    """Checks and concatenates item tables. Exact duplicate rows are merged and counted;
    the same item_id with different text is an error naming both rows."""
    tables, report = [], {"duplicate_item_rows_merged": 0}
    seen: dict[str, tuple[SourceTable, int, tuple]] = {}
    for src in sources:
        _require_columns(src, ITEM_REQUIRED)
        cols = {c: _as_string(src, c) for c in ("item_id", "domain")}
        cols["title"] = pc.fill_null(_as_string(src, "title", allow_null=True), "")
        for name in src.table.column_names:
            if name in cols:
                continue
            col = src.table.column(name)
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                if not pa.types.is_floating(col.type.value_type) and not pa.types.is_integer(col.type.value_type):
                    raise DataError(f"{src.path}: column '{name}' is a list of {col.type.value_type}, "
                                    "expected a list of floats (feature vector)")
                cols[name] = col.cast(pa.list_(pa.float32()))
            else:
                cols[name] = pc.fill_null(_as_string(src, name, allow_null=True), "")
        table = pa.table(cols)
        text_cols = [c for c in table.column_names if c != "item_id"]
        ids = table.column("item_id").to_pylist()
        rows = list(zip(*[table.column(c).to_pylist() for c in text_cols]))
        keep = np.ones(len(ids), dtype=bool)
        for r, (iid, content) in enumerate(zip(ids, rows)):
            prev = seen.get(iid)
            if prev is None:
                seen[iid] = (src, r, content)
            elif prev[2] == content:
                keep[r] = False
                report["duplicate_item_rows_merged"] += 1
            else:
                other = prev[0].where(prev[1])
                diff = next(c for c, a, b in zip(text_cols, prev[2], content) if a != b)
                raise DataError(f"{src.where(r, 'item_id')}: item_id {iid!r} appears again with different "
                                f"{diff} than at {other}")
        tables.append(table.filter(pa.array(keep)))
    items = pa.concat_tables(tables, promote_options="default")
    for name in items.column_names:
        if items.column(name).null_count and pa.types.is_string(items.column(name).type):
            items = items.set_column(items.column_names.index(name), name, pc.fill_null(items.column(name), ""))
    return items, report


def validate_interactions(sources: list[SourceTable], items: pa.Table) -> pa.Table:
    """Checks interaction tables against the items: known domain, known item, same domain as the item."""
    item_ids = items.column("item_id")
    item_dom = items.column("domain").to_numpy(zero_copy_only=False)
    domains = sorted(set(item_dom.tolist()))
    tables = []
    for src in sources:
        _require_columns(src, INTERACTION_REQUIRED)
        cols = {"user_id": _as_string(src, "user_id"), "item_id": _as_string(src, "item_id"),
                "domain": _as_string(src, "domain"), "timestamp": _as_timestamp(src)}
        if "rating" in src.table.column_names:
            try:
                cols["rating"] = src.table.column("rating").cast(pa.float32())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise DataError(f"{src.path}: column 'rating' is not numeric") from None
        for name in _STRING_INTERACTION_OPTIONAL:
            if name in src.table.column_names:
                cols[name] = pc.fill_null(_as_string(src, name, allow_null=True), "")
        dom = cols["domain"]
        unknown = pc.invert(pc.is_in(dom, value_set=pa.array(domains)))
        if pc.any(unknown).as_py():
            row = int(np.flatnonzero(unknown.to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{src.where(row, 'domain')}: unknown domain {dom[row].as_py()!r} "
                            f"(domains in items: {', '.join(domains)})")
        idx_arr = pc.index_in(cols["item_id"], value_set=item_ids)
        if idx_arr.null_count:
            row = int(np.flatnonzero(pc.is_null(idx_arr).to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{src.where(row, 'item_id')}: item_id {cols['item_id'][row].as_py()!r} "
                            "is not in the items")
        idx = idx_arr.to_numpy(zero_copy_only=False).astype(np.int64)
        wrong = item_dom[idx] != dom.to_numpy(zero_copy_only=False)
        if wrong.any():
            row = int(np.flatnonzero(wrong)[0])
            iid = cols["item_id"][row].as_py()
            raise DataError(f"{src.where(row, 'domain')}: domain {dom[row].as_py()!r} differs from item "
                            f"{iid!r}'s domain {item_dom[int(idx[row])]!r} in the items")
        tables.append(pa.table(cols))
    return pa.concat_tables(tables, promote_options="default")


def validate_identity(src: SourceTable) -> pa.Table:
    """(platform, platform_user_id) -> user_id; a key mapped to two different users is an error."""
    _require_columns(src, IDENTITY_REQUIRED)
    cols = {c: _as_string(src, c) for c in IDENTITY_REQUIRED}
    seen: dict[tuple[str, str], tuple[int, str]] = {}
    for r, key in enumerate(zip(cols["platform"].to_pylist(), cols["platform_user_id"].to_pylist())):
        user = cols["user_id"][r].as_py()
        if key in seen and seen[key][1] != user:
            raise DataError(f"{src.where(r, 'user_id')}: {key[0]}/{key[1]} is mapped to {user!r} here "
                            f"and to {seen[key][1]!r} at row {seen[key][0] + 1}")
        seen[key] = (r, user)
    return pa.table(cols)
