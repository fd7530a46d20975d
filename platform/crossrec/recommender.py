"""The in-process recommender over a bundle: `crossrec recommend` and the serving replica both call
`Recommender.recommend`, the one definition of retrieve -> rank -> explain.

Retrieval is the bundle's `crossrec.retrieval.Retriever` (its item matrix per domain, the user encoder, the priors:
the score `crossrec evaluate` ranks by) over the bundle's catalog plus the items added online. A history is a list
of known item ids (or precomputed item vectors for text-only entries); the answer is the top-k items of the target
domain: retrieval's order, or, with the bundle's ranker, retrieval's top-N re-ordered by it. On request each item
names the history entries that contributed most to the score it is ranked by (occlusion: how much that score drops
when the entry is left out), computed in the same pass from the vectors already in hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from crossrec.bundle import Bundle
from crossrec.retrieval import Retriever

if TYPE_CHECKING:  # the ranker is optional: only its type is needed here
    from crossrec.ranker import Ranker

__all__ = [
    "HistoryItem",
    "Recommendation",
    "Candidates",
    "Recommender",
    "UnknownItem",
    "UnknownDomain",
    "CatalogFull",
    "EXPLAIN_HISTORY",
    "N_REASONS",
]

EXPLAIN_HISTORY = 20  # most recent history entries weighed by `explain` (one tower pass per entry)
N_REASONS = 3  # reasons per item, strongest first


class UnknownItem(KeyError):
    def __str__(self) -> str:
        return self.args[0]


class UnknownDomain(KeyError):
    def __str__(self) -> str:
        return self.args[0]


class CatalogFull(ValueError):
    """More items added online than `max_online_items` allows; the message names the limit."""


@dataclass
class HistoryItem:
    domain: str
    item_id: str | None = None
    vector: torch.Tensor | None = None  # (D,) an item vector of the model (e.g. text embedded by the encoder)
    rating: float | None = None  # what the user rated it; read by a model trained with `behaviour.rating: feature`


@dataclass
class Recommendation:
    item_id: str
    domain: str
    title: str
    score: float  # what the list is ordered by: the ranker's score with a ranker, else retrieval's
    reasons: list[dict] | None = None  # [{"item_id", "domain", "weight"}], strongest first


@dataclass
class Candidates:
    """Retrieval's top-N with what a second stage (crossrec.ranker) rescores them from."""

    item_ids: list[str]
    scores: np.ndarray  # (N,) retrieval scores, descending
    user: np.ndarray  # (V,) the user vector that produced them
    history_vectors: np.ndarray  # (H, V) item vectors of the history entries
    candidate_vectors: np.ndarray  # (N, V)


