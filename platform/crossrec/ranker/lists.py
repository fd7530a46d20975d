"""Retrieval's top-N as the ranker's lists, for a batch of targets and for the VALIDATION targets it trains on
(see crossrec.ranker)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from crossrec.config import RankerConfig
from crossrec.domains import domain_id
from crossrec.ranker.features import ItemTable, ListBatch, list_features, table_rows_for
from crossrec.retrieval import Retriever
from crossrec.splits import Splits, TargetBatch


def candidate_lists(
    scorer: Retriever, batch: TargetBatch, table_rows: np.ndarray, domain_id: int, top_n: int, max_len: int
) -> tuple[ListBatch, np.ndarray, np.ndarray]:
    """Retrieval's top-N for a batch of targets (history items of the domain excluded, as evaluation does).
    table_rows: catalog global index -> ItemTable row. Returns (lists, top columns (B, N), full scores (B, n))."""
    c = scorer.catalog
    off, n = c.offset[batch.domain], c.n_items[batch.domain]
    users = scorer.user_vectors(batch.histories, batch.domain, batch.history_ratings)  # (B, V)
    block = scorer.vecs[off : off + n]
    full = scorer.scores(batch, users)  # (B, n) the priors included: lists and their `retrieval` scores
    for r, h in enumerate(batch.histories):
        own = h[(h >= off) & (h < off + n)] - off
        full[r, torch.from_numpy(own)] = -math.inf
    k = min(top_n, n)
    scores, cols = full.topk(k, dim=1)
    valid = torch.isfinite(scores)
    b = len(batch)
    hist_items = np.zeros((b, max_len), np.int64)
    hist_valid = np.zeros((b, max_len), bool)
    for r, h in enumerate(batch.histories):
        h = h[-max_len:]
        hist_items[r, max_len - len(h) :] = h
        hist_valid[r, max_len - len(h) :] = True
    hi = torch.from_numpy(hist_items)
    hv = torch.from_numpy(hist_valid)
    tcode = c.domain_code[batch.domain]
    lists = ListBatch(
        user=users,
        cand=block[cols],
        scores=scores.masked_fill(~valid, 0.0),
        cand_valid=valid,
        cand_rows=torch.from_numpy(table_rows[(cols + off).numpy()]),
        hist=scorer.vecs[hi] * hv[..., None],
        hist_valid=hv,
        hist_same=torch.from_numpy(c.item_domain[hist_items] == tcode) & hv,
        hist_rows=torch.from_numpy(table_rows[hist_items]).masked_fill(~hv, -1),
        domain=torch.full((b,), domain_id, dtype=torch.long),
    )
    return lists, cols.numpy(), full.numpy()


@dataclass
class RankLists:
    """Precomputed features of many candidate lists (training data of the ranker)."""

    feats: torch.Tensor  # (Q, N, F)
    valid: torch.Tensor  # (Q, N) bool
    domain: torch.Tensor  # (Q,)
    label: torch.Tensor  # (Q,) position of the target in the list
    holdout: torch.Tensor  # (Q,) bool: early-stopping lists
    # Lists whose target retrieval missed (no re-ranking can find it) are only counted, [training, holdout]:
    # they teach nothing and score 0 for every order, so their features are never computed.
    missed: torch.Tensor  # (2,) long

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "feats": self.feats,
            "valid": self.valid,
            "domain": self.domain,
            "label": self.label,
            "holdout": self.holdout,
            "missed": self.missed,
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> RankLists:
        return cls(**{k: t[k] for k in ("feats", "valid", "domain", "label", "holdout", "missed")})


def build_lists(
    scorer: Retriever,
    splits: Splits,
    items: ItemTable,
    cfg: RankerConfig,
    learned_dim: int,
    max_len: int,
    split: str = "valid",
    batch_size: int = 64,
) -> RankLists:
    """Features of retrieval's top-N for every `split` target (validation: see the module docstring)."""
    if split == "test":
        raise ValueError("the ranker never trains on test targets")
    rows_of = table_rows_for(items, splits)
    out: dict[str, list] = {k: [] for k in ("feats", "valid", "domain", "label", "holdout")}
    missed = torch.zeros(2, dtype=torch.long)
    for d in splits.domains:
        did = domain_id(items.domains, d)
        rows = splits.targets(split, d)
        for s in range(0, len(rows), batch_size):
            batch = splits.batch(rows[s : s + batch_size], d)
            lists, cols, _ = candidate_lists(scorer, batch, rows_of, did, cfg.top_n, max_len)
            target = (splits.row_item[batch.rows] - splits.offset[d])[:, None]
            hit = cols == target
            found = hit.any(1)
            # Held-out users by a fixed hash of the user index: the same users for every domain.
            u = splits.row_user[batch.rows].astype(np.uint64)
            holdout = ((u * np.uint64(2654435761)) % np.uint64(2**32)).astype(np.float64) / 2**32 < cfg.valid_fraction
            missed += torch.tensor([int((~found & ~holdout).sum()), int((~found & holdout).sum())])
            if not found.any():
                continue
            keep = torch.from_numpy(found)
            lists = ListBatch(**{k: v[keep] for k, v in vars(lists).items()})
            out["feats"].append(list_features(lists, items, learned_dim))
            out["valid"].append(lists.cand_valid)
            out["domain"].append(lists.domain)
            out["label"].append(torch.from_numpy(hit[found].argmax(1)))
            out["holdout"].append(torch.from_numpy(holdout[found]))
    n = max((f.shape[1] for f in out["feats"]), default=0)

    def cat(key: str, fill) -> torch.Tensor:
        parts = [
            F.pad(t, (0, 0, 0, n - t.shape[1]), value=fill)
            if key == "feats"
            else F.pad(t, (0, n - t.shape[1]), value=fill)
            if t.dim() == 2
            else t
            for t in out[key]
        ]
        return torch.cat(parts) if parts else torch.zeros(0)

    return RankLists(
        feats=cat("feats", 0.0),
        valid=cat("valid", False),
        domain=cat("domain", 0),
        label=cat("label", -1),
        holdout=cat("holdout", False),
        missed=missed,
    )
