"""Priors: terms added to retrieval's score, each weighted per domain on validation (`base.Prior`).

Every module of this package registers its prior (`@register`); config lists them by name, in order
(`priors: [popularity, transition]`), and a class outside the package is named "module:Class".
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from crossrec.priors.base import REGISTRY, Choice, Prior, StoredBundle, choose, grid_search, register

if TYPE_CHECKING:
    from crossrec.catalog import Catalog

__all__ = [
    "Prior",
    "Choice",
    "register",
    "choose",
    "grid_search",
    "prior_class",
    "known_priors",
    "make_prior",
    "load_priors",
]

for _m in pkgutil.iter_modules(__path__):  # a new prior is one new module here: nothing else to edit
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")


def known_priors() -> list[str]:
    return sorted(REGISTRY)


def prior_class(name: str) -> type[Prior]:
    """The prior registered as `name`, or the class at "module:Class"; unknown names fail listing the known ones."""
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"`priors`: cannot import {name!r} ({e})") from None
        if not (isinstance(cls, type) and issubclass(cls, Prior)):
            raise ValueError(f"`priors`: {name!r} is not a crossrec.priors.Prior")
        return cls
    raise ValueError(f"`priors`: unknown prior {name!r} (known: {', '.join(known_priors())}, or module:Class)")


def make_prior(name: str, catalog: Catalog) -> Prior:
    """A new (unfitted) prior of config name `name` over `catalog`."""
    prior = prior_class(name)(catalog)
    prior.spec = name
    return prior


def bundle_prior_names(meta: dict) -> list[str]:
    """The priors of a bundle, in order: bundle.json "priors", or (bundles written before it) the entries present."""
    if "priors" in meta:
        return list(meta["priors"])
    return [n for n, key in (("popularity", "pop_prior"), ("transition", "co_prior")) if meta.get(key)]


def load_priors(bundle: StoredBundle, catalog: Catalog) -> list[Prior]:
    """The bundle's priors mapped onto `catalog`, in their order (a prior the bundle stores nothing of is left out)."""
    out = []
    for name in bundle_prior_names(bundle.meta):
        prior = prior_class(name).load(bundle, catalog)
        if prior is not None:
            prior.spec = name
            out.append(prior)
    return out
