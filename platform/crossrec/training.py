"""Training data, loss and scoring for the two-tower model: plain PyTorch, shared by every trainer.

`SequenceData` cuts each user's training sequence (targets already removed by the split) into windows of
`max_len + 1` items; `loss_inputs` prepares a batch for the model's InfoNCE forward. Scoring full catalogs
(validation, evaluation, serving) is crossrec.retrieval's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from crossrec.config import TrainConfig
from crossrec.model import RATING_UNKNOWN, rating_buckets
from crossrec.splits import Splits

__all__ = [
    "SequenceData",
    "SeqBatch",
    "loss_inputs",
    "ssl_views",
    "resolve_text_prior",
    "text_prior_unset",
]


@dataclass
class SeqBatch:
    """Left-padded windows: position t reads items[:, :t+1] and predicts targets[:, t]."""

    items: np.ndarray  # (B, L) global item index (0 where padded)
    domains: np.ndarray  # (B, L) domain code
    next_domains: np.ndarray  # (B, L) domain code of the target
    valid: np.ndarray  # (B, L) bool: a real input item
    targets: np.ndarray  # (B, L) global item index
    target_valid: np.ndarray  # (B, L) bool
    ratings: np.ndarray | None = None  # (B, L) crossrec.model.rating_buckets rows; None: the data has no ratings


class SequenceData:
    """Training windows of a split, optionally restricted to some domains (transfer pre-training)."""

    def __init__(
        self, splits: Splits, max_len: int, domains: list[str] | None = None, domain_map: np.ndarray | None = None
    ):
        """domain_map: dataset domain code -> model domain id (default: the same)."""
        self.max_len = max_len
        keep_dom = None if domains is None else np.array([splits.domain_code[splits.check_domain(d)] for d in domains])
        windows = []
        for rows in splits.train_sequences():
            if keep_dom is not None:
                rows = rows[np.isin(splits.row_domain[rows], keep_dom)]
            n = len(rows)
            # Windows ending at n, n - L, ...: every training interaction after the first is a target once.
            for end in range(n, 1, -max_len):
                windows.append(rows[max(0, end - max_len - 1) : end])
        self.windows = windows
        self.item = splits.row_item
        self.dom = splits.row_domain if domain_map is None else domain_map[splits.row_domain]
        self.rating = None if splits.row_rating is None else rating_buckets(splits.row_rating)

    def __len__(self) -> int:
        return len(self.windows)

    def batches(self, batch_size: int, rng: np.random.Generator, rank: int = 0, world: int = 1) -> Iterator[SeqBatch]:
        """This rank's batches of one epoch. Every rank gets the same number of batches (DDP needs it)."""
        order = rng.permutation(len(self.windows))
        per_rank = len(order) // world
        mine = order[rank * per_rank : (rank + 1) * per_rank]
        # Full batches only (the remainder changes every epoch); a tiny dataset still gets one batch.
        n_batches = per_rank // batch_size if per_rank >= batch_size else int(per_rank > 0)
        mine = mine[: n_batches * batch_size] if per_rank >= batch_size else mine
        # Bucket by length within chunks of 32 batches: batches of similar lengths pad little (most histories
        # are far shorter than max_len), while the chunks keep the epoch's order random.
        lengths = np.array([len(self.windows[k]) for k in mine])
        chunk = 32 * batch_size
        for c in range(0, len(mine), chunk):
            part = mine[c : c + chunk][np.argsort(lengths[c : c + chunk], kind="stable")]
            groups = [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
            for g in rng.permutation(len(groups)):
                yield self.collate([self.windows[k] for k in groups[g]])

    def collate(self, windows: list[np.ndarray]) -> SeqBatch:
        b, length = len(windows), max(len(w) for w in windows) - 1  # pad to the batch's longest only
        items = np.zeros((b, length), np.int64)
        doms = np.zeros((b, length), np.int64)
        nxt = np.zeros((b, length), np.int64)
        tgt = np.zeros((b, length), np.int64)
        valid = np.zeros((b, length), bool)
        ratings = None if self.rating is None else np.full((b, length), RATING_UNKNOWN, np.int64)
        for r, w in enumerate(windows):
            inp, out = w[:-1], w[1:]
            k = len(inp)
            if ratings is not None and self.rating is not None:
                ratings[r, length - k :] = self.rating[inp]
            items[r, length - k :] = self.item[inp]
            doms[r, length - k :] = self.dom[inp]
            nxt[r, length - k :] = self.dom[out]
            tgt[r, length - k :] = self.item[out]
            valid[r, length - k :] = True
        return SeqBatch(items, doms, nxt, valid, tgt, valid.copy(), ratings)


def _drop_domains(batch: SeqBatch, p: float, unknown: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Whole sequences lose their domain ids with probability p: trains the zero-shot (unknown domain) path."""
    drop = rng.random(len(batch.items)) < p
    doms, nxt = batch.domains.copy(), batch.next_domains.copy()
    doms[drop], nxt[drop] = unknown, unknown
    return doms, nxt


def ssl_views(valid: np.ndarray, mask: float, rng: np.random.Generator) -> np.ndarray:
    """(2, B, L) two augmented views of left-padded histories (CL4SRec's crop and mask): each view drops a random
    prefix of up to half the items, then hides each remaining item with probability `mask`; the most recent item
    (the last position, which the view's user vector is read from) always stays."""
    views = np.zeros((2, *valid.shape), bool)
    n = valid.sum(1)
    length = valid.shape[1]
    for v in range(2):
        keep = valid & (rng.random(valid.shape) >= mask)
        crop = (rng.random(len(n)) * (n // 2 + 1)).astype(np.int64)  # items dropped from the oldest end
        first = length - n + crop  # first kept position
        keep &= np.arange(length)[None, :] >= first[:, None]
        keep[:, -1] = valid[:, -1]
        views[v] = keep
    return views


def loss_inputs(
    batch: SeqBatch,
    item_input,
    item_domain: torch.Tensor,
    domain_items: list[torch.Tensor],
    n_negatives: int,
    rng: np.random.Generator,
    unknown_domain: int,
    domain_dropout: float = 0.0,
    ssl_mask: float | None = None,
) -> dict[str, torch.Tensor]:
    """Arguments of `CrossRecModel.forward` (the InfoNCE loss) for a batch: each position's target is scored
    against the batch's targets plus `n_negatives` uniform samples per domain, within the target's domain
    (the model ranks within a domain). item_input(idx) is the item encoder's input for global indices.
    ssl_mask: not None adds two augmented views of each history (`ssl_views`) for the self-supervised term."""
    doms, nxt = batch.domains, batch.next_domains
    if domain_dropout:
        doms, nxt = _drop_domains(batch, domain_dropout, unknown_domain, rng)
    valid = torch.from_numpy(batch.valid)
    tv = torch.from_numpy(batch.target_valid)
    hist = torch.from_numpy(batch.items)
    targets = torch.from_numpy(batch.targets)[tv]  # (P,)
    negs = [d[torch.from_numpy(rng.integers(0, len(d), n_negatives))] for d in domain_items if n_negatives and len(d)]
    # One item-encoder pass over every item the batch touches: history, targets, negatives.
    uniq = torch.unique(torch.cat([hist[valid], targets, *negs]))
    cand = torch.unique(torch.cat([targets, *negs]))
    extra = {}
    if ssl_mask is not None:
        extra["ssl_valid"] = torch.from_numpy(ssl_views(batch.valid, ssl_mask, rng))
    if batch.ratings is not None:  # the model reads them only with `behaviour.rating: feature`
        extra["ratings"] = torch.from_numpy(batch.ratings)
    return {
        **extra,
        "target_domain": item_domain[targets],
        "item_x": item_input(uniq),
        "hist_index": torch.searchsorted(uniq, hist).clamp(max=len(uniq) - 1),  # pads: any row, zeroed later
        "domains": torch.from_numpy(doms),
        "next_domains": torch.from_numpy(nxt),
        "valid": valid,
        "target_valid": tv,
        "cand_index": torch.searchsorted(uniq, cand),
        "wrong_domain": item_domain[cand].unsqueeze(0) != item_domain[targets].unsqueeze(1),
        "labels": torch.searchsorted(cand, targets),
    }


def resolve_text_prior(cfg: TrainConfig, splits: Splits, vectors: np.ndarray) -> TrainConfig:
    """`cfg` with its unset (None) `text_prior_decay` / `text_prior_cross` chosen on the validation split of the
    training domains from textknn's grid (`fit_textknn`; a value that is set stays, only the other is searched):
    the model's text prior then starts as the dataset's best textknn. vectors: (N, D) frozen backbone vectors
    of the catalog. Unchanged for models without a text prior."""
    from crossrec.baselines.textknn import CROSS_WEIGHTS, DECAYS, fit_textknn

    if not text_prior_unset(cfg):
        return cfg
    decay, cross = cfg.text_prior_decay, cfg.text_prior_cross
    knn = fit_textknn(
        splits,
        vectors,
        DECAYS if decay is None else (decay,),
        CROSS_WEIGHTS if cross is None else (cross,),
        domains=cfg.train_domains,
    )
    return dataclasses.replace(cfg, text_prior_decay=knn.decay, text_prior_cross=knn.cross_weight)


def text_prior_unset(cfg: TrainConfig) -> bool:
    """Whether `resolve_text_prior` has a value to choose."""
    return cfg.item_encoder == "text" and cfg.text_prior and None in (cfg.text_prior_decay, cfg.text_prior_cross)
