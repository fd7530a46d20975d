"""Popularity prior: a domain-agnostic term added to the model's retrieval score,

    score(u, i) = model score(u, i) + gamma_d * p_i

where p_i is the item's standardised log popularity in its domain d, counted over the interactions of the
split's training window (the counts the `popularity` baseline ranks by, `Popularity(splits).counts`), or over
the most recent `RECENT_SHARE` of them (PrepRec-style recency, Wang et al., CIKM 2023). For a user new to a
domain, what is popular there is most of the signal; the model's score alone ignores it.

gamma_d (and the window) is chosen per domain on VALIDATION targets from a grid that contains 0 (the model as
it is), so the prior is never worse on validation: at training end for the trained domains (stored in the
bundle: `bundle.json` "pop_prior" and a `pop` column of `items/DOMAIN.parquet`), and by zero-shot calibration
(crossrec.inference.calibrate_zero_shot) for a domain the bundle never saw. The grid is relative to the spread
of the model's scores (`GRID` times the mean per-user standard deviation over the domain's items), so one grid
fits models whose scores live on different scales; the chosen gamma is stored absolute.

An item without training interactions, and an item added online, gets p of zero interactions (`cold`): the
value the catalog's own never-seen items had when gamma was chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from crossrec.baselines.popularity import Popularity
from crossrec.metrics import metrics_from_ranks, rank_targets
from crossrec.splits import Splits, TargetBatch
from crossrec.training import ModelScorer

__all__ = [
    "GRID",
    "WINDOWS",
    "RECENT_SHARE",
    "PopChoice",
    "window_counts",
    "standardised_log_pop",
    "choose_pop_prior",
    "check_grid",
    "grid_search",
    "apply_pop_prior",
    "fit_pop_prior",
    "pop_prior_meta",
]

GRID = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)  # x the spread of the model's scores; 0 first: ties keep it
WINDOWS = ("all", "recent")
T = TypeVar("T")  # a grid option: a window name or a decay
RECENT_SHARE = 0.1  # "recent": the last 10% of a domain's training interactions (by time)


@dataclass
class PopChoice:
    """What validation chose for one domain. pop: (n_items[domain],) p_i of the chosen window."""

    weight: float  # gamma, absolute (score units)
    relative: float  # gamma / spread: the grid point
    window: str
    spread: float  # mean per-user std of the model's scores over the domain's items
    cold: float  # p of an item with no training interactions (in this window)
    valid_ndcg10: float  # with the chosen gamma (= `base_ndcg10` when gamma is 0)
    base_ndcg10: float  # gamma = 0: the model alone
    n_targets: int
    pop: np.ndarray = field(repr=False)
    grid: dict[str, list[float]] = field(default_factory=dict, repr=False)  # window -> NDCG@10 per grid point


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


def standardised_log_pop(splits: Splits, counts: np.ndarray, domain: str) -> tuple[np.ndarray, float]:
    """(p of the domain's items, p of zero interactions): log(1 + count) standardised over the domain's catalog
    (all zero when every item has the same count)."""
    off, n = splits.offset[domain], splits.n_items[domain]
    x = np.log1p(counts[off : off + n])
    mean, std = float(x.mean()) if n else 0.0, float(x.std()) if n else 0.0
    if std < 1e-12:
        return np.zeros(n, np.float32), 0.0
    return ((x - mean) / std).astype(np.float32), float(-mean / std)


def _subset(rows: np.ndarray, max_targets: int) -> np.ndarray:
    """The fixed, evenly spaced subset `crossrec.evaluation.evaluate` scores with `max_targets`."""
    if max_targets and len(rows) > max_targets:
        return rows[np.linspace(0, len(rows) - 1, max_targets).astype(np.int64)]
    return rows


def check_grid(grid: tuple[float, ...]) -> None:
    if grid[0] != 0.0:
        raise ValueError(f"`grid` must start with 0 (the scores without the prior), got {grid[0]!r}")


def grid_search(
    splits: Splits,
    domain: str,
    rows: np.ndarray,
    base: Callable[[TargetBatch], np.ndarray],
    term: Callable[[TargetBatch, T], np.ndarray],
    options: tuple[T, ...],
    grid: tuple[float, ...],
    batch_size: int,
) -> tuple[dict[T, list[float]], T, int, float]:
    """Re-ranks the validation targets `rows` of `domain` by base + g * spread * term(option) for every option and
    grid point g, from one `base` per batch: (NDCG@10 per option and grid point, the best option, the best grid
    point's index, spread). spread is the mean per-user std of `base` over the first batch (the grid's unit;
    `rows` is a fixed subset, so it is deterministic). Ties keep the earlier option and the smaller grid point;
    grid[0] must be 0 (base alone, the same for every option). Shared by the popularity prior (options: windows)
    and the transition prior (options: decays)."""
    check_grid(grid)
    off, n = splits.offset[domain], splits.n_items[domain]
    ranks: dict[tuple[T, int], list[np.ndarray]] = {(o, k): [] for o in options for k in range(len(grid))}
    spread = 0.0
    for s in range(0, len(rows), batch_size):
        batch = splits.batch(rows[s : s + batch_size], domain)
        scores = base(batch)
        if s == 0:
            spread = float(scores.std(axis=1).mean())
        mask = [h[(h >= off) & (h < off + n)] - off for h in batch.histories]
        tcol = splits.row_item[batch.rows] - off
        for o in options:
            t = term(batch, o)
            for k, g in enumerate(grid):
                if k == 0 and o != options[0]:
                    ranks[(o, k)].append(ranks[(options[0], 0)][-1])  # grid point 0 does not depend on the option
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
        for o in options
    }
    best_o, best_k = options[0], 0
    for o in options:
        for k in range(len(grid)):
            if ndcg[o][k] > ndcg[best_o][best_k]:
                best_o, best_k = o, k
    return ndcg, best_o, best_k, spread


def choose_pop_prior(
    scorer: ModelScorer,
    domains: list[str] | None = None,
    max_targets: int = 3000,
    grid: tuple[float, ...] = GRID,
    windows: tuple[str, ...] = WINDOWS,
) -> dict[str, PopChoice]:
    """Per domain, the (window, gamma) of the best validation NDCG@10 of the model's score plus gamma * p, popularity
    from `scorer.catalog`'s training window. The model's scores are computed once per batch (without any prior the
    scorer holds) and every grid point re-ranks them. Ties keep the earlier window and the smaller gamma; a domain
    without validation targets gets gamma 0. Nothing is changed: `apply_pop_prior` installs the choice."""
    check_grid(grid)
    splits = scorer.catalog
    counts = {w: window_counts(splits, w) for w in windows}
    out = {}
    for d in list(domains or splits.domains):
        n = splits.n_items[splits.check_domain(d)]
        pops = {w: standardised_log_pop(splits, counts[w], d) for w in windows}
        rows = _subset(splits.targets("valid", d), max_targets)
        ndcg, best_w, best_k, spread = grid_search(
            splits,
            d,
            rows,
            lambda batch: scorer.model_scores(batch).numpy().astype(np.float64),  # (B, n) the model alone
            lambda batch, w: pops[w][0][None, :],
            windows,
            grid,
            max(64, min(4096, int(3.2e7 // max(n, 1)))),
        )
        pop, cold = pops[best_w]
        out[d] = PopChoice(
            weight=float(grid[best_k] * spread),
            relative=float(grid[best_k]),
            window=best_w,
            spread=spread,
            cold=cold,
            valid_ndcg10=ndcg[best_w][best_k],
            base_ndcg10=ndcg[windows[0]][0],
            n_targets=int(len(rows)),
            pop=pop,
            grid=ndcg,
        )
    return out


def apply_pop_prior(scorer: ModelScorer, choices: dict[str, PopChoice]) -> None:
    """Installs the chosen p and gamma of these domains in `scorer` (new objects: a shallow copy of the scorer
    keeps its own)."""
    c = scorer.catalog
    pop = torch.zeros(len(c.item_ids)) if scorer.pop is None else scorer.pop.clone()
    for d, ch in choices.items():
        pop[c.offset[d] : c.offset[d] + c.n_items[d]] = torch.from_numpy(ch.pop)
    scorer.pop = pop
    scorer.pop_weight = {**scorer.pop_weight, **{d: ch.weight for d, ch in choices.items()}}


def fit_pop_prior(
    scorer: ModelScorer, domains: list[str] | None = None, max_targets: int = 3000
) -> dict[str, PopChoice]:
    """choose_pop_prior, then apply_pop_prior: what training does at its end for the trained domains."""
    choices = choose_pop_prior(scorer, domains, max_targets)
    apply_pop_prior(scorer, choices)
    return choices


def pop_prior_meta(choices: dict[str, PopChoice]) -> dict:
    """The "pop_prior" entry of bundle.json (the per-item p go into the items' `pop` column)."""
    return {
        "weights": {d: ch.weight for d, ch in choices.items()},
        "cold": {d: ch.cold for d, ch in choices.items()},
        "window": {d: ch.window for d, ch in choices.items()},
        "relative": {d: ch.relative for d, ch in choices.items()},
        "valid_ndcg10": {d: {"chosen": ch.valid_ndcg10, "without": ch.base_ndcg10} for d, ch in choices.items()},
        "n_valid_targets": {d: ch.n_targets for d, ch in choices.items()},
        "grid": list(GRID),
        "recent_share": RECENT_SHARE,
    }
