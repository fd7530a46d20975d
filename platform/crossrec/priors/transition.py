"""Transition prior: a collaborative term, weight_d * log(1 + sum_k decay_d^age_k * T[h_k, i]),

where h_k are the user's history items (all domains; age 0 = the most recent) and T[a, b] counts how often the
training interactions of one user go from a to b: the next interaction (weight LAGS[0]) or the one after it
(LAGS[1]), across domains too. A user known in food and new to kitchen gets the kitchen items that users with the
same food items went on to: the collaborative signal item text lacks (food and kitchen titles say little about each
other, while ID-based SASRec learns exactly this). The decay is chosen with the weight.

T holds training interactions only: under the cold-user protocol the hidden rows never count, and a domain the
bundle never trained on has no transitions into it (zero-shot: the term is 0 there). An item added online has no
transitions (its term is 0), and history entries the catalog does not know add nothing. Stored in the bundle as
co_prior.parquet (pairs by domain and item id).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from crossrec.priors.base import Prior, StoredBundle, register, top_m
from crossrec.splits import Splits, TargetBatch

if TYPE_CHECKING:
    from crossrec.catalog import Catalog

__all__ = ["TransitionPrior", "Transitions", "LAGS", "DECAYS"]

LAGS = (1.0, 0.5)  # weight of a pair one step apart, two steps apart
DECAYS = (1.0, 0.7, 0.4)  # weight of a history entry = decay ** (its age: 0 = the most recent)
FILE = "co_prior.parquet"


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
        """The pairs by (domain, item_id), as the bundle stores them."""
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
        """(B, n) log(1 + sums) of each history: the prior's term before the weight."""
        return np.log1p(np.stack([self.sums(h, off, n, decay) for h in histories])) if histories else np.zeros((0, n))


@register
class TransitionPrior(Prior):
    name = "transition"
    meta_key = "co_prior"
    label = "transition prior"
    short = "co"
    option_name = "decay"
    grid = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)

    def __init__(self, catalog: Catalog, transitions: Transitions | None = None):
        super().__init__(catalog)
        self.transitions = transitions or Transitions(len(catalog.item_ids), np.zeros(0), np.zeros(0), np.zeros(0))
        self.decay: dict[str, float] = {}

    def fit(self, splits: Splits) -> None:
        self.transitions = Transitions.from_splits(splits)

    def _term(self, domain: str, histories: Sequence[np.ndarray], decay: float) -> np.ndarray:
        off, n = self.catalog.offset[domain], self.catalog.n_items[domain]
        return self.transitions.term(list(histories), off, n, decay)

    def options(self, domain: str) -> dict[float, Callable[[TargetBatch], np.ndarray]]:
        def term(decay: float) -> Callable[[TargetBatch], np.ndarray]:
            return lambda batch: self._term(domain, batch.histories, decay)

        return {c: term(c) for c in DECAYS}

    def select(self, domain: str, option: float) -> None:
        self.decay[domain] = float(option)

    def term(self, domain: str, histories: Sequence[np.ndarray]) -> np.ndarray:
        return self._term(domain, list(histories), self.decay[domain])

    def top_rows(self, domain: str, history: np.ndarray, m: int) -> np.ndarray:
        off, n = self.catalog.offset[domain], self.catalog.n_items[domain]
        sums = self.transitions.sums(history, off, n, self.decay[domain])
        nz = np.flatnonzero(sums)  # the items the history leads to; every other item's term is 0
        return nz if len(nz) <= m else nz[top_m(sums[nz], m)]

    def _adopt(self, other: Prior, domains: Sequence[str]) -> None:
        assert isinstance(other, TransitionPrior)
        c, o = self.catalog, other.catalog
        adopted = np.zeros(len(c.item_ids), bool)
        for d in domains:
            adopted[c.offset[d] : c.offset[d] + c.n_items[d]] = True
        theirs = other.transitions.to_table(o.item_ids, [o.domains[k] for k in o.item_domain])
        theirs = theirs.filter(pc.is_in(theirs.column("dst_domain"), pa.array(list(domains))))
        index = {(c.domains[k], str(i)): g for g, (k, i) in enumerate(zip(c.item_domain, c.item_ids))}
        new = Transitions.from_table(theirs, index, len(c.item_ids))  # pairs into `domains`, from any item
        keep = ~adopted[self.transitions.dst]
        self.transitions = Transitions(
            len(c.item_ids),
            np.concatenate([self.transitions.src[keep], new.src]),
            np.concatenate([self.transitions.dst[keep], new.dst]),
            np.concatenate([self.transitions.weight[keep], new.weight]),
        )
        for d in domains:
            if d in other.decay:
                self.decay[d] = other.decay[d]
            else:
                self.decay.pop(d, None)

    def meta(self) -> dict:
        return {
            **super().meta(),
            "decay": dict(self.decay),
            "lags": list(LAGS),
            "n_pairs": len(self.transitions),
        }

    def save(self, folder: Path) -> dict:
        if any(self.weight.values()):  # no pairs to store when validation turned it off everywhere
            c = self.catalog
            pq.write_table(self.transitions.to_table(c.item_ids, [c.domains[k] for k in c.item_domain]), folder / FILE)
        return self.meta()

    @classmethod
    def load(cls, bundle: StoredBundle, catalog: Catalog) -> TransitionPrior | None:
        meta = bundle.meta.get(cls.meta_key) or {}
        weights = {d: float(w) for d, w in meta.get("weights", {}).items() if w and d in catalog.domain_code}
        f = bundle.path / FILE
        if not weights or not f.is_file():
            return None
        index = {(catalog.domains[k], str(i)): g for g, (k, i) in enumerate(zip(catalog.item_domain, catalog.item_ids))}
        prior = cls(catalog, Transitions.from_table(pq.read_table(f), index, len(catalog.item_ids)))
        prior.weight = weights
        prior.decay = {d: float(meta["decay"][d]) for d in weights}
        return prior

    def params(self, domains: list[str]) -> dict[str, Any]:
        return {
            f"co_weight[{d}]": f"{self.weight[d]:.6g} (decay {self.decay[d]:g})" for d in domains if d in self.weight
        }
