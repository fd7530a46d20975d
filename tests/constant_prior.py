"""A toy prior, in one file that no module of crossrec names: a constant per item (1 for the items whose id hashes
to 0 mod 3, else 0). Config names it "tests.constant_prior:ConstantPrior"; tests/test_prior_plugin.py shows that
evaluation and Serve over HTTP both apply it, with nothing else edited."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from crossrec.priors import Prior


def boosted(item_id: str) -> bool:
    return int(hashlib.sha256(item_id.encode()).hexdigest(), 16) % 3 == 0


class ConstantPrior(Prior):
    name = "constant"
    meta_key = "constant_prior"
    label = "constant prior"
    short = "const"
    option_name = "value"
    grid = (0.0, 1.0, 10.0)

    def __init__(self, catalog):
        super().__init__(catalog)
        self.value = np.array([boosted(str(i)) for i in catalog.item_ids], np.float32)  # (N,)

    def fit(self, splits):
        pass  # nothing to count: the term is a property of the item id

    def options(self, domain):
        return {"id-hash": lambda batch: self.term(domain, [])}

    def select(self, domain, option):
        pass

    def term(self, domain, histories):
        off, n = self.catalog.offset[domain], self.catalog.n_items[domain]
        return self.value[None, off : off + n]

    def save(self, folder: Path) -> dict:
        return self.meta()

    @classmethod
    def load(cls, bundle, catalog):
        meta = bundle.meta.get(cls.meta_key)
        if not meta:
            return None
        prior = cls(catalog)
        prior.weight = {d: float(w) for d, w in meta["weights"].items() if d in catalog.domain_code}
        return prior
