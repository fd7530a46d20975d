"""`prepare` in bounded memory: interactions validated piece by piece, spilled, sorted one range of users at a time.

The dataset must not depend on the limits (same bytes, same content hash), bad rows are named by the same file row
whatever the pieces, and the spill is gone after success and after failure.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import DATA, REPO

from crossrec.dataset import Dataset, PrepareLimits, prepare
from crossrec.schema import DataError
from crossrec.spill import RangeSpill
from crossrec_cli import main

TINY = PrepareLimits(batch_rows=61, partition_rows=150)  # the minis have 800 to 3,400 interactions: 5 to 23 ranges


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("*.parquet"))}


def _same_dataset(a: Path, b: Path) -> None:
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    for m in (ma, mb):
        m.pop("created_at")
    assert ma == mb  # content hash, counts, report (identity merge included)
    assert _files(a) == _files(b)


def _mixed_columns(tmp_path: Path) -> list[Path]:
    """Two sources whose interactions have different optional columns (rating in one, event and platform in the
    other), so that pieces are unified into one set of columns."""
    out = []
    for name, extra in (("amazon-art-office-mini", {"rating": "4.5"}), ("amazon-food-kitchen-mini", {"event": "buy"})):
        dst = tmp_path / name
        shutil.copytree(DATA / name, dst)
        with open(dst / "interactions.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        with open(dst / "interactions.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=[*rows[0], *extra, *(["platform"] if "event" in extra else [])])
            w.writeheader()
            for i, r in enumerate(rows):
                if "event" in extra:  # every third row leaves event and platform empty
                    w.writerow({**r, **({"event": "buy", "platform": r["domain"]} if i % 3 else {})})
                else:
                    w.writerow({**r, "rating": str(1 + i % 5)})
        out.append(dst)
    return out


SOURCES = {
    "csv": lambda tmp: [DATA / "amazon-art-office-mini"],
    "jsonl": lambda tmp: [DATA / "jsonl-mini"],
    "recbole": lambda tmp: [DATA / "recbole-mini"],
    "amazon2023": lambda tmp: [DATA / "amazon2023-mini"],
    "two sources, mixed columns": _mixed_columns,
}


@pytest.mark.parametrize("case", list(SOURCES))
def test_tiny_batches_and_ranges_give_the_same_dataset_as_one_batch(case, tmp_path):
    srcs = SOURCES[case](tmp_path)
    prepare(srcs, tmp_path / "one", progress=False, limits=PrepareLimits(batch_rows=10**9, partition_rows=10**9))
    prepare(srcs, tmp_path / "tiny", progress=False, limits=TINY)
    assert Dataset.load(tmp_path / "tiny").interactions.num_rows > 4 * TINY.partition_rows
    _same_dataset(tmp_path / "one", tmp_path / "tiny")


def test_identity_merge_is_the_same_in_tiny_ranges(tmp_path, food_kitchen_csv):
    src = tmp_path / "src"
    shutil.copytree(food_kitchen_csv, src)
    with open(src / "interactions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    kitchen = sorted({r["user_id"] for r in rows if r["domain"] == "kitchen"})
    with open(src / "interactions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "user_id": "k-" + r["user_id"]} if r["domain"] == "kitchen" else r for r in rows)
    (tmp_path / "identity.csv").write_text(
        "platform,platform_user_id,user_id\n" + "".join(f"kitchen,k-{u},{u}\n" for u in kitchen[::2])
    )
    kw = {"identity": tmp_path / "identity.csv", "identity_canonical": ["food"], "progress": False}
    one = prepare([src], tmp_path / "one", **kw)  # type: ignore[arg-type]
    prepare([src], tmp_path / "tiny", limits=TINY, **kw)  # type: ignore[arg-type]
    assert one["report"]["identity"]["users_on_2_or_more_platforms"] > 0
    _same_dataset(tmp_path / "one", tmp_path / "tiny")


def test_vendored_dataset_prepared_again_keeps_its_content_hash(tmp_path):
    """The vendored datasets were written by the in-memory prepare; streamed in small ranges, the same bytes."""
    src = REPO / "data" / "amazon-art-office"
    man = prepare([src], tmp_path / "ao", progress=False, limits=PrepareLimits(batch_rows=20000, partition_rows=50000))
    assert man["content_hash"] == json.loads((src / "manifest.json").read_text())["content_hash"]


def _bad_timestamp(tmp_path: Path, row: int) -> Path:
    src = tmp_path / "src"
    shutil.copytree(DATA / "amazon-art-office-mini", src)
    lines = (src / "interactions.csv").read_text().splitlines(keepends=True)
    parts = lines[row].split(",")
    parts[3] = "yesterday\n"
    lines[row] = ",".join(parts)
    (src / "interactions.csv").write_text("".join(lines))
    return src


@pytest.mark.parametrize("row", [1, 61, 62, 1000, 3452])
def test_bad_rows_are_named_by_their_file_row_across_batches(tmp_path, row):
    src = _bad_timestamp(tmp_path, row)
    msg = rf"interactions.csv: column 'timestamp' row {row}: expected an integer, got 'yesterday'"
    for limits in (PrepareLimits(), TINY):
        with pytest.raises(DataError, match=msg):
            prepare([src], tmp_path / "ds", progress=False, limits=limits)


def test_bad_rows_of_a_parquet_file_are_named_across_batches(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    inter = Dataset.load(REPO / "data" / "amazon-art-office").interactions.slice(0, 5000)
    items = pq.read_table(REPO / "data" / "amazon-art-office" / "items.parquet")
    pq.write_table(items, src / "items.parquet")
    item = inter.column("item_id").to_pylist()
    item[4321] = "arts-nope"
    pq.write_table(inter.set_column(1, "item_id", pa.array(item)), src / "interactions.parquet", row_group_size=1000)
    with pytest.raises(DataError, match=r"interactions.parquet: column 'item_id' row 4322: item_id 'arts-nope'"):
        prepare([src], tmp_path / "ds", progress=False, limits=TINY)


def test_the_spill_is_gone_after_success_and_after_failure(tmp_path, art_office_csv):
    spill = tmp_path / "spill"
    limits = PrepareLimits(batch_rows=61, partition_rows=150, spill_dir=spill)
    prepare([art_office_csv], tmp_path / "out" / "ds", progress=False, limits=limits)
    assert list(spill.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ds"]
    assert sorted(p.name for p in (tmp_path / "out" / "ds").iterdir()) == [
        "interactions.parquet",
        "items.parquet",
        "manifest.json",
    ]
    # A bad row near the end: every piece before it is spilled by then. Default spill place (the temporary folder)
    # and a given one: nothing of either is left.
    src = _bad_timestamp(tmp_path, 3400)
    for failing in (TINY, limits):
        with pytest.raises(DataError, match="row 3400"):
            prepare([src], tmp_path / "failed" / "ds", progress=False, limits=failing)
        assert list((tmp_path / "failed").iterdir()) == [] and list(spill.iterdir()) == []
    # A failure after the ranges are written (an identity table with a conflict is read after the spill).
    (tmp_path / "identity.csv").write_text("platform,platform_user_id,user_id\narts,x,a\narts,x,b\n")
    with pytest.raises(DataError, match="is mapped to 'b'"):
        prepare([art_office_csv], tmp_path / "failed" / "ds", identity=tmp_path / "identity.csv", progress=False)
    assert list((tmp_path / "failed").iterdir()) == []


def test_range_spill_sorts_by_user_and_time_ties_in_input_order(tmp_path):
    rng = np.random.default_rng(0)
    pieces = []
    for n in (1, 500, 37, 2000, 0, 800):  # uneven pieces, one empty
        pieces.append(
            pa.table(
                {
                    "user_id": pa.array([f"u{u:03d}" for u in rng.integers(0, 150, n)], pa.string()),
                    "timestamp": pa.array(rng.integers(0, 5, n), pa.int64()),  # many ties
                    "seq": pa.array(np.arange(n) + sum(p.num_rows for p in pieces), pa.int64()),
                }
            )
        )
    whole = pa.concat_tables(pieces)
    expected = whole.take(pc.sort_indices(whole, [("user_id", "ascending"), ("timestamp", "ascending")]))
    with RangeSpill(tmp_path / "spill", partition_rows=250, batch_rows=300) as spill:
        for p in pieces:
            spill.add(p)
        spill.partition(lambda t: t, whole.schema, spill.sample().column("user_id"))
        ranges = list(spill.sorted_parts())
        assert len(ranges) >= 8  # ceil(3338 / 250) = 14 planned; a few may come out empty or merged by ties
        users = [set(r.column("user_id").to_pylist()) for r in ranges]
        assert all(not (a & b) for i, a in enumerate(users) for b in users[i + 1 :])  # a user is in one range
        assert pa.concat_tables(ranges).equals(expected)  # Arrow's sort is stable: `seq` shows input order
    assert not (tmp_path / "spill").exists()


def test_limits_are_checked_with_the_field_named(tmp_path, art_office_csv, capsys):
    with pytest.raises(ValueError, match=r"`partition_rows` must be > 0, got 0"):
        PrepareLimits(partition_rows=0)
    argv = ["prepare", str(art_office_csv), "--out", str(tmp_path / "ds"), "--quiet"]
    assert main([*argv, "--batch-rows", "-1"]) == 2
    assert "`batch_rows` must be > 0, got -1" in capsys.readouterr().err
    assert main([*argv, "--batch-rows", "50", "--partition-rows", "400", "--spill-dir", str(tmp_path / "sp")]) == 0
    assert list((tmp_path / "sp").iterdir()) == []
