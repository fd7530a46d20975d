"""textknn: the frozen backbone as a recommender, with no training at all.

score(user, candidate) = cosine(candidate's text vector, q), where q is the recency-weighted mean of the
(L2-normalised) text vectors of the user's history in every domain, item k steps back from the most recent one
weighted `decay ** k`. A user with no history gets all-zero scores (ties, broken by item id order).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from crossrec.splits import Splits, TargetBatch

__all__ = ["TextKNN"]


class TextKNN:
    """Scores the batch's domain by cosine to the history's recency-weighted mean text vector. `vectors` are the
    frozen backbone vectors of the whole catalog in `splits`' global item order (crossrec.inference.backbone_vectors)."""

    name = "textknn"

    def __init__(self, splits: Splits, vectors: np.ndarray, decay: float = 0.8):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"`decay` must be in (0, 1], got {decay}")
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[0] != len(splits.item_ids):
            raise ValueError(f"`vectors` must be (n_items, dim) = ({len(splits.item_ids)}, dim) in the splits' "
                             f"global item order, got shape {vectors.shape}")
        self.splits = splits
        self.decay = decay
        # Normalised once: the mean is over unit vectors, and a dot product with a candidate is its cosine.
        self.vectors = F.normalize(torch.from_numpy(vectors).float(), dim=-1)  # (N, D)

    def user_vectors(self, histories: list[np.ndarray]) -> torch.Tensor:
        """(B, D) unit query vectors (zero rows for empty histories)."""
        lengths = torch.tensor([len(h) for h in histories], dtype=torch.long)
        q = torch.zeros(len(histories), self.vectors.shape[1])
        if int(lengths.sum()) == 0:
            return q
        items = torch.from_numpy(np.concatenate(histories).astype(np.int64))  # (H,) all rows' histories, chained
        row = torch.repeat_interleave(torch.arange(len(histories)), lengths)  # (H,)
        # Age within its own history: 0 for the most recent (last) item.
        ends = torch.cumsum(lengths, 0)
        age = ends[row] - 1 - torch.arange(len(items))
        w = torch.pow(torch.tensor(self.decay, dtype=torch.float64), age.double()).float()  # (H,)
        q.index_add_(0, row, w[:, None] * self.vectors[items])  # (B, D) weighted sums
        # A weighted sum points where the weighted mean does: normalising it gives the mean's cosine directly.
        return F.normalize(q, dim=-1)  # zero rows stay zero

    def __call__(self, batch: TargetBatch) -> np.ndarray:
        off, n = self.splits.offset[batch.domain], self.splits.n_items[batch.domain]
        q = self.user_vectors(batch.histories)  # (B, D)
        return (q @ self.vectors[off:off + n].T).numpy()  # (B, n_items[domain]) cosines
