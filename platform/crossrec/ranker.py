"""Second stage: re-ranks the retriever's top-N with a small MLP over per-(user, candidate) features.

    score'(u, c) = a * retrieval(u, c) + MLP([features(u, c), domain embedding])

The MLP's last layer starts at zero and `a` at one, so an untrained ranker keeps retrieval's order and
training (listwise softmax over the top-N: the retriever's hard negatives) only has to learn corrections.
Features (FEATURES) use only what serving has at request time - the model's item vectors of the candidates and
of the history, the retrieval scores, the user vector - plus a per-item table saved with the ranker (log
popularity in the training data, knowledge-graph rows). Items the ranker never saw score with zero popularity
and no graph links, never an error. The retrieval scores include the retriever's priors
(crossrec.priors), in training lists, evaluation and serving alike: they are the scores that chose the top-N,
and an untrained ranker then keeps exactly retrieval's order.

Training data (`build_lists`): the VALIDATION targets. The retriever was fit on the training sequences, so its
scores there are optimistic (the targets were its positives); on validation targets its top-N looks like it
will at test time. Validation users are split: `valid_fraction` of them are held out for early stopping.
Test targets are never used. Plain PyTorch: the Ray Train driver is `trainers/ranker.py`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from crossrec.config import RankerConfig
from crossrec.domains import domain_id
from crossrec.retrieval import Retriever
from crossrec.splits import Splits, TargetBatch

__all__ = [
    "FEATURES",
    "RankRequest",
    "ItemTable",
    "ListBatch",
    "RankerNet",
    "Ranker",
    "RankLists",
    "build_item_table",
    "build_lists",
    "list_features",
    "ranker_epoch",
    "rerank_ndcg",
    "RankedScorer",
    "save_ranker",
    "load_ranker",
    "RANKER_DIR",
    "candidate_lists",
    "table_rows_for",
    "fit_standardizer",
    "two_hop",
]

RANKER_DIR = "ranker"
RANKER_FORMAT = 1
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
class RankRequest:
    domain: str  # target domain
    candidates: list[str]  # item ids of `domain`, in retrieval order (top-N)
    retrieval_scores: np.ndarray  # (N,) the retriever's scores of `candidates`
    user: np.ndarray  # (V,) the user vector the retriever used
    history: list[tuple[str, str | None]]  # (domain, item_id or None for a text-only entry), oldest first
    history_vectors: np.ndarray  # (H, V) the model's item vectors of the history entries
    candidate_vectors: np.ndarray  # (N, V) the model's item vectors of the candidates
    # (N,) the priors' term in `retrieval_scores` (crossrec.priors); None: no prior.
    # Explanations re-read retrieval scores from other user vectors and add it back.
    candidate_bias: np.ndarray | None = None


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


class RankerNet(nn.Module):
    """a * retrieval score + MLP(standardised features, domain embedding)."""

    feat_mean: torch.Tensor  # buffers (register_buffer): the training lists' feature statistics
    feat_std: torch.Tensor

    def __init__(self, n_features: int, n_domains: int, hidden: int, domain_dim: int = 8, dropout: float = 0.1):
        super().__init__()
        self.register_buffer("feat_mean", torch.zeros(n_features))
        self.register_buffer("feat_std", torch.ones(n_features))
        self.domain = nn.Embedding(n_domains + 1, domain_dim)  # + unknown
        nn.init.zeros_(self.domain.weight)
        self.mlp = nn.Sequential(
            nn.Linear(n_features + domain_dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, 1),
        )
        last = self.mlp[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)  # start exactly at retrieval's order
        nn.init.zeros_(last.bias)
        self.retrieval_weight = nn.Parameter(torch.ones(()))

    def forward(self, feats: torch.Tensor, domain: torch.Tensor, cand_valid: torch.Tensor) -> torch.Tensor:
        """feats (B, N, F), domain (B,), cand_valid (B, N) -> (B, N) scores (-inf for padding)."""
        x = (feats - self.feat_mean) / self.feat_std
        dom = self.domain(domain)[:, None, :].expand(-1, feats.shape[1], -1)
        out = self.retrieval_weight * feats[..., 0] + self.mlp(torch.cat([x, dom], -1)).squeeze(-1)
        return out.masked_fill(~cand_valid, -math.inf)


# -- candidate lists -----------------------------------------------------------------------------------------
def candidate_lists(
    scorer: Retriever, batch: TargetBatch, table_rows: np.ndarray, domain_id: int, top_n: int, max_len: int
) -> tuple[ListBatch, np.ndarray, np.ndarray]:
    """Retrieval's top-N for a batch of targets (history items of the domain excluded, as evaluation does).
    table_rows: catalog global index -> ItemTable row. Returns (lists, top columns (B, N), full scores (B, n))."""
    c = scorer.catalog
    off, n = c.offset[batch.domain], c.n_items[batch.domain]
    users = scorer.user_vectors(batch.histories, batch.domain)  # (B, V)
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


def table_rows_for(items: ItemTable, splits: Splits) -> np.ndarray:
    """Catalog global index -> ItemTable row (-1 for items the table does not have)."""
    return items.rows([(splits.domains[d], i) for d, i in zip(splits.item_domain, splits.item_ids)]).numpy()


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


# -- training steps (shared by the Ray Train worker) -----------------------------------------------------------
def fit_standardizer(net: RankerNet, lists: RankLists) -> None:
    """Feature mean/std over the real candidates of the training lists."""
    f = lists.feats[lists.valid & ~lists.holdout[:, None]]
    if len(f):
        net.feat_mean.copy_(f.mean(0))
        net.feat_std.copy_(f.std(0).clamp(min=1e-4) if len(f) > 1 else torch.ones(f.shape[1]))


def ranker_epoch(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    lists: RankLists,
    batch_size: int,
    rng: np.random.Generator,
    rank: int = 0,
    world: int = 1,
) -> float:
    """One epoch of listwise softmax cross-entropy over the training lists."""
    net.train()
    idx = np.flatnonzero((~lists.holdout).numpy())
    order = rng.permutation(idx)
    per_rank = len(order) // world if world > 1 else len(order)
    mine = order[rank * per_rank : (rank + 1) * per_rank]
    losses = []
    for s in range(0, len(mine), batch_size):
        q = torch.from_numpy(mine[s : s + batch_size])
        logits = net(lists.feats[q], lists.domain[q], lists.valid[q])
        loss = F.cross_entropy(logits, lists.label[q])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return float(np.mean(losses)) if losses else 0.0


def _ndcg_at(ranks: torch.Tensor, k: int = 10) -> torch.Tensor:
    """ranks: 1-based, 0 = miss."""
    return torch.where((ranks >= 1) & (ranks <= k), 1.0 / torch.log2(ranks.float() + 1), torch.zeros(()))


@torch.inference_mode()
def rerank_ndcg(net: RankerNet, lists: RankLists, which: str = "holdout", k: int = 10) -> dict[str, float]:
    """NDCG@k of the re-ranked lists and of retrieval's own order on the holdout (or training) lists;
    a target retrieval missed counts as a miss for both, as in the full-ranking evaluation."""
    net.eval()
    sel = lists.holdout if which == "holdout" else ~lists.holdout
    q = torch.from_numpy(np.flatnonzero(sel.numpy()))
    n_missed = int(lists.missed[1 if which == "holdout" else 0])
    if len(q) == 0:
        return {"ndcg": 0.0, "retrieval_ndcg": 0.0, "n": n_missed}
    scores = torch.cat(
        [
            net(lists.feats[q[s : s + 1024]], lists.domain[q[s : s + 1024]], lists.valid[q[s : s + 1024]])
            for s in range(0, len(q), 1024)
        ]
    )
    label = lists.label[q]
    t = scores.gather(1, label[:, None])
    pos = torch.arange(scores.shape[1])[None, :]
    ahead = (scores > t) | ((scores == t) & (pos < label[:, None]))
    n = len(q) + n_missed
    return {
        "ndcg": float(_ndcg_at(1 + ahead.sum(1), k).sum()) / n,
        "retrieval_ndcg": float(_ndcg_at(label + 1, k).sum()) / n,
        "n": n,
    }


# -- the trained ranker -----------------------------------------------------------------------------------
class Ranker:
    """A trained second stage: `score(RankRequest)` for serving, `RankedScorer` for evaluation."""

    def __init__(
        self,
        net: RankerNet,
        items: ItemTable,
        cfg: RankerConfig,
        learned_dim: int,
        max_len: int,
        meta: dict | None = None,
    ):
        self.net = net.eval()
        self.items = items
        self.cfg = cfg
        self.learned_dim = learned_dim
        self.max_len = max_len
        self.meta = meta or {}

    def domain_id(self, domain: str) -> int:
        return domain_id(self.items.domains, domain)

    @torch.inference_mode()
    def score_lists(self, lists: ListBatch, cols: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N) scores, or (B, C) of the candidates at positions `cols` (the same values as those columns)."""
        valid = lists.cand_valid if cols is None else lists.cand_valid[:, cols]
        return self.net(list_features(lists, self.items, self.learned_dim, cols), lists.domain, valid)

    @torch.inference_mode()
    def score(self, req: RankRequest) -> np.ndarray:
        """(N,) new scores of `req.candidates`, higher is better."""
        if len(req.candidates) == 0:
            return np.zeros(0, np.float32)
        return self.score_lists(self._request_list(req))[0].numpy()

    @torch.inference_mode()
    def score_without(
        self,
        req: RankRequest,
        users: np.ndarray,
        drop: list[int],
        cols: np.ndarray | None = None,
        bias: np.ndarray | None = None,
    ) -> np.ndarray:
        """(B, N) scores of `req.candidates` with history entry `drop[b]` left out and `users[b]` (V,) as the user
        vector (retrieval scores re-read from it): explanations by occlusion of the ranked order, in one batch.
        Leaving an entry out is masking it: every feature reads the history through `hist_valid`. cols: only
        the candidates at these positions, (B, C) (the list statistics still read all N). bias: (B, N) the priors'
        term of the candidates with each entry left out (the transition prior depends on the history); default:
        `req.candidate_bias` for every row."""
        one = self._request_list(req)
        b = len(drop)
        n = len(req.candidates) if cols is None else len(cols)
        users_t = torch.from_numpy(np.asarray(users, dtype=np.float32)).reshape(b, -1)
        width = one.hist.shape[1]
        shown = min(len(req.history), self.max_len)  # the entries inside the ranker's window
        valid, rows, same = (t.expand(b, -1).clone() for t in (one.hist_valid, one.hist_rows, one.hist_same))
        for r, i in enumerate(drop):
            p = width - len(req.history) + i  # its slot; an entry older than the window has none
            if p >= width - shown:
                valid[r, p], rows[r, p], same[r, p] = False, -1, False
        scores = users_t @ one.cand[0].T  # (B, N)
        if bias is not None:
            scores = scores + torch.from_numpy(np.asarray(bias, dtype=np.float32)).reshape(b, -1)
        elif req.candidate_bias is not None:
            scores = scores + torch.from_numpy(np.asarray(req.candidate_bias, dtype=np.float32)).reshape(1, -1)
        lists = ListBatch(
            user=users_t,
            cand=one.cand.expand(b, -1, -1),
            scores=scores,
            cand_valid=one.cand_valid.expand(b, -1),
            cand_rows=one.cand_rows.expand(b, -1),
            hist=one.hist.expand(b, -1, -1),
            hist_valid=valid,
            hist_same=same,
            hist_rows=rows,
            domain=one.domain.expand(b),
        )
        picked = None if cols is None else torch.as_tensor(np.asarray(cols), dtype=torch.long)
        return self.score_lists(lists, picked).numpy().reshape(b, n)

    def _request_list(self, req: RankRequest) -> ListBatch:
        """One request as a batch of one list."""
        n = len(req.candidates)
        cand = torch.from_numpy(np.array(req.candidate_vectors, dtype=np.float32)).reshape(n, -1)
        hist_keys = list(req.history)[-self.max_len :]
        hvec = np.array(req.history_vectors, dtype=np.float32).reshape(len(req.history), cand.shape[1])[-self.max_len :]
        h = len(hist_keys)
        width = max(h, 1)  # one padded slot when there is no history
        hist = torch.zeros(1, width, cand.shape[1])
        valid = torch.zeros(1, width, dtype=torch.bool)
        rows = torch.full((1, width), -1, dtype=torch.long)
        same = torch.zeros(1, width, dtype=torch.bool)
        if h:
            hist[0, width - h :] = torch.from_numpy(hvec)
            valid[0, width - h :] = True
            rows[0, width - h :] = self.items.rows([(d, i) for d, i in hist_keys])
            same[0, width - h :] = torch.tensor([d == req.domain for d, _ in hist_keys])
        return ListBatch(
            user=torch.from_numpy(np.array(req.user, dtype=np.float32)).reshape(1, -1),
            cand=cand[None],
            scores=torch.from_numpy(np.array(req.retrieval_scores, dtype=np.float32)).reshape(1, n),
            cand_valid=torch.ones(1, n, dtype=torch.bool),
            cand_rows=self.items.rows([(req.domain, c) for c in req.candidates])[None],
            hist=hist,
            hist_valid=valid,
            hist_same=same,
            hist_rows=rows,
            domain=torch.tensor([self.domain_id(req.domain)]),
        )

    def online_item(self, domain: str, item_id: str, text_vector: np.ndarray | None = None) -> None:
        """An item added through POST /v1/items: scored with zero popularity and no graph links."""
        self.items.add(domain, item_id)


