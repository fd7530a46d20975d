"""The in-process recommender over a bundle: `crossrec recommend` and the serving graph both use it.

Per domain it holds the catalog's item vectors (a dense index: exact inner-product top-k), takes a history
of known item ids (or precomputed item vectors for text-only entries), and returns the top-k items of the
target domain with, on request, the history items that contributed most (occlusion: how much the item's
score drops when that history item is left out).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from crossrec.bundle import Bundle
from crossrec.training import encode_users

__all__ = ["HistoryItem", "Recommendation", "Candidates", "Recommender", "UnknownItem", "UnknownDomain"]


class UnknownItem(KeyError):
    def __str__(self) -> str:
        return self.args[0]


class UnknownDomain(KeyError):
    def __str__(self) -> str:
        return self.args[0]


@dataclass
class HistoryItem:
    domain: str
    item_id: str | None = None
    vector: torch.Tensor | None = None  # (D,) an item vector of the model (e.g. text embedded by the encoder)


@dataclass
class Recommendation:
    item_id: str
    domain: str
    title: str
    score: float
    reasons: list[dict] | None = None  # [{"item_id", "weight"}], strongest first


@dataclass
class Candidates:
    """Retrieval's top-N with what a second stage (crossrec.ranker) rescores them from."""
    item_ids: list[str]
    scores: np.ndarray  # (N,) retrieval scores, descending
    user: np.ndarray  # (V,) the user vector that produced them
    history_vectors: np.ndarray  # (H, V) item vectors of the history entries
    candidate_vectors: np.ndarray  # (N, V)


