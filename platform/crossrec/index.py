"""Approximate nearest-neighbour index of a domain's item vectors (faiss IVF-Flat, inner product).

Chosen by a measured comparison of faiss-cpu, hnswlib and usearch on catalogs drawn around real MiniLM item vectors
(docs/ANN.md): IVF-Flat was the only one to reach recall@10 >= 0.95 at 300k and 1M items with sub-millisecond
median search on one thread, and faiss maps a saved IVF index's inverted lists from disk (IO_FLAG_MMAP), so Serve
replicas on one machine share its pages. The lists hold the raw vectors (no quantisation), so a candidate's score is
exact; retrieval then rescores its candidates with the priors (crossrec.retrieval.Retriever.candidate_rows).

nlist = 4 sqrt(n) coarse cells (faiss's guideline is 4-16 sqrt(n)), trained on at most 40 vectors per cell; a query
visits `nprobe` cells. An index never changes after it is built: items added online are scored exactly beside it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["IvfIndex", "IndexSpec", "nlist_for", "tune_nprobe", "INDEX_KINDS", "NPROBES"]

NPROBES = (8, 16, 32, 64, 128)  # tried in order at export until candidates hold the exact top-10 often enough

INDEX_KINDS = ("auto", "exact", "ann")


def _faiss():
    # OpenMP threads that spin while they wait starve everything else on a busy machine (faiss builds ran ~25x
    # slower here without it, docs/ANN.md); read when OpenMP starts, so before faiss loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import faiss
    except ImportError as e:  # a dependency of crossrec: only a broken install lacks it
        raise ImportError("approximate retrieval needs faiss-cpu: pip install faiss-cpu==1.15.1") from e
    return faiss


def nlist_for(n: int) -> int:
    """Coarse cells for n vectors: 4 sqrt(n), at least 1 and at most n / 39 (faiss wants ~39 training points per
    cell), so tiny catalogs get one cell."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


@dataclass
class IndexSpec:
    """How an index was built and is searched (bundle.json "retrieval"."index"[DOMAIN])."""

    kind: str  # "faiss-ivfflat"
    n: int
    dim: int
    nlist: int
    nprobe: int
    file: str  # relative to the bundle


class IvfIndex:
    """faiss IndexIVFFlat over (n, V) float32 vectors, inner product; rows are the vectors' order."""

    def __init__(self, index, nprobe: int):
        self.index = index
        self.nprobe = nprobe

    @property
    def nprobe(self) -> int:
        """Cells a query visits, as asked (the search visits at most nlist)."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._nprobe = value
        self.index.nprobe = min(value, int(self.index.nlist))

    @classmethod
    def build(cls, vectors: np.ndarray, nprobe: int, nlist: int | None = None, seed: int = 0) -> IvfIndex:
        faiss = _faiss()
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        n, dim = x.shape
        nlist = nlist or nlist_for(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = x if n <= 40 * nlist else x[np.sort(rng.choice(n, 40 * nlist, replace=False))]
        index.train(sample)
        index.add(x)
        return cls(index, nprobe)

    @property
    def nlist(self) -> int:
        return int(self.index.nlist)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, query: np.ndarray, k: int) -> np.ndarray:
        """(<= k,) rows with the largest inner product with `query` (V,) among the visited cells. One thread: a
        request is one query, and a replica's CPUs serve other requests."""
        faiss = _faiss()
        faiss.omp_set_num_threads(1)
        _, rows = self.index.search(np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1), k)
        rows = rows[0]
        return rows[rows >= 0].astype(np.int64)

    def save(self, path: str | Path) -> None:
        _faiss().write_index(self.index, str(path))

    @classmethod
    def load(cls, path: str | Path, nprobe: int, mmap: bool = True) -> IvfIndex:
        """A saved index; with `mmap` its inverted lists stay on disk, mapped (the pages are shared between
        processes that load the same file)."""
        faiss = _faiss()
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        return cls(faiss.read_index(str(path), flags), nprobe)


def tune_nprobe(
    index: IvfIndex,
    vectors: np.ndarray,
    queries: np.ndarray,
    candidates: int,
    k: int = 10,
    target: float = 0.95,
) -> tuple[int, float]:
    """The smallest nprobe of NPROBES whose `candidates` rows hold at least `target` of each query's exact top-k by
    inner product (mean over `queries`, e.g. validation users), and that recall; the largest when none reaches it.
    Sets it on `index`."""
    if not len(queries):
        return index.nprobe, float("nan")
    x = np.asarray(vectors, dtype=np.float32)
    q = np.asarray(queries, dtype=np.float32)
    kk = min(k, len(x))
    exact = np.argpartition(-(q @ x.T), kk - 1, axis=1)[:, :kk]  # (Q, k)
    recall = 0.0
    for nprobe in NPROBES:
        index.nprobe = nprobe
        hits = [len(set(index.search(qi, candidates).tolist()) & set(e.tolist())) / kk for qi, e in zip(q, exact)]
        recall = float(np.mean(hits))
        if recall >= target or nprobe >= index.nlist:
            break
    return index.nprobe, recall
