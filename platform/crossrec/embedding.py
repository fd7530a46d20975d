"""Catalog text -> backbone vectors, in-process, with an on-disk cache keyed by what determines the vectors.

Two levels: a content-addressed store of one vector per (backbone, max_tokens, text) (`TextVectorStore`), so
pooling two datasets, adding a domain or a new day's items embeds only the texts never embedded before; and,
derived from it, one .npy per catalog in global item order (`vector_cache_path`) that training reads.
The Ray Data job (`trainers/embed.py`) computes the same vectors on a cluster and stores them in the same
cache, so whichever ran first serves the other.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from crossrec.backbones import cache_dir, resolve_backbone
from crossrec.text import TextTemplate, render_items

__all__ = [
    "template_of",
    "catalog_texts",
    "vector_cache_path",
    "load_cached_vectors",
    "save_cached_vectors",
    "embed_texts",
    "TextVectorStore",
    "cached_text_vectors",
]


def template_of(text_template: str, max_tokens: int) -> TextTemplate:
    return TextTemplate(template=text_template or "{title}", max_tokens=max_tokens)


def catalog_texts(items: pa.Table, template: TextTemplate) -> list[str]:
    """One text per item row (truncation to `template.max_tokens` happens at tokenization)."""
    return render_items(items, template)


def _key(item_ids: list[str], texts_hash: str, backbone: str, template: TextTemplate) -> str:
    spec = resolve_backbone(backbone)
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "backbone": spec.name,
                "template": template.template,
                "extras": template.extras,
                "max_tokens": template.max_tokens,
                "texts": texts_hash,
            }
        ).encode()
    )
    h.update("\x1f".join(item_ids).encode())
    return h.hexdigest()[:24]


def vector_cache_path(item_ids: list[str], texts: list[str], backbone: str, template: TextTemplate) -> Path:
    texts_hash = hashlib.sha256("\x1f".join(texts).encode()).hexdigest()
    name = resolve_backbone(backbone).name.replace("/", "_")
    return cache_dir() / "vectors" / f"{name}-{_key(item_ids, texts_hash, backbone, template)}.npy"


def load_cached_vectors(path: Path, n: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    v = np.load(path, mmap_mode=None)
    return v if v.shape[0] == n else None


def save_cached_vectors(path: Path, vectors: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}.npy")
    np.save(tmp, vectors if vectors.dtype == np.uint8 else vectors.astype(np.float32))
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def embed_texts(
    texts: list[str], backbone: str, max_tokens: int, batch_size: int = 64, progress: bool = False
) -> np.ndarray:
    """In-process encoding with the frozen backbone: (N, backbone dim) float32."""
    from crossrec.backbones import load_backbone

    bb = load_backbone(backbone)
    return bb.encode(texts, batch_size=batch_size, max_length=max_tokens, progress=progress)


class TextVectorStore:
    """Vectors of one backbone at one truncation, addressed by the text's content: key = sha256(backbone name,
    max_tokens, text)[:16]. A folder of shards, each `vecs-ID.npy` (n, D) + `keys-ID.npy` (n, 16) uint8; the keys
    file is written last (atomically), so a shard without it is ignored. Adding texts writes a new shard; nothing
    is rewritten, so concurrent writers only risk embedding a text twice."""

    def __init__(self, backbone: str, max_tokens: int, root: Path | None = None):
        self.name = resolve_backbone(backbone).name
        self.max_tokens = int(max_tokens)
        tag = hashlib.sha256(f"{self.name}\x1f{self.max_tokens}".encode()).hexdigest()[:12]
        self.folder = (root or cache_dir() / "vectors") / "by-text" / f"{self.name.replace('/', '_')[-40:]}-{tag}"

    def keys(self, texts: list[str]) -> list[bytes]:
        prefix = f"{self.name}\x1f{self.max_tokens}\x1f".encode()
        return [hashlib.sha256(prefix + t.encode()).digest()[:16] for t in texts]

    def _index(self) -> tuple[dict[bytes, tuple[int, int]], list[Path]]:
        index: dict[bytes, tuple[int, int]] = {}
        shards: list[Path] = []
        for kf in sorted(self.folder.glob("keys-*.npy")) if self.folder.is_dir() else []:
            vf = kf.with_name("vecs-" + kf.name[len("keys-") :])
            if not vf.is_file():
                continue
            keys = np.load(kf)
            shards.append(vf)
            for r, k in enumerate(keys):
                index.setdefault(k.tobytes(), (len(shards) - 1, r))
        return index, shards

    def lookup(self, texts: list[str]) -> tuple[np.ndarray | None, np.ndarray]:
        """(vectors (N, D) with the found rows filled, or None when nothing is found; bool mask of found rows)."""
        keys = self.keys(texts)
        index, shards = self._index()
        where = [index.get(k) for k in keys]
        found = np.array([w is not None for w in where], dtype=bool)
        if not found.any():
            return None, found
        out = None
        for s, vf in enumerate(shards):
            rows = [(i, w[1]) for i, w in enumerate(where) if w is not None and w[0] == s]
            if not rows:
                continue
            v = np.load(vf, mmap_mode="r")
            if out is None:
                out = np.zeros((len(texts), v.shape[1]), np.float32)
            at, src = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
            out[at] = v[src]
        return out, found

    def add(self, texts: list[str], vectors: np.ndarray) -> None:
        if not len(texts):
            return
        keys = np.frombuffer(b"".join(self.keys(texts)), dtype=np.uint8).reshape(len(texts), 16)
        sid = hashlib.sha256(keys.tobytes()).hexdigest()[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        save_cached_vectors(self.folder / f"vecs-{sid}.npy", vectors)
        save_cached_vectors(self.folder / f"keys-{sid}.npy", keys)


def cached_text_vectors(
    texts: list[str], backbone: str, max_tokens: int, embed, progress: bool = False
) -> tuple[np.ndarray, int]:
    """(N, D) vectors of `texts` from the content-addressed store; `embed(list of texts) -> (n, D)` computes the
    ones it lacks (each distinct text once), which are then stored. Returns (vectors, number of texts embedded)."""
    store = TextVectorStore(backbone, max_tokens)
    out, found = store.lookup(texts)
    missing = np.flatnonzero(~found)
    if not len(missing):  # all found (or no text at all)
        return (out if out is not None else np.zeros((0, 0), np.float32)), 0
    uniq = list(dict.fromkeys(texts[i] for i in missing))
    new = np.asarray(embed(uniq), dtype=np.float32)
    store.add(uniq, new)
    if out is None:
        out = np.zeros((len(texts), new.shape[1]), np.float32)
    row = {t: k for k, t in enumerate(uniq)}
    out[missing] = new[[row[texts[i]] for i in missing]]
    if progress:
        print(f"embedded {len(uniq)} new texts ({len(texts) - len(missing)} of {len(texts)} from the text cache)")
    return out, len(uniq)
