"""A new prior is one file: tests/constant_prior.py (a constant per item, named in config as "module:Class") is
fitted, weighted and saved by the same code as the built-in priors, and applied alike by `crossrec evaluate`'s
retriever, the in-process Recommender and Serve over HTTP. Real MiniLM vectors, real Ray Serve on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import urllib.request

import numpy as np
import pytest
from conftest import fit_priors, save_with_priors, untrained_cold_user_setup

PLUGIN = "tests.constant_prior:ConstantPrior"
WEIGHT = 0.5


@pytest.fixture(scope="module")
def bundle(vector_cache, cross_fk, tmp_path_factory):
    """An untrained text model with the popularity prior (chosen on validation) and the toy prior (weight fixed:
    an untrained model's validation would not need it)."""
    from crossrec.bundle import load_bundle
    from crossrec.config import TrainConfig

    data, sp, cfg, model, item_vecs, make = untrained_cold_user_setup(cross_fk)
    cfg = TrainConfig(**{**vars(cfg), "priors": ["popularity", PLUGIN]})
    retriever = make()
    fit_priors(retriever, ["popularity", PLUGIN])
    toy = retriever.priors[1]
    assert type(toy).__name__ == "ConstantPrior" and toy.spec == PLUGIN
    toy.weight = {d: WEIGHT for d in sp.domains}
    path = save_with_priors(tmp_path_factory.mktemp("plugin") / "b", data, sp, cfg, model, item_vecs, retriever)
    return load_bundle(path), data, sp


def test_evaluation_and_the_recommender_apply_the_plugin_prior(bundle):
    from crossrec.inference import bundle_retriever
    from crossrec.recommender import HistoryItem, Recommender
    from tests.constant_prior import boosted

    b, data, sp = bundle
    assert b.meta["priors"] == ["popularity", PLUGIN] and b.meta["constant_prior"]["weights"]["kitchen"] == WEIGHT
    retriever = bundle_retriever(b, data, sp)
    assert [p.spec for p in retriever.priors] == ["popularity", PLUGIN]
    batch = sp.batch(sp.targets("test", "kitchen")[:4], "kitchen")
    with_toy = retriever(batch)
    retriever.priors = retriever.priors[:1]
    without = retriever(batch)
    off, n = sp.offset["kitchen"], sp.n_items["kitchen"]
    want = WEIGHT * np.array([boosted(str(i)) for i in sp.item_ids[off : off + n]], np.float32)
    assert want.any() and not want.all()
    np.testing.assert_allclose(with_toy - without, np.broadcast_to(want, with_toy.shape), atol=1e-5)
    rec = Recommender(b)
    for r, h in enumerate(batch.histories):
        hist = [HistoryItem(sp.domains[sp.item_domain[i]], str(sp.item_ids[i])) for i in h]
        got = rec.recommend(hist, "kitchen", k=10, exclude_seen=False)
        top = np.argsort(-with_toy[r], kind="stable")[:10]
        assert [g.item_id for g in got] == sp.item_ids[off + top].tolist()
        np.testing.assert_allclose([g.score for g in got], with_toy[r, top], atol=1e-5)


def test_serve_applies_the_plugin_prior_over_http(bundle, ray_cluster, tmp_path):
    from ray import serve

    from crossrec.inference import bundle_retriever
    from serving.app import deploy

    b, data, sp = bundle
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = deploy(b.path, port=port, state_dir=tmp_path / "state")
    try:
        retriever = bundle_retriever(b, data, sp)
        off = sp.offset["kitchen"]
        batch = sp.batch(sp.targets("test", "kitchen")[:3], "kitchen")
        full = retriever(batch)
        for r, h in enumerate(batch.histories):
            body = {
                "history": [{"item_id": str(sp.item_ids[i]), "domain": sp.domains[sp.item_domain[i]]} for i in h],
                "domain": "kitchen",
                "k": 10,
                "exclude_seen": False,
            }
            req = urllib.request.Request(
                url + "/v1/recommend", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=60) as resp:
                got = json.loads(resp.read())["items"]
            top = np.argsort(-full[r], kind="stable")[:10]
            assert [g["item_id"] for g in got] == sp.item_ids[off + top].tolist()
            np.testing.assert_allclose([g["score"] for g in got], full[r, top], atol=1e-4)
    finally:
        serve.shutdown()
