"""Interactions sorted by (user_id, timestamp), ties in input order, in bounded memory: a range-partitioned sort.

Arrow sorts in memory only (Acero's `order_by` says "larger-than-memory sort is not currently supported"), so the
sort is split where a library does each part, never a hand-written merge:

1. `add`: validated pieces are written as they come to `runs/` (Parquet), each row numbered (`_row`, its input
   position, the tie-break that makes the order total), and a systematic sample of rows is kept (at most
   `SAMPLE_ROWS`);
2. `partition`: the sample's user ids give `ceil(rows / partition_rows)` user ranges; the runs (after the caller's
   per-row finish, e.g. the identity merge), gathered a range's worth at a time, are written by
   `pyarrow.dataset.write_dataset` into one folder per range (`parts/RANGE/`, a file per gathered batch). A user's
   rows all land in one range, and ranges are in user order;
3. `sorted_parts`: each range is read back whole and sorted by Arrow; the ranges in order are the sorted table.

Memory holds one piece, the sample and one range, never the whole log. A range is `partition_rows` long give or
take the sample's error, plus the rows of a user that straddles a cut (one user's history is never split).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

__all__ = ["RangeSpill", "SAMPLE_ROWS"]

SAMPLE_ROWS = 1 << 16  # rows kept to choose the user ranges: ~1% error on a range's size at 100 ranges
_ROW, _PART = "_row", "_part"
_SORT_KEYS = [("user_id", "ascending"), ("timestamp", "ascending"), (_ROW, "ascending")]
_COMPRESSION = "lz4"  # spill files are read once, soon: speed over size


class RangeSpill:
    """A folder of spilled interactions (removed by `close`, or by the `with` block that holds it)."""

    def __init__(self, folder: Path, partition_rows: int, batch_rows: int) -> None:
        self.folder = folder
        self.partition_rows = partition_rows
        self.batch_rows = batch_rows
        self.rows = 0
        self.schemas: list[pa.Schema] = []  # of each piece added (without `_row`), in input order
        (folder / "runs").mkdir(parents=True)
        self._sample: list[pa.Table] = []
        self._stride = 1  # the sample holds the rows whose input position is a multiple of the stride
        self._n_parts = 0

    def __enter__(self) -> RangeSpill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- 1. runs ------------------------------------------------------------------------------------------------
    def add(self, table: pa.Table) -> None:
        """Spills the next validated piece, in input order."""
        self.schemas.append(table.schema)
        table = table.append_column(_ROW, pa.array(np.arange(self.rows, self.rows + table.num_rows, dtype=np.int64)))
        pq.write_table(table, self._run(len(self.schemas) - 1), compression=_COMPRESSION)
        first = -self.rows % self._stride  # the first row of this piece at a multiple of the stride
        self._sample.append(table.take(pa.array(np.arange(first, table.num_rows, self._stride, dtype=np.int64))))
        self.rows += table.num_rows
        while sum(t.num_rows for t in self._sample) > SAMPLE_ROWS:
            self._stride *= 2
            self._sample = [
                t.filter(pc.equal(pc.bit_wise_and(t.column(_ROW), self._stride - 1), 0)) for t in self._sample
            ]

    def _run(self, i: int) -> Path:
        return self.folder / "runs" / f"{i:06d}.parquet"

    def runs(self) -> Iterator[pa.Table]:
        """The spilled pieces in input order, each with its `_row` column."""
        for i in range(len(self.schemas)):
            yield pq.read_table(self._run(i))

    def sample(self) -> pa.Table:
        """The sampled rows (at most ~`SAMPLE_ROWS`), in input order, without `_row`; columns vary as the runs'
        do. Pass them through the same finish as the runs to get the user ids for `partition`."""
        return pa.concat_tables(self._sample, promote_options="default").drop_columns([_ROW])

    # -- 2. ranges ----------------------------------------------------------------------------------------------
    def partition(
        self, finish: Callable[[pa.Table], pa.Table], schema: pa.Schema, sample_users: pa.ChunkedArray
    ) -> None:
        """Writes the runs into user ranges cut at quantiles of `sample_users` (the sample's final user ids). Each run
        first goes through `finish`: same rows in the same order, with the columns `schema` and the final user ids
        (e.g. after the identity merge), so the ranges are ranges of what will be sorted."""
        cuts = self._cuts(sample_users)
        self._n_parts = len(cuts) + 1 if self.rows else 0
        if not self.rows:
            return

        def finished() -> Iterator[pa.Table]:
            for run in self.runs():
                done = finish(run.drop_columns([_ROW]))
                if not done.schema.equals(schema):
                    raise ValueError(f"finish gave {done.schema}, expected {schema}")
                yield done.append_column(run.field(_ROW), run.column(_ROW))

        # Runs gathered up to a range's worth of rows, and each gathered batch written by its own `write_dataset`
        # call (a file per range): an open Parquet file keeps every row group's metadata until it is closed, so one
        # long call would hold (ranges x batches) of it, which grows as the square of the log.
        for k, group in enumerate(_gathered(finished(), max(self.batch_rows, self.partition_rows))):
            ds.write_dataset(
                group.append_column(_PART, _range_of(group.column("user_id"), cuts)),
                self.folder / "parts",
                basename_template=f"batch-{k:06d}-{{i}}.parquet",
                format="parquet",
                file_options=ds.ParquetFileFormat().make_write_options(compression=_COMPRESSION),
                partitioning=ds.partitioning(pa.schema([(_PART, pa.int32())])),
                max_partitions=self._n_parts,
                existing_data_behavior="overwrite_or_ignore",
            )
        shutil.rmtree(self.folder / "runs")  # all in `parts/` now: the disk holds one copy of the log at a time

    def _cuts(self, users: pa.ChunkedArray) -> list[str]:
        """User ids that start a new range: evenly spaced in the sorted sample, each at most once."""
        n = max(1, math.ceil(self.rows / self.partition_rows))
        if n == 1 or len(users) == 0:
            return []
        ordered = pc.take(users, pc.sort_indices(users))
        picks = [ordered[len(ordered) * k // n].as_py() for k in range(1, n)]
        return sorted(set(picks))

    # -- 3. sorted ranges ---------------------------------------------------------------------------------------
    def sorted_parts(self) -> Iterator[pa.Table]:
        """Each user range sorted by (user_id, timestamp), ties in input order, ranges in user order; no `_row`."""
        for p in range(self._n_parts):
            folder = self.folder / "parts" / str(p)
            if not folder.is_dir():  # no sampled cut falls into an empty range, but a range may still be empty
                continue
            table = ds.dataset(folder, format="parquet").to_table()
            table = table.take(pc.sort_indices(table, _SORT_KEYS)).drop_columns([_ROW])
            shutil.rmtree(folder)
            yield table


def _gathered(tables: Iterator[pa.Table], rows: int) -> Iterator[pa.Table]:
    """Consecutive tables of one schema concatenated into tables of about `rows` rows (at least, but the last)."""
    group: list[pa.Table] = []
    n = 0
    for table in tables:
        group.append(table)
        n += table.num_rows
        if n >= rows:
            yield pa.concat_tables(group).combine_chunks()
            group, n = [], 0
    if group:
        yield pa.concat_tables(group).combine_chunks()


def _range_of(users: pa.ChunkedArray, cuts: list[str]) -> pa.Array:
    """The range of each user id: how many cuts are <= it (strings compare by UTF-8 bytes, as Arrow sorts them).
    A binary search of all rows at once: log2(len(cuts) + 1) vectorised comparisons."""
    users_arr = users.combine_chunks()
    cut = pa.array(cuts, pa.string())
    lo = np.zeros(len(users_arr), dtype=np.int64)
    hi = np.full(len(users_arr), len(cuts), dtype=np.int64)
    while (active := lo < hi).any():
        mid = (lo + hi) // 2
        at_least = pc.greater_equal(users_arr, pc.take(cut, np.minimum(mid, len(cuts) - 1))).to_numpy(
            zero_copy_only=False
        )
        lo = np.where(active & at_least, mid + 1, lo)
        hi = np.where(active & ~at_least, mid, hi)
    return pa.array(lo.astype(np.int32))
