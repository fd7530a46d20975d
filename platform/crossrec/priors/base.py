"""The contract of a prior: one additive term of retrieval's score, weighted per domain,

    score(h, i) = model score(h, i) + sum over priors p of weight_p[d] * term_p(d, h)[i]

A prior fits statistics on the training rows of a split (`fit`), offers options whose term the validation grid
search compares (`options`, e.g. a popularity window or a recency decay), installs the chosen option (`select`),
gives its term for a domain and histories (`term`), the term of an item added online (`new_item_term`), and saves
itself into a bundle folder and loads back onto any catalog (`save`, `load`). The weight per domain is chosen on
VALIDATION targets by `choose` from a grid that starts at 0 (the scores without the prior, so a prior is never worse
on validation), relative to the spread of the scores it is added to; priors are chosen in their configured order,
each on the model plus the priors before it.

A new prior is one module in this package (it registers itself with `@register`) or any importable class named in
config as "module:Class".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import pyarrow as pa

from crossrec.metrics import metrics_from_ranks, rank_targets
from crossrec.splits import Splits, TargetBatch

if TYPE_CHECKING:
    import torch

    from crossrec.catalog import Catalog

__all__ = [
    "Prior",
    "StoredBundle",
    "Choice",
    "REGISTRY",
    "register",
    "grid_search",
    "choose",
    "subset",
    "check_grid",
    "rows_by_id",
]

REGISTRY: dict[str, type[Prior]] = {}


class StoredBundle(Protocol):
    """What a prior reads of a bundle (crossrec.bundle.Bundle): bundle.json, its folder, its items per domain."""

    meta: dict
    path: Path
    items: dict[str, pa.Table]


def register(cls: type[Prior]) -> type[Prior]:
    """Class decorator: makes the prior known by `cls.name` (config `priors: [...]`, bundle.json "priors")."""
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class Choice:
    """What validation chose for one domain."""

    weight: float  # absolute (score units)
    relative: float  # weight / spread: the grid point
    option: Any  # the prior's option (e.g. a window, a decay)
    spread: float  # mean per-user std of the scores the term is added to
    valid_ndcg10: float  # with the chosen weight (= `base_ndcg10` when it is 0)
    base_ndcg10: float  # weight 0
    n_targets: int
    grid: dict[Any, list[float]] = field(default_factory=dict, repr=False)  # option -> NDCG@10 per grid point


class Prior(ABC):
    """One prior over a catalog (global indices: crossrec.retrieval). `weight`: domain -> weight (0 or absent: off)."""

    name: ClassVar[str]  # config and bundle name
    meta_key: ClassVar[str]  # bundle.json key of its entry
    label: ClassVar[str]  # how output names it ("popularity prior")
    short: ClassVar[str]  # prefix of its reported values ("pop": pop_weight[DOMAIN])
    grid: ClassVar[tuple[float, ...]]  # x the spread of the scores; starts at 0
    # Zero-shot calibration refits it on the evaluated dataset's training window (a statistic that exists for a new
    # domain: popularity does; transitions into a never-seen domain do not).
    calibrates: ClassVar[bool] = False
    batch_cells: ClassVar[float] = 1.6e7  # validation batch size x items of the domain, for the grid search
    max_batch: ClassVar[int] = 2048

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self.spec = self.name  # how config and bundle.json name it (a "module:Class" outside this package)
        self.weight: dict[str, float] = {}
        self.choices: dict[str, Choice] = {}

    @abstractmethod
    def fit(self, splits: Splits) -> None:
        """Statistics from the training rows of `splits` (whose catalog is this prior's)."""

    @abstractmethod
    def options(self, domain: str) -> dict[Any, Callable[[TargetBatch], np.ndarray]]:
        """Option -> its term (B | 1, n) for a validation batch of `domain`; the first option is the default."""

    @abstractmethod
    def select(self, domain: str, option: Any) -> None:
        """Installs the chosen option for `domain`."""

    @abstractmethod
    def term(self, domain: str, histories: Sequence[np.ndarray]) -> np.ndarray:
        """(B | 1, n_items[domain]) the term before the weight (histories: global indices, -1 = unknown entry)."""

    def clone(self) -> Prior:
        """A copy that shares the catalog and nothing that `fit`, `choose` or `install` change."""
        import copy

        out = copy.copy(self)
        for k, v in vars(self).items():
            if k != "catalog":
                setattr(out, k, copy.copy(v))
        return out

    def install(self, choices: dict[str, Choice]) -> None:
        """Takes what validation chose for these domains (`choose`)."""
        for d, ch in choices.items():
            self.select(d, ch.option)
            self.weight[d] = ch.weight
            self.choices[d] = ch

    def new_item_term(self, domain: str) -> float:
        """The term of an item added online (no statistics yet)."""
        return 0.0

    def adopt(self, other: Prior, domains: Sequence[str]) -> None:
        """Takes `other`'s statistics, chosen option and weight for `domains` (the same prior, fitted and chosen over
        another catalog: items are matched by domain and item id); other domains keep this prior's own. How
        `crossrec adapt` carries a new domain's prior into the bundle's."""
        if type(other) is not type(self):
            raise TypeError(f"{self.label}: cannot adopt a {other.label}")
        for d in domains:
            self.weight.pop(d, None)
            self.choices.pop(d, None)
            if d in other.weight:
                self.weight[d] = other.weight[d]
            if d in other.choices:
                self.choices[d] = other.choices[d]
        self._adopt(other, domains)

    def _adopt(self, other: Prior, domains: Sequence[str]) -> None:
        """`adopt`'s part for this prior's own statistics and options."""
        raise NotImplementedError(
            f"the {self.label} ({self.spec}) cannot be carried to a new domain: it has no `_adopt` (crossrec adapt)"
        )

    def term_at(self, domain: str, histories: Sequence[np.ndarray], rows: np.ndarray) -> np.ndarray:
        """(B | 1, len(rows)) the term at some rows of the domain: a request that scores only candidates."""
        return np.asarray(self.term(domain, histories))[:, rows]

    def top_rows(self, domain: str, history: np.ndarray, m: int) -> np.ndarray:
        """At most m rows of the domain with the largest term for one history: what this prior adds to the
        candidates of an approximate (ANN) retrieval, so that the items it lifts are scored even when the model's
        score alone would not propose them."""
        return top_m(np.asarray(self.term(domain, [history]))[0], m)

    def meta(self) -> dict:
        """Its bundle.json entry: the weights plus what validation chose."""
        return {
            "weights": dict(self.weight),
            "relative": {d: ch.relative for d, ch in self.choices.items()},
            "valid_ndcg10": {
                d: {"chosen": ch.valid_ndcg10, "without": ch.base_ndcg10} for d, ch in self.choices.items()
            },
            "n_valid_targets": {d: ch.n_targets for d, ch in self.choices.items()},
            "grid": list(self.grid),
        }

    @abstractmethod
    def save(self, folder: Path) -> dict:
        """Writes its files into a bundle being written (`folder`); returns its bundle.json entry."""

    @classmethod
    @abstractmethod
    def load(cls, bundle: StoredBundle, catalog: Catalog) -> Prior | None:
        """The bundle's prior mapped onto `catalog` (by domain and item id), or None when the bundle has none."""

    def describe(self, domain: str) -> str:
        """One line fragment for output: the chosen weight and option of `domain`."""
        ch = self.choices.get(domain)
        if ch is None:
            return f"{domain} weight {self.weight.get(domain, 0.0):.4g}"
        return (
            f"{domain} weight {ch.weight:.4g} ({ch.relative:g} x spread, {self.option_name} {ch.option}; valid NDCG@10 "
            f"{ch.base_ndcg10:.4f} -> {ch.valid_ndcg10:.4f})"
        )

    option_name: ClassVar[str] = "option"

    def params(self, domains: list[str]) -> dict[str, Any]:
        """What `crossrec evaluate` prints of it for the evaluated domains."""
        return {f"{self.short}_weight[{d}]": round(self.weight[d], 6) for d in domains if d in self.weight}


def rows_by_id(source: Catalog, target: Catalog, domain: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows of `source`'s domain, the same items' rows in `target`'s domain): the items both catalogs have."""
    off, n = source.offset[domain], source.n_items[domain]
    where = {
        str(i): k
        for k, i in enumerate(target.item_ids[target.offset[domain] : target.offset[domain] + target.n_items[domain]])
    }
    pairs = [(k, where[str(i)]) for k, i in enumerate(source.item_ids[off : off + n]) if str(i) in where]
    src, dst = (np.array(x, np.int64) for x in zip(*pairs)) if pairs else (np.zeros(0, np.int64),) * 2
    return src, dst


def top_m(values: np.ndarray, m: int) -> np.ndarray:
    """Indices of the (at most) m largest values, in no particular order."""
    m = min(m, len(values))
    if m <= 0:
        return np.zeros(0, np.int64)
    return np.argpartition(-values, m - 1)[:m]


def check_grid(grid: tuple[float, ...]) -> None:
    if grid[0] != 0.0:
        raise ValueError(f"`grid` must start with 0 (the scores without the prior), got {grid[0]!r}")


def subset(rows: np.ndarray, max_targets: int) -> np.ndarray:
    """The fixed, evenly spaced subset `crossrec.evaluation.evaluate` scores with `max_targets`."""
    if max_targets and len(rows) > max_targets:
        return rows[np.linspace(0, len(rows) - 1, max_targets).astype(np.int64)]
    return rows


def grid_search(
    splits: Splits,
    domain: str,
    rows: np.ndarray,
    base: Callable[[TargetBatch], np.ndarray],
    options: dict[Any, Callable[[TargetBatch], np.ndarray]],
    grid: tuple[float, ...],
    batch_size: int,
) -> tuple[dict[Any, list[float]], Any, int, float]:
    """Re-ranks the validation targets `rows` of `domain` by base + g * spread * term(option) for every option and
    grid point g, from one `base` per batch: (NDCG@10 per option and grid point, the best option, the best grid
    point's index, spread). spread is the mean per-user std of `base` over the first batch (the grid's unit;
    `rows` is a fixed subset, so it is deterministic). Ties keep the earlier option and the smaller grid point;
    grid[0] must be 0 (base alone, the same for every option)."""
    check_grid(grid)
    names = list(options)
    off, n = splits.offset[domain], splits.n_items[domain]
    ranks: dict[tuple[Any, int], list[np.ndarray]] = {(o, k): [] for o in names for k in range(len(grid))}
    spread = 0.0
    for s in range(0, len(rows), batch_size):
        batch = splits.batch(rows[s : s + batch_size], domain)
        scores = base(batch)
        if s == 0:
            spread = float(scores.std(axis=1).mean())
        mask = [h[(h >= off) & (h < off + n)] - off for h in batch.histories]
        tcol = splits.row_item[batch.rows] - off
        for o in names:
            t = options[o](batch)
            for k, g in enumerate(grid):
                if k == 0 and o != names[0]:
                    ranks[(o, k)].append(ranks[(names[0], 0)][-1])  # grid point 0 does not depend on the option
                    continue
                ranks[(o, k)].append(rank_targets(scores + g * spread * t, tcol, mask))
    ndcg = {
        o: [
            float(
                metrics_from_ranks(np.concatenate(ranks[(o, k)]) if ranks[(o, k)] else np.zeros(0), (10,))["ndcg@10"]
                or 0.0
            )
            for k in range(len(grid))
        ]
        for o in names
    }
    best_o, best_k = names[0], 0
    for o in names:
        for k in range(len(grid)):
            if ndcg[o][k] > ndcg[best_o][best_k]:
                best_o, best_k = o, k
    return ndcg, best_o, best_k, spread


class Scorer(Protocol):
    """What choosing a weight reads of retrieval (crossrec.retrieval.Retriever)."""

    catalog: Catalog
    priors: list[Prior]

    def model_scores(self, batch: TargetBatch) -> torch.Tensor: ...

    def prior_terms(
        self, domain: str, histories: Sequence[np.ndarray], upto: int | None = None
    ) -> torch.Tensor | None: ...


def choose(
    retriever: Scorer,
    prior: Prior,
    domains: list[str] | None = None,
    max_targets: int = 3000,
    grid: tuple[float, ...] | None = None,
    install: bool = True,
) -> dict[str, Choice]:
    """Chooses (and, with `install`, installs) `prior`'s (option, weight) per domain on the validation targets of the retriever's
    catalog (a Splits): the best NDCG@10 of the model's scores plus the priors before `prior` in
    `retriever.priors` plus weight * term. A domain without validation targets gets weight 0."""
    splits = retriever.catalog
    if not isinstance(splits, Splits):
        raise TypeError("choosing a prior's weight needs the retriever of a split (validation targets)")
    grid = prior.grid if grid is None else grid
    check_grid(grid)
    upto = retriever.priors.index(prior)
    out = {}
    for d in list(domains or splits.domains):
        n = splits.n_items[splits.check_domain(d)]

        def base(batch: TargetBatch) -> np.ndarray:  # the model and the priors before this one
            scores = retriever.model_scores(batch)
            bias = retriever.prior_terms(batch.domain, batch.histories, upto=upto)
            return (scores if bias is None else scores + bias).numpy().astype(np.float64)

        rows = subset(splits.targets("valid", d), max_targets)
        options = prior.options(d)
        ndcg, best_o, best_k, spread = grid_search(
            splits, d, rows, base, options, grid, max(64, min(prior.max_batch, int(prior.batch_cells // max(n, 1))))
        )
        out[d] = Choice(
            weight=float(grid[best_k] * spread),
            relative=float(grid[best_k]),
            option=best_o,
            spread=spread,
            valid_ndcg10=ndcg[best_o][best_k],
            base_ndcg10=ndcg[next(iter(options))][0],
            n_targets=int(len(rows)),
            grid=ndcg,
        )
    if install:
        prior.install(out)
    return out
