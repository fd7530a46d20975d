"""Do ratings carry signal for the text prior? textknn (the model's text prior, crossrec.baselines.textknn) with
each history item's recency weight multiplied by a function of its rating, on a rated dataset: validation and test
NDCG@10 per weighting, decay and cross-domain weight from textknn's own validation grid. Prints a table.

    python bench/rating_textknn.py DATASET      # a prepared dataset with a `rating` column (bench/movielens_csv.py)

Weightings: none (textknn as shipped); linear r / max; liked only (r >= 4, others 0); centred r - user's mean
(an item rated under the user's average pulls the query away from it).
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from crossrec.baselines.textknn import fit_textknn
from crossrec.dataset import Dataset
from crossrec.evaluation import evaluate
from crossrec.inference import backbone_vectors
from crossrec.splits import Splits, TargetBatch


def _weights(kind: str, r: np.ndarray) -> np.ndarray:
    if kind == "none":
        return np.ones_like(r)
    if kind == "linear":
        return r / 5.0
    if kind == "liked":
        return (r >= 4).astype(np.float32)
    return r - r.mean()  # centred on the user's own mean over the history


class RatedTextKNN:
    def __init__(self, splits: Splits, vectors: torch.Tensor, decay: float, cross: float, kind: str):
        self.splits, self.vectors, self.decay, self.cross, self.kind = splits, vectors, decay, cross, kind

    def __call__(self, batch: TargetBatch) -> np.ndarray:
        sp = self.splits
        assert batch.history_ratings is not None
        code = sp.domain_code[batch.domain]
        q = torch.zeros(len(batch.histories), self.vectors.shape[1])
        for k, (h, r) in enumerate(zip(batch.histories, batch.history_ratings)):
            if not len(h):
                continue
            w = self.decay ** np.arange(len(h) - 1, -1, -1, dtype=np.float64)
            w = w * np.where(sp.item_domain[h] == code, 1.0, self.cross) * _weights(self.kind, r.astype(np.float32))
            q[k] = torch.from_numpy(w.astype(np.float32)) @ self.vectors[torch.from_numpy(h)]
        off, n = sp.offset[batch.domain], sp.n_items[batch.domain]
        return (F.normalize(q, dim=-1) @ self.vectors[off : off + n].T).numpy()


def main(path: str) -> None:
    data = Dataset.load(path)
    sp = Splits(data)
    if sp.row_rating is None:
        sys.exit(f"{path}: no `rating` column")
    raw = backbone_vectors(data, sp, "minilm", "", 64)
    knn = fit_textknn(sp, raw)
    vecs = F.normalize(torch.from_numpy(raw).float(), dim=-1)
    print(f"textknn grid on validation: decay {knn.decay}, cross {knn.cross_weight}")
    print("| weighting | valid NDCG@10 | test NDCG@10 |\n|---|---|---|")
    for kind in ("none", "linear", "liked", "centred"):
        scorer = RatedTextKNN(sp, vecs, knn.decay, knn.cross_weight, kind)
        row = [evaluate(sp, scorer, split, ks=(10,)).metrics["all"]["ndcg@10"] for split in ("valid", "test")]
        print(f"| {kind} | {row[0]:.4f} | {row[1]:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1])
