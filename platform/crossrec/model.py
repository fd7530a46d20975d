"""The two-tower model: item adaptor over backbone vectors, and a causal user tower over histories.

    item:  backbone vector (B_t) ──► adaptor ──► L2-normalised item vector (D)
    user:  [item vector + domain emb + position emb + next-domain emb] * L ──► causal transformer ──► (D)
    score(u, i) = <u, i> / tau

The user tower reads the history left-padded to `max_len` (the last position is the most recent item) and
is told at each position which domain the next item comes from, so one pass trains every position
(SASRec-style) and at inference the last position asks for the target domain. Domain index `n_domains`
is "unknown": used for domains never trained on (zero-shot) and, with `domain_dropout`, in training.
Plain PyTorch; no Ray, no strategy code.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crossrec.config import TrainConfig
from crossrec.fusion import Fusion, split_sides

__all__ = [
    "ItemAdaptor",
    "UserTower",
    "CrossRecModel",
    "domain_mmd",
    "view_infonce",
    "rating_buckets",
    "RATING_UNKNOWN",
]

# Ratings read by the user tower (`behaviour.rating: feature`): rounded and clipped to 0..10, which holds the usual
# scales (1-5 stars, 0.5-5 in halves, 1-10) without fitting a scale per dataset; row 11 is "unknown" (no rating:
# a dataset or request without one, NaN).
RATING_UNKNOWN = 11


def rating_buckets(ratings: np.ndarray | None, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """int64 embedding rows of ratings (float, NaN = unknown); None gives `shape` filled with RATING_UNKNOWN."""
    if ratings is None:
        return np.full(shape or (0,), RATING_UNKNOWN, np.int64)
    r = np.asarray(ratings, dtype=np.float64)
    known = np.isfinite(r)
    out = np.full(r.shape, RATING_UNKNOWN, np.int64)
    out[known] = np.clip(np.rint(r[known]), 0, 10).astype(np.int64)
    return out


class ItemAdaptor(nn.Module):
    """Maps frozen backbone vectors into the recommender's space.

    `moe`: UniSRec's parametric whitening with a mixture of experts (Hou et al., KDD 2022, sec. 3.1.2):
    expert_k(x) = (x - b_k) W_k, mixed by a softmax gate over x; it corrects the anisotropy of text
    embeddings and lets experts specialise by domain. `mlp` and `linear` are the simpler alternatives.
    """

    def __init__(self, in_dim: int, cfg: TrainConfig):
        super().__init__()
        self.kind = cfg.adaptor
        d = cfg.dim
        if self.kind == "moe":
            self.bias = nn.Parameter(torch.zeros(cfg.n_experts, in_dim))
            self.proj = nn.Parameter(torch.empty(cfg.n_experts, in_dim, d))
            nn.init.xavier_uniform_(self.proj.view(-1, d))
            self.gate = nn.Linear(in_dim, cfg.n_experts, bias=False)
            nn.init.zeros_(self.gate.weight)  # start as the plain average of experts
        elif self.kind == "mlp":
            self.net: nn.Module = nn.Sequential(
                nn.Linear(in_dim, 2 * d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(2 * d, d)
            )
        else:
            self.net = nn.Linear(in_dim, d)
        self.drop = nn.Dropout(cfg.dropout)

    @torch.no_grad()
    def init_from_vectors(self, x: torch.Tensor) -> None:
        """Starts every expert (or the linear map) as the projection on the catalog's top principal components,
        so item vectors begin with the cosine structure of the text vectors (the model starts near textknn
        instead of from noise) and training refines it."""
        mean = x.mean(0)
        xc = x - mean
        _, _, vt = torch.linalg.svd(
            xc[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:20000]], full_matrices=False
        )
        d = self.proj.shape[-1] if self.kind == "moe" else None
        if self.kind == "moe":
            comps = vt[:d].T  # (in_dim, D)
            self.proj.copy_(comps.unsqueeze(0).expand_as(self.proj) + 0.01 * torch.randn_like(self.proj))
            self.bias.copy_(mean.unsqueeze(0).expand_as(self.bias))
        elif isinstance(self.net, nn.Linear):
            self.net.weight.copy_(vt[: self.net.out_features])
            self.net.bias.copy_(-(self.net.weight @ mean))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, in_dim) -> (N, D)
        x = self.drop(x)
        if self.kind == "moe":
            experts = torch.einsum("nki,kid->nkd", x.unsqueeze(1) - self.bias, self.proj)  # (N, K, D)
            gate = torch.softmax(self.gate(x), dim=-1).unsqueeze(-1)  # (N, K, 1)
            return (gate * experts).sum(1)
        return self.net(x)


class UserTower(nn.Module):
    def __init__(self, n_domains: int, cfg: TrainConfig):
        super().__init__()
        d = cfg.dim
        self.max_len = cfg.max_len
        self.unknown_domain = n_domains
        self.pos = nn.Embedding(cfg.max_len, d)  # position 0 = most recent
        self.domain = nn.Embedding(n_domains + 1, d)
        self.next_domain = nn.Embedding(n_domains + 1, d)
        self.pad = nn.Parameter(torch.zeros(d))
        # Only with `behaviour.rating: feature`: bundles trained without it keep their state dict as it was.
        self.rating = nn.Embedding(RATING_UNKNOWN + 1, d) if cfg.behaviour.rating == "feature" else None
        self.rating_dropout = cfg.behaviour.rating_dropout
        # Small embeddings at start: the residual stream is then mostly the items themselves.
        for emb in (self.pos, self.domain, self.next_domain, self.rating):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d,
            cfg.heads,
            dim_feedforward=2 * d,
            dropout=cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm_in = nn.LayerNorm(d)
        self.norm_out = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        self.heads = cfg.heads

    def forward(
        self,
        items: torch.Tensor,
        domains: torch.Tensor,
        next_domains: torch.Tensor,
        valid: torch.Tensor,
        ratings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """items (B, L, D) item vectors; domains, next_domains (B, L) ids; valid (B, L) bool, left-padded; ratings
        (B, L) `rating_buckets` rows (None: all unknown; read only with `behaviour.rating: feature`).
        Returns (B, L, D) L2-normalised user vectors: position t has read items <= t."""
        b, length, d = items.shape
        pos = torch.arange(length - 1, -1, -1, device=items.device)  # left padding: last = most recent
        x = items + self.domain(domains)
        if self.rating is not None:
            if ratings is None:
                ratings = torch.full_like(domains, RATING_UNKNOWN)
            elif self.training and self.rating_dropout:
                hide = torch.rand(ratings.shape, device=ratings.device) < self.rating_dropout
                ratings = ratings.masked_fill(hide, RATING_UNKNOWN)
            x = x + self.rating(ratings)
        x = torch.where(valid.unsqueeze(-1), x, self.pad)
        x = x + self.pos(pos).unsqueeze(0) + self.next_domain(next_domains)
        x = self.drop(self.norm_in(x))
        # Causal, and padded keys hidden; a padded query still sees itself (no all-masked rows -> no NaN).
        causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
        allowed = causal.unsqueeze(0) & (
            valid.unsqueeze(1) | torch.eye(length, dtype=torch.bool, device=items.device).unsqueeze(0)
        )
        mask = torch.zeros(b, length, length, device=items.device).masked_fill(~allowed, float("-inf"))
        mask = mask.repeat_interleave(self.heads, dim=0)  # (B * heads, L, L)
        h = self.encoder(x, mask=mask)
        return F.normalize(self.norm_out(h), dim=-1)


class CrossRecModel(nn.Module):
    """Item adaptor (or ID embeddings for SASRec) + user tower + temperature, with an optional text prior.

    Text prior (`text_prior`, text items only): item vectors carry, beside the learned part, the frozen
    L2-normalised backbone vector, and user vectors carry the recency-weighted mean of the history's backbone
    vectors, so that

        score(u, i) = <u_learned, i_learned> / tau  +  beta * cos(recency-mean of history text, i's text)

    The second term is exactly the `textknn` baseline; the model learns what sequences add on top of it, and
    `beta` (trained) says how much of the text prior it keeps. Both parts live in one concatenated vector per
    item and per user, so retrieval stays a single inner product.
    """

    def __init__(self, cfg: TrainConfig, n_domains: int, in_dim: int | None = None, n_items: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.text_prior = cfg.item_encoder == "text" and cfg.text_prior
        if cfg.item_encoder == "text":
            if in_dim is None:
                raise ValueError("a text item encoder needs the backbone's vector size (in_dim)")
            # With side vectors (graph, feature columns; fusion.py) the input is [text | sides]: the adaptor
            # reads the text part, the fusion adds the rest.
            self.adaptor = ItemAdaptor(in_dim - sum(cfg.side_dims or []), cfg)
            if cfg.side_dims:
                self.fusion = Fusion(cfg.side_dims, cfg.dim, cfg.fusion)
            if cfg.item_ids:
                # The collaborative signal text cannot carry; row n_items (zero, frozen) = "no id" for items never
                # seen in training, new items and other catalogs, which then rest on their text alone.
                if not n_items:
                    raise ValueError("`item_ids` needs the number of items")
                self.item_emb = nn.Embedding(n_items + 1, cfg.dim, padding_idx=n_items)
                nn.init.zeros_(self.item_emb.weight)
        else:
            if not n_items:
                raise ValueError("an id item encoder (SASRec) needs the number of items")
            self.item_emb = nn.Embedding(n_items, cfg.dim)
            nn.init.normal_(self.item_emb.weight, std=0.1)
        self.tower = UserTower(n_domains, cfg)
        self.log_tau = nn.Parameter(torch.tensor(math.log(cfg.temperature)), requires_grad=cfg.learn_temperature)
        if self.text_prior:
            if cfg.text_prior_decay is None or cfg.text_prior_cross is None:
                raise ValueError(
                    "`text_prior_decay` / `text_prior_cross` are unset (null: chosen on validation): "
                    "resolve them first with crossrec.training.resolve_text_prior"
                )
            self.log_beta = nn.Parameter(torch.tensor(math.log(cfg.text_prior_weight)))

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.exp().clamp(0.01, 1.0)

    @property
    def vector_dim(self) -> int:
        return self.cfg.dim + (self.adaptor_in_dim if self.text_prior else 0)

    @property
    def adaptor_in_dim(self) -> int:
        a = self.adaptor
        if a.kind == "moe":
            return int(a.proj.shape[1])
        first = a.net if isinstance(a.net, nn.Linear) else a.net[0]  # type: ignore[index]
        return int(first.in_features)

    def item_vectors(self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Backbone vectors (N, in_dim) for text - or (vectors, id rows) with `item_ids` -, or item indices (N,)
        for id -> (N, vector_dim): the normalised learned vector, then (text prior) the normalised backbone vector."""
        ids = None
        if isinstance(x, tuple):
            x, ids = x
        if self.cfg.item_encoder == "text":
            x, sides = split_sides(x, self.cfg.side_dims, self.adaptor_in_dim)
            v = self.adaptor(x)
            if sides:
                if self.training and self.cfg.side_dropout:
                    keep = (torch.rand(len(x), 1, device=x.device) >= self.cfg.side_dropout).to(x.dtype)  # (N, 1)
                    sides = [s * keep for s in sides]
                v = self.fusion(v, sides)
            if ids is not None and self.cfg.item_ids:
                v = v + self.item_emb(ids)
        else:
            v = self.item_emb(x)
        v = F.normalize(v, dim=-1)
        return torch.cat([v, F.normalize(x, dim=-1)], dim=-1) if self.text_prior else v

    def learned_user_vectors(
        self,
        items: torch.Tensor,
        domains: torch.Tensor,
        next_domains: torch.Tensor,
        valid: torch.Tensor,
        ratings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The learned part of user_vectors: (B, L, dim) tower outputs over the items' learned columns, / tau."""
        return self.tower(items, domains, next_domains, valid, ratings) / self.tau

    def user_vectors(
        self,
        items: torch.Tensor,
        domains: torch.Tensor,
        next_domains: torch.Tensor,
        valid: torch.Tensor,
        ratings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """items (B, L, vector_dim) -> (B, L, vector_dim) user vectors, scaled so that score = <user, item>: at
        every position (training). Inference reads the last position's with the prior over the whole history
        (crossrec.retrieval.Retriever.encode)."""
        d = self.cfg.dim
        u = self.learned_user_vectors(items[..., :d], domains, next_domains, valid, ratings)
        if not self.text_prior:
            return u
        # Recency-weighted prefix means of the history's text vectors: w[t, s] = decay^(t - s), s <= t.
        length = items.shape[1]
        steps = torch.arange(length, device=items.device)  # on the items' device: GPU training too
        age = steps.unsqueeze(1) - steps.unsqueeze(0)  # (L, L) t - s
        decay, cross = self.cfg.text_prior_decay, self.cfg.text_prior_cross
        if decay is None or cross is None:
            raise ValueError(
                "`text_prior_decay` / `text_prior_cross` are unset: training chooses them before the "
                "model runs (crossrec.training.resolve_text_prior)"
            )
        w = torch.where(age >= 0, decay ** age.clamp(min=0).float(), torch.zeros((), device=items.device))
        w = w.unsqueeze(0) * valid.unsqueeze(1)  # (B, L, L)
        if cross != 1.0:
            # History items from another domain than the one predicted at t count text_prior_cross as much.
            same = domains.unsqueeze(1) == next_domains.unsqueeze(2)  # (B, L_t, L_s)
            w = w * torch.where(same, 1.0, cross)
        raw = F.normalize(w @ items[..., d:], dim=-1)  # (B, L, in_dim)
        return torch.cat([u, self.log_beta.exp() * raw], dim=-1)

    def forward(
        self,
        item_x: torch.Tensor,
        hist_index: torch.Tensor,
        domains: torch.Tensor,
        next_domains: torch.Tensor,
        valid: torch.Tensor,
        target_valid: torch.Tensor,
        cand_index: torch.Tensor,
        wrong_domain: torch.Tensor,
        labels: torch.Tensor,
        target_domain: torch.Tensor | None = None,
        ssl_valid: torch.Tensor | None = None,
        ratings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The training loss in one forward pass (so DDP/DeepSpeed see every parameter once): InfoNCE, plus
        `align_weight` * MMD between target domains' user vectors and `ssl_weight` * a contrastive loss between
        two views of each history, when those are on.

        item_x: encoder input of the U unique items of the batch; hist_index (B, L) and cand_index (C,)
        index into them; labels (P,) is each valid position's target column in the C candidates; logits
        of candidates from another domain than the target's are masked (wrong_domain (P, C)). target_domain (P,):
        the dataset domain of each target (alignment); ssl_valid (2, B, L): the two views' kept positions; ratings
        (B, L): the history's `rating_buckets` rows (None: unknown)."""
        vecs = self.item_vectors(item_x)  # (U, V)
        hist = vecs[hist_index] * valid.unsqueeze(-1)  # (B, L, V)
        users = self.user_vectors(hist, domains, next_domains, valid, ratings)[target_valid]  # (P, V)
        logits = (users @ vecs[cand_index].T).masked_fill(wrong_domain, float("-inf"))  # (P, C)
        loss = F.cross_entropy(logits, labels)
        d = self.cfg.dim
        if self.cfg.align_weight and target_domain is not None:
            loss = loss + self.cfg.align_weight * domain_mmd(users[:, :d] * self.tau, target_domain)
        if self.cfg.ssl_weight and ssl_valid is not None:
            views = [
                self.tower(hist[..., :d] * v.unsqueeze(-1), domains, next_domains, v, ratings)[:, -1] for v in ssl_valid
            ]
            loss = loss + self.cfg.ssl_weight * view_infonce(*views)  # (B, dim) each: the last position
        return loss


SSL_TAU = 0.2  # temperature of the two-view InfoNCE (CL4SRec uses 0.1-1; unit vectors)


def view_infonce(a: torch.Tensor, b: torch.Tensor, tau: float = SSL_TAU) -> torch.Tensor:
    """Symmetric InfoNCE between two views (B, D) of the same B sequences: row k of `a` should find row k of `b`
    among the batch (CL4SRec, Xie et al., ICDE 2022, eq. 4)."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.T / tau  # (B, B)
    labels = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def domain_mmd(
    users: torch.Tensor,
    domain: torch.Tensor,
    max_per_domain: int = 256,
    bandwidths: tuple[float, ...] = (0.5, 1.0, 2.0),
) -> torch.Tensor:
    """Mean over pairs of domains present in the batch of the squared MMD (Gretton et al., JMLR 2012, eq. 5,
    biased estimate) between their users' vectors (P, D), with a sum of RBF kernels exp(-|x - y|^2 / (2 s^2)).
    Zero when the batch holds one domain only. Each domain is capped at `max_per_domain` vectors (its first
    ones: the batch order is random)."""
    groups = [users[domain == k][:max_per_domain] for k in torch.unique(domain)]
    if len(groups) < 2:
        return users.sum() * 0.0  # keeps every parameter in the graph (DDP)

    def k(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d2 = torch.cdist(x, y).pow(2)
        return torch.stack([torch.exp(-d2 / (2 * s * s)) for s in bandwidths]).sum(0).mean()

    total, n = users.new_zeros(()), 0
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            x, y = groups[i], groups[j]
            total = total + k(x, x) + k(y, y) - 2 * k(x, y)
            n += 1
    return total / n
