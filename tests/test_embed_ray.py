"""Catalog embedding as a Ray Data job (trainers/embed.py) on real item texts with real minilm weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pytest

import crossrec.embedding
import trainers.embed
from crossrec.backbones import load_backbone
from crossrec.config import TrainConfig
from crossrec.dataset import Dataset, prepare
from crossrec.embedding import catalog_texts, template_of
from crossrec.splits import Splits
from trainers.embed import embed_catalog, embed_texts_ray


@pytest.fixture(scope="module")
def small_catalog(art_office_csv, tmp_path_factory) -> Path:
    """A prepared dataset of 200 real items (100 per domain) of the art-office slice and their interactions."""
    items = pacsv.read_csv(art_office_csv / "items.csv")
    keep = [pc.equal(items["domain"], d) for d in ("arts", "office")]
    items = pa.concat_tables([items.filter(k).slice(0, 100) for k in keep])
    inter = pacsv.read_csv(art_office_csv / "interactions.csv")
    inter = inter.filter(pc.is_in(inter["item_id"], items["item_id"]))
    src = tmp_path_factory.mktemp("small-src")
    pacsv.write_csv(items, src / "items.csv")
    pacsv.write_csv(inter, src / "interactions.csv")
    out = tmp_path_factory.mktemp("small") / "data"
    prepare([src], out, progress=False)
    return out


def test_ray_data_matches_in_process_and_caches(ray_cluster, small_catalog, monkeypatch, tmp_path):
    monkeypatch.setattr(crossrec.embedding, "cache_dir", lambda: tmp_path)
    data = Dataset.load(small_catalog)
    splits = Splits(data)
    cfg = TrainConfig()  # minilm, item titles + attributes, 64 tokens
    path = embed_catalog(data, splits, cfg, progress=False)
    assert path.is_file() and path.parent == tmp_path / "vectors"
    vectors = np.load(path)

    texts = catalog_texts(data.items.take(splits.item_row), template_of(cfg.text_template, cfg.max_tokens))
    assert len(texts) == 200
    expected = load_backbone(cfg.backbone).encode(texts, max_length=cfg.max_tokens)  # global item order
    assert vectors.shape == expected.shape == (200, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, expected, atol=1e-5)

    # Same cache key as the in-process path, and a second call starts no work at all.
    from crossrec.embedding import vector_cache_path

    assert (
        vector_cache_path(splits.item_ids.tolist(), texts, cfg.backbone, template_of(cfg.text_template, cfg.max_tokens))
        == path
    )

    def no_work(*args, **kwargs):
        raise AssertionError("cache hit expected, but the Ray Data job ran")

    monkeypatch.setattr(trainers.embed, "embed_texts_ray", no_work)
    mtime = path.stat().st_mtime_ns
    assert embed_catalog(data, splits, cfg, progress=False) == path
    assert path.stat().st_mtime_ns == mtime


def test_embed_texts_ray_edges(ray_cluster):
    assert embed_texts_ray([], "minilm", 64).shape == (0, 384)
    with pytest.raises(ValueError, match="`batch_size` must be >= 1, got 0"):
        embed_texts_ray(["a"], "minilm", 64, batch_size=0)
    with pytest.raises(ValueError, match="`actors` must be >= 1, got 0"):
        embed_texts_ray(["a"], "minilm", 64, actors=0)
    # More CPUs than the 2-CPU test cluster has: refused at once instead of waiting forever.
    with pytest.raises(ValueError, match="3 actors x 1 CPUs need 3 CPUs, the cluster has 2"):
        embed_texts_ray(["a"], "minilm", 64, actors=3)
    with pytest.raises(ValueError, match="2 actors x 1.5 CPUs need 3 CPUs, the cluster has 2"):
        embed_texts_ray(["a"], "minilm", 64, actors=2, cpus_per_actor=1.5)
