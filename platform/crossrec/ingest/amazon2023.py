"""Amazon Reviews 2023 (McAuley lab) JSONL: reviews `CATEGORY.jsonl` with item metadata `meta_CATEGORY.jsonl`.

Either file may be gzipped (`.jsonl.gz`). Each category is one domain, named after its file lower-cased
(`Grocery_and_Gourmet_Food.jsonl` -> `grocery_and_gourmet_food`) unless `--domain` is given (one category only).
Items are the meta rows: item_id = parent_asin, title, `categories` joined by " > ", `brand` = store, and
`description` / `features` joined. Interactions are the reviews: item_id = parent_asin, timestamp in ms, rating.
A review of an item without a meta row has no text to learn from: it is skipped and counted in
`skipped["reviews_without_meta"]`. Item table rows are the meta file's lines; review fields are checked here,
naming the line, because skipped reviews shift the table's rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from crossrec.ingest.base import Source
from crossrec.ingest.jsonl import records as _records
from crossrec.schema import DataError, SourceTable

__all__ = ["detect", "read", "DESCRIPTION_CHARS", "CHUNK_ROWS"]

# Long descriptions add little for a text encoder that truncates anyway, and bloat the items table.
DESCRIPTION_CHARS = 1000
CHUNK_ROWS = 1 << 18  # reviews converted to Arrow at a time
_EXTS = (".jsonl", ".jsonl.gz")
_META = "meta_"


def detect(path: Path) -> bool:
    if path.is_file():
        return _stem(path) is not None and _partner(path) is not None
    return path.is_dir() and any(
        _partner(p) is not None for p in path.iterdir() if p.name.startswith(_META) and _stem(p) is not None
    )


def read(path: Path, domain: str | None) -> Source:
    pairs = _pairs(path)
    if domain is not None and len(pairs) > 1:
        raise DataError(
            f"{path}: --domain {domain!r} was given but the folder holds {len(pairs)} categories "
            f"({', '.join(pairs)}); each is its own domain, named after its files"
        )
    items, inters, skipped = [], [], 0
    for category, (reviews, meta) in pairs.items():
        dom = domain or category.lower()
        item_table = _read_meta(meta, dom)
        known = set(item_table.whole().column("item_id").to_pylist())
        review_table, n_skipped = _read_reviews(reviews, dom, known)
        items.append(item_table)
        inters.append(review_table)
        skipped += n_skipped
    return Source(
        items=items,
        interactions=inters,
        description=f"Amazon Reviews 2023 JSONL {path}",
        skipped={"reviews_without_meta": skipped},
    )


def _stem(path: Path) -> str | None:
    """The file name without .jsonl[.gz], or None for any other file."""
    for ext in sorted(_EXTS, key=len, reverse=True):
        if path.name.endswith(ext) and len(path.name) > len(ext):
            return path.name[: -len(ext)]
    return None


def _find(folder: Path, stem: str) -> Path | None:
    found = [folder / f"{stem}{ext}" for ext in _EXTS if (folder / f"{stem}{ext}").is_file()]
    if len(found) > 1:
        raise DataError(f"{folder}: both {found[0].name} and {found[1].name}; keep one")
    return found[0] if found else None


def _partner(path: Path) -> Path | None:
    """The meta file of a reviews file, or the reviews file of a meta file."""
    stem = _stem(path)
    assert stem is not None
    other = stem[len(_META) :] if stem.startswith(_META) else _META + stem
    return _find(path.parent, other) if other else None


def _pairs(path: Path) -> dict[str, tuple[Path, Path]]:
    """CATEGORY -> (reviews file, meta file)."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if _stem(p) is not None)
    pairs: dict[str, tuple[Path, Path]] = {}
    for f in files:
        stem = _stem(f)
        if stem is None:
            raise DataError(
                f"{f}: not an Amazon Reviews 2023 file (expected CATEGORY.jsonl[.gz] or meta_CATEGORY.jsonl[.gz])"
            )
        category = stem[len(_META) :] if stem.startswith(_META) else stem
        if category in pairs:
            continue
        reviews, meta = _find(f.parent, category), _find(f.parent, _META + category)
        # A category with only one half cannot be read, and skipping it would lose data silently.
        if reviews is None or meta is None:
            half, missing = (meta, category) if reviews is None else (reviews, _META + category)
            raise DataError(
                f"{half}: no {missing}.jsonl[.gz] next to it (Amazon Reviews 2023 needs the reviews "
                "and the meta file of each category)"
            )
        pairs[category] = (reviews, meta)
    if not pairs:
        raise DataError(f"{path}: no Amazon Reviews 2023 files (CATEGORY.jsonl + meta_CATEGORY.jsonl)")
    return pairs


