"""Chronological leave-one-out splits per (user, domain), with cross-domain histories.

Protocol (DESIGN.md "Splits and evaluation"):
- each user's interactions are ordered by timestamp, ties in dataset order (the dataset is stored so);
- for each (user, domain) with at least `min_per_domain` interactions there, the last one in that domain is
  the test target and the one before it the validation target;
- a target's input history is every interaction of the user, in any domain, with a strictly earlier
  timestamp (equal timestamps are simultaneous: neither is in the other's history);
- training interactions are all the others; targets never reach training, neither as targets nor inside
  the sequences training sees (`train_sequences`).

Items get global indices: domains in sorted order, item ids sorted (code-point order) within a domain, so
a domain's candidates are the contiguous block `offset[d] : offset[d] + n_items[d]`, and ties in ranking
are broken by item id order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crossrec.dataset import Dataset

__all__ = ["Splits", "TargetBatch"]


@dataclass
class TargetBatch:
    """Targets of one domain handed to a scorer. The target item itself is not included."""

    domain: str
    rows: np.ndarray  # indices into Splits' interaction arrays
    user_ids: list[str]
    histories: list[np.ndarray]  # global item indices, chronological, all domains
    history_ts: list[np.ndarray]
    target_ts: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


class Splits:
    """A dataset's interactions as arrays, with test/validation/training masks.

    Items: `item_ids`, `item_domain` (domain code), `item_row` (row in the dataset's items table) per global
    item index; `offset[d]`, `n_items[d]` the block of domain `d`; `domain_code[d]` its code.
    Interactions ("rows"), sorted by user then time: `row_user` (index into `users`), `row_item` (global item
    index), `row_time`, `row_domain` (domain code), and the masks `is_test`, `is_valid`, `is_train`;
    `user_start[k]:user_start[k + 1]` are user k's rows.
    """

    def __init__(self, data: Dataset, min_per_domain: int = 3):
        if min_per_domain < 2:
            raise ValueError(f"`min_per_domain` must be >= 2 (a test and a validation target), got {min_per_domain}")
        self.min_per_domain = min_per_domain
        self.data_hash = data.content_hash
        items = data.items
        item_ids = items.column("item_id").to_numpy(zero_copy_only=False).astype(str)
        item_dom = items.column("domain").to_numpy(zero_copy_only=False).astype(str)
        self.domains: list[str] = sorted(set(item_dom.tolist()))
        self.domain_code = {d: k for k, d in enumerate(self.domains)}
        # Global order: (domain, item_id). The dataset is stored in that order; sort again to not depend on it.
        order = np.lexsort((item_ids, item_dom))
        self.item_ids = item_ids[order]
        self.item_domain = np.array([self.domain_code[d] for d in item_dom[order]], dtype=np.int64)
        self.item_row = order  # row of data.items for each global index (titles, attributes, ...)
        self.offset = {d: int(np.searchsorted(self.item_domain, k)) for d, k in self.domain_code.items()}
        self.n_items = {d: int((self.item_domain == k).sum()) for d, k in self.domain_code.items()}
        index = {iid: k for k, iid in enumerate(self.item_ids)}

        inter = data.interactions
        users = inter.column("user_id").to_numpy(zero_copy_only=False).astype(str)
        ts = inter.column("timestamp").to_numpy().astype(np.int64)
        self.users, ucode = np.unique(users, return_inverse=True)
        ucode = ucode.reshape(-1)
        item = np.fromiter((index[x] for x in inter.column("item_id").to_numpy(zero_copy_only=False)),
                           dtype=np.int64, count=inter.num_rows)
        o = np.lexsort((np.arange(len(ts)), ts, ucode))
        self.row_user, self.row_item, self.row_time = ucode[o], item[o], ts[o]
        self.row_domain = self.item_domain[self.row_item]
        n = len(self.row_user)
        self.user_start = np.searchsorted(self.row_user, np.arange(len(self.users) + 1))
        # Position counted from the end within each (user, domain): 0 = last (test), 1 = validation.
        key = self.row_user * len(self.domains) + self.row_domain
        o2 = np.lexsort((np.arange(n), key))
        k2 = key[o2]
        brk = np.flatnonzero(np.diff(k2)) + 1
        starts, ends = np.r_[0, brk], np.r_[brk, n]
        size = np.repeat(ends - starts, ends - starts)
        rev = np.repeat(ends, ends - starts) - 1 - np.arange(n)
        group_size, rev_pos = np.empty(n, np.int64), np.empty(n, np.int64)
        group_size[o2], rev_pos[o2] = size, rev
        ok = group_size >= min_per_domain
        self.is_test = ok & (rev_pos == 0)
        self.is_valid = ok & (rev_pos == 1)
        self.is_train = ~(self.is_test | self.is_valid)
        # Rows are sorted by (user, ts): the first row of each run of equal (user, ts).
        n_idx = np.arange(n)
        new_run = np.r_[True, (self.row_user[1:] != self.row_user[:-1]) | (self.row_time[1:] != self.row_time[:-1])]
        self._first_simultaneous = np.maximum.accumulate(np.where(new_run, n_idx, 0))
        # Items ever seen in training, per global index (cold-item slice).
        self.train_count = np.bincount(self.row_item[self.is_train], minlength=len(self.item_ids))

    # -- targets ---------------------------------------------------------------------------------------
    def targets(self, split: str = "test", domain: str | None = None) -> np.ndarray:
        if split not in ("test", "valid"):
            raise ValueError(f"split must be 'test' or 'valid', got {split!r}")
        mask = self.is_test if split == "test" else self.is_valid
        if domain is not None:
            mask = mask & (self.row_domain == self.domain_code[self.check_domain(domain)])
        return np.flatnonzero(mask)

    def history_end(self, rows: np.ndarray) -> np.ndarray:
        """For each row, the end (exclusive) of its input history: the first row of the user with the
        same timestamp, so simultaneous interactions are excluded."""
        return self._first_simultaneous[np.asarray(rows)]

    def batch(self, rows: np.ndarray, domain: str) -> TargetBatch:
        ends = self.history_end(rows)
        starts = self.user_start[self.row_user[rows]]
        return TargetBatch(domain=domain, rows=rows, user_ids=[str(self.users[self.row_user[r]]) for r in rows],
                           histories=[self.row_item[s:e] for s, e in zip(starts, ends)],
                           history_ts=[self.row_time[s:e] for s, e in zip(starts, ends)], target_ts=self.row_time[rows])

    # -- training ----------------------------------------------------------------------------------------
    def train_sequences(self) -> list[np.ndarray]:
        """Per user, the row indices of their training interactions, chronological (targets removed)."""
        rows = np.flatnonzero(self.is_train)
        cut = np.searchsorted(self.row_user[rows], np.arange(len(self.users) + 1))
        return [rows[cut[k]:cut[k + 1]] for k in range(len(self.users))]

    def check_domain(self, domain: str) -> str:
        if domain not in self.domain_code:
            raise ValueError(f"unknown domain {domain!r} (domains: {', '.join(self.domains)})")
        return domain
