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
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
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
    conform_interactions,
    iter_interactions,
    validate_identity,
    validate_items,
)
from crossrec.spill import RangeSpill

__all__ = ["Dataset", "prepare", "PrepareLimits", "MANIFEST"]

MANIFEST = "manifest.json"
_FILES = ("items", "interactions", "identity")
# pyarrow's default row group length, which `pq.write_table` gave every dataset before interactions were streamed:
# the streamed writer cuts the same row groups, so the files (and content hashes) are byte for byte the same.
ROW_GROUP_ROWS = 1 << 20


@dataclass(frozen=True)
class PrepareLimits:
    """How many interactions `prepare` holds in memory at a time; the log itself may be larger than memory.
    Peak memory is about the items, the identity table and ~200 bytes per row of the larger of the two sizes
    (`bench/ingest_memory.py`); the output does not depend on them."""

    # Interactions validated and spilled at a time: a piece a reader gives (CSV: 32 MiB of text, JSONL: 128 Ki
    # lines, Parquet: 1 Mi rows) is cut into pieces of at most this many rows.
    batch_rows: int = 1 << 18
    # Interactions sorted at a time: one range of users (one user's history is never split across ranges).
    partition_rows: int = 1 << 19
    # Where interactions are spilled meanwhile (about the size of the output again; removed when `prepare` ends,
    # whether it succeeds or fails). Default: inside the dataset's temporary folder, on the output's disk, where
    # the next `prepare` of the same output also removes what a killed one left.
    spill_dir: Path | None = field(default=None)

    def __post_init__(self) -> None:
        for name in ("batch_rows", "partition_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be > 0, got {value!r}")


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


def _check_canonical(known: set[str], canonical: Sequence[str]) -> None:
    for c in canonical:
        if c not in known:
            raise DataError(f"--identity-canonical: unknown platform {c!r} (platforms: {', '.join(sorted(known))})")


def _map_users(inters: pa.Table, identity: pa.Table, canonical: Sequence[str] = ()) -> tuple[pa.Table, int]:
    """Maps (platform, platform_user_id) to the unified user_id; returns the table and how many rows the identity
    table did not map. Unmapped users of a `canonical` platform (whose ids already are the unified ids) keep their
    id; those of other platforms become `platform:id`, so raw ids of two platforms never merge by accident."""
    platform = _platform(inters)
    keys = pc.binary_join_element_wise(platform, inters.column("user_id"), "\x1f")
    id_keys = pc.binary_join_element_wise(identity.column("platform"), identity.column("platform_user_id"), "\x1f")
    idx = pc.index_in(keys, value_set=id_keys)
    mapped = pc.take(identity.column("user_id"), pc.fill_null(idx, 0))
    fallback = pc.binary_join_element_wise(platform, inters.column("user_id"), ":")
    if canonical:
        own = pc.is_in(platform, value_set=pa.array(list(canonical), pa.string()))
        fallback = pc.if_else(own, inters.column("user_id"), fallback)
    user = pc.if_else(pc.is_null(idx), fallback, mapped)
    return inters.set_column(inters.column_names.index("user_id"), "user_id", user), idx.null_count


def users_on_platforms(inters: pa.Table, at_least: int = 2) -> int:
    """Users with interactions on `at_least` platforms (the cross-platform users a merge is for)."""
    per = (
        pa.table({"u": inters.column("user_id"), "p": _platform(inters)})
        .group_by("u")
        .aggregate([("p", "count_distinct")])
    )
    return int(pc.sum(pc.greater_equal(per.column("p_count_distinct"), at_least)).as_py() or 0)


@dataclass
class _InteractionCounts:
    """The manifest's interaction counts, summed over ranges of users (a user is in exactly one range)."""

    rows: int = 0
    users: int = 0
    per_domain: dict[str, list[int]] = field(default_factory=dict)  # domain -> [interactions, users]
    on_2_platforms: int = 0

    def add(self, inters: pa.Table, platforms: bool) -> None:
        self.rows += inters.num_rows
        self.users += int(pc.count_distinct(inters.column("user_id")).as_py())
        per = inters.group_by("domain").aggregate([("user_id", "count"), ("user_id", "count_distinct")])
        for d, n, u in zip(*(per.column(c).to_pylist() for c in ("domain", "user_id_count", "user_id_count_distinct"))):
            have = self.per_domain.setdefault(d, [0, 0])
            have[0] += n
            have[1] += u
        if platforms:
            self.on_2_platforms += users_on_platforms(inters)


def _counts(items: pa.Table, inters: _InteractionCounts) -> dict:
    item_n = dict(
        zip(
            *(
                items.group_by("domain").aggregate([("item_id", "count")]).column(c).to_pylist()
                for c in ("domain", "item_id_count")
            )
        )
    )
    per = {
        d: {
            "items": int(item_n[d]),
            "interactions": int(inters.per_domain.get(d, [0, 0])[0]),
            "users": int(inters.per_domain.get(d, [0, 0])[1]),
        }
        for d in sorted(item_n)
    }
    return {"users": inters.users, "items": items.num_rows, "interactions": inters.rows, "domains": per}