class RankedScorer:
    """Full-ranking scorer of the whole pipeline for `evaluate`: the re-ranked top-N first, then every other
    item in retrieval order."""

    name = "crossrec"

    def __init__(self, retrieval: Retriever, ranker: Ranker):
        if not isinstance(retrieval.catalog, Splits):
            raise TypeError("RankedScorer evaluates a split: its retriever's catalog must be a Splits")
        self.retrieval = retrieval
        self.splits = retrieval.catalog
        self.ranker = ranker
        self.rows = table_rows_for(ranker.items, self.splits)

    def __call__(self, batch: TargetBatch) -> np.ndarray:
        if len(batch) > 64:  # features are (B, N, H, ...): a few lists at a time
            cat = self.splits
            return np.concatenate(
                [self(cat.batch(batch.rows[s : s + 64], batch.domain)) for s in range(0, len(batch), 64)]
            )
        lists, cols, full = candidate_lists(
            self.retrieval,
            batch,
            self.rows,
            self.ranker.domain_id(batch.domain),
            self.ranker.cfg.top_n,
            self.ranker.max_len,
        )
        new = self.ranker.score_lists(lists).numpy().astype(np.float64)  # (B, N)
        full = full.astype(np.float64)
        rest = full.copy()
        np.put_along_axis(rest, cols, -np.inf, axis=1)
        floor = np.where(np.isfinite(rest).any(1), rest.max(1), 0.0)[:, None]
        lo = np.where(np.isfinite(new), new, np.inf).min(1, keepdims=True)
        lifted = np.where(np.isfinite(new), floor + 1.0 + (new - lo), -np.inf)
        np.put_along_axis(full, cols, lifted, axis=1)
        return full


