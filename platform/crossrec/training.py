"""Training data, loss and scoring for the two-tower model: plain PyTorch, shared by every trainer.

`SequenceData` cuts each user's training sequence (targets already removed by the split) into windows of
`max_len + 1` items; `loss_inputs` prepares a batch for the model's InfoNCE forward; `ModelScorer` scores full catalogs for evaluation, validation
during training, `crossrec recommend` and serving.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from crossrec.config import TrainConfig
from crossrec.model import CrossRecModel
from crossrec.splits import Splits, TargetBatch

if TYPE_CHECKING:
    from crossrec.transitions import Transitions

__all__ = [
    "SequenceData",
    "SeqBatch",
    "loss_inputs",
    "ssl_views",
    "ModelScorer",
    "history_arrays",
    "encode_users",
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
        for r, w in enumerate(windows):
            inp, out = w[:-1], w[1:]
            k = len(inp)
            items[r, length - k :] = self.item[inp]
            doms[r, length - k :] = self.dom[inp]
            nxt[r, length - k :] = self.dom[out]
            tgt[r, length - k :] = self.item[out]
            valid[r, length - k :] = True
        return SeqBatch(items, doms, nxt, valid, tgt, valid.copy())


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


def history_arrays(
    histories: list[np.ndarray], hist_domains: list[np.ndarray], target_domain: np.ndarray, max_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded (items, domains, next_domains, valid) for inference: the last position asks for the
    target domain. Histories longer than max_len keep their most recent items."""
    b = len(histories)
    items = np.zeros((b, max_len), np.int64)
    doms = np.zeros((b, max_len), np.int64)
    nxt = np.zeros((b, max_len), np.int64)
    valid = np.zeros((b, max_len), bool)
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
    return items, doms, nxt, valid


@torch.inference_mode()
def encode_users(
    model: CrossRecModel,
    item_vectors: torch.Tensor,
    histories: list[np.ndarray],
    hist_domains: list[np.ndarray],
    target_domains: np.ndarray,
    batch_size: int = 512,
    prior_domains: tuple[list[np.ndarray], np.ndarray] | None = None,
) -> torch.Tensor:
    """(B, D) user vectors for target domains (model ids), from histories given as rows of `item_vectors`.
    prior_domains: (hist_domains, target_domains) as distinct codes of the data's own domains, for the text
    prior's same-domain weighting (model ids merge every unseen domain into one; see CrossRecModel)."""
    out = []
    for s in range(0, len(histories), batch_size):
        hs = histories[s : s + batch_size]
        items, doms, nxt, valid = history_arrays(
            hs, hist_domains[s : s + batch_size], target_domains[s : s + batch_size], model.cfg.max_len
        )
        d = model.cfg.dim
        hv = item_vectors[torch.from_numpy(items), :d] * torch.from_numpy(valid).unsqueeze(-1)
        u = model.learned_user_vectors(hv, torch.from_numpy(doms), torch.from_numpy(nxt), torch.from_numpy(valid))[
            :, -1
        ]
        if model.text_prior:
            # The prior over the WHOLE history, not just the tower's last max_len items: a user whose recent
            # items are all from other domains still has a same-domain text query (exactly textknn's).
            pd, pn = prior_domains if prior_domains is not None else (hist_domains, target_domains)
            u = torch.cat(
                [
                    u,
                    model.log_beta.exp()
                    * _prior_query(model, item_vectors[:, d:], hs, pd[s : s + batch_size], pn[s : s + batch_size]),
                ],
                dim=-1,
            )
        out.append(u)
    return torch.cat(out) if out else torch.zeros(0, item_vectors.shape[1])


def _prior_query(
    model: CrossRecModel,
    text: torch.Tensor,
    histories: list[np.ndarray],
    hist_domains: list[np.ndarray],
    target_domains: np.ndarray,
) -> torch.Tensor:
    """(B, T) unit recency-weighted means of the histories' text vectors (`text`: rows of the catalog), with
    the model's decay and cross-domain weight: what CrossRecModel.user_vectors computes over its window."""
    lengths = torch.tensor([len(h) for h in histories], dtype=torch.long)
    q = torch.zeros(len(histories), text.shape[1])
    if int(lengths.sum()) == 0:
        return q
    items = torch.from_numpy(np.concatenate(histories).astype(np.int64))  # (H,) every history, chained
    row = torch.repeat_interleave(torch.arange(len(histories)), lengths)  # (H,)
    age = torch.cumsum(lengths, 0)[row] - 1 - torch.arange(len(items))  # 0 = the most recent item
    w = torch.pow(torch.tensor(model.cfg.text_prior_decay, dtype=torch.float64), age.double()).float()
    if model.cfg.text_prior_cross != 1.0:
        same = (
            torch.from_numpy(np.concatenate(hist_domains).astype(np.int64))
            == torch.from_numpy(np.asarray(target_domains, dtype=np.int64))[row]
        )
        cross = model.cfg.text_prior_cross
        if cross is None:
            raise ValueError("`text_prior_cross` is unset: training chooses it before the model runs")
        w = torch.where(same, w, w * cross)
    q.index_add_(0, row, w[:, None] * text[items])
    return torch.nn.functional.normalize(q, dim=-1)


