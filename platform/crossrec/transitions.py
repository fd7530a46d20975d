"""Item-to-item transitions of training interactions (the transition prior's T, crossrec.co_prior): how often one
user's training interactions go from item a to item b, one step apart (weight LAGS[0]) or two (LAGS[1]), across
domains too. Kept apart from co_prior.py so that training.ModelScorer can hold one without an import cycle."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from crossrec.splits import Splits

__all__ = ["LAGS", "Transitions"]

LAGS = (1.0, 0.5)  # weight of a pair one step apart, two steps apart


class Transitions:
    """T as a CSR matrix over a catalog's global indices: row a holds (b, weight) of the pairs a -> b."""

    def __init__(self, n: int, src: np.ndarray, dst: np.ndarray, weight: np.ndarray):
        src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
        w = np.asarray(weight, np.float64)
        # Sum duplicate pairs, then sort by source row (CSR).
        key, inv = np.unique(src * n + dst, return_inverse=True)
        summed = np.bincount(inv.reshape(-1), weights=w, minlength=len(key))
        self.n = int(n)
        self.src, self.dst = key // n, key % n
        self.weight = summed.astype(np.float32)
        self.indptr = np.searchsorted(self.src, np.arange(n + 1))

    def __len__(self) -> int:
        return len(self.weight)

    @classmethod
    def from_splits(cls, splits: Splits) -> Transitions:
        """The training interactions' transitions (`splits.is_train`, rows sorted by user and time)."""
        rows = np.flatnonzero(splits.is_train)
        src, dst, w = [], [], []
        for lag, weight in enumerate(LAGS, start=1):
            same = splits.row_user[rows[lag:]] == splits.row_user[rows[:-lag]]
            src.append(splits.row_item[rows[:-lag]][same])
            dst.append(splits.row_item[rows[lag:]][same])
            w.append(np.full(int(same.sum()), weight))
        return cls(len(splits.item_ids), np.concatenate(src), np.concatenate(dst), np.concatenate(w))

    def to_table(self, item_ids: np.ndarray, item_domain: list[str]) -> pa.Table:
        """The pairs by (domain, item_id), as the bundle stores them (`co_prior.parquet`)."""
        ids, dom = np.asarray(item_ids).astype(str), np.asarray(item_domain).astype(str)
        return pa.table(
            {
                "src_domain": dom[self.src],
                "src_id": ids[self.src],
                "dst_domain": dom[self.dst],
                "dst_id": ids[self.dst],
                "weight": self.weight,
            }
        )

    @classmethod
    def from_table(cls, table: pa.Table, index: dict[tuple[str, str], int], n: int) -> Transitions:
        """The pairs of `table` whose both items are in `index` ((domain, item_id) -> global index)."""
        cols = [table.column(c).to_pylist() for c in ("src_domain", "src_id", "dst_domain", "dst_id")]
        a = np.array([index.get(k, -1) for k in zip(cols[0], cols[1])], np.int64)
        b = np.array([index.get(k, -1) for k in zip(cols[2], cols[3])], np.int64)
        keep = (a >= 0) & (b >= 0)
        w = table.column("weight").to_numpy()
        return cls(n, a[keep], b[keep], w[keep])

    def sums(self, history: np.ndarray, off: int, n: int, decay: float) -> np.ndarray:
        """(n,) sum_k decay^age_k T[h_k, off + j] for one history (global indices, oldest first; -1 = unknown)."""
        h = np.asarray(history, np.int64)
        age = np.arange(len(h))[::-1]
        known = h >= 0
        h, age = h[known], age[known]
        starts, ends = self.indptr[h], self.indptr[h + 1]
        lens = ends - starts
        if not lens.sum():
            return np.zeros(n, np.float64)
        idx = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
        cols = self.dst[idx] - off
        vals = self.weight[idx] * np.repeat(decay**age, lens)
        inside = (cols >= 0) & (cols < n)
        return np.bincount(cols[inside], weights=vals[inside], minlength=n)

    def term(self, histories: list[np.ndarray], off: int, n: int, decay: float) -> np.ndarray:
        """(B, n) log(1 + sums) of each history: the prior's term before beta."""
        return np.log1p(np.stack([self.sums(h, off, n, decay) for h in histories])) if histories else np.zeros((0, n))
