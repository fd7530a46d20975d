"""RecBole / UniSRec atomic files: `NAME.inter` with item text in `NAME.item` (RecBole) or `NAME.text` (UniSRec).

Files are tab-separated with a header of typed fields (`user_id:token`, `timestamp:float`); the type suffix is
dropped, `float_seq` item fields become feature vectors and every other item field a text column (UniSRec's
`text` is the title). NAME, the file name up to its first dot (UniSRec's `Scientific.test.inter` is
`Scientific`), is the domain unless `--domain` is given; a folder with several NAMEs holds several domains.

`.inter` comes in two forms:
- one interaction per row (`user_id`, `item_id`, optional `timestamp`, `rating`). Without a timestamp the row
  order per user is the ordinal timestamp. Table rows are the file's rows.
- UniSRec's sequence form (`user_id`, `item_id_list`, `item_id`): a row is a user's history (space-separated)
  and the next item, expanded to ordinal timestamps 0..n-1 for the history and n for `item_id`. A user may have
  several rows only when each sequence is a prefix of the longest (UniSRec's augmented train file): the longest is
  kept, the others are counted in `skipped["history_rows_merged"]`. Table rows are then the expanded
  interactions, not file rows, and the table's path says so.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from crossrec.ingest.base import Source
from crossrec.schema import DataError, SourceTable

__all__ = ["detect", "read"]

_TYPES = ("token", "token_seq", "float", "float_seq")


def detect(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".inter"
    return path.is_dir() and any(path.glob("*.inter"))


def read(path: Path, domain: str | None) -> Source:
    datasets = _datasets(path)
    if domain is not None and len(datasets) > 1:
        raise DataError(
            f"{path}: --domain {domain!r} was given but the folder holds {len(datasets)} datasets "
            f"({', '.join(datasets)}); each is its own domain, named after its files"
        )
    items, inters, merged, seq_form = [], [], 0, False
    for name, inter_path in datasets.items():
        dom = domain or name
        items.append(_read_items(inter_path.parent, name, dom, inter_path))
        table, n_merged = _read_interactions(inter_path, dom)
        inters.append(table)
        if n_merged is not None:
            seq_form, merged = True, merged + n_merged
    return Source(
        items=items,
        interactions=inters,
        description=f"RecBole atomic files {path}",
        skipped={"history_rows_merged": merged} if seq_form else {},
    )


def _datasets(path: Path) -> dict[str, Path]:
    """NAME -> its one `.inter` file."""
    files = [path] if path.is_file() else sorted(path.glob("*.inter"))
    if not files:
        raise DataError(f"{path}: no .inter file")
    by_name: dict[str, list[Path]] = {}
    for f in files:
        by_name.setdefault(f.name.split(".")[0], []).append(f)
    for name, fs in by_name.items():
        if len(fs) > 1:
            # train/valid/test splits of one dataset overlap (UniSRec) or need a merged order: refuse, don't guess.
            raise DataError(
                f"{path}: several .inter files for dataset {name!r} ({', '.join(f.name for f in fs)}); "
                f"pass one file (UniSRec's {name}.test.inter holds every user's whole history)"
            )
    return {name: fs[0] for name, fs in by_name.items()}


def _read_atomic(path: Path) -> tuple[list[str], list[str], list[list[str]]]:
    """(field names, field types, rows of raw values); every row has exactly as many values as the header."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if lines[-1] == "":
        lines.pop()
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    if not lines or not lines[0].strip():
        raise DataError(f"{path}: file is empty (no header, no rows)")
    names, types = [], []
    for field in lines[0].split("\t"):
        name, _, typ = field.strip().partition(":")
        if typ and typ not in _TYPES:
            raise DataError(f"{path}: header field {field!r} has unknown type {typ!r} (accepted: {', '.join(_TYPES)})")
        if name in names:
            raise DataError(f"{path}: header names field {name!r} twice")
        names.append(name)
        types.append(typ or "token")
    rows = []
    for r, line in enumerate(lines[1:], 1):
        values = line.split("\t")
        if len(values) != len(names):
            # Most often a tab inside a text value: the format has no quoting.
            raise DataError(
                f"{path}: row {r}: expected {len(names)} tab-separated fields ({', '.join(names)}), got {len(values)}"
            )
        rows.append(values)
    if not rows:
        raise DataError(f"{path}: file is empty (no rows)")
    return names, types, rows


def _require(path: Path, names: list[str], column: str, required: str) -> None:
    if column not in names:
        raise DataError(f"{path}: missing column '{column}' (required: {required}; found: {', '.join(names)})")


def _numbers(path: Path, column: str, values: list[str]) -> pa.Array:
    """Numbers of a float/token field: int64 where every value is integral (`1.0` -> 1), else float64, so the
    schema check refuses a fractional timestamp with its row. Empty values become nulls (reported there too)."""
    out: list[int | float | None] = []
    for r, v in enumerate(values):
        if not v.strip():
            out.append(None)
            continue
        try:
            x = float(v)
        except ValueError:
            raise DataError(f"{path}: column '{column}' row {r + 1}: expected a number, got {v!r}") from None
        # int(v) first: ms timestamps stay exact even beyond float precision.
        out.append(int(v) if v.strip().lstrip("-").isdigit() else int(x) if x.is_integer() else x)
    if all(v is None or isinstance(v, int) for v in out):
        return pa.array(out, pa.int64())
    return pa.array(out, pa.float64())


