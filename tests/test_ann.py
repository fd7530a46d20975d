"""Approximate retrieval (crossrec.index, Retriever.candidate_rows) on the golden bundle (tests/data/golden): with an
index that visits every cell it answers exactly what the exact scan answers (lists, scores, reasons); the priors'
own top items and items added online reach answers whatever the index proposes; a bundle holding indexes loads
them memory-mapped and Serve answers over HTTP what the in-process Recommender answers. Real faiss, real Serve."""

from __future__ import annotations

import json
import shutil
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).parent / "data" / "golden"


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    from crossrec.bundle import load_bundle

    path = tmp_path_factory.mktemp("ann") / "bundle"
    shutil.copytree(GOLDEN / "bundle", path)
    return load_bundle(path), json.loads((GOLDEN / "expected.json").read_text())


def _exhaustive(rec):
    """Indexes that visit every cell: exact-equivalent."""
    from crossrec.index import nlist_for

    n = max(nlist_for(rec.retriever.catalog.n_items[d]) for d in rec.domains)
    rec.retriever.build_indexes(nprobe=n)
    return rec


def test_an_exhaustive_index_answers_exactly_what_the_scan_answers(golden):
    from crossrec.recommender import HistoryItem, Recommender

    bundle, want = golden
    exact, ann = Recommender(bundle, index="exact"), _exhaustive(Recommender(bundle, index="exact"))
    assert set(ann.retriever.index) == {"food", "kitchen"} and not exact.retriever.index
    for case in want["recommend"]:
        hist = [HistoryItem(d, i) for d, i in case["history"]]
        a = exact.recommend(hist, case["domain"], k=10, explain=True)
        b = ann.recommend(hist, case["domain"], k=10, explain=True)
        assert [x.item_id for x in b] == [x.item_id for x in a] == case["items"]
        np.testing.assert_allclose([x.score for x in b], [x.score for x in a], atol=1e-5)
        for x, y in zip(a, b):
            assert [r["item_id"] for r in x.reasons] == [r["item_id"] for r in y.reasons]


def test_priors_and_online_items_reach_answers_whatever_the_index_proposes(golden):
    import torch

    from crossrec.recommender import HistoryItem, Recommender

    bundle, want = golden
    case = next(c for c in want["recommend"] if c["domain"] == "food")
    hist = [HistoryItem(d, i) for d, i in case["history"]]
    exact, ann = Recommender(bundle, index="exact"), _exhaustive(Recommender(bundle, index="exact"))
    ann.retriever.ann_candidates = 1  # the index proposes one item; the priors propose the rest
    glob = ann._history(hist)[1]
    user = ann._users(ann._history(hist)[0], hist, "food", [None])[0]
    cand = set(ann.retriever.candidate_rows("food", user, glob).tolist())
    pop, co = ann.retriever.priors
    assert set(pop.top_rows("food", glob, ann.retriever.prior_candidates).tolist()) <= cand
    assert set(co.top_rows("food", glob, ann.retriever.prior_candidates).tolist()) <= cand
    # An item added online is no part of the index, yet it is scored (exactly, beside the index) and can top the list.
    vec = ann.vecs["food"][0].clone() * 10
    for rec in (exact, ann):
        rec.upsert("food", "online-1", "an item added online", vec)
    a, b = exact.recommend(hist, "food", k=10), ann.recommend(hist, "food", k=10)
    assert a[0].item_id == b[0].item_id == "online-1"
    assert len(ann.retriever.index["food"]) == ann.retriever.catalog.n_items["food"]  # the index is unchanged
    assert torch.equal(ann.retriever.rows("food")[-1], vec)
    # When the priors decide the list, the answer is the exact one although the index proposed a single item.
    for rec in (exact, ann):
        for p in rec.retriever.priors:
            p.weight["food"] = p.weight["food"] * 1000
    a, b = exact.recommend(hist, "food", k=10), ann.recommend(hist, "food", k=10)
    assert [x.item_id for x in b] == [x.item_id for x in a]


def test_a_bundle_with_indexes_loads_them_mapped_and_serve_answers_as_in_process(golden, ray_cluster, tmp_path):
    from ray import serve

    from crossrec.bundle import BundleContents, load_bundle, save_bundle
    from crossrec.recommender import HistoryItem, Recommender
    from crossrec.retrieval import Retriever
    from serving.app import deploy

    bundle, want = golden
    src = Retriever.from_bundle(bundle, "exact")
    src.build_indexes(nprobe=4)
    items = {d: (src.ids(d), bundle.items[d].column("title").to_pylist(), src.rows(d).numpy()) for d in src.domains}
    contents = BundleContents(
        bundle.model,
        bundle.config,
        bundle.domains,
        items,
        {},
        bundle.meta["data_hash"],
        in_dim=384,
        priors=src.priors,
        indexes=src.index,
    )
    path = save_bundle(tmp_path / "indexed", contents)
    indexed = load_bundle(path, verify=True)  # the index files are hashed with the rest
    assert set(indexed.meta["retrieval"]["index"]) == {"food", "kitchen"}
    rec = Recommender(indexed)
    assert {d: ix.nprobe for d, ix in rec.retriever.index.items()} == {"food": 4, "kitchen": 4}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = deploy(path, port=port, state_dir=tmp_path / "state")
    try:
        for case in want["recommend"][:4]:
            hist = [HistoryItem(d, i) for d, i in case["history"]]
            local = rec.recommend(hist, case["domain"], k=10)
            body = {
                "history": [{"item_id": i, "domain": d} for d, i in case["history"]],
                "domain": case["domain"],
                "k": 10,
            }
            req = urllib.request.Request(
                url + "/v1/recommend", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=60) as resp:
                got = json.loads(resp.read())["items"]
            assert [g["item_id"] for g in got] == [x.item_id for x in local]
            np.testing.assert_allclose([g["score"] for g in got], [x.score for x in local], atol=1e-4)
    finally:
        serve.shutdown()


def test_export_builds_and_tunes_the_index_when_asked(ray_cluster, vector_cache, tiny_fk, tmp_path):
    """`retrieval.index=ann`: training's export builds every domain's index over the rows the bundle stores, tunes
    its nprobe on validation users, hashes its file with the bundle's, and the Recommender searches it."""
    from crossrec.bundle import load_bundle
    from crossrec.config import RunSettings, load_config
    from crossrec.recommender import HistoryItem, Recommender
    from trainers.pipeline import train_bundle

    fast = ["epochs=1", "dim=32", "layers=1", "n_negatives=32", "batch_size=32", "valid_max_targets=0", "patience=0"]
    cfg = load_config(overrides=[*fast, "retrieval.index=ann"])
    meta = train_bundle(tiny_fk, tmp_path / "b", cfg, RunSettings(workers=1, name="ann"), progress=False)
    specs = meta["retrieval"]["index"]
    assert set(specs) == {"food", "kitchen"} and all(s["nprobe"] in (8, 16, 32, 64, 128) for s in specs.values())
    bundle = load_bundle(tmp_path / "b", verify=True)
    rec = Recommender(bundle)
    assert set(rec.retriever.index) == {"food", "kitchen"}
    item = rec.ids["food"][0]
    got = rec.recommend([HistoryItem("food", item)], "kitchen", k=5)
    exact = Recommender(bundle, index="exact").recommend([HistoryItem("food", item)], "kitchen", k=5)
    assert len(got) == 5 and got[0].item_id == exact[0].item_id
