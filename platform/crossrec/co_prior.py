"""Transition prior: a collaborative term added to the model's retrieval score,

    score(u, i) = model score(u, i) + gamma_d * p_i + beta_d * log(1 + sum_k decay_d^age_k * T[h_k, i])

where h_k are the user's history items (all domains; age 0 = the most recent) and T[a, b] counts how often the
training interactions of one user go from a to b: the next interaction (weight 1) or the one after it
(weight LAGS[1]), across domains too. A user known in food and new to kitchen gets the kitchen items that users
with the same food items went on to: the collaborative signal that item text lacks (food and kitchen titles say
little about each other, while ID-based SASRec learns exactly this; measured in docs/RESULTS.md "Transfer").

beta_d and decay_d are chosen per domain on VALIDATION targets from a grid that contains beta 0 (the model and its
popularity prior as they are), at training end after the popularity prior (stored in the bundle: bundle.json
"co_prior" and `co_prior.parquet`, the transitions by item id). Like `gamma`, the grid is relative to the spread of
the scores it is added to. T holds training interactions only: under the cold-user protocol the hidden rows never
count, and a domain the bundle never trained on has no transitions into it (zero-shot: the term is 0 there).
An item added online has no transitions (its term is 0), and history entries the bundle does not know add nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from crossrec.pop_prior import _subset, check_grid, grid_search
from crossrec.training import ModelScorer
from crossrec.transitions import LAGS, Transitions

__all__ = [
    "GRID",
    "DECAYS",
    "LAGS",
    "Transitions",
    "CoChoice",
    "choose_co_prior",
    "fit_co_prior",
    "co_prior_meta",
]

GRID = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)  # x the spread of the scores; 0 first: ties keep it
DECAYS = (1.0, 0.7, 0.4)  # weight of a history entry = decay ** (its age: 0 = the most recent)


@dataclass
class CoChoice:
    """What validation chose for one domain."""

    weight: float  # beta, absolute (score units)
    relative: float  # beta / spread: the grid point
    decay: float
    spread: float  # mean per-user std of the scores the term is added to
    valid_ndcg10: float  # with the chosen beta (= `base_ndcg10` when beta is 0)
    base_ndcg10: float  # beta = 0
    n_targets: int
    grid: dict[float, list[float]] = field(default_factory=dict, repr=False)  # decay -> NDCG@10 per grid point


def choose_co_prior(
    scorer: ModelScorer,
    transitions: Transitions,
    domains: list[str] | None = None,
    max_targets: int = 3000,
    grid: tuple[float, ...] = GRID,
    decays: tuple[float, ...] = DECAYS,
) -> dict[str, CoChoice]:
    """Per domain, the (decay, beta) of the best validation NDCG@10 of the scorer's scores (model and popularity
    prior, without any transition prior it holds) plus beta * term. Ties keep the earlier decay and the smaller
    beta; a domain without validation targets gets beta 0. Nothing is changed: `fit_co_prior` installs it."""
    check_grid(grid)
    splits = scorer.catalog
    out = {}
    for d in list(domains or splits.domains):
        off, n = splits.offset[splits.check_domain(d)], splits.n_items[d]
        rows = _subset(splits.targets("valid", d), max_targets)

        def base(batch):  # the model and the popularity prior (none of the transition prior the scorer holds)
            scores, bias = scorer.model_scores(batch), scorer.item_bias(batch.domain)
            return (scores if bias is None else scores + bias).numpy().astype(np.float64)

        ndcg, best_c, best_k, spread = grid_search(
            splits,
            d,
            rows,
            base,
            lambda batch, c: transitions.term(batch.histories, off, n, c),
            decays,
            grid,
            max(64, min(2048, int(1.6e7 // max(n, 1)))),
        )
        out[d] = CoChoice(
            weight=float(grid[best_k] * spread),
            relative=float(grid[best_k]),
            decay=best_c,
            spread=spread,
            valid_ndcg10=ndcg[best_c][best_k],
            base_ndcg10=ndcg[decays[0]][0],
            n_targets=int(len(rows)),
            grid=ndcg,
        )
    return out


def fit_co_prior(
    scorer: ModelScorer, transitions: Transitions, domains: list[str] | None = None, max_targets: int = 3000
) -> dict[str, CoChoice]:
    """choose_co_prior, then installs the choice in `scorer` (`scorer.co`, `scorer.co_weight`): what training
    does at its end, after the popularity prior."""
    choices = choose_co_prior(scorer, transitions, domains, max_targets)
    scorer.co = transitions
    scorer.co_weight = {**scorer.co_weight, **{d: (ch.weight, ch.decay) for d, ch in choices.items()}}
    return choices


def co_prior_meta(choices: dict[str, CoChoice], n_pairs: int) -> dict:
    """The "co_prior" entry of bundle.json (the pairs go into co_prior.parquet)."""
    return {
        "weights": {d: ch.weight for d, ch in choices.items()},
        "decay": {d: ch.decay for d, ch in choices.items()},
        "relative": {d: ch.relative for d, ch in choices.items()},
        "valid_ndcg10": {d: {"chosen": ch.valid_ndcg10, "without": ch.base_ndcg10} for d, ch in choices.items()},
        "n_valid_targets": {d: ch.n_targets for d, ch in choices.items()},
        "grid": list(GRID),
        "lags": list(LAGS),
        "n_pairs": int(n_pairs),
    }
