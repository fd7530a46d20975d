"""Catalog text -> backbone vectors, in-process, with an on-disk cache keyed by what determines the vectors.

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

__all__ = ["template_of", "catalog_texts", "vector_cache_path", "load_cached_vectors", "save_cached_vectors",
           "embed_texts"]


def template_of(text_template: str, max_tokens: int) -> TextTemplate:
    return TextTemplate(template=text_template or "{title}", max_tokens=max_tokens)


def catalog_texts(items: pa.Table, template: TextTemplate) -> list[str]:
    """One text per item row (truncation to `template.max_tokens` happens at tokenization)."""
    return render_items(items, template)


def _key(item_ids: list[str], texts_hash: str, backbone: str, template: TextTemplate) -> str:
    spec = resolve_backbone(backbone)
    h = hashlib.sha256()
    h.update(json.dumps({"backbone": spec.name, "template": template.template, "extras": template.extras,
                         "max_tokens": template.max_tokens, "texts": texts_hash}).encode())
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
    np.save(tmp, vectors.astype(np.float32))
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def embed_texts(texts: list[str], backbone: str, max_tokens: int, batch_size: int = 64,
                progress: bool = False) -> np.ndarray:
    """In-process encoding with the frozen backbone: (N, backbone dim) float32."""
    from crossrec.backbones import load_backbone

    bb = load_backbone(backbone)
    return bb.encode(texts, batch_size=batch_size, max_length=max_tokens, progress=progress)
