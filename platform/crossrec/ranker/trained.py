"""The trained ranker: scoring a request (and its explanations), the full-ranking scorer of the whole pipeline for
`evaluate`, and the ranker's folder in a bundle."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from crossrec.config import RankerConfig
from crossrec.domains import domain_id
from crossrec.ranker.features import FEATURES, ItemTable, ListBatch, list_features, table_rows_for
from crossrec.ranker.lists import candidate_lists
from crossrec.ranker.net import RankerNet
from crossrec.retrieval import Retriever
from crossrec.splits import Splits, TargetBatch

RANKER_DIR = "ranker"
RANKER_FORMAT = 1


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