class ModelScorer:
    """Scores every item of a domain for a batch of histories, with one model and one item catalog.

    `item_vectors` (N, D) are the model's item vectors for the catalog's global indices; `domain_map`
    maps the catalog's domain codes to the model's domain ids (unknown domains -> the unknown id).
    `learned_weight` scales the learned part of the score against the text prior (zero-shot calibration,
    crossrec.inference.calibrate_zero_shot; 1 = the model as trained). `pop` (N,) and `pop_weight` (domain ->
    gamma) are the popularity prior (crossrec.pop_prior): gamma * pop is added to a domain's scores. `co` (the
    training transitions) and `co_weight` (domain -> (beta, decay)) are the transition prior (crossrec.co_prior):
    beta * log(1 + decayed transitions from the history) is added too."""

    name = "crossrec"

    params: dict  # set by calibration only (inference.calibrate_zero_shot): `crossrec evaluate` prints it

    def __init__(
        self,
        model: CrossRecModel,
        item_vectors: torch.Tensor,
        catalog: Splits,
        domain_map: np.ndarray,
        batch_size: int = 512,
    ):
        self.model = model.eval()
        self.vecs = item_vectors
        self.catalog = catalog
        self.domain_map = domain_map
        self.batch_size = batch_size
        self.learned_weight = 1.0
        self.pop: torch.Tensor | None = None  # (N,) standardised log popularity of each catalog item
        self.pop_weight: dict[str, float] = {}  # target domain -> gamma (absent or 0: no prior)
        self.co: Transitions | None = None  # the training transitions over the catalog's global indices
        self.co_weight: dict[str, tuple[float, float]] = {}  # target domain -> (beta, decay); absent: no prior

    @torch.inference_mode()
    def user_vectors(self, histories: list[np.ndarray], target_domain: str) -> torch.Tensor:
        c = self.catalog
        code = c.domain_code[target_domain]
        codes = [c.item_domain[h] for h in histories]
        users = encode_users(
            self.model,
            self.vecs,
            histories,
            [self.domain_map[x] for x in codes],
            np.full(len(histories), self.domain_map[code]),
            self.batch_size,
            prior_domains=(codes, np.full(len(histories), code)),
        )
        if self.learned_weight != 1.0:
            users[:, : self.model.cfg.dim] *= self.learned_weight
        return users

    def item_bias(self, domain: str) -> torch.Tensor | None:
        """(n_items[domain],) the popularity prior's term gamma * p of the domain's items, or None without one."""
        gamma = self.pop_weight.get(domain, 0.0)
        if not gamma or self.pop is None:
            return None
        off, n = self.catalog.offset[domain], self.catalog.n_items[domain]
        return gamma * self.pop[off : off + n]

    def history_bias(self, batch: TargetBatch) -> torch.Tensor | None:
        """(B, n_items[domain]) the transition prior's term beta * log(1 + ...) of each history, or None."""
        beta, decay = self.co_weight.get(batch.domain, (0.0, 1.0))
        if not beta or self.co is None:
            return None
        off, n = self.catalog.offset[batch.domain], self.catalog.n_items[batch.domain]
        return beta * torch.from_numpy(self.co.term(batch.histories, off, n, decay).astype(np.float32))

    def retrieval_scores(self, batch: TargetBatch, users: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n_items[domain]) what retrieval ranks: the model's scores (from `users` when given) plus the
        popularity and transition priors."""
        if users is None:
            scores = self.model_scores(batch)
        else:
            off, n = self.catalog.offset[batch.domain], self.catalog.n_items[batch.domain]
            scores = users @ self.vecs[off : off + n].T
        for bias in (self.item_bias(batch.domain), self.history_bias(batch)):
            if bias is not None:
                scores = scores + bias
        return scores

    @torch.inference_mode()
    def model_scores(self, batch: TargetBatch) -> torch.Tensor:
        """(B, n_items[domain]) the model's scores alone, without the popularity prior."""
        off, n = self.catalog.offset[batch.domain], self.catalog.n_items[batch.domain]
        users = self.user_vectors(batch.histories, batch.domain)
        return users @ self.vecs[off : off + n].T

    @torch.inference_mode()
    def __call__(self, batch: TargetBatch) -> np.ndarray:
        return self.retrieval_scores(batch).numpy()


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
