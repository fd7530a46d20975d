"""The ranker's network: score'(u, c) = a * retrieval(u, c) + MLP([standardised features, domain embedding]), the
MLP's last layer at zero and `a` at one, so an untrained ranker keeps retrieval's order."""

from __future__ import annotations

import math

import torch
from torch import nn


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