def _id(path: Path, n: int, rec: dict[str, Any], key: str) -> str:
    v = rec.get(key)
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if not isinstance(v, str) or not v.strip():
        raise DataError(f"{path}: column '{key}' row {n}: expected a non-empty string, got {v!r}")
    return v


def _join(value: Any, sep: str) -> str:
    """Text of a field that is a string or a list of strings (either occurs); null and [] are ""."""
    if value is None:
        return ""
    if isinstance(value, list):
        return sep.join(str(v).strip() for v in value if v is not None and str(v).strip())
    return str(value).strip()


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit]
    # At a word boundary, unless that throws most of the text away (e.g. CJK without spaces).
    space = cut.rfind(" ")
    return cut[:space] if space > limit // 2 else cut


def _read_meta(path: Path, domain: str) -> SourceTable:
    cols: dict[str, list[str]] = {c: [] for c in ("item_id", "title", "categories", "brand", "description", "features")}
    for n, rec in _records(path):
        cols["item_id"].append(_id(path, n, rec, "parent_asin"))
        cols["title"].append(_join(rec.get("title"), " "))
        cols["categories"].append(_join(rec.get("categories"), " > "))
        cols["brand"].append(_join(rec.get("store"), " "))
        cols["description"].append(_truncate(_join(rec.get("description"), " "), DESCRIPTION_CHARS))
        cols["features"].append(_join(rec.get("features"), " "))
    if not cols["item_id"]:
        raise DataError(f"{path}: file is empty (no rows)")
    table = pa.table(
        {
            "item_id": cols.pop("item_id"),
            "domain": [domain] * len(cols["title"]),
            **{c: pa.array(v, pa.string()) for c, v in cols.items()},
        }
    )
    return SourceTable(table, str(path))


def _read_reviews(path: Path, domain: str, known: set[str]) -> tuple[SourceTable, int]:
    """Reviews in Arrow pieces of `CHUNK_ROWS`: a full category (tens of millions of reviews) is never held as
    Python objects, only as compact columns."""
    users: list[str] = []
    item_ids: list[str] = []
    ts: list[int] = []
    ratings: list[float | None] = []
    parts: list[pa.Table] = []
    skipped, rated = 0, False

    def flush() -> None:
        parts.append(
            pa.table(
                {
                    "user_id": pa.array(users, pa.string()),
                    "item_id": pa.array(item_ids, pa.string()),
                    "domain": pa.array([domain] * len(users), pa.string()),
                    "timestamp": pa.array(ts, pa.int64()),
                    "rating": pa.array(ratings, pa.float64()),
                }
            )
        )
        for col in (users, item_ids, ts, ratings):
            col.clear()

    for n, rec in _records(path):
        user, item = _id(path, n, rec, "user_id"), _id(path, n, rec, "parent_asin")
        t = rec.get("timestamp")
        if isinstance(t, float) and t.is_integer():
            t = int(t)
        if not isinstance(t, int) or isinstance(t, bool):
            raise DataError(f"{path}: column 'timestamp' row {n}: expected an integer (ms), got {t!r}")
        rating = rec.get("rating")
        if rating is not None and (isinstance(rating, bool) or not isinstance(rating, (int, float))):
            raise DataError(f"{path}: column 'rating' row {n}: expected a number, got {rating!r}")
        if item not in known:
            skipped += 1
            continue
        users.append(user)
        item_ids.append(item)
        ts.append(t)
        ratings.append(rating)
        rated = rated or rating is not None
        if len(users) >= CHUNK_ROWS:
            flush()
    if not parts and not users and not skipped:
        raise DataError(f"{path}: file is empty (no rows)")
    flush()
    table = pa.concat_tables(parts)
    if not rated:
        table = table.drop_columns(["rating"])
    return SourceTable(table, str(path)), skipped
