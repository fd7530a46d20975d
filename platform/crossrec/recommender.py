"""The in-process recommender over a bundle: `crossrec recommend` and the serving replica both call
`Recommender.recommend`, the one definition of retrieve -> rank -> explain.

Per domain it holds the catalog's item vectors (a dense index: exact inner-product top-k) plus the items added
online, takes a history of known item ids (or precomputed item vectors for text-only entries), and returns the
top-k items of the target domain: retrieval's order, or, with the bundle's ranker, retrieval's top-N re-ordered
by it. Retrieval's score is the inner product plus the bundle's popularity prior (gamma * p, crossrec.pop_prior)
and transition prior (crossrec.co_prior), as `crossrec evaluate` scores it; an item added online has the p of zero
interactions and no transitions. On request each item names
the history entries that contributed most to the score it is ranked by (occlusion: how much that score drops when
the entry is left out), computed in the same pass from the vectors already in hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from crossrec.bundle import Bundle
from crossrec.training import _prior_query, history_arrays

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
    """Index of one bundle (+ items added online) and its optional ranker.

    ranker: the bundle's second stage (`crossrec.ranker.load_ranker`), or None for retrieval's order.
    max_online_items: how many items not in the bundle `upsert` may add (None: no limit).
    explain_history: the most recent history entries that `explain` weighs; older ones are never named.
    """

    def __init__(
        self,
        bundle: Bundle,
        ranker: Ranker | None = None,
        *,
        max_online_items: int | None = None,
        explain_history: int = EXPLAIN_HISTORY,
    ):
        if max_online_items is not None and max_online_items < 0:
            raise ValueError(f"`max_online_items` must be >= 0, got {max_online_items}")
        if explain_history < 1:
            raise ValueError(f"`explain_history` must be >= 1, got {explain_history}")
        self.bundle = bundle
        self.model = bundle.model.eval()
        self.ranker = ranker
        self.max_online_items = max_online_items
        self.explain_history = explain_history
        self.ids: dict[str, list[str]] = {}
        self.titles: dict[str, list[str]] = {}
        # vecs[d] is a view of the first rows of _block[d], whose spare rows take items added online: an insert
        # writes one row (amortised O(1)) instead of copying the matrix.
        self.vecs: dict[str, torch.Tensor] = {}
        self._block: dict[str, torch.Tensor] = {}
        self.pos: dict[str, dict[str, int]] = {}
        self.online: set[tuple[str, str]] = set()  # (domain, item_id) of items added that the bundle lacks
        # Popularity prior: gamma per domain and p per item (pop[d] a view of _pop_block[d], grown with _block[d]).
        self.pop_weight = {d: w for d, w in bundle.pop_weights.items() if w}
        self.pop: dict[str, torch.Tensor] = {}
        self._pop_block: dict[str, torch.Tensor] = {}
        for d in bundle.items:
            ids, vecs = bundle.item_matrix(d)
            self.ids[d], self.vecs[d], self._block[d] = ids, vecs, vecs
            self.titles[d] = bundle.items[d].column("title").to_pylist()
            self.pos[d] = {iid: k for k, iid in enumerate(ids)}
            pop = bundle.item_pop(d) if d in self.pop_weight else None
            if pop is not None:
                self.pop[d] = self._pop_block[d] = torch.from_numpy(pop.copy())
        # Transition prior (crossrec.co_prior): (beta, decay) per domain and the pairs over the bundle's catalog,
        # global index = the domain's offset (domains in sorted order) + its row; items added online have none.
        self.co_weight = bundle.co_weights
        self.co = None
        self._co_off: dict[str, int] = {}
        self._co_n: dict[str, int] = {}
        pairs = bundle.co_pairs() if self.co_weight else None
        if pairs is not None:
            from crossrec.transitions import Transitions

            index: dict[tuple[str, str], int] = {}
            for d in sorted(self.ids):
                self._co_off[d], self._co_n[d] = len(index), len(self.ids[d])
                index.update({(d, iid): len(index) + k for k, iid in enumerate(self.ids[d])})
            self.co = Transitions.from_table(pairs, index, len(index))

    @classmethod
    def load(cls, bundle: Bundle, **kwargs) -> Recommender:
        """The bundle's recommender with its ranker when it has one (what `crossrec recommend` and Serve answer)."""
        from crossrec.ranker import load_ranker

        return cls(bundle, load_ranker(bundle), **kwargs)

    @property
    def domains(self) -> list[str]:
        return sorted(self.ids)

    @property
    def n_candidates(self) -> int | None:
        """Retrieval's N handed to the ranker: the list length it was trained on (its features depend on it)."""
        return None if self.ranker is None else self.ranker.cfg.top_n

    def check_domain(self, domain: str, field: str = "domain") -> None:
        if domain not in self.ids:
            raise UnknownDomain(f"`{field}`: unknown domain {domain!r} (known: {', '.join(self.domains)})")

    def item_vector(self, domain: str, item_id: str, field: str = "history") -> torch.Tensor:
        self.check_domain(domain, field)
        k = self.pos[domain].get(item_id)
        if k is None:
            raise UnknownItem(f"`{field}`: unknown item_id {item_id!r} in domain {domain!r}")
        return self.vecs[domain][k]

    # -- items added online -------------------------------------------------------------------------------
    def room(self, keys: list[tuple[str, str]], field: str = "items") -> None:
        """Raises CatalogFull unless the new ones among (domain, item_id) `keys` fit under max_online_items."""
        if self.max_online_items is None:
            return
        new = {k for k in keys if k[1] not in self.pos.get(k[0], {})}
        if len(self.online) + len(new) > self.max_online_items:
            raise CatalogFull(
                f"`{field}`: {len(new)} new items do not fit: {len(self.online)} of max_online_items="
                f"{self.max_online_items} items added online are in use"
            )

    def upsert(self, domain: str, item_id: str, title: str, vector: torch.Tensor) -> bool:
        """Adds or replaces an item (recommendable at once). Returns True if it was new."""
        self.check_domain(domain, "items.domain")
        k = self.pos[domain].get(item_id)
        if k is not None:  # an update replaces the row in place
            self.vecs[domain][k] = vector.reshape(-1)
            self.titles[domain][k] = title
            return False
        self.room([(domain, item_id)])
        n, block = len(self.ids[domain]), self._block[domain]
        if n == len(block):  # grow geometrically: the copy is paid once per n/4 inserts
            grown = torch.empty(n + max(256, n // 4), block.shape[1], dtype=block.dtype)
            grown[:n] = block[:n]
            self._block[domain] = block = grown
            if domain in self._pop_block:
                pop = torch.empty(len(grown))
                pop[:n] = self._pop_block[domain][:n]
                self._pop_block[domain] = pop
        block[n] = vector.reshape(-1)
        self.vecs[domain] = block[: n + 1]
        if domain in self._pop_block:  # new: no interactions yet, as the catalog's never-seen items had
            self._pop_block[domain][n] = self.bundle.pop_cold(domain)
            self.pop[domain] = self._pop_block[domain][: n + 1]
        self.pos[domain][item_id] = n
        self.ids[domain].append(item_id)
        self.titles[domain].append(title)
        self.online.add((domain, item_id))
        return True

    # -- scoring ------------------------------------------------------------------------------------------
    def _history(self, history: list[HistoryItem]) -> tuple[torch.Tensor, np.ndarray]:
        vecs, doms = [], []
        for k, h in enumerate(history):
            if h.vector is not None:
                vecs.append(torch.as_tensor(h.vector, dtype=torch.float32).reshape(-1))
            else:
                if h.item_id is None:
                    raise UnknownItem(f"history[{k}]: an entry needs an item_id or a vector")
                vecs.append(self.item_vector(h.domain, h.item_id, f"history[{k}]"))
            doms.append(self.bundle.domain_id(h.domain))
        dim = self.model.vector_dim
        return (torch.stack(vecs) if vecs else torch.zeros(0, dim)), np.array(doms, dtype=np.int64)

    @torch.inference_mode()
    def _users(
        self, hvecs: torch.Tensor, hdoms: np.ndarray, hnames: list[str], domain: str, drop: list[int | None]
    ) -> torch.Tensor:
        """(B, V) user vectors for the history with each `drop` position left out (None: the full history).
        hnames: the history's domain names (two domains the bundle never saw share one model id, not a name).

        crossrec.training.encode_users, with the tower's input trimmed to the longest real history of the batch
        instead of max_len: the tower reads left-padded histories whose padded slots only ever see themselves,
        so the last position's output is the same, at a fraction of the cost for the usual short history."""
        model = self.model
        tid = self.bundle.domain_id(domain)
        n = len(hdoms)
        code = {name: k for k, name in enumerate(sorted({domain, *hnames}))}
        hcodes = np.array([code[name] for name in hnames], dtype=np.int64)
        keeps = [np.array([i for i in range(n) if i != d], dtype=np.int64) for d in drop]
        length = min(model.cfg.max_len, max(1, max(len(k) for k in keeps)))
        items, doms, nxt, valid = history_arrays(keeps, [hdoms[k] for k in keeps], np.full(len(drop), tid), length)
        if len(hvecs) == 0:  # no history: one zero row for the padded slot to read
            hvecs = torch.zeros(1, model.vector_dim)
        d = model.cfg.dim
        hv = hvecs[torch.from_numpy(items), :d] * torch.from_numpy(valid).unsqueeze(-1)  # (B, L, dim)
        u = model.learned_user_vectors(hv, torch.from_numpy(doms), torch.from_numpy(nxt), torch.from_numpy(valid))[
            :, -1
        ]
        if model.text_prior:  # over the whole history, as encode_users does
            u = torch.cat(
                [
                    u,
                    model.log_beta.exp()
                    * _prior_query(
                        model, hvecs[:, d:], keeps, [hcodes[k] for k in keeps], np.full(len(drop), code[domain])
                    ),
                ],
                dim=-1,
            )
        return u

    def _bias(self, domain: str, history: list[HistoryItem], drop: list[int] | None = None) -> torch.Tensor | None:
        """(N,) the popularity prior's term gamma * p of the domain's items plus the transition prior's term of
        `history`, or None without either; with `drop`, (B, N): the history with each drop position left out."""
        pop = self.pop.get(domain)
        out = None if pop is None else self.pop_weight[domain] * pop
        beta, decay = self.co_weight.get(domain, (0.0, 1.0))
        if self.co is None or not beta:
            return out if drop is None or out is None else out.expand(len(drop), -1)
        hidx = np.array(
            [
                self._co_off[h.domain] + self.pos[h.domain][h.item_id]
                if h.domain in self._co_off
                and h.item_id is not None
                and self.pos[h.domain].get(h.item_id, self._co_n[h.domain]) < self._co_n[h.domain]
                else -1
                for h in history
            ],
            dtype=np.int64,
        )
        keeps = [hidx] if drop is None else [np.delete(hidx, i) for i in drop]
        n = self._co_n[domain]
        term = torch.zeros(len(keeps), len(self.ids[domain]))  # items added online (past n) have no transitions
        term[:, :n] = torch.from_numpy(self.co.term(keeps, self._co_off[domain], n, decay).astype(np.float32))
        co = beta * term
        if out is not None:
            co = co + out
        return co[0] if drop is None else co

    def _score(
        self, history: list[HistoryItem], domain: str, exclude_seen: bool, candidates: list[str] | None = None
    ) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """History vectors (H, V) and domain ids (H,), the user vector (V,), the scores (N,) of every item of
        `domain` (-inf where masked), and the priors' term (N,) in them (None without priors)."""
        self.check_domain(domain)
        hvecs, hdoms = self._history(history)
        user = self._users(hvecs, hdoms, [h.domain for h in history], domain, [None])[0]
        scores = self.vecs[domain] @ user  # (N,)
        bias = self._bias(domain, history)
        if bias is not None:
            scores = scores + bias
        if exclude_seen:
            seen = [
                self.pos[domain][h.item_id]
                for h in history
                if h.domain == domain and h.item_id is not None and h.item_id in self.pos[domain]
            ]
            if seen:
                scores[seen] = float("-inf")
        if candidates is not None:
            mask = torch.full_like(scores, float("-inf"))
            idx = [self.pos[domain][c] for c in candidates if c in self.pos[domain]]
            mask[idx] = 0
            scores = scores + mask
        return hvecs, hdoms, user, scores, bias

    def candidates(self, history: list[HistoryItem], domain: str, n: int, exclude_seen: bool = True) -> Candidates:
        """Top-n of `domain` by the user vector of `history` (the first stage of a retrieve-then-rank graph)."""
        hvecs, _, user, scores, _ = self._score(history, domain, exclude_seen)
        top = torch.topk(scores, min(n, int(torch.isfinite(scores).sum())))
        return Candidates(
            item_ids=[self.ids[domain][j] for j in top.indices.tolist()],
            scores=top.values.numpy(),
            user=user.numpy(),
            history_vectors=hvecs.numpy(),
            candidate_vectors=self.vecs[domain][top.indices].numpy(),
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
        `candidates`), then, with a ranker, retrieval's top `n_candidates` (default: the ranker's top_n)
        re-ordered by it; `explain` adds to each returned item the history entries whose removal lowers the
        score it is ranked by the most (among the last `explain_history` entries)."""
        hvecs, hdoms, user, scores, bias = self._score(history, domain, exclude_seen, candidates)
        finite = int(torch.isfinite(scores).sum())
        if self.ranker is None:
            top = torch.topk(scores, min(k, finite))
            rows, final = top.indices, top.values  # (k,)
            req = None
        else:
            from crossrec.ranker import RankRequest

            top = torch.topk(scores, min(max(n_candidates or self.ranker.cfg.top_n, k), finite))
            cand = self.vecs[domain][top.indices]  # (N, V)
            req = RankRequest(
                domain=domain,
                candidates=[self.ids[domain][j] for j in top.indices.tolist()],
                retrieval_scores=top.values.numpy(),
                user=user.numpy(),
                history=[(h.domain, h.item_id) for h in history],
                history_vectors=hvecs.numpy(),
                candidate_vectors=cand.numpy(),
                candidate_bias=None if bias is None else bias[top.indices].numpy(),
            )
            ranked = torch.from_numpy(self.ranker.score(req))  # (N,)
            order = torch.from_numpy(np.argsort(-ranked.numpy(), kind="stable")[:k])
            rows, final = top.indices[order], ranked[order]
        recs = [
            Recommendation(item_id=self.ids[domain][j], domain=domain, title=self.titles[domain][j], score=float(s))
            for s, j in zip(final.tolist(), rows.tolist())
        ]
        if explain and len(history) and len(recs):
            drop = self._explain(
                hvecs, hdoms, history, domain, user, rows, final, None if req is None else (req, order, top.indices)
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
        hdoms: np.ndarray,
        history: list[HistoryItem],
        domain: str,
        user: torch.Tensor,
        rows: torch.Tensor,
        final: torch.Tensor,
        ranked,
    ) -> torch.Tensor:
        """(E, k) score lost by each returned item when each of the last E history entries is left out: the
        ranker's score with a ranker (the order the user sees), else retrieval's."""
        first = max(0, len(history) - self.explain_history)
        drop = list(range(first, len(history)))
        loo = self._users(hvecs, hdoms, [h.domain for h in history], domain, list(drop))
        # The priors with each entry left out: popularity's does not depend on the history (it cancels out), the
        # transition prior's does.
        bias = self._bias(domain, history, drop)  # (E, N) or None
        if ranked is None:
            return final.unsqueeze(0) - (loo @ self.vecs[domain][rows].T + (0.0 if bias is None else bias[:, rows]))
        req, order, cand_rows = ranked  # cand_rows: the catalog rows of req.candidates
        assert self.ranker is not None  # `ranked` comes from the ranker
        without = self.ranker.score_without(
            req, loo.numpy(), drop, cols=order.numpy(), bias=None if bias is None else bias[:, cand_rows].numpy()
        )  # (E, k)
        return final.unsqueeze(0) - torch.from_numpy(without)
