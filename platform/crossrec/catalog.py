"""A catalog's global item index, what retrieval and the priors address items by: domains in sorted order, each a
contiguous block `offset[d] : offset[d] + n_items[d]`. A `crossrec.splits.Splits` is one (a dataset's catalog);
`BundleCatalog` is a bundle's own items (what Serve and `crossrec recommend` rank)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = ["Catalog", "BundleCatalog"]


class Catalog(Protocol):
    """What retrieval and the priors read of a catalog (a `crossrec.splits.Splits` is one)."""

    domains: list[str]  # sorted
    domain_code: dict[str, int]
    item_ids: np.ndarray  # (N,) str, global index order
    item_domain: np.ndarray  # (N,) domain code
    offset: dict[str, int]
    n_items: dict[str, int]

    def check_domain(self, domain: str) -> str: ...


@dataclass
class BundleCatalog:
    """A bundle's own items as a catalog (what Serve and `crossrec recommend` rank)."""

    domains: list[str]
    domain_code: dict[str, int]
    item_ids: np.ndarray
    item_domain: np.ndarray
    offset: dict[str, int]
    n_items: dict[str, int]

    @classmethod
    def of(cls, ids: dict[str, list[str]]) -> BundleCatalog:
        domains = sorted(ids)
        n = {d: len(ids[d]) for d in domains}
        offset = dict(zip(domains, np.cumsum([0, *n.values()])[:-1].tolist()))
        return cls(
            domains=domains,
            domain_code={d: k for k, d in enumerate(domains)},
            item_ids=np.array([i for d in domains for i in ids[d]], dtype=object),
            item_domain=np.repeat(np.arange(len(domains), dtype=np.int64), [n[d] for d in domains]),
            offset=offset,
            n_items=n,
        )

    def check_domain(self, domain: str) -> str:
        if domain not in self.domain_code:
            raise KeyError(f"unknown domain {domain!r} (known: {', '.join(self.domains)})")
        return domain