# -- persistence ------------------------------------------------------------------------------------------
def save_ranker(
    bundle_path: str | Path,
    net: RankerNet,
    items: ItemTable,
    cfg: RankerConfig,
    learned_dim: int,
    max_len: int,
    metrics: dict,
) -> Path:
    """Writes `ranker/` into a bundle, all-or-nothing: ranker.json, model.safetensors, items.safetensors,
    items.parquet (domain, item_id of each row)."""
    from crossrec.atomic import building
    from crossrec.config import config_to_dict

    out = Path(bundle_path) / RANKER_DIR
    with building(out) as tmp:
        save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(tmp / "model.safetensors"))
        save_file({k: v.contiguous() for k, v in items.arrays.items()}, str(tmp / "items.safetensors"))
        pq.write_table(pa.table({"domain": items.item_domain, "item_id": items.item_ids}), tmp / "items.parquet")
        meta = {
            "format": RANKER_FORMAT,
            "config": config_to_dict(cfg),
            "features": list(FEATURES),
            "domains": items.domains,
            "learned_dim": learned_dim,
            "max_len": max_len,
            "n_features": len(FEATURES),
            "metrics": metrics,
        }
        (tmp / "ranker.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def load_ranker(bundle) -> Ranker | None:
    """The bundle's ranker, or None when it has none. `bundle`: a `crossrec.bundle.Bundle` or its folder."""
    path = Path(getattr(bundle, "path", bundle)) / RANKER_DIR
    if not (path / "ranker.json").is_file():
        return None
    meta = json.loads((path / "ranker.json").read_text())
    if meta.get("format") != RANKER_FORMAT:
        raise ValueError(f"{path}: ranker format {meta.get('format')!r}, this crossrec reads {RANKER_FORMAT}")
    if meta["features"] != list(FEATURES):
        raise ValueError(
            f"{path}: the ranker was trained on features {meta['features']}, this crossrec computes {list(FEATURES)}"
        )
    cfg = RankerConfig(**meta["config"])
    net = RankerNet(meta["n_features"], len(meta["domains"]), cfg.hidden)
    net.load_state_dict(load_file(str(path / "model.safetensors")))
    t = pq.read_table(path / "items.parquet")
    items = ItemTable(
        domains=list(meta["domains"]),
        item_domain=t.column("domain").to_pylist(),
        item_ids=t.column("item_id").to_pylist(),
        arrays=load_file(str(path / "items.safetensors")),
    )
    return Ranker(net, items, cfg, meta["learned_dim"], meta["max_len"], meta)
