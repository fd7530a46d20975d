"""A prepared dataset: a folder of Parquet files plus `manifest.json`, written atomically by `prepare`.

items.parquet          item_id, domain, title, optional text / feature columns; sorted by (domain, item_id)
interactions.parquet   user_id, item_id, domain, timestamp[, rating, event, platform]; sorted by
                       (user_id, timestamp), ties in input order
identity.parquet       optional: platform, platform_user_id -> user_id
manifest.json          schema version, source, counts per domain, what was merged or skipped, hashes
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

import crossrec
from crossrec.atomic import file_sha256, publishing
from crossrec.ingest import read_source
from crossrec.ingest.tables import CSV, JSONL, PARQUET
from crossrec.schema import (
    SCHEMA_VERSION,
    DataError,
    SourceTable,
    validate_identity,
    validate_interactions,
    validate_items,
)

__all__ = ["Dataset", "prepare", "MANIFEST"]

MANIFEST = "manifest.json"
_FILES = ("items", "interactions", "identity")


@dataclass
class Dataset:
    """A prepared dataset loaded in memory (pyarrow tables)."""

    path: Path
    items: pa.Table
    interactions: pa.Table
    identity: pa.Table | None
    manifest: dict

    @classmethod
    def load(cls, path: str | Path) -> Dataset:
        path = Path(path)
        man = path / MANIFEST
        if not man.is_file():
            raise DataError(
                f"{path}: not a prepared crossrec dataset (no {MANIFEST}); "
                f"run `crossrec prepare SRC --out {path}` first"
            )
        manifest = json.loads(man.read_text())
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise DataError(
                f"{man}: schema version {manifest.get('schema_version')!r}, this crossrec reads "
                f"{SCHEMA_VERSION}; prepare the data again"
            )
        ident = path / "identity.parquet"
        return cls(
            path=path,
            items=pq.read_table(path / "items.parquet"),
            interactions=pq.read_table(path / "interactions.parquet"),
            identity=pq.read_table(ident) if ident.is_file() else None,
            manifest=manifest,
        )

    @property
    def domains(self) -> list[str]:
        return sorted(self.manifest["counts"]["domains"])

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]


def _platform(inters: pa.Table) -> pa.ChunkedArray:
    """The platform of each interaction: its `platform` column, else its domain."""
    return inters.column("platform") if "platform" in inters.column_names else inters.column("domain")


def _apply_identity(inters: pa.Table, identity: pa.Table, canonical: Sequence[str] = ()) -> tuple[pa.Table, dict]:
    """Maps (platform, platform_user_id) to the unified user_id. Unmapped users of a `canonical` platform (whose ids
    already are the unified ids) keep their id; those of other platforms become `platform:id`, so raw ids of two
    platforms never merge by accident."""
    platform = _platform(inters)
    known = set(pc.unique(platform).to_pylist())
    for c in canonical:
        if c not in known:
            raise DataError(f"--identity-canonical: unknown platform {c!r} (platforms: {', '.join(sorted(known))})")
    keys = pc.binary_join_element_wise(platform, inters.column("user_id"), "\x1f")
    id_keys = pc.binary_join_element_wise(identity.column("platform"), identity.column("platform_user_id"), "\x1f")
    idx = pc.index_in(keys, value_set=id_keys)
    mapped = pc.take(identity.column("user_id"), pc.fill_null(idx, 0))
    fallback = pc.binary_join_element_wise(platform, inters.column("user_id"), ":")
    if canonical:
        own = pc.is_in(platform, value_set=pa.array(list(canonical), pa.string()))
        fallback = pc.if_else(own, inters.column("user_id"), fallback)
    user = pc.if_else(pc.is_null(idx), fallback, mapped)
    n_unmapped = idx.null_count
    out = inters.set_column(inters.column_names.index("user_id"), "user_id", user)
    return out, {
        "interactions_mapped": inters.num_rows - n_unmapped,
        "interactions_unmapped": n_unmapped,
        "canonical_platforms": list(canonical),
    }


def users_on_platforms(inters: pa.Table, at_least: int = 2) -> int:
    """Users with interactions on `at_least` platforms (the cross-platform users a merge is for)."""
    per = (
        pa.table({"u": inters.column("user_id"), "p": _platform(inters)})
        .group_by("u")
        .aggregate([("p", "count_distinct")])
    )
    return int(pc.sum(pc.greater_equal(per.column("p_count_distinct"), at_least)).as_py() or 0)


def _sort_interactions(inters: pa.Table) -> pa.Table:
    # Arrow's sort is stable: equal timestamps keep input order (the protocol's tie rule; see splits.py). Strings
    # compare by UTF-8 bytes, which is code-point order, as before; no Python string per row is ever made.
    order = pc.sort_indices(inters, [("user_id", "ascending"), ("timestamp", "ascending")])
    return inters.take(order)


def _counts(items: pa.Table, inters: pa.Table) -> dict:
    item_n = dict(
        zip(
            *(
                items.group_by("domain").aggregate([("item_id", "count")]).column(c).to_pylist()
                for c in ("domain", "item_id_count")
            )
        )
    )
    per_dom = inters.group_by("domain").aggregate([("user_id", "count"), ("user_id", "count_distinct")])
    inter_n = dict(zip(per_dom.column("domain").to_pylist(), per_dom.column("user_id_count").to_pylist()))
    user_n = dict(zip(per_dom.column("domain").to_pylist(), per_dom.column("user_id_count_distinct").to_pylist()))
    per = {
        d: {"items": int(item_n[d]), "interactions": int(inter_n.get(d, 0)), "users": int(user_n.get(d, 0))}
        for d in sorted(item_n)
    }
    return {
        "users": int(pc.count_distinct(inters.column("user_id")).as_py()),
        "items": items.num_rows,
        "interactions": inters.num_rows,
        "domains": per,
    }


def prepare(
    sources: Sequence[str | Path],
    out: str | Path,
    fmt: str = "auto",
    domain: str | None = None,
    identity: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    identity_canonical: Sequence[str] = (),
) -> dict:
    """Reads, validates and writes a dataset; returns its manifest. identity_canonical: platforms whose user ids
    already are the unified ids (their users merge with the identity table's user_id values).

    Published with `crossrec.atomic.publishing`: the writer lock is taken first (a concurrent `prepare` of the
    same `out` is refused at once), the dataset is built in a temporary sibling and swapped into place only when
    complete and on disk; on any failure, or a kill at any moment, `out` is left as it was.
    """
    out = Path(out)
    if os.path.lexists(out) and not force:
        raise DataError(f"{out}: already exists; pass --force to replace it")
    if not sources:
        raise DataError("no source given")
    if identity_canonical and identity is None:
        raise DataError("--identity-canonical needs --identity (the table that maps the other platforms' ids)")
    steps = ["read"] * len(sources) + ["validate", "sort", "write"]
    bar = tqdm(total=len(steps), desc="prepare", unit="step", disable=not progress)
    try:
        with publishing(out, replace=force, exists_hint="pass --force to replace it") as tmp:
            manifest = _prepare_into(tmp, sources, fmt, domain, identity, bar, identity_canonical)
        bar.update()
        return manifest
    finally:
        bar.close()


def _prepare_into(
    tmp: Path,
    sources: Sequence[str | Path],
    fmt: str,
    domain: str | None,
    identity: str | Path | None,
    bar: tqdm,
    canonical: Sequence[str] = (),
) -> dict:
    read = []
    for src in sources:
        bar.set_postfix_str(f"read {src}")
        read.append(read_source(src, fmt, domain))
        bar.update()
    bar.set_postfix_str("validate")
    items, report = validate_items([t for s in read for t in s.items])
    inters = validate_interactions([t for s in read for t in s.interactions], items)
    ident_src = [s.identity for s in read if s.identity is not None]
    if identity is not None:
        ident_src.append(_read_identity(Path(identity)))
    ident = None
    if ident_src:
        ident = pa.concat_tables([validate_identity(s) for s in ident_src])
        inters, report["identity"] = _apply_identity(inters, ident, canonical)
        report["identity"]["users_on_2_or_more_platforms"] = users_on_platforms(inters)
    skipped: dict[str, int] = {}
    for s in read:
        for k, v in s.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    bar.update()
    bar.set_postfix_str("sort")
    items = items.take(pc.sort_indices(items, [("domain", "ascending"), ("item_id", "ascending")]))
    inters = _sort_interactions(inters)
    bar.update()
    bar.set_postfix_str("write")
    tables = {"items": items, "interactions": inters, "identity": ident}
    hashes = {}
    for name in _FILES:
        if tables[name] is None:
            continue
        pq.write_table(tables[name], tmp / f"{name}.parquet", compression="zstd")
        hashes[f"{name}.parquet"] = file_sha256(tmp / f"{name}.parquet")
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"crossrec {crossrec.__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": [{"path": str(src), "format": fmt, "read_as": s.description} for src, s in zip(sources, read)],
        "counts": _counts(items, inters),
        "report": report,
        "skipped": skipped,
        "files": hashes,
        "content_hash": hashlib.sha256("".join(hashes[k] for k in sorted(hashes)).encode()).hexdigest(),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _read_identity(path: Path) -> SourceTable:
    for fmt in (CSV, PARQUET, JSONL):
        if path.suffix == fmt.suffix:
            return fmt.reader(path)
    raise DataError(f"{path}: identity table must be .csv, .parquet or .jsonl")
