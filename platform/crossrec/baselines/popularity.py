"""Popularity per target domain: an item's score is its number of training interactions."""

from __future__ import annotations

import numpy as np

from crossrec.splits import Splits, TargetBatch

__all__ = ["Popularity"]


class Popularity:
    """Scores every candidate of the batch's domain by its training count (history masking is the
    evaluator's job, so the same counts serve every user)."""

    name = "popularity"

    def __init__(self, splits: Splits):
        self.splits = splits
        self.counts = splits.train_count.astype(np.float64)

    def __call__(self, batch: TargetBatch) -> np.ndarray:
        off, n = self.splits.offset[batch.domain], self.splits.n_items[batch.domain]
        return self.counts[off : off + n]
