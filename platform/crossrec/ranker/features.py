"""The ranker's features per (user, candidate): what serving has at request time (the model's item vectors of the
candidates and the history, the retrieval scores, the user vector) plus a per-item table saved with the ranker (log
popularity in the training data, knowledge-graph rows)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from crossrec.splits import Splits

FEATURES = (
    "retrieval",
    "retrieval_gap",
    "retrieval_z",
    "rank",
    "learned",
    "text_prior",
    "popularity",
    "known",
    "cos_max",
    "cos_mean",
    "cos_recent",
    "recency_of_best",
    "same_domain_share",
    "history_len",
    "graph_max",
    "graph_recent",
)
RECENCY_DECAY = 0.8  # weight of a history item k steps older than the latest: 0.8^k


@dataclass
class ItemTable:
    """What the ranker knows per catalog item, by row."""

    domains: list[str]  # the ranker's domains (the bundle's); id len(domains) = unknown
    item_domain: list[str]  # (n,)
    item_ids: list[str]  # (n,)
    arrays: dict[str, torch.Tensor]  # log_pop (n,); attr, attr_w (n, A); nb, nb_w (n, K) (graph, optional)

    def __post_init__(self):
        self._row = {(d, i): r for r, (d, i) in enumerate(zip(self.item_domain, self.item_ids))}

    @property
    def has_graph(self) -> bool:
        return "attr" in self.arrays

    def rows(self, keys: list[tuple[str, str | None]]) -> torch.Tensor:
        """(domain, item_id) -> row, -1 for items it never saw (new, online, text-only)."""
        return torch.tensor([self._row.get(k, -1) for k in keys], dtype=torch.long)

    def add(self, domain: str, item_id: str) -> None:
        """An item added online: known from now on, with zero popularity and no graph links."""
        if (domain, item_id) in self._row:
            return
        self._row[(domain, item_id)] = len(self.item_ids)
        self.item_domain.append(domain)
        self.item_ids.append(item_id)
        for k, v in self.arrays.items():
            fill = -1 if k in ("attr", "nb") else 0
            self.arrays[k] = torch.cat([v, torch.full((1, *v.shape[1:]), fill, dtype=v.dtype)])


def build_item_table(splits: Splits, domains: list[str], graph=None) -> ItemTable:
    """Rows = the catalog in global order: log(1 + training interactions), and the graph's Â rows if given."""
    arrays = {"log_pop": torch.from_numpy(np.log1p(splits.train_count).astype(np.float32))}
    if graph is not None:
        arrays.update({k: torch.from_numpy(v) for k, v in graph.item_arrays().items()})
    return ItemTable(
        domains=list(domains),
        item_domain=[splits.domains[c] for c in splits.item_domain],
        item_ids=splits.item_ids.tolist(),
        arrays=arrays,
    )


@dataclass
class ListBatch:
    """B candidate lists (the retriever's top-N) with what the features need. Histories are left-padded."""

    user: torch.Tensor  # (B, V)
    cand: torch.Tensor  # (B, N, V) item vectors
    scores: torch.Tensor  # (B, N) retrieval scores
    cand_valid: torch.Tensor  # (B, N) bool: a real candidate (short lists are padded)
    cand_rows: torch.Tensor  # (B, N) ItemTable rows, -1 unknown
    hist: torch.Tensor  # (B, H, V)
    hist_valid: torch.Tensor  # (B, H) bool
    hist_same: torch.Tensor  # (B, H) bool: from the target domain
    hist_rows: torch.Tensor  # (B, H) ItemTable rows, -1 unknown
    domain: torch.Tensor  # (B,) ranker domain id


def _gather(table: torch.Tensor, rows: torch.Tensor, fill) -> torch.Tensor:
    out = table[rows.clamp(min=0)]
    mask = (rows < 0).view(*rows.shape, *([1] * (out.dim() - rows.dim())))
    return out.masked_fill(mask, fill)


def two_hop(items: ItemTable, cand_rows: torch.Tensor, hist_rows: torch.Tensor) -> torch.Tensor:
    """Graph similarity (B, N, H) = Â²[c, h] through shared attribute tokens + Â[c, h] for co-interactions:
    LightGCN's propagation between two items, from the padded Â rows of the item table."""
    a = items.arrays
    b, n = cand_rows.shape
    h = hist_rows.shape[1]
    ca, cw = _gather(a["attr"], cand_rows, -1).long(), _gather(a["attr_w"], cand_rows, 0.0)  # (B, N, A)
    ha, hw = _gather(a["attr"], hist_rows, -1).long(), _gather(a["attr_w"], hist_rows, 0.0)  # (B, H, A)
    # Each history item's Â row, dense over the tokens the batch's histories use (slot U: none of them).
    uniq, inv = torch.unique(ha[ha >= 0], return_inverse=True)
    u = len(uniq)
    hidx = torch.full_like(ha, u)
    hidx[ha >= 0] = inv
    rows = torch.zeros(b, h, u + 1).scatter_add_(2, hidx, hw)  # (B, H, U + 1)
    cidx = torch.searchsorted(uniq, ca.clamp(min=0))
    found = (
        (ca >= 0) & (cidx < u) & (uniq[cidx.clamp(max=max(u - 1, 0))] == ca)
        if u
        else torch.zeros_like(ca, dtype=torch.bool)
    )
    cidx = torch.where(found, cidx, torch.full_like(cidx, u)).reshape(b, -1)  # (B, N * A)
    picked = rows.transpose(1, 2).gather(1, cidx[..., None].expand(-1, -1, h))  # (B, N * A, H)
    sim = (picked.reshape(b, n, -1, h) * cw[..., None]).sum(2)  # (B, N, H)
    nb, nw = _gather(a["nb"], cand_rows, -1), _gather(a["nb_w"], cand_rows, 0.0)  # (B, N, K)
    hit = (nb[:, :, None, :] == hist_rows[:, None, :, None]) & (hist_rows >= 0)[:, None, :, None]  # (B,N,H,K)
    return sim + (hit * nw[:, :, None, :]).sum(-1)