class Recommender:
    """Retrieval over one bundle (+ items added online) and its optional ranker.

    ranker: the bundle's second stage (`crossrec.ranker.load_ranker`), or None for retrieval's order.
    max_online_items: how many items not in the bundle `upsert` may add (None: no limit).
    explain_history: the most recent history entries that `explain` weighs; older ones are never named.
    index: "auto" searches the ANN indexes the bundle holds (large domains), "exact" scans every item, "ann" also
    builds an index for every other domain (crossrec.retrieval.Retriever.from_bundle).
    """

    def __init__(
        self,
        bundle: Bundle,
        ranker: Ranker | None = None,
        *,
        max_online_items: int | None = None,
        explain_history: int = EXPLAIN_HISTORY,
        index: str = "auto",
    ):
        if max_online_items is not None and max_online_items < 0:
            raise ValueError(f"`max_online_items` must be >= 0, got {max_online_items}")
        if explain_history < 1:
            raise ValueError(f"`explain_history` must be >= 1, got {explain_history}")
        self.bundle = bundle
        self.model = bundle.model.eval()
        self.retriever = Retriever.from_bundle(bundle, index)
        self.ranker = ranker
        self.max_online_items = max_online_items
        self.explain_history = explain_history
        self.titles: dict[str, list[str]] = {d: bundle.items[d].column("title").to_pylist() for d in self.domains}
        self.online: set[tuple[str, str]] = set()  # (domain, item_id) of items added that the bundle lacks

    @classmethod
    def load(cls, bundle: Bundle, **kwargs) -> Recommender:
        """The bundle's recommender with its ranker when it has one (what `crossrec recommend` and Serve answer)."""
        from crossrec.ranker import load_ranker

        return cls(bundle, load_ranker(bundle), **kwargs)

    @property
    def domains(self) -> list[str]:
        return self.retriever.domains

    @property
    def ids(self) -> dict[str, list[str]]:
        """Domain -> item ids in row order (items added online last)."""
        return {d: self.retriever.ids(d) for d in self.domains}

    @property
    def pos(self) -> dict[str, dict[str, int]]:
        """Domain -> item_id -> row."""
        return {d: self.retriever.pos(d) for d in self.domains}

    @property
    def vecs(self) -> dict[str, torch.Tensor]:
        """Domain -> (n, V) item vectors."""
        return {d: self.retriever.rows(d) for d in self.domains}

    @property
    def n_candidates(self) -> int | None:
        """Retrieval's N handed to the ranker: the list length it was trained on (its features depend on it)."""
        return None if self.ranker is None else self.ranker.cfg.top_n

    def check_domain(self, domain: str, field: str = "domain") -> None:
        if domain not in self.retriever.catalog.domain_code:
            raise UnknownDomain(f"`{field}`: unknown domain {domain!r} (known: {', '.join(self.domains)})")

    def item_vector(self, domain: str, item_id: str, field: str = "history") -> torch.Tensor:
        self.check_domain(domain, field)
        k = self.retriever.pos(domain).get(item_id)
        if k is None:
            raise UnknownItem(f"`{field}`: unknown item_id {item_id!r} in domain {domain!r}")
        return self.retriever.rows(domain)[k]

    # -- items added online -------------------------------------------------------------------------------
    def room(self, keys: list[tuple[str, str]], field: str = "items") -> None:
        """Raises CatalogFull unless the new ones among (domain, item_id) `keys` fit under max_online_items."""
        if self.max_online_items is None:
            return
        new = {k for k in keys if k[0] not in self.domains or k[1] not in self.retriever.pos(k[0])}
        if len(self.online) + len(new) > self.max_online_items:
            raise CatalogFull(
                f"`{field}`: {len(new)} new items do not fit: {len(self.online)} of max_online_items="
                f"{self.max_online_items} items added online are in use"
            )

    def upsert(self, domain: str, item_id: str, title: str, vector: torch.Tensor) -> bool:
        """Adds or replaces an item (recommendable at once). Returns True if it was new."""
        self.check_domain(domain, "items.domain")
        k = self.retriever.pos(domain).get(item_id)
        if k is not None:
            self.retriever.add_item(domain, item_id, vector)
            self.titles[domain][k] = title
            return False
        self.room([(domain, item_id)])
        self.retriever.add_item(domain, item_id, vector)
        self.titles[domain].append(title)
        self.online.add((domain, item_id))
        return True

    # -- scoring ------------------------------------------------------------------------------------------
    def _history(self, history: list[HistoryItem]) -> tuple[torch.Tensor, np.ndarray]:
        """(H, V) the entries' vectors and (H,) their catalog global indices (-1: online item, text)."""
        vecs, glob = [], []
        for k, h in enumerate(history):
            if h.vector is not None:
                vecs.append(torch.as_tensor(h.vector, dtype=torch.float32).reshape(-1))
                glob.append(-1)
            else:
                if h.item_id is None:
                    raise UnknownItem(f"history[{k}]: an entry needs an item_id or a vector")
                vecs.append(self.item_vector(h.domain, h.item_id, f"history[{k}]"))
                glob.append(self.retriever.global_index(h.domain, h.item_id))
        dim = self.model.vector_dim
        return (torch.stack(vecs) if vecs else torch.zeros(0, dim)), np.array(glob, dtype=np.int64)

    def _users(
        self, hvecs: torch.Tensor, history: list[HistoryItem], domain: str, drop: list[int | None]
    ) -> torch.Tensor:
        """(B, V) user vectors for the history with each `drop` position left out (None: the full history)."""
        names = [h.domain for h in history]
        code = {name: k for k, name in enumerate(sorted({domain, *names}))}  # only equality matters
        hcodes = np.array([code[n] for n in names], dtype=np.int64)
        hids = np.array([self.retriever.model_domain(n) for n in names], dtype=np.int64)
        rates = np.array([np.nan if h.rating is None else h.rating for h in history], dtype=np.float32)
        n = len(history)
        keeps = [np.array([i for i in range(n) if i != d], dtype=np.int64) for d in drop]
        return self.retriever.encode(
            hvecs,
            keeps,
            [hcodes[k] for k in keeps],
            code[domain],
            ([hids[k] for k in keeps], self.retriever.model_domain(domain)),
            domain=domain,
            ratings=[rates[k] for k in keeps],
        )

    def _score(
        self, history: list[HistoryItem], domain: str, exclude_seen: bool, candidates: list[str] | None = None
    ) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor | None, np.ndarray | None]:
        """History vectors (H, V) and catalog indices (H,), the user vector (V,), the scores of the rows of `domain`
        that retrieval considers (-inf where masked) and the priors' term in them (None without priors), and those
        rows: None for every row (exact scan), else the given `candidates` or, in a domain with an ANN index, the
        index's candidates (crossrec.retrieval.Retriever.candidate_rows), each scored exactly."""
        self.check_domain(domain)
        hvecs, glob = self._history(history)
        user = self._users(hvecs, history, domain, [None])[0]
        pos = self.retriever.pos(domain)
        cand: np.ndarray | None
        if candidates is not None:
            cand = np.array(sorted({pos[c] for c in candidates if c in pos}), dtype=np.int64)
        else:
            cand = self.retriever.candidate_rows(domain, user, glob)
        if cand is None:
            scores = self.retriever.rows(domain) @ user  # (N,)
            bias = self.retriever.prior_terms(domain, [glob])
            if bias is not None:
                bias = bias[0]
                scores = scores + bias
        else:
            scores, bias = self.retriever.scores_at(domain, user, glob, cand)  # (C,)
        if exclude_seen:
            seen = [
                pos[h.item_id] for h in history if h.domain == domain and h.item_id is not None and h.item_id in pos
            ]
            if seen and cand is None:
                scores[seen] = float("-inf")
            elif seen and cand is not None:
                scores[torch.from_numpy(np.isin(cand, seen))] = float("-inf")
        return hvecs, glob, user, scores, bias, cand

    def candidates(self, history: list[HistoryItem], domain: str, n: int, exclude_seen: bool = True) -> Candidates:
        """Top-n of `domain` by the user vector of `history` (the first stage of a retrieve-then-rank graph)."""
        hvecs, _, user, scores, _, cand = self._score(history, domain, exclude_seen)
        top = torch.topk(scores, min(n, int(torch.isfinite(scores).sum())))
        rows = top.indices if cand is None else torch.from_numpy(cand)[top.indices]
        ids = self.retriever.ids(domain)
        return Candidates(
            item_ids=[ids[j] for j in rows.tolist()],
            scores=top.values.numpy(),
            user=user.numpy(),
            history_vectors=hvecs.numpy(),
            candidate_vectors=self.retriever.rows(domain)[rows].numpy(),
        )

    def recommend(
        self,
        history: list[HistoryItem],
        domain: str,
        k: int = 10,
        exclude_seen: bool = True,
        explain: bool = False,
        candidates: list[str] | None = None,
        n_candidates: int | None = None,
    ) -> list[Recommendation]:
        """Top-k of `domain` for `history` (oldest first), in one pass: retrieval over every item (or only over
        `candidates`; or, in a domain with an ANN index, over the index's candidates), then, with a ranker,
        retrieval's top `n_candidates` (default: the ranker's top_n) re-ordered by it; `explain` adds to each
        returned item the history entries whose removal lowers the score it is ranked by the most (among the last
        `explain_history` entries)."""
        hvecs, glob, user, scores, bias, cand = self._score(history, domain, exclude_seen, candidates)
        ids, rows_d = self.retriever.ids(domain), self.retriever.rows(domain)
        finite = int(torch.isfinite(scores).sum())
        n = min(k, finite) if self.ranker is None else min(max(n_candidates or self.ranker.cfg.top_n, k), finite)
        top = torch.topk(scores, n)
        top_rows = top.indices if cand is None else torch.from_numpy(cand)[top.indices]  # catalog rows
        if self.ranker is None:
            rows, final = top_rows, top.values  # (k,)
            req = None
        else:
            from crossrec.ranker import RankRequest

            req = RankRequest(
                domain=domain,
                candidates=[ids[j] for j in top_rows.tolist()],
                retrieval_scores=top.values.numpy(),
                user=user.numpy(),
                history=[(h.domain, h.item_id) for h in history],
                history_vectors=hvecs.numpy(),
                candidate_vectors=rows_d[top_rows].numpy(),  # (N, V)
                candidate_bias=None if bias is None else bias[top.indices].numpy(),
            )
            ranked = torch.from_numpy(self.ranker.score(req))  # (N,)
            order = torch.from_numpy(np.argsort(-ranked.numpy(), kind="stable")[:k])
            rows, final = top_rows[order], ranked[order]
        recs = [
            Recommendation(item_id=ids[j], domain=domain, title=self.titles[domain][j], score=float(s))
            for s, j in zip(final.tolist(), rows.tolist())
        ]
        if explain and len(history) and len(recs):
            drop = self._explain(
                hvecs, glob, history, domain, rows, final, None if req is None else (req, order, top_rows)
            )  # (E, k)
            first = len(history) - drop.shape[0]
            for c, rec in enumerate(recs):
                w = drop[:, c]
                best = torch.argsort(w, descending=True, stable=True)[:N_REASONS].tolist()
                rec.reasons = [
                    {
                        "item_id": history[first + i].item_id or f"history[{first + i}]",
                        "domain": history[first + i].domain,
                        "weight": round(float(w[i]), 4),
                    }
                    for i in best
                ]
        return recs

    def _explain(
        self,
        hvecs: torch.Tensor,
        glob: np.ndarray,
        history: list[HistoryItem],
        domain: str,
        rows: torch.Tensor,
        final: torch.Tensor,
        ranked,
    ) -> torch.Tensor:
        """(E, k) score lost by each returned item (catalog `rows`) when each of the last E history entries is left
        out: the ranker's score with a ranker (the order the user sees), else retrieval's."""
        first = max(0, len(history) - self.explain_history)
        drop = list(range(first, len(history)))
        loo = self._users(hvecs, history, domain, list(drop))
        variants = [np.delete(glob, i) for i in drop]
        # The priors with each entry left out, at the rows that need them: popularity's does not depend on the
        # history (one row, broadcast), the transition prior's does.
        if ranked is None:
            bias = self.retriever.prior_terms_at(domain, variants, rows.numpy())  # (E | 1, k) or None
            scores = loo @ self.retriever.rows(domain)[rows].T
            return final.unsqueeze(0) - (scores + (0.0 if bias is None else bias))
        req, order, cand_rows = ranked  # cand_rows: the catalog rows of req.candidates
        assert self.ranker is not None  # `ranked` comes from the ranker
        bias = self.retriever.prior_terms_at(domain, variants, cand_rows.numpy())  # (E | 1, N) or None
        without = self.ranker.score_without(
            req,
            loo.numpy(),
            drop,
            cols=order.numpy(),
            bias=None if bias is None else bias.expand(len(drop), -1).numpy(),
        )  # (E, k)
        return final.unsqueeze(0) - torch.from_numpy(without)
