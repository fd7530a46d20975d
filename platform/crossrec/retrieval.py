"""Retrieval: the one definition of the score that ranks a domain's items for a history,

    score(h, i) = <user(h), item_i> + sum over the priors p of weight_p[d] * term_p(d, h)[i]

`Retriever` owns the item matrix of a catalog (per domain, grown by items added online), the one user encoder
(the model's user tower over the last `max_len` items plus the text prior over the whole history, `text_query`)
and the ordered priors (crossrec.priors). Evaluation, validation during training, zero-shot calibration, the
ranker's candidate lists, `crossrec recommend` and the Serve replica all call it, so they cannot drift.

A catalog gives every item a global index: domains in sorted order, each a contiguous block `offset[d] :
offset[d] + n_items[d]` (a `Splits`, or `BundleCatalog` for a bundle's own items). Histories are arrays of global
indices, oldest first; -1 marks an entry the catalog does not know (an item added online, a text): priors skip it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from crossrec.calibration import Calibration
from crossrec.catalog import BundleCatalog, Catalog
from crossrec.domains import domain_id, domain_ids
from crossrec.model import CrossRecModel, rating_buckets
from crossrec.splits import TargetBatch

if TYPE_CHECKING:
    from crossrec.bundle import Bundle
    from crossrec.priors.base import Prior

__all__ = ["Catalog", "BundleCatalog", "Retriever", "AnnIndex", "Calibration", "text_query", "history_arrays"]

ANN_CANDIDATES = 200  # rows an ANN index proposes per request, rescored exactly
PRIOR_CANDIDATES = 100  # rows each weighted prior adds to them (its largest terms for the history)


class AnnIndex(Protocol):
    """An approximate nearest-neighbour index over a domain's catalog rows (crossrec.index)."""

    def search(self, query: np.ndarray, k: int) -> np.ndarray:
        """(<= k,) rows with the largest inner product with `query` (V,)."""
        ...