class Recommender:
    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.model = bundle.model.eval()
        self.ids: dict[str, list[str]] = {}
        self.titles: dict[str, list[str]] = {}
        self.vecs: dict[str, torch.Tensor] = {}
        self.pos: dict[str, dict[str, int]] = {}
        for d in bundle.items:
            ids, vecs = bundle.item_matrix(d)
            self.ids[d], self.vecs[d] = ids, vecs
            self.titles[d] = bundle.items[d].column("title").to_pylist()
            self.pos[d] = {iid: k for k, iid in enumerate(ids)}

    @property
    def domains(self) -> list[str]:
        return sorted(self.ids)

    def check_domain(self, domain: str, field: str = "domain") -> None:
        if domain not in self.ids:
            raise UnknownDomain(f"`{field}`: unknown domain {domain!r} (known: {', '.join(self.domains)})")

    def item_vector(self, domain: str, item_id: str, field: str = "history") -> torch.Tensor:
        self.check_domain(domain, field)
        k = self.pos[domain].get(item_id)
        if k is None:
            raise UnknownItem(f"`{field}`: unknown item_id {item_id!r} in domain {domain!r}")
        return self.vecs[domain][k]

    def upsert(self, domain: str, item_id: str, title: str, vector: torch.Tensor) -> bool:
        """Adds or replaces an item (recommendable at once). Returns True if it was new."""
        if domain not in self.ids:
            self.ids[domain], self.titles[domain], self.pos[domain] = [], [], {}
            self.vecs[domain] = torch.zeros(0, self.model.vector_dim)
        k = self.pos[domain].get(item_id)
        if k is not None:
            self.vecs[domain][k] = vector
            self.titles[domain][k] = title
            return False
        self.pos[domain][item_id] = len(self.ids[domain])
        self.ids[domain].append(item_id)
        self.titles[domain].append(title)
        self.vecs[domain] = torch.cat([self.vecs[domain], vector.reshape(1, -1)])
        return True

    def _history(self, history: list[HistoryItem]) -> tuple[torch.Tensor, np.ndarray]:
        vecs, doms = [], []
        for k, h in enumerate(history):
            if h.vector is not None:
                vecs.append(h.vector.reshape(-1))
            else:
                vecs.append(self.item_vector(h.domain, h.item_id, f"history[{k}]"))
            doms.append(self.bundle.domain_id(h.domain))
        dim = self.model.vector_dim
        return (torch.stack(vecs) if vecs else torch.zeros(0, dim)), np.array(doms, dtype=np.int64)

    @torch.inference_mode()
    def _users(self, hvecs: torch.Tensor, hdoms: np.ndarray, hnames: list[str], domain: str,
               drop: list[int | None]) -> torch.Tensor:
        """User vectors for the history with each `drop` position left out (None: the full history).
        hnames: the history's domain names (two domains the bundle never saw share one model id, not a name)."""
        tid = self.bundle.domain_id(domain)
        n = len(hdoms)
        code = {name: k for k, name in enumerate(sorted({domain, *hnames}))}
        hcodes = np.array([code[name] for name in hnames], dtype=np.int64)
        hists, hds, codes = [], [], []
        for d in drop:
            keep = np.array([i for i in range(n) if i != d], dtype=np.int64)
            hists.append(keep)
            hds.append(hdoms[keep])
            codes.append(hcodes[keep])
        return encode_users(self.model, hvecs, hists, hds, np.full(len(drop), tid),
                            prior_domains=(codes, np.full(len(drop), code[domain])))

    def candidates(self, history: list[HistoryItem], domain: str, n: int, exclude_seen: bool = True) -> Candidates:
        """Top-n of `domain` by the user vector of `history` (the first stage of a retrieve-then-rank graph)."""
        hvecs, _, user, scores = self._score(history, domain, exclude_seen)
        top = torch.topk(scores, min(n, int(torch.isfinite(scores).sum())))
        return Candidates(item_ids=[self.ids[domain][j] for j in top.indices.tolist()], scores=top.values.numpy(),
                          user=user.numpy(), history_vectors=hvecs.numpy(),
                          candidate_vectors=self.vecs[domain][top.indices].numpy())

    def _score(self, history: list[HistoryItem], domain: str, exclude_seen: bool,
               candidates: list[str] | None = None) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, torch.Tensor]:
        """History vectors (H, V) and domain ids (H,), the user vector (V,), and the scores (N,) of every item of
        `domain` (-inf where masked)."""
        self.check_domain(domain)
        hvecs, hdoms = self._history(history)
        user = self._users(hvecs, hdoms, [h.domain for h in history], domain, [None])[0]
        scores = self.vecs[domain] @ user  # (N,)
        if exclude_seen:
            seen = [self.pos[domain][h.item_id] for h in history
                    if h.domain == domain and h.item_id is not None and h.item_id in self.pos[domain]]
            if seen:
                scores[seen] = float("-inf")
        if candidates is not None:
            mask = torch.full_like(scores, float("-inf"))
            idx = [self.pos[domain][c] for c in candidates if c in self.pos[domain]]
            mask[idx] = 0
            scores = scores + mask
        return hvecs, hdoms, user, scores

    def recommend(self, history: list[HistoryItem], domain: str, k: int = 10, exclude_seen: bool = True,
                  explain: bool = False, candidates: list[str] | None = None) -> list[Recommendation]:
        hvecs, hdoms, user, scores = self._score(history, domain, exclude_seen, candidates)
        k = min(k, int(torch.isfinite(scores).sum()))
        top = torch.topk(scores, k)
        recs = [Recommendation(item_id=self.ids[domain][j], domain=domain, title=self.titles[domain][j],
                               score=float(s)) for s, j in zip(top.values.tolist(), top.indices.tolist())]
        if explain and len(history):
            # Occlusion: one forward for all leave-one-out histories at once.
            loo = self._users(hvecs, hdoms, [h.domain for h in history], domain, list(range(len(history))))  # (H, D)
            items = self.vecs[domain][top.indices]  # (k, D)
            drop = (user @ items.T).unsqueeze(0) - loo @ items.T  # (H, k): score lost without history item h
            for c, rec in enumerate(recs):
                w = drop[:, c]
                order = torch.argsort(w, descending=True)[:3].tolist()
                rec.reasons = [{"item_id": history[i].item_id or f"history[{i}]", "domain": history[i].domain,
                                "weight": round(float(w[i]), 4)} for i in order]
        return recs