def _read_items(folder: Path, name: str, domain: str, inter_path: Path) -> SourceTable:
    item_path, text_path = folder / f"{name}.item", folder / f"{name}.text"
    if item_path.is_file() and text_path.is_file():
        raise DataError(f"{folder}: both {item_path.name} and {text_path.name}; keep one as the item text")
    path = item_path if item_path.is_file() else text_path
    if not path.is_file():
        raise DataError(
            f"{inter_path}: no item text; expected {item_path.name} (RecBole) or {text_path.name} (UniSRec) next to it"
        )
    names, types, rows = _read_atomic(path)
    _require(path, names, "item_id", "item_id, title (or text)")
    if path is text_path and "text" in names and "title" not in names:
        names = ["title" if n == "text" else n for n in names]
    cols: dict[str, pa.Array] = {}
    for i, (col, typ) in enumerate(zip(names, types)):
        values = [row[i] for row in rows]
        if typ == "float_seq":
            cols[col] = _vectors(path, col, values)
        elif col != "domain":  # the domain is NAME or --domain, never a per-row field
            cols[col] = pa.array(values, pa.string())
    cols["domain"] = pa.array([domain] * len(rows), pa.string())
    return SourceTable(pa.table(cols), str(path))


def _vectors(path: Path, column: str, values: list[str]) -> pa.Array:
    out = []
    for r, v in enumerate(values):
        try:
            out.append([float(x) for x in v.split()])
        except ValueError:
            raise DataError(f"{path}: column '{column}' row {r + 1}: expected space-separated floats") from None
    return pa.array(out, pa.list_(pa.float32()))


def _read_interactions(path: Path, domain: str) -> tuple[SourceTable, int | None]:
    """The interactions and, for the sequence form, how many prefix rows were merged (None otherwise)."""
    names, _, rows = _read_atomic(path)
    required = "user_id, item_id (or item_id_list)"
    _require(path, names, "user_id", required)
    if "item_id_list" in names:
        return _expand_sequences(path, names, rows, domain)
    _require(path, names, "item_id", required)
    cols = {n: [row[i] for row in rows] for i, n in enumerate(names)}
    out: dict[str, pa.Array] = {
        "user_id": pa.array(cols["user_id"], pa.string()),
        "item_id": pa.array(cols["item_id"], pa.string()),
        "domain": pa.array([domain] * len(rows), pa.string()),
    }
    if "timestamp" in cols:
        out["timestamp"] = _numbers(path, "timestamp", cols["timestamp"])
    else:
        seen: dict[str, int] = {}
        ordinal = []
        for u in cols["user_id"]:
            ordinal.append(seen.get(u, 0))
            seen[u] = ordinal[-1] + 1
        out["timestamp"] = pa.array(ordinal, pa.int64())
    if "rating" in cols:
        out["rating"] = _numbers(path, "rating", cols["rating"]).cast(pa.float64())
    return SourceTable(pa.table(out), str(path)), None


def _expand_sequences(path: Path, names: list[str], rows: list[list[str]], domain: str) -> tuple[SourceTable, int]:
    u_col, h_col = names.index("user_id"), names.index("item_id_list")
    t_col = names.index("item_id") if "item_id" in names else None
    # Checked here, per file row: after expansion the schema checks can only name interactions.
    seqs: dict[str, tuple[int, list[str]]] = {}
    merged = 0
    for r, row in enumerate(rows):
        user = row[u_col].strip()
        if not user:
            raise DataError(f"{path}: column 'user_id' row {r + 1}: empty value")
        seq = row[h_col].split()
        if t_col is not None:
            if not row[t_col].strip():
                raise DataError(f"{path}: column 'item_id' row {r + 1}: empty value")
            seq.append(row[t_col].strip())
        if not seq:
            raise DataError(f"{path}: row {r + 1}: no items (item_id_list is empty and there is no item_id)")
        prev = seqs.get(user)
        if prev is None:
            seqs[user] = (r, seq)
            continue
        short, long = sorted((prev, (r, seq)), key=lambda p: len(p[1]))
        if long[1][: len(short[1])] != short[1]:
            raise DataError(
                f"{path}: row {r + 1}: user {user!r} has another history at row {prev[0] + 1} and "
                "neither is a prefix of the other (histories cut to a window?); pass a file with "
                "one row per user, such as UniSRec's NAME.test.inter"
            )
        seqs[user] = long
        merged += 1
    users: list[str] = []
    item_ids: list[str] = []
    ts: list[int] = []
    for user, (_, seq) in seqs.items():
        users += [user] * len(seq)
        item_ids += seq
        ts += range(len(seq))
    table = pa.table(
        {
            "user_id": pa.array(users, pa.string()),
            "item_id": pa.array(item_ids, pa.string()),
            "domain": pa.array([domain] * len(users), pa.string()),
            "timestamp": pa.array(ts, pa.int64()),
        }
    )
    return SourceTable(table, f"{path} (item_id_list expanded: rows are interactions)"), merged