def history_arrays(
    histories: list[np.ndarray],
    hist_domains: list[np.ndarray],
    target_domain: np.ndarray,
    max_len: int,
    ratings: Sequence[np.ndarray | None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded (items, domains, next_domains, valid, ratings) for inference: the last position asks for the
    target domain; ratings are `rating_buckets` rows (unknown where a history, or the whole batch, has none).
    Histories longer than max_len keep their most recent items."""
    b = len(histories)
    items = np.zeros((b, max_len), np.int64)
    doms = np.zeros((b, max_len), np.int64)
    nxt = np.zeros((b, max_len), np.int64)
    valid = np.zeros((b, max_len), bool)
    rates = rating_buckets(None, (b, max_len))
    for r, (h, hd) in enumerate(zip(histories, hist_domains)):
        h, hd = h[-max_len:], hd[-max_len:]
        k = len(h)
        if k == 0:
            # No history: one padded slot still carries the target domain to the last position.
            nxt[r, -1] = target_domain[r]
            continue
        items[r, max_len - k :] = h
        doms[r, max_len - k :] = hd
        nxt[r, max_len - k : -1] = hd[1:]
        nxt[r, -1] = target_domain[r]
        valid[r, max_len - k :] = True
        hr = None if ratings is None else ratings[r]
        if hr is not None:
            rates[r, max_len - k :] = rating_buckets(np.asarray(hr)[-max_len:])
    return items, doms, nxt, valid, rates


def text_query(
    text: torch.Tensor,
    histories: Sequence[np.ndarray],
    hist_domains: Sequence[np.ndarray],
    target_domains: np.ndarray,
    decay: float,
    cross: float,
) -> torch.Tensor:
    """(B, T) unit recency-weighted means of the histories' text vectors (rows of `text`): the item k steps back
    from the most recent one weighs decay ** k, times `cross` when its domain code differs from the target's. Zero
    rows for empty histories. The text prior of the model and the textknn baseline; the model's training forward
    computes the same at every position of its window (CrossRecModel.user_vectors)."""
    lengths = torch.tensor([len(h) for h in histories], dtype=torch.long)
    q = torch.zeros(len(histories), text.shape[1])
    if int(lengths.sum()) == 0:
        return q
    items = torch.from_numpy(np.concatenate(histories).astype(np.int64))  # (H,) every history, chained
    row = torch.repeat_interleave(torch.arange(len(histories)), lengths)  # (H,)
    age = torch.cumsum(lengths, 0)[row] - 1 - torch.arange(len(items))  # 0 = the most recent item
    w = torch.pow(torch.tensor(decay, dtype=torch.float64), age.double()).float()
    if cross != 1.0:
        other = (
            torch.from_numpy(np.concatenate(hist_domains).astype(np.int64))
            != torch.from_numpy(np.asarray(target_domains, dtype=np.int64))[row]
        )
        w = torch.where(other, w * cross, w)
    q.index_add_(0, row, w[:, None] * text[items])
    # A weighted sum points where the weighted mean does: normalising it gives the mean's cosine directly.
    return F.normalize(q, dim=-1)


class Retriever:
    """The model, a catalog's item vectors and the priors: retrieval's scores for histories.

    vectors: (N, V) the model's item vectors in the catalog's global order. model_domains: the domains the model
    has ids for (any other domain is its "unknown" id). learned_weight scales the learned part of the user vector
    against the text prior (1: the model as trained); `calibration` overrides it, and the text prior's decay and
    cross-domain weight, for the target domains it names (zero-shot calibration, adapted domains)."""

    name = "crossrec"

    def __init__(
        self,
        model: CrossRecModel,
        catalog: Catalog,
        vectors: torch.Tensor,
        model_domains: Sequence[str],
        priors: Sequence[Prior] = (),
        learned_weight: float = 1.0,
        batch_size: int = 512,
        calibration: Mapping[str, Calibration] | None = None,
    ):
        if vectors.shape[0] != len(catalog.item_ids):
            raise ValueError(f"`vectors`: {vectors.shape[0]} rows for a catalog of {len(catalog.item_ids)} items")
        self.model = model.eval()
        self.catalog = catalog
        self.vecs = vectors  # (N, V) the catalog's rows (items added online live in `_block` only)
        self.model_domains = list(model_domains)
        self.domain_map = domain_ids(self.model_domains, catalog.domains)  # catalog code -> model id
        self.priors = list(priors)
        self.learned_weight = learned_weight
        self.calibration: dict[str, Calibration] = dict(calibration or {})
        self.batch_size = batch_size
        self.params: dict = {}  # chosen values to report (`crossrec evaluate` prints them)
        # Per domain, the first rows of _block[d] are the domain's items: a view of `vecs` until an item added
        # online grows it (an insert then writes one row, amortised O(1), instead of copying the matrix).
        self._block = {d: vectors[self._span(d)] for d in catalog.domains}
        self._rows = {d: catalog.n_items[d] for d in catalog.domains}
        self._ids: dict[str, list[str]] = {}
        self._pos: dict[str, dict[str, int]] = {}
        # Domains with an approximate nearest-neighbour index over their catalog rows (crossrec.index): a request
        # there scores `candidate_rows` exactly instead of every row. Evaluation scores every row.
        self.index: dict[str, AnnIndex] = {}
        self.ann_candidates = ANN_CANDIDATES
        self.prior_candidates = PRIOR_CANDIDATES

    @classmethod
    def from_bundle(cls, bundle: Bundle, index: str = "auto") -> Retriever:
        """The bundle's retrieval over its own catalog, with the priors it was trained with. index: "auto" uses the
        ANN indexes the bundle holds (memory-mapped), "exact" none, "ann" also builds one for every other domain."""
        from crossrec.priors import load_priors

        matrices = {d: bundle.item_matrix(d) for d in sorted(bundle.items)}
        catalog = BundleCatalog.of({d: ids for d, (ids, _) in matrices.items()})
        vectors = (
            torch.cat([m for _, m in matrices.values()])
            if matrices
            else torch.zeros(0, bundle.model.vector_dim, dtype=torch.float32)
        )
        out = cls(
            bundle.model,
            catalog,
            vectors,
            bundle.domains,
            load_priors(bundle, catalog),
            learned_weight=bundle.learned_weight,
            calibration=bundle.calibration,
        )
        out.load_indexes(bundle, index)
        return out

    def load_indexes(self, bundle: Bundle, index: str = "auto") -> None:
        """Installs the bundle's ANN indexes of this catalog's domains (index "auto" or "ann"; "ann" builds the
        missing ones in memory). The bundle's catalog must be this retriever's (an index's rows are its order)."""
        from crossrec.index import INDEX_KINDS, IvfIndex

        if index not in INDEX_KINDS:
            raise ValueError(f"`index` must be one of {', '.join(INDEX_KINDS)}, got {index!r}")
        cfg = bundle.config.retrieval
        self.ann_candidates = cfg.candidates
        if index == "exact":
            return
        specs = (bundle.meta.get("retrieval") or {}).get("index") or {}
        for d in self.domains:
            spec = specs.get(d)
            if spec is not None and spec["n"] == self.catalog.n_items[d]:
                self.index[d] = IvfIndex.load(bundle.path / spec["file"], spec["nprobe"])
        if index == "ann":
            self.build_indexes(cfg.nprobe, [d for d in self.domains if d not in self.index])

    def build_indexes(
        self, nprobe: int, domains: Sequence[str] | None = None, nlist: int | None = None, tune_on: int = 0
    ) -> dict[str, float]:
        """Builds an ANN index (crossrec.index) over the catalog rows of each of `domains` (default: all). With
        `tune_on` > 0 (a Splits catalog), nprobe is the smallest that holds 95% of the exact top-10 of up to that
        many validation users of the domain (crossrec.index.tune_nprobe), else `nprobe`. Returns the measured
        recall per tuned domain."""
        from crossrec.index import IvfIndex, tune_nprobe

        recall = {}
        for d in self.domains if domains is None else domains:
            if not self.catalog.n_items[d]:
                continue
            rows = self.vecs[self._span(d)].numpy()
            index = self.index[d] = IvfIndex.build(rows, nprobe, nlist)
            targets = self.catalog.targets("valid", d)[:tune_on] if tune_on and hasattr(self.catalog, "targets") else []
            if len(targets):
                b = self.catalog.batch(targets, d)  # type: ignore[attr-defined]
                users = self.user_vectors(b.histories, d, b.history_ratings).numpy()
                _, recall[d] = tune_nprobe(index, rows, users, self.ann_candidates)
        return recall

    # -- the catalog, per domain ------------------------------------------------------------------------------
    def _span(self, domain: str) -> slice:
        off = self.catalog.offset[domain]
        return slice(off, off + self.catalog.n_items[domain])

    @property
    def domains(self) -> list[str]:
        return list(self.catalog.domains)

    def rows(self, domain: str) -> torch.Tensor:
        """(n, V) the domain's item vectors, items added online last."""
        return self._block[domain][: self._rows[domain]]

    def ids(self, domain: str) -> list[str]:
        """The domain's item ids in row order (built on first use: evaluation never needs them)."""
        if domain not in self._ids:
            self._ids[domain] = [str(i) for i in self.catalog.item_ids[self._span(domain)]]
        return self._ids[domain]

    def pos(self, domain: str) -> dict[str, int]:
        """item_id -> row of the domain."""
        if domain not in self._pos:
            self._pos[domain] = {iid: k for k, iid in enumerate(self.ids(domain))}
        return self._pos[domain]

    def model_domain(self, name: str) -> int:
        return domain_id(self.model_domains, name)

    def global_index(self, domain: str, item_id: str | None) -> int:
        """The catalog's global index of an item, or -1 (an item added online, a text, an unknown domain)."""
        if item_id is None or domain not in self.catalog.domain_code:
            return -1
        k = self.pos(domain).get(item_id, -1)
        return self.catalog.offset[domain] + k if 0 <= k < self.catalog.n_items[domain] else -1

    def add_item(self, domain: str, item_id: str, vector: torch.Tensor) -> bool:
        """Adds (or replaces the vector of) an item of `domain`; it is ranked at once. True if it was new. An added
        item has no history in the priors: each gives it the term of a new item (`Prior.new_item_term`)."""
        pos = self.pos(domain)
        k = pos.get(item_id)
        if k is not None:  # an update replaces the row in place
            self._block[domain][k] = vector.reshape(-1)
            return False
        n, block = self._rows[domain], self._block[domain]
        if n == len(block):  # grow geometrically: the copy is paid once per n/4 inserts
            grown = torch.empty(n + max(256, n // 4), block.shape[1], dtype=block.dtype)
            grown[:n] = block[:n]
            self._block[domain] = block = grown
        block[n] = vector.reshape(-1)
        self._rows[domain] = n + 1
        pos[item_id] = n
        self.ids(domain).append(item_id)
        return True

    # -- the user encoder ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(
        self,
        source: torch.Tensor,
        histories: Sequence[np.ndarray],
        hist_codes: Sequence[np.ndarray],
        target_code: int,
        model_ids: tuple[Sequence[np.ndarray], int],
        domain: str | None = None,
        ratings: Sequence[np.ndarray | None] | None = None,
    ) -> torch.Tensor:
        """(B, V) user vectors for histories given as rows of `source` (M, V), their domains as codes (only equality
        matters: the text prior's same-domain weight) and as the model's ids (`model_ids`: per history, then the
        target's). `domain`: the target domain's name, for its `calibration`. `ratings`: optionally each history's
        ratings (float per entry, NaN or a None history: unrated; read by a model trained with `behaviour.rating:
        feature`). The tower reads the last max_len items, left-padded to the longest of the batch (padded slots only
        ever see themselves, so the last position is the same as at max_len); the text prior reads the whole
        history."""
        model = self.model
        d = model.cfg.dim
        learned_weight, decay, cross = self.setting(domain)
        hist_ids, target_id = model_ids
        if len(source) == 0:  # no history anywhere: one zero row for the padded slots to read
            source = torch.zeros(1, source.shape[1])
        out = []
        for s in range(0, len(histories), self.batch_size):
            hs = histories[s : s + self.batch_size]
            length = min(model.cfg.max_len, max(1, max(len(h) for h in hs)))
            items, doms, nxt, valid, rates = history_arrays(
                list(hs),
                list(hist_ids[s : s + self.batch_size]),
                np.full(len(hs), target_id),
                length,
                None if ratings is None else ratings[s : s + self.batch_size],
            )
            hv = source[torch.from_numpy(items), :d] * torch.from_numpy(valid).unsqueeze(-1)  # (B, L, dim)
            u = model.learned_user_vectors(
                hv,
                torch.from_numpy(doms),
                torch.from_numpy(nxt),
                torch.from_numpy(valid),
                torch.from_numpy(rates),
            )
            u = u[:, -1]
            if learned_weight != 1.0:
                u = u * learned_weight
            if model.text_prior:
                if decay is None or cross is None:
                    raise ValueError("`text_prior_decay` / `text_prior_cross` are unset: training chooses them first")
                q = text_query(
                    source[:, d:], hs, hist_codes[s : s + self.batch_size], np.full(len(hs), target_code), decay, cross
                )
                u = torch.cat([u, model.log_beta.exp() * q], dim=-1)
            out.append(u)
        return torch.cat(out) if out else torch.zeros(0, source.shape[1])

    def setting(self, domain: str | None) -> tuple[float, float | None, float | None]:
        """(learned weight, text prior decay, text prior cross-domain weight) for targets in `domain`: its
        calibration, else the model as trained."""
        c = self.calibration.get(domain) if domain is not None else None
        if c is not None:
            return c.learned_weight, c.text_prior_decay, c.text_prior_cross
        return self.learned_weight, self.model.cfg.text_prior_decay, self.model.cfg.text_prior_cross

    def user_vectors(
        self, histories: Sequence[np.ndarray], domain: str, ratings: Sequence[np.ndarray] | None = None
    ) -> torch.Tensor:
        """(B, V) user vectors of catalog histories (global indices) for targets in `domain`; ratings: per history,
        its ratings (a TargetBatch's `history_ratings`; None: unrated)."""
        c = self.catalog
        code = c.domain_code[c.check_domain(domain)]
        codes = [c.item_domain[h] for h in histories]
        return self.encode(
            self.vecs,
            histories,
            codes,
            code,
            ([self.domain_map[x] for x in codes], int(self.domain_map[code])),
            domain=domain,
            ratings=ratings,
        )

    # -- scores -------------------------------------------------------------------------------------------------
    def prior_terms(self, domain: str, histories: Sequence[np.ndarray], upto: int | None = None) -> torch.Tensor | None:
        """(B, n) or (1, n) the sum of weight * term of the priors (the first `upto` of them) over the domain's rows
        (items added online get each prior's new-item term), or None when no prior has a weight here."""
        total = None
        n_base, n = self.catalog.n_items.get(domain, 0), self._rows[domain]
        for p in self.priors[:upto]:
            w = p.weight.get(domain, 0.0)
            if not w:
                continue
            term = torch.as_tensor(p.term(domain, histories), dtype=torch.float32)  # (B | 1, n_base)
            if n > n_base:
                term = torch.cat([term, torch.full((len(term), n - n_base), p.new_item_term(domain))], dim=1)
            total = w * term if total is None else total + w * term
        return total

    def prior_terms_at(self, domain: str, histories: Sequence[np.ndarray], rows: np.ndarray) -> torch.Tensor | None:
        """`prior_terms` at some rows of the domain only: (B | 1, len(rows)), or None."""
        total = None
        n_base = self.catalog.n_items.get(domain, 0)
        rows = np.asarray(rows, dtype=np.int64)
        base = rows < n_base
        for p in self.priors:
            w = p.weight.get(domain, 0.0)
            if not w:
                continue
            at = np.asarray(p.term_at(domain, histories, rows[base]), dtype=np.float32)  # (B | 1, n_at)
            if base.all():
                term = torch.from_numpy(at)
            else:  # items added online: the prior's new-item term
                full = np.full((len(at), len(rows)), p.new_item_term(domain), dtype=np.float32)
                full[:, base] = at
                term = torch.from_numpy(full)
            total = w * term if total is None else total + w * term
        return total

    def candidate_rows(self, domain: str, user: torch.Tensor, history: np.ndarray) -> np.ndarray | None:
        """The rows retrieval scores exactly in a domain with an ANN index (sorted): the index's top `ann_candidates`
        by the model's score, every item added online (the index does not hold them), and each weighted prior's top
        `prior_candidates` rows for the history. None in a domain without an index: every row (exact scan)."""
        index = self.index.get(domain)
        if index is None:
            return None
        n_base, n = self.catalog.n_items[domain], self._rows[domain]
        parts = [np.asarray(index.search(user.numpy(), self.ann_candidates), dtype=np.int64)]
        if n > n_base:
            parts.append(np.arange(n_base, n))
        for p in self.priors:
            if p.weight.get(domain):
                parts.append(np.asarray(p.top_rows(domain, history, self.prior_candidates), dtype=np.int64))
        return np.unique(np.concatenate(parts))

    def model_scores(self, batch: TargetBatch, users: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n) the model's scores of the domain's items, without the priors."""
        if users is None:
            users = self.user_vectors(batch.histories, batch.domain, batch.history_ratings)
        return users @ self.rows(batch.domain).T

    def scores(self, batch: TargetBatch, users: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n) what retrieval ranks: the model's scores plus the priors'. In a domain with an ANN index, as a
        request sees it: each user's `candidate_rows` scored exactly, -inf elsewhere (to measure what ANN costs)."""
        if batch.domain in self.index:
            return self._ann_scores(batch, users)
        scores = self.model_scores(batch, users)
        bias = self.prior_terms(batch.domain, batch.histories)
        return scores if bias is None else scores + bias

    def _ann_scores(self, batch: TargetBatch, users: torch.Tensor | None) -> torch.Tensor:
        d = batch.domain
        if users is None:
            users = self.user_vectors(batch.histories, d, batch.history_ratings)
        rows_d = self.rows(d)
        out = torch.full((len(batch.histories), len(rows_d)), float("-inf"))
        for r, h in enumerate(batch.histories):
            cand = self.candidate_rows(d, users[r], h)
            assert cand is not None  # the domain has an index
            out[r, torch.from_numpy(cand)] = self.scores_at(d, users[r], h, cand)[0]
        return out

    def scores_at(
        self, domain: str, user: torch.Tensor, history: np.ndarray, rows: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(len(rows),) retrieval's scores of some rows of the domain for one user vector (V,) and its history
        (global indices), and the priors' term in them (None without priors)."""
        scores = self.rows(domain)[torch.from_numpy(rows)] @ user
        bias = self.prior_terms_at(domain, [history], rows)
        if bias is None:
            return scores, None
        return scores + bias[0], bias[0]

    def __call__(self, batch: TargetBatch) -> np.ndarray:
        """The evaluation Scorer (crossrec.evaluation.evaluate)."""
        return self.scores(batch).numpy()