def list_features(b: ListBatch, items: ItemTable, learned_dim: int, cols: torch.Tensor | None = None) -> torch.Tensor:
    """(B, N, len(FEATURES)) features of every candidate; the one definition used by training and serving.
    cols: (C,) positions in the list: the features of only those candidates, (B, C, F), equal to those columns
    of the whole list's features (list statistics still read every candidate). Explanations score only the k
    items returned, not the whole top-N: most of a request's cost when it asks for reasons."""
    bsz, n, _ = b.cand.shape
    s = b.scores.masked_fill(~b.cand_valid, 0.0)
    cnt = b.cand_valid.sum(1, keepdim=True).clamp(min=1)
    mean = s.sum(1, keepdim=True) / cnt
    std = (((s - mean) ** 2 * b.cand_valid).sum(1, keepdim=True) / cnt).sqrt().clamp(min=1e-6)
    top = s.masked_fill(~b.cand_valid, -math.inf).max(1, keepdim=True).values
    rank = torch.arange(n, dtype=torch.float32).expand(bsz, n)
    cand, cand_rows, cand_valid = b.cand, b.cand_rows, b.cand_valid
    if cols is not None:  # from here on every feature is per candidate
        s, rank, cand, cand_rows, cand_valid = (t[:, cols] for t in (s, rank, cand, cand_rows, cand_valid))
        n = len(cols)
    learned = (cand[..., :learned_dim] * b.user[:, None, :learned_dim]).sum(-1)
    prior = (cand[..., learned_dim:] * b.user[:, None, learned_dim:]).sum(-1)
    pop = _gather(items.arrays["log_pop"], cand_rows, 0.0)
    known = (cand_rows >= 0).float()
    # Cosines between candidates and history items, recency weights over valid history positions.
    hv = b.hist_valid.float()
    age = (hv.flip(1).cumsum(1).flip(1) - 1).clamp(min=0)  # (B, H): 0 = most recent valid item
    w = (RECENCY_DECAY**age) * hv
    cos = torch.einsum("bnv,bhv->bnh", F.normalize(cand, dim=-1), F.normalize(b.hist, dim=-1))  # (B, N, H)
    has_hist = hv.sum(1, keepdim=True) > 0  # (B, 1)
    cos_m = cos.masked_fill(~b.hist_valid[:, None, :], -math.inf)
    cos_max = torch.where(has_hist, cos_m.max(-1).values, torch.zeros(()))
    cos_mean = (cos * hv[:, None, :]).sum(-1) / hv.sum(1, keepdim=True).clamp(min=1)
    cos_recent = (cos * w[:, None, :]).sum(-1) / w.sum(1, keepdim=True).clamp(min=1e-9)
    best_age = age.gather(1, cos_m.argmax(-1))  # (B, N)
    recency_best = torch.where(has_hist, 1.0 / (1.0 + best_age), torch.zeros(()))
    same_share = ((b.hist_same & b.hist_valid).sum(1, keepdim=True) / hv.sum(1, keepdim=True).clamp(min=1)).expand(
        -1, n
    )
    hist_len = torch.log1p(hv.sum(1, keepdim=True)).expand(-1, n)
    if items.has_graph:
        g = two_hop(items, cand_rows, b.hist_rows) * hv[:, None, :]  # (B, N, H)
        g_max = g.max(-1).values
        g_recent = (g * w[:, None, :]).sum(-1) / w.sum(1, keepdim=True).clamp(min=1e-9)
    else:
        g_max = g_recent = torch.zeros(bsz, n)
    feats = torch.stack(
        [
            s,
            s - top,
            (s - mean) / std,
            torch.log1p(rank),
            learned,
            prior,
            pop,
            known,
            cos_max,
            cos_mean,
            cos_recent,
            recency_best,
            same_share,
            hist_len,
            g_max,
            g_recent,
        ],
        -1,
    )
    return feats.masked_fill(~cand_valid[..., None], 0.0)


def table_rows_for(items: ItemTable, splits: Splits) -> np.ndarray:
    """Catalog global index -> ItemTable row (-1 for items the table does not have)."""
    return items.rows([(splits.domains[d], i) for d, i in zip(splits.item_domain, splits.item_ids)]).numpy()
