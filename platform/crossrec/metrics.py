"""Full-ranking metrics: ranks of targets among every item of their domain, and Recall/NDCG/MRR at K.

Rank (1-based) of a target = 1 + #candidates scoring higher + #candidates scoring equal whose column
(item id order) comes first. Masked candidates (history items) are not ranked; a masked target is a miss
(rank = inf), so "recommend what they already have" earns nothing.
"""

from __future__ import annotations

import numpy as np

__all__ = ["KS", "METRICS", "rank_targets", "metrics_from_ranks"]

KS = (10, 20, 50)
METRICS = ("recall", "ndcg", "mrr")


def rank_targets(scores: np.ndarray, target_col: np.ndarray, mask: list[np.ndarray] | None = None) -> np.ndarray:
    """Ranks (float, inf = masked target) of each row's target.

    scores: (B, N); target_col: (B,); mask[r]: columns masked in row r (may include the target)."""
    s = np.array(scores, dtype=np.float64)  # a copy: masking writes into it
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D (targets, items), got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    tc = np.asarray(target_col, dtype=np.int64)
    b, n = s.shape
    masked_target = np.zeros(b, dtype=bool)
    if mask is not None:
        for r, cols in enumerate(mask):
            if len(cols):
                # NaN compares false to everything, so a masked column never counts as ahead of the target.
                s[r, cols] = np.nan
                masked_target[r] = bool((np.asarray(cols) == tc[r]).any())
    t = s[np.arange(b), tc][:, None]  # (B, 1)
    ahead = (s > t) | ((s == t) & (np.arange(n)[None, :] < tc[:, None]))
    rank = 1.0 + np.count_nonzero(ahead, axis=1)
    rank[masked_target] = np.inf
    return rank


def metrics_from_ranks(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float | None]:
    """Mean Recall@K, NDCG@K (one relevant item: 1/log2(rank+1)), MRR@K over the targets; None if none."""
    r = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float | None] = {}
    for name in METRICS:
        for k in ks:
            if r.size == 0:
                out[f"{name}@{k}"] = None
                continue
            hit = r <= k
            safe = np.where(hit, r, 1.0)
            v: np.ndarray
            if name == "recall":
                v = hit.astype(np.float64)
            elif name == "ndcg":
                v = hit / np.log2(safe + 1.0)
            else:
                v = hit / safe
            out[f"{name}@{k}"] = float(np.mean(v))
    return out
