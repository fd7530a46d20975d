"""Model domain ids: a model knows its training domains by position; every other domain is "unknown".

The unknown id is `len(domains)`: its embedding is trained by `domain_dropout` and is what zero-shot domains use.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["domain_id", "domain_ids"]


def domain_id(domains: Sequence[str], name: str) -> int:
    """The model's id of domain `name`; `len(domains)` (unknown) for a domain it never trained on."""
    return domains.index(name) if name in domains else len(domains)


def domain_ids(domains: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """(len(names),) int64 model ids of `names` (e.g. a dataset's domains in code order)."""
    return np.array([domain_id(domains, n) for n in names], dtype=np.int64)
