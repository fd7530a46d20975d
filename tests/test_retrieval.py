"""The retrieval core (crossrec.retrieval, crossrec.priors) answers what the code before it answered: a small bundle
with both priors (tests/data/golden, made by its make.py at commit 30d5e84, before the core existed) scores the
food-kitchen slice alike in evaluation (top-10 ids and scores, metrics), in `Recommender.recommend` (lists, scores,
explanations) and after zero-shot calibration. Real MiniLM vectors, no Ray."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).parent / "data" / "golden"


@pytest.fixture(scope="module")
def golden(tmp_path_factory, cross_fk):
    from crossrec.bundle import load_bundle
    from crossrec.dataset import Dataset
    from crossrec.splits import Splits

    bundle = tmp_path_factory.mktemp("golden") / "bundle"
    shutil.copytree(GOLDEN / "bundle", bundle)
    data = Dataset.load(cross_fk)
    return load_bundle(bundle), data, Splits(data), json.loads((GOLDEN / "expected.json").read_text())


def test_evaluation_scores_and_metrics_are_unchanged(golden):
    from crossrec.evaluation import evaluate, top_k_lists
    from crossrec.inference import bundle_retriever

    bundle, data, sp, want = golden
    assert bundle.version == want["bundle_version"]
    retriever = bundle_retriever(bundle, data, sp)
    assert [p.name for p in retriever.priors] == ["popularity", "transition"]
    for split in ("valid", "test"):
        res = evaluate(sp, retriever, split=split)
        for d, m in want["evaluate"][split]["metrics"].items():
            assert res.metrics[d] == pytest.approx(m, abs=1e-9), (split, d)
        for d in sp.domains:
            top, _ = top_k_lists(sp, retriever, d, split=split, k=10)
            full = retriever(sp.batch(sp.targets(split, d), d))
            got_ids = [[str(sp.item_ids[sp.offset[d] + c]) for c in t] for t in top.tolist()]
            assert got_ids == want["evaluate"][split][d]["top10"], (split, d)
            got = [[full[r, c] for c in t] for r, t in enumerate(top.tolist())]
            np.testing.assert_allclose(got, want["evaluate"][split][d]["scores"], atol=2e-5)


def test_recommender_lists_and_explanations_are_unchanged(golden):
    from crossrec.recommender import HistoryItem, Recommender

    bundle, *_, want = golden
    rec = Recommender(bundle)
    for case in want["recommend"]:
        hist = [HistoryItem(d, i) for d, i in case["history"]]
        got = rec.recommend(hist, case["domain"], k=10, explain=True)
        assert [g.item_id for g in got] == case["items"]
        np.testing.assert_allclose([g.score for g in got], case["scores"], atol=2e-5)
        for g, reasons in zip(got, case["reasons"]):
            assert [r["item_id"] for r in g.reasons] == [r["item_id"] for r in reasons]
            np.testing.assert_allclose([r["weight"] for r in g.reasons], [r["weight"] for r in reasons], atol=2e-4)


def test_zero_shot_calibration_is_unchanged(golden):
    from crossrec.bundle import load_bundle
    from crossrec.evaluation import evaluate
    from crossrec.inference import bundle_retriever, calibrate_zero_shot

    bundle, data, sp, want = golden
    retriever = bundle_retriever(load_bundle(bundle.path), data, sp)
    params = calibrate_zero_shot(retriever, ["kitchen"])
    assert {k: str(v) for k, v in params.items()} == want["zero_shot"]["params"]
    res = evaluate(sp, retriever, split="test", domains=["kitchen"])
    assert res.metrics["kitchen"] == pytest.approx(want["zero_shot"]["metrics"]["kitchen"], abs=1e-9)
