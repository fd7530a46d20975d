"""textknn: the frozen backbone as a recommender, with no training at all.

score(user, candidate) = cosine(candidate's text vector, q), where q is the weighted mean of the (L2-normalised)
text vectors of the user's history in every domain: the item k steps back from the most recent one weighted
`decay ** k`, times `cross_weight` when it is from another domain than the target's. A user with no history gets
all-zero scores (ties, broken by item id order).

`decay` and `cross_weight` are chosen on the validation split (`fit_textknn`), never on test: on Amazon data the
best values differ a lot between datasets (a recent same-domain item says more than a cross-domain one).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from crossrec.splits import Splits, TargetBatch

__all__ = ["TextKNN", "fit_textknn"]


class TextKNN:
    """Scores the batch's domain by cosine to the history's recency-weighted mean text vector. `vectors` are the
    frozen backbone vectors of the whole catalog in `splits`' global item order (crossrec.inference.backbone_vectors)."""

    name = "textknn"

    @property
    def params(self) -> dict:
        return {"decay": self.decay, "cross_weight": self.cross_weight}

    def __init__(self, splits: Splits, vectors: np.ndarray, decay: float = 0.8, cross_weight: float = 1.0):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"`decay` must be in (0, 1], got {decay}")
        if not 0.0 <= cross_weight <= 1.0:
            raise ValueError(f"`cross_weight` must be in [0, 1], got {cross_weight}")
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[0] != len(splits.item_ids):
            raise ValueError(
                f"`vectors` must be (n_items, dim) = ({len(splits.item_ids)}, dim) in the splits' "
                f"global item order, got shape {vectors.shape}"
            )
        self.splits = splits
        self.decay = decay
        self.cross_weight = cross_weight
        self.valid_ndcg10: float | None = None  # set by fit_textknn
        # Normalised once: the mean is over unit vectors, and a dot product with a candidate is its cosine.
        self.vectors = F.normalize(torch.from_numpy(vectors).float(), dim=-1)  # (N, D)

    def user_vectors(self, histories: list[np.ndarray], domain: str | None = None) -> torch.Tensor:
        """(B, D) unit query vectors for targets in `domain` (zero rows for empty histories)."""
        from crossrec.retrieval import text_query

        sp = self.splits
        # Without a domain every entry counts alike (the target's code matches none of the catalog's).
        target = sp.domain_code[domain] if domain is not None else -1
        cross = self.cross_weight if domain is not None else 1.0
        return text_query(
            self.vectors,
            histories,
            [sp.item_domain[h] for h in histories],
            np.full(len(histories), target),
            self.decay,
            cross,
        )

    def __call__(self, batch: TargetBatch) -> np.ndarray:
        off, n = self.splits.offset[batch.domain], self.splits.n_items[batch.domain]
        q = self.user_vectors(batch.histories, batch.domain)  # (B, D)
        return (q @ self.vectors[off : off + n].T).numpy()  # (B, n_items[domain]) cosines


DECAYS = (0.3, 0.6, 0.8)
CROSS_WEIGHTS = (0.0, 0.1, 1.0)


def fit_textknn(
    splits: Splits,
    vectors: np.ndarray,
    decays: tuple[float, ...] = DECAYS,
    cross_weights: tuple[float, ...] = CROSS_WEIGHTS,
    max_targets: int = 1500,
    domains: list[str] | None = None,
) -> TextKNN:
    """The TextKNN whose (decay, cross_weight) scores the best mean NDCG@10 over `domains` (default: all) on a
    fixed subset of validation targets (`max_targets` per domain). Ties keep the earlier grid point."""
    from crossrec.evaluation import evaluate

    domains = list(domains or splits.domains)
    best: TextKNN | None = None
    best_score = -1.0
    for decay in decays:
        for cw in cross_weights:
            knn = TextKNN(splits, vectors, decay, cw)
            m = evaluate(splits, knn, "valid", ks=(10,), max_targets=max_targets, domains=domains).metrics
            score = float(np.mean([m[d]["ndcg@10"] or 0.0 for d in domains]))
            if score > best_score:
                best, best_score = knn, score
    if best is None:
        raise ValueError("fit_textknn: empty grid (`decays` and `cross_weights` need a value each)")
    best.valid_ndcg10 = best_score
    return best
