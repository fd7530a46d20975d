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

import torch
import torch.nn.functional as F
from torch import nn

from crossrec.config import TrainConfig

__all__ = ["ItemAdaptor", "UserTower", "CrossRecModel"]


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
            self.net = nn.Sequential(nn.Linear(in_dim, 2 * d), nn.GELU(), nn.Dropout(cfg.dropout),
                                     nn.Linear(2 * d, d))
        else:
            self.net = nn.Linear(in_dim, d)
        self.drop = nn.Dropout(cfg.dropout)

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
        layer = nn.TransformerEncoderLayer(d, cfg.heads, dim_feedforward=2 * d, dropout=cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm_in = nn.LayerNorm(d)
        self.norm_out = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        self.heads = cfg.heads

    def forward(self, items: torch.Tensor, domains: torch.Tensor, next_domains: torch.Tensor,
                valid: torch.Tensor) -> torch.Tensor:
        """items (B, L, D) item vectors; domains, next_domains (B, L) ids; valid (B, L) bool, left-padded.
        Returns (B, L, D) L2-normalised user vectors: position t has read items <= t."""
        b, length, d = items.shape
        pos = torch.arange(length - 1, -1, -1, device=items.device)  # left padding: last = most recent
        # Item vectors are unit-norm; scaled by sqrt(D) to weigh as much as the N(0, 1) embeddings beside them.
        x = torch.where(valid.unsqueeze(-1), items * math.sqrt(d) + self.domain(domains), self.pad)
        x = x + self.pos(pos).unsqueeze(0) + self.next_domain(next_domains)
        x = self.drop(self.norm_in(x))
        # Causal, and padded keys hidden; a padded query still sees itself (no all-masked rows -> no NaN).
        causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
        allowed = causal.unsqueeze(0) & (valid.unsqueeze(1) | torch.eye(length, dtype=torch.bool,
                                                                         device=items.device).unsqueeze(0))
        mask = torch.zeros(b, length, length, device=items.device).masked_fill(~allowed, float("-inf"))
        mask = mask.repeat_interleave(self.heads, dim=0)  # (B * heads, L, L)
        h = self.encoder(x, mask=mask)
        return F.normalize(self.norm_out(h), dim=-1)


class CrossRecModel(nn.Module):
    """Item adaptor (or ID embeddings for SASRec) + user tower + temperature."""

    def __init__(self, cfg: TrainConfig, n_domains: int, in_dim: int | None = None, n_items: int | None = None):
        super().__init__()
        self.cfg = cfg
        if cfg.item_encoder == "text":
            if in_dim is None:
                raise ValueError("a text item encoder needs the backbone's vector size (in_dim)")
            self.adaptor = ItemAdaptor(in_dim, cfg)
        else:
            if not n_items:
                raise ValueError("an id item encoder (SASRec) needs the number of items")
            self.item_emb = nn.Embedding(n_items, cfg.dim)
            nn.init.normal_(self.item_emb.weight, std=0.1)
        self.tower = UserTower(n_domains, cfg)
        self.log_tau = nn.Parameter(torch.tensor(math.log(cfg.temperature)),
                                    requires_grad=cfg.learn_temperature)

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.exp().clamp(0.01, 1.0)

    def item_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone vectors (N, in_dim) for text, or item indices (N,) for id -> (N, D) normalised."""
        v = self.adaptor(x) if self.cfg.item_encoder == "text" else self.item_emb(x)
        return F.normalize(v, dim=-1)

    def user_vectors(self, items: torch.Tensor, domains: torch.Tensor, next_domains: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor:
        return self.tower(items, domains, next_domains, valid)

    def forward(self, item_x: torch.Tensor, hist_index: torch.Tensor, domains: torch.Tensor,
                next_domains: torch.Tensor, valid: torch.Tensor, target_valid: torch.Tensor,
                cand_index: torch.Tensor, wrong_domain: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The InfoNCE training loss in one forward pass (so DDP/DeepSpeed see every parameter once).

        item_x: encoder input of the U unique items of the batch; hist_index (B, L) and cand_index (C,)
        index into them; labels (P,) is each valid position's target column in the C candidates; logits
        of candidates from another domain than the target's are masked (wrong_domain (P, C))."""
        vecs = self.item_vectors(item_x)  # (U, D)
        hist = vecs[hist_index] * valid.unsqueeze(-1)  # (B, L, D)
        users = self.user_vectors(hist, domains, next_domains, valid)[target_valid]  # (P, D)
        logits = (users @ vecs[cand_index].T / self.tau).masked_fill(wrong_domain, float("-inf"))  # (P, C)
        return F.cross_entropy(logits, labels)
