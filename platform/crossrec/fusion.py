"""Fusion of an item's text vector with side vectors: knowledge-graph vectors (graph.py) and precomputed feature
columns (`list<float32>` item columns, e.g. image embeddings).

The item encoder's input is one matrix per catalog, [text | side_1 | side_2 ...]; `TrainConfig.side_dims` gives
the side block sizes. Each side block is L2-normalised and projected (no bias) to the model's size D, so an
all-zero block - an item without graph edges, a new item, a missing image - contributes nothing and the item
falls back to its text. Modes (`fusion`):
    concat     W [t; s_1; ...]         W starts as [I 0 ...]: training starts from the text-only model
    gate       t + sum_m sigmoid(g_m([t; s_m])) s_m
    attention  sum over present modalities m of softmax_m(<q(t), k(s_m)> / sqrt(D)) s_m, text always present
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Fusion", "split_sides", "feature_column_vectors", "side_vectors"]


class Fusion(nn.Module):
    def __init__(self, side_dims: list[int], dim: int, kind: str):
        super().__init__()
        self.kind = kind
        self.side_dims = list(side_dims)
        self.proj = nn.ModuleList(nn.Linear(s, dim, bias=False) for s in side_dims)
        m = len(side_dims)
        if kind == "concat":
            self.out = nn.Linear((m + 1) * dim, dim)
            with torch.no_grad():
                self.out.weight.zero_()
                self.out.weight[:, :dim] = torch.eye(dim)
                self.out.bias.zero_()
        elif kind == "gate":
            self.gates = nn.ModuleList(nn.Linear(2 * dim, 1) for _ in side_dims)
        elif kind == "attention":
            self.q = nn.Linear(dim, dim, bias=False)
            self.k = nn.Linear(dim, dim, bias=False)
        else:
            raise ValueError(f"`fusion` must be one of concat, gate, attention, got {kind!r}")

    def forward(self, text: torch.Tensor, sides: list[torch.Tensor]) -> torch.Tensor:
        """text (N, D) the adaptor's output; sides[m] (N, side_dims[m]) -> (N, D)."""
        present = [s.abs().sum(-1, keepdim=True) > 0 for s in sides]  # (N, 1) each
        hs = [p(F.normalize(s, dim=-1)) for p, s in zip(self.proj, sides)]  # (N, D) each, 0 when absent
        if self.kind == "concat":
            return self.out(torch.cat([text, *hs], -1))
        if self.kind == "gate":
            return text + sum(
                torch.sigmoid(g(torch.cat([text, h], -1))) * h * p for g, h, p in zip(self.gates, hs, present)
            )
        tokens = torch.stack([text, *hs], 1)  # (N, M + 1, D)
        mask = torch.cat([torch.ones_like(present[0]), *present], -1) if present else None  # (N, M + 1)
        att = torch.einsum("nd,nmd->nm", self.q(text), self.k(tokens)) / math.sqrt(text.shape[-1])
        if mask is not None:
            att = att.masked_fill(~mask, -math.inf)
        return torch.einsum("nm,nmd->nd", torch.softmax(att, -1), tokens)


def split_sides(x: torch.Tensor, side_dims: list[int] | None, text_dim: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """[text | side_1 | ...] (N, text_dim + sum(side_dims)) -> text (N, text_dim), [side_m (N, side_dims[m])].
    Text alone (N, text_dim) - a new item embedded from its text, by inference or serving - gets zero sides."""
    if not side_dims:
        return x, []
    if x.shape[-1] == text_dim:
        return x, [x.new_zeros(*x.shape[:-1], d) for d in side_dims]
    parts = torch.split(x, [text_dim, *side_dims], dim=-1)
    return parts[0], list(parts[1:])


def feature_column_vectors(items: pa.Table, column: str) -> np.ndarray:
    """A `list<float32>` item column as (n, d); empty or null rows (no such feature) become zeros."""
    if column not in items.column_names:
        raise ValueError(
            f"`feature_columns`: no column {column!r} in the items table (columns: {', '.join(items.column_names)})"
        )
    col = items.column(column)
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        raise ValueError(f"`feature_columns`: column {column!r} is {col.type}, expected a list of floats")
    rows = col.to_pylist()
    dims = {len(r) for r in rows if r}
    if len(dims) != 1:
        raise ValueError(
            f"`feature_columns`: column {column!r} must hold vectors of one length, got lengths "
            f"{sorted(dims) or 'none'}"
        )
    d = dims.pop()
    out = np.zeros((len(rows), d), np.float32)
    for i, r in enumerate(rows):
        if r:
            out[i] = r
    return out


def side_vectors(data, splits, cfg, text_vectors: np.ndarray) -> list[np.ndarray]:
    """The side blocks a TrainConfig asks for, in global item order: the graph vectors (graph.enabled), then
    each of `feature_columns`."""
    from crossrec.graph import build_graph, graph_item_vectors

    blocks = []
    if cfg.graph.enabled:
        graph = build_graph(data, splits, cfg.graph.columns, cfg.graph.co_interaction)
        blocks.append(graph_item_vectors(graph, text_vectors, cfg.graph.layers))
    items = data.items.take(splits.item_row)
    for c in cfg.feature_columns or []:
        blocks.append(feature_column_vectors(items, c))
    return blocks


def with_side_vectors(data, splits, cfg, text_path) -> tuple[str, list[int]]:
    """The item-encoder input [text | sides] for a run with `graph.enabled` or `feature_columns`, saved beside the
    cached text vectors (keyed by what determines it). Returns (its .npy path, side_dims)."""
    import hashlib
    import json
    import os
    from pathlib import Path

    text = np.load(text_path)
    key = hashlib.sha256(
        json.dumps(
            [
                str(text_path),
                data.content_hash,
                cfg.graph.enabled,
                cfg.graph.layers,
                cfg.graph.co_interaction,
                cfg.graph.columns,
                cfg.feature_columns,
                cfg.min_per_domain,
            ]
        ).encode()
    ).hexdigest()[:16]
    path = Path(text_path).with_name(f"{Path(text_path).stem}-side-{key}.npy")
    blocks = side_vectors(data, splits, cfg, text)
    dims = [b.shape[1] for b in blocks]
    if not path.is_file():
        tmp = path.with_suffix(f".tmp-{os.getpid()}.npy")
        np.save(tmp, np.concatenate([text, *blocks], 1).astype(np.float32))
        os.replace(tmp, path)
    return str(path), dims