def _write_sorted(path: Path, schema: pa.Schema, parts: Iterable[pa.Table]) -> None:
    """Writes consecutive tables as one zstd Parquet file: byte for byte what `pq.write_table` writes for their
    concatenation taken in one piece (as a sort's `take` gives it): the same row groups (ROW_GROUP_ROWS), each from
    one contiguous chunk (a data page ends where a 1024-row write batch does, and batches restart at each chunk)."""
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        pending: list[pa.Table] = []
        n, wrote = 0, False
        for part in parts:
            pending.append(part)
            n += part.num_rows
            while n >= ROW_GROUP_ROWS:
                buf = pa.concat_tables(pending).combine_chunks()
                writer.write_table(buf.slice(0, ROW_GROUP_ROWS))
                pending, n, wrote = [buf.slice(ROW_GROUP_ROWS)], n - ROW_GROUP_ROWS, True
        if n or not wrote:
            writer.write_table(pa.concat_tables(pending).combine_chunks() if pending else schema.empty_table())


def prepare(
    sources: Sequence[str | Path],
    out: str | Path,
    fmt: str = "auto",
    domain: str | None = None,
    identity: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    identity_canonical: Sequence[str] = (),
    limits: PrepareLimits = PrepareLimits(),
) -> dict:
    """Reads, validates and writes a dataset; returns its manifest. identity_canonical: platforms whose user ids
    already are the unified ids (their users merge with the identity table's user_id values).

    Interactions are streamed: validated piece by piece, spilled, and sorted one range of users at a time
    (`crossrec.spill`), so memory is bounded by `limits`, not by the log; the items and the identity table are
    held whole. Published with `crossrec.atomic.publishing`: the writer lock is taken first (a concurrent
    `prepare` of the same `out` is refused at once), the dataset is built in a temporary sibling and swapped into
    place only when complete and on disk; on any failure, or a kill at any moment, `out` is left as it was.
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
            if limits.spill_dir is not None:
                Path(limits.spill_dir).mkdir(parents=True, exist_ok=True)
            spill_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.spill-", dir=limits.spill_dir or tmp))
            with RangeSpill(spill_dir, limits.partition_rows, limits.batch_rows) as spill:
                manifest = _prepare_into(tmp, sources, fmt, domain, identity, bar, spill, limits, identity_canonical)
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
    spill: RangeSpill,
    limits: PrepareLimits,
    canonical: Sequence[str] = (),
) -> dict:
    read = []
    for src in sources:
        bar.set_postfix_str(f"read {src}")
        read.append(read_source(src, fmt, domain))
        bar.update()
    bar.set_postfix_str("validate")
    items, report = validate_items([t for s in read for t in s.items])
    # 1. every interaction validated and spilled, in input order; only what the identity check needs is kept
    platforms: set[str] = set()  # of pieces with a `platform` column
    domains_without: set[str] = set()  # domains of pieces without one (their platform is "" or the domain)
    for piece in iter_interactions([t for s in read for t in s.interactions], items, limits.batch_rows):
        spill.add(piece)
        if canonical:
            has = "platform" in piece.column_names
            (platforms if has else domains_without).update(pc.unique(_platform(piece)).to_pylist())
    schema = pa.unify_schemas(spill.schemas)  # the columns concatenating every piece would give
    ident_src = [s.identity for s in read if s.identity is not None]
    if identity is not None:
        ident_src.append(_read_identity(Path(identity)))
    ident = pa.concat_tables([validate_identity(s) for s in ident_src]) if ident_src else None
    if canonical:
        has_platform = "platform" in schema.names
        _check_canonical(
            platforms | ({""} if domains_without else set()) if has_platform else domains_without, canonical
        )
    skipped: dict[str, int] = {}
    for s in read:
        for k, v in s.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    bar.update()

    # 2. spilled again by ranges of final user ids
    bar.set_postfix_str("sort")
    unmapped = 0

    def finish(piece: pa.Table) -> pa.Table:
        nonlocal unmapped
        piece = conform_interactions(piece, schema)
        if ident is not None:
            piece, n = _map_users(piece, ident, canonical)
            unmapped += n
        return piece

    if spill.rows:
        sample_users = conform_interactions(spill.sample(), schema)
        if ident is not None:
            sample_users = _map_users(sample_users, ident, canonical)[0]
        spill.partition(finish, schema, sample_users.column("user_id"))
    items = items.take(pc.sort_indices(items, [("domain", "ascending"), ("item_id", "ascending")]))
    bar.update()

    # 3. each range sorted and appended to interactions.parquet
    bar.set_postfix_str("write")
    counts = _InteractionCounts()

    def counted(parts: Iterable[pa.Table]) -> Iterator[pa.Table]:
        for part in parts:
            counts.add(part, platforms=ident is not None)
            yield part

    hashes = {}
    for name in _FILES:
        path = tmp / f"{name}.parquet"
        if name == "interactions":
            _write_sorted(path, schema, counted(spill.sorted_parts()))
        elif name == "items":
            pq.write_table(items, path, compression="zstd")
        elif ident is not None:
            pq.write_table(ident, path, compression="zstd")
        else:
            continue
        hashes[f"{name}.parquet"] = file_sha256(path)
    if ident is not None:
        report["identity"] = {
            "interactions_mapped": counts.rows - unmapped,
            "interactions_unmapped": unmapped,
            "canonical_platforms": list(canonical),
            "users_on_2_or_more_platforms": counts.on_2_platforms,
        }
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"crossrec {crossrec.__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": [{"path": str(src), "format": fmt, "read_as": s.description} for src, s in zip(sources, read)],
        "counts": _counts(items, counts),
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
