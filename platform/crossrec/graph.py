"""Knowledge graph of the catalog and LightGCN propagation over it (plain PyTorch sparse ops).

Nodes: every catalog item (global index order of `Splits`), then one node per attribute token of the
categorical item columns (`attributes`, `brand`, ... : every string column but item_id, domain and title),
named "column:token". Edges (undirected, unweighted): item - attribute token, and optionally item - item for
consecutive interactions of a user in TRAINING data only (`Splits.is_train`), so no target leaks in.

LightGCN (He et al., SIGIR 2020, eq. 3-4): e^(k+1) = Â e^(k) with Â = D^-1/2 A D^-1/2, no weights and no
non-linearity in propagation; the node vector is the mean of e^(0..K). Here e^(0) is the items' frozen text
vectors (attribute nodes start at zero), so an item's graph vector mixes the text of items that share its
category/brand tokens or its co-interactions. Items with no edges get a zero graph vector (text-only fallback).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from crossrec.dataset import Dataset
from crossrec.splits import Splits

__all__ = ["ItemGraph", "build_graph", "attribute_columns", "normalized_adjacency", "propagate", "graph_item_vectors"]

NOT_CATEGORICAL = ("item_id", "domain", "title", "description", "text", "review")
_SPLIT = re.compile(r"[\s,;|>/]+")


@dataclass
class ItemGraph:
    n_items: int
    attributes: list[str]  # attribute node names "column:token"; node id = n_items + position
    item_attr: np.ndarray  # (E1, 2) item index, attribute index
    item_item: np.ndarray  # (E2, 2) item i < item j

    @property
    def n_nodes(self) -> int:
        return self.n_items + len(self.attributes)

    def edges(self) -> np.ndarray:
        """(E, 2) undirected edges as node ids, each once."""
        ia = self.item_attr.copy()
        ia[:, 1] += self.n_items
        return np.concatenate([ia, self.item_item]).astype(np.int64)

    def degree(self) -> np.ndarray:
        e = self.edges()
        return np.bincount(e.reshape(-1), minlength=self.n_nodes).astype(np.float64)

    def item_arrays(self, max_attrs: int = 16, max_neighbors: int = 16) -> dict[str, np.ndarray]:
        """Padded per-item rows of Â for the ranker's graph similarity (see `two_hop` in ranker/features.py):
        attr (n, max_attrs) attribute ids (-1 pad) with weights Â[item, attr]; nb (n, max_neighbors) item
        neighbours with Â[item, nb]. Items with more keep their heaviest (rarest) ones."""
        deg = self.degree()
        inv = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1)), 0.0)

        def pad(pairs: np.ndarray, other_offset: int, width: int) -> tuple[np.ndarray, np.ndarray]:
            ids = np.full((self.n_items, width), -1, np.int32)
            w = np.zeros((self.n_items, width), np.float32)
            if len(pairs) == 0:
                return ids, w
            wt = inv[pairs[:, 0]] * inv[pairs[:, 1] + other_offset]
            o = np.lexsort((-wt, pairs[:, 0]))  # by item, heaviest first
            p, wt = pairs[o], wt[o]
            start = np.searchsorted(p[:, 0], p[:, 0], side="left")
            slot = np.arange(len(p)) - start
            keep = slot < width
            ids[p[keep, 0], slot[keep]] = p[keep, 1]
            w[p[keep, 0], slot[keep]] = wt[keep]
            return ids, w

        attr, attr_w = pad(self.item_attr, self.n_items, max_attrs)
        both = np.concatenate([self.item_item, self.item_item[:, ::-1]]) if len(self.item_item) else self.item_item
        nb, nb_w = pad(both, 0, max_neighbors)
        return {"attr": attr, "attr_w": attr_w, "nb": nb, "nb_w": nb_w}


def attribute_columns(items: pa.Table) -> list[str]:
    """The categorical string columns of an items table (free-text ones excluded by name)."""
    return [f.name for f in items.schema if pa.types.is_string(f.type) and f.name not in NOT_CATEGORICAL]


def build_graph(
    data: Dataset, splits: Splits, columns: list[str] | None = None, co_interaction: bool = True, min_items: int = 2
) -> ItemGraph:
    """The item-attribute(-item) graph of a dataset. Tokens shared by fewer than `min_items` items are dropped
    (a token of one item links nothing)."""
    items = data.items.take(splits.item_row)  # global item order
    cols = attribute_columns(items) if columns is None else columns
    for c in cols:
        if c not in items.column_names:
            raise ValueError(f"graph column {c!r} not in the items table (columns: {', '.join(items.column_names)})")
    pairs: dict[str, list[int]] = {}
    for c in cols:
        for i, value in enumerate(items.column(c).to_pylist()):
            for tok in set(_SPLIT.split((value or "").lower())):
                if tok:
                    pairs.setdefault(f"{c}:{tok}", []).append(i)
    names = sorted(k for k, v in pairs.items() if len(v) >= min_items)
    ia = [(i, a) for a, k in enumerate(names) for i in pairs[k]]
    item_attr = np.array(ia, np.int64).reshape(-1, 2)
    item_item = np.zeros((0, 2), np.int64)
    if co_interaction:
        rows = np.flatnonzero(splits.is_train)  # sorted by (user, time): consecutive rows of a user are pairs
        same_user = splits.row_user[rows[1:]] == splits.row_user[rows[:-1]]
        a, b = splits.row_item[rows[:-1]][same_user], splits.row_item[rows[1:]][same_user]
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        keep = lo != hi
        item_item = np.unique(np.stack([lo[keep], hi[keep]], 1), axis=0).reshape(-1, 2)
    return ItemGraph(n_items=len(splits.item_ids), attributes=names, item_attr=item_attr, item_item=item_item)


def normalized_adjacency(graph: ItemGraph) -> torch.Tensor:
    """Â = D^-1/2 A D^-1/2 as a sparse (n_nodes, n_nodes) tensor (symmetric; isolated nodes: empty rows)."""
    e = graph.edges()
    src = np.concatenate([e[:, 0], e[:, 1]])
    dst = np.concatenate([e[:, 1], e[:, 0]])
    deg = np.bincount(src, minlength=graph.n_nodes).astype(np.float64)
    w = 1.0 / np.sqrt(deg[src] * deg[dst]) if len(src) else np.zeros(0)
    return torch.sparse_coo_tensor(
        torch.from_numpy(np.stack([src, dst])),
        torch.from_numpy(w).float(),
        (graph.n_nodes, graph.n_nodes),
        check_invariants=False,
    ).coalesce()


def propagate(adj: torch.Tensor, x0: torch.Tensor, layers: int) -> torch.Tensor:
    """LightGCN: mean of e^(0..K), e^(k+1) = Â e^(k). adj (n, n) sparse, x0 (n, d) -> (n, d)."""
    out, x = x0, x0
    for _ in range(layers):
        x = torch.sparse.mm(adj, x)
        out = out + x
    return out / (layers + 1)


def graph_item_vectors(graph: ItemGraph, item_x0: np.ndarray | torch.Tensor, layers: int = 2) -> np.ndarray:
    """(n_items, d) graph vectors: LightGCN over the graph from the items' vectors (attribute nodes start at
    zero). Items without edges get zeros, so a model sees "no graph information" rather than a copy of text."""
    x_items = torch.as_tensor(np.asarray(item_x0, dtype=np.float32))
    x0 = torch.cat([x_items, torch.zeros(len(graph.attributes), x_items.shape[1])])
    out = propagate(normalized_adjacency(graph), x0, layers)[: graph.n_items]
    out[torch.from_numpy(graph.degree()[: graph.n_items] == 0)] = 0.0
    return out.numpy()
