"""Popularity prior: weight_d * p_i, where p_i is the item's standardised log popularity in its domain d, counted over
the interactions of the split's training window (the counts the `popularity` baseline ranks by) or over the most
recent `RECENT_SHARE` of them (PrepRec-style recency, Wang et al., CIKM 2023). For a user new to a domain, what is
popular there is most of the signal; the model's score alone ignores it. The window is chosen with the weight.

An item without training interactions, and an item added online, gets p of zero interactions (`cold`): the value the
catalog's own never-seen items had when the weight was chosen. Zero-shot calibration refits it on the evaluated
dataset (a new domain has a training window of its own).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crossrec.baselines.popularity import Popularity
from crossrec.priors.base import Prior, StoredBundle, register, rows_by_id
from crossrec.splits import Splits, TargetBatch

if TYPE_CHECKING:
    from crossrec.catalog import Catalog

__all__ = ["PopularityPrior", "WINDOWS", "RECENT_SHARE", "window_counts", "standardised_log_pop"]

WINDOWS = ("all", "recent")
RECENT_SHARE = 0.1  # "recent": the last 10% of a domain's training interactions (by time)
FILE = "pop_prior.parquet"


def window_counts(splits: Splits, window: str) -> np.ndarray:
    """(N,) training interactions per catalog item in `window`: "all" = the popularity baseline's counts; "recent"
    = within the last RECENT_SHARE of the item's domain's training interactions, by time (ties included)."""
    if window == "all":
        return Popularity(splits).counts
    if window != "recent":
        raise ValueError(f"`window` must be one of {', '.join(WINDOWS)}, got {window!r}")
    train = np.flatnonzero(splits.is_train)
    out = np.zeros(len(splits.item_ids), np.float64)
    for code in range(len(splits.domains)):
        rows = train[splits.row_domain[train] == code]
        if not len(rows):
            continue
        t = splits.row_time[rows]
        start = np.sort(t)[int(np.floor((1 - RECENT_SHARE) * (len(t) - 1)))]
        out += np.bincount(splits.row_item[rows[t >= start]], minlength=len(out))
    return out


def standardised_log_pop(splits: Catalog, counts: np.ndarray, domain: str) -> tuple[np.ndarray, float]:
    """(p of the domain's items, p of zero interactions): log(1 + count) standardised over the domain's catalog
    (all zero when every item has the same count)."""
    off, n = splits.offset[domain], splits.n_items[domain]
    x = np.log1p(counts[off : off + n])
    mean, std = float(x.mean()) if n else 0.0, float(x.std()) if n else 0.0
    if std < 1e-12:
        return np.zeros(n, np.float32), 0.0
    return ((x - mean) / std).astype(np.float32), float(-mean / std)


@register
class PopularityPrior(Prior):
    name = "popularity"
    meta_key = "pop_prior"
    label = "popularity prior"
    short = "pop"
    option_name = "window"
    grid = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
    calibrates = True
    batch_cells = 3.2e7
    max_batch = 4096

    def __init__(self, catalog: Catalog):
        super().__init__(catalog)
        self.p = np.zeros(len(catalog.item_ids), np.float32)  # (N,) p of the chosen window
        self.cold: dict[str, float] = {}
        self.window: dict[str, str] = {}
        self._counts: dict[str, np.ndarray] = {}
        self._top: dict[str, np.ndarray] = {}  # domain -> rows by decreasing p (top_rows)

    def fit(self, splits: Splits) -> None:
        self._counts = {w: window_counts(splits, w) for w in WINDOWS}

    def _pops(self, domain: str) -> dict[str, tuple[np.ndarray, float]]:
        return {w: standardised_log_pop(self.catalog, c, domain) for w, c in self._counts.items()}

    def options(self, domain: str) -> dict[str, Callable[[TargetBatch], np.ndarray]]:
        pops = self._pops(domain)

        def term(p: np.ndarray) -> Callable[[TargetBatch], np.ndarray]:
            return lambda batch: p[None, :]

        return {w: term(p) for w, (p, _) in pops.items()}

    def select(self, domain: str, option: str) -> None:
        p, cold = self._pops(domain)[option]
        off = self.catalog.offset[domain]
        self.p[off : off + len(p)] = p
        self.cold[domain], self.window[domain] = cold, option
        self._top.pop(domain, None)

    def term(self, domain: str, histories: Sequence[np.ndarray]) -> np.ndarray:
        off, n = self.catalog.offset[domain], self.catalog.n_items[domain]
        return self.p[None, off : off + n]

    def new_item_term(self, domain: str) -> float:
        return self.cold.get(domain, 0.0)

    def term_at(self, domain: str, histories: Sequence[np.ndarray], rows: np.ndarray) -> np.ndarray:
        return self.p[None, self.catalog.offset[domain] + np.asarray(rows, dtype=np.int64)]

    def top_rows(self, domain: str, history: np.ndarray, m: int) -> np.ndarray:
        if domain not in self._top:  # the same for every history: sorted once per domain
            off, n = self.catalog.offset[domain], self.catalog.n_items[domain]
            self._top[domain] = np.argsort(-self.p[off : off + n], kind="stable")
        return self._top[domain][:m]

    def _adopt(self, other: Prior, domains: Sequence[str]) -> None:
        assert isinstance(other, PopularityPrior)
        for d in domains:
            src, dst = rows_by_id(other.catalog, self.catalog, d)
            off = self.catalog.offset[d]
            self.cold[d] = other.cold.get(d, 0.0)
            self.p[off : off + self.catalog.n_items[d]] = self.cold[d]  # items `other` lacks: never seen
            self.p[off + dst] = other.p[other.catalog.offset[d] + src]
            if d in other.window:
                self.window[d] = other.window[d]
            self._top.pop(d, None)

    def meta(self) -> dict:
        return {
            **super().meta(),
            "cold": dict(self.cold),
            "window": dict(self.window),
            "recent_share": RECENT_SHARE,
        }

    def save(self, folder: Path) -> dict:
        c = self.catalog
        pq.write_table(
            pa.table(
                {
                    "domain": [c.domains[k] for k in c.item_domain],
                    "item_id": [str(i) for i in c.item_ids],
                    "pop": self.p,
                }
            ),
            folder / FILE,
        )
        return self.meta()

    @classmethod
    def load(cls, bundle: StoredBundle, catalog: Catalog) -> PopularityPrior | None:
        meta = bundle.meta.get(cls.meta_key)
        if not meta:
            return None
        prior = cls(catalog)
        stored = _stored_pop(bundle)
        for d in catalog.domains:
            w = float(meta.get("weights", {}).get(d, 0.0))
            if d not in stored:
                continue  # a domain the bundle never saw: p 0
            prior.cold[d] = float(meta.get("cold", {}).get(d, 0.0))
            if d in meta.get("window", {}):
                prior.window[d] = meta["window"][d]
            if w:
                prior.weight[d] = w
            off, n = catalog.offset[d], catalog.n_items[d]
            have = stored[d]
            prior.p[off : off + n] = [have.get(str(i), prior.cold[d]) for i in catalog.item_ids[off : off + n]]
        return prior


def _stored_pop(bundle: StoredBundle) -> dict[str, dict[str, float]]:
    """Domain -> item_id -> p as the bundle stores it: pop_prior.parquet, or (bundles written before the priors had
    files of their own) a `pop` column of items/DOMAIN.parquet."""
    f = bundle.path / FILE
    out: dict[str, dict[str, float]] = {}
    if f.is_file():
        t = pq.read_table(f)
        for d, i, p in zip(*(t.column(c).to_pylist() for c in ("domain", "item_id", "pop"))):
            out.setdefault(d, {})[i] = p
        return out
    for d, t in bundle.items.items():
        if "pop" in t.column_names:
            pop = np.asarray(t.column("pop").to_numpy(), dtype=np.float32)
            out[d] = dict(zip(t.column("item_id").to_pylist(), pop.tolist()))
    return out
