"""The ranker's training steps (plain PyTorch, shared by the Ray Train worker in trainers/ranker.py)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crossrec.ranker.lists import RankLists
from crossrec.ranker.net import RankerNet


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
