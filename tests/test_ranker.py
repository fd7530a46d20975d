"""The second-stage ranker: trained with real Ray Train on a tiny real bundle (MiniLM vectors, art-office slice with
attributes), re-ordering, bundle round trip, serving requests, and `crossrec evaluate` with and without it."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import _subset

from crossrec.bundle import load_bundle
from crossrec.config import RankerConfig, load_config
from crossrec.dataset import Dataset
from crossrec.graph import build_graph
from crossrec.inference import bundle_retriever
from crossrec.ranker import (
    FEATURES,
    Ranker,
    RankerNet,
    RankRequest,
    build_item_table,
    build_lists,
    candidate_lists,
    fit_standardizer,
    load_ranker,
    ranker_epoch,
    rerank_ndcg,
    save_ranker,
    table_rows_for,
)
from crossrec.splits import Splits
from crossrec_cli import main

FAST = [
    "epochs=1",
    "dim=32",
    "layers=1",
    "n_negatives=32",
    "batch_size=32",
    "valid_max_targets=0",
    "patience=0",
    "ranker.epochs=2",
    "ranker.top_n=30",
    "ranker.patience=0",
]


@pytest.fixture(scope="module")
def small_ao(tmp_path_factory, art_office_csv):
    """~80 real art-office users (items carry category/brand attributes)."""
    from crossrec.dataset import prepare

    root = tmp_path_factory.mktemp("ranker-data")
    out = root / "ao"
    prepare([_subset(art_office_csv, root / "src", 80)], out, progress=False)
    return out


@pytest.fixture(scope="module")
def ranked_bundle(ray_cluster, vector_cache, small_ao, tmp_path_factory):
    """`crossrec train` without --config (the default, `recommended`: graph + attention fusion, then the ranker),
    shortened by FAST: retriever, then ranker, both through Ray Train."""
    out = tmp_path_factory.mktemp("bundles") / "ao"
    assert (
        main(
            [
                "train",
                "--data",
                str(small_ao),
                "--out",
                str(out),
                "--workers",
                "1",
                "--quiet",
                *[x for kv in FAST for x in ("--set", kv)],
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def parts(ranked_bundle, small_ao):
    bundle = load_bundle(ranked_bundle)
    data = Dataset.load(small_ao)
    splits = Splits(data)
    retrieval = bundle_retriever(bundle, data, splits)
    items = build_item_table(splits, bundle.domains, build_graph(data, splits))
    cfg = RankerConfig(top_n=30, hidden=16)
    lists = build_lists(retrieval, splits, items, cfg, bundle.config.dim, bundle.config.max_len)
    return bundle, data, splits, retrieval, items, cfg, lists


def test_train_stores_a_ranker_in_the_bundle(ranked_bundle, capsys):
    meta = json.loads((ranked_bundle / "ranker" / "ranker.json").read_text())
    hist = meta["metrics"]["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    # Epoch 0 is the untrained ranker: exactly retrieval's order on the held-out lists.
    assert hist[0]["valid/ndcg@10"] == pytest.approx(hist[0]["valid/retrieval_ndcg@10"])
    assert meta["metrics"]["valid"]["valid/ndcg@10"] >= hist[0]["valid/retrieval_ndcg@10"]
    assert meta["features"] == list(FEATURES) and meta["domains"] == ["arts", "office"]
    assert {p.name for p in (ranked_bundle / "ranker").iterdir()} == {
        "ranker.json",
        "model.safetensors",
        "items.safetensors",
        "items.parquet",
    }
    assert load_bundle(ranked_bundle).has_ranker


def test_train_without_config_trains_the_recommended_pipeline(ranked_bundle):
    """No --config: the bundle is the built-in `recommended` (text + knowledge-graph vectors fused by attention,
    then a ranker) with the command's --set values on top, and it serves with its ranker."""
    from crossrec.config import config_to_dict
    from crossrec.recommender import Recommender

    cfg = json.loads((ranked_bundle / "bundle.json").read_text())["config"]
    assert cfg["graph"]["enabled"] and cfg["fusion"] == "attention" and cfg["ranker"]["enabled"]
    assert cfg["mode"] == "cached" and cfg["side_dims"] == [384]  # the graph block beside the text vector
    derived = ("side_dims", "text_prior_decay", "text_prior_cross")  # set by training
    expected = config_to_dict(load_config("recommended", FAST))
    assert {k: v for k, v in cfg.items() if k not in derived} == {k: v for k, v in expected.items() if k not in derived}
    assert (ranked_bundle / "ranker" / "model.safetensors").is_file()
    assert Recommender.load(load_bundle(ranked_bundle)).ranker is not None


def test_lists_hold_hard_negatives_of_validation_targets_only(parts):
    bundle, data, splits, retrieval, items, cfg, lists = parts
    n_valid = len(splits.targets("valid"))
    # Lists whose target retrieval found keep their features; the others are only counted.
    found = len(lists.label)
    assert found + int(lists.missed.sum()) == n_valid and 0 < found < n_valid
    assert lists.feats.shape == (found, 30, len(FEATURES))
    assert ((lists.label >= 0) & (lists.label < 30)).all()
    assert 0 < int(lists.holdout.sum()) + int(lists.missed[1]) < n_valid
    # Column 0 is the retrieval score, sorted: the lists are retrieval's order.
    s = lists.feats[..., 0]
    assert bool((s[:, :-1] >= s[:, 1:] - 1e-6).all())
    # The graph feature links candidates to histories through shared attribute tokens.
    assert float(lists.feats[..., FEATURES.index("graph_max")].max()) > 0
    with pytest.raises(ValueError, match="never trains on test targets"):
        build_lists(retrieval, splits, items, cfg, bundle.config.dim, bundle.config.max_len, split="test")


def test_training_steps_reorder_candidates_and_round_trip(parts, tmp_path):
    bundle, data, splits, retrieval, items, cfg, lists = parts
    torch.manual_seed(0)
    net = RankerNet(len(FEATURES), len(bundle.domains), cfg.hidden)
    fit_standardizer(net, lists)
    before = rerank_ndcg(net, lists, "train")
    assert before["ndcg"] == pytest.approx(before["retrieval_ndcg"])  # untrained = retrieval's order
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    losses = [ranker_epoch(net, opt, lists, 32, np.random.default_rng(e)) for e in range(15)]
    assert losses[-1] < losses[0]
    assert rerank_ndcg(net, lists, "train")["ndcg"] > before["ndcg"]  # it fits its training lists
    ranker = Ranker(net, items, cfg, bundle.config.dim, bundle.config.max_len)
    batch = splits.batch(splits.targets("valid", "office")[:8], "office")
    lists8, cols, _ = candidate_lists(
        retrieval, batch, table_rows_for(items, splits), ranker.domain_id("office"), 30, bundle.config.max_len
    )
    new = ranker.score_lists(lists8).numpy()
    assert (np.argsort(-new, 1, kind="stable") != np.arange(new.shape[1])).any()  # the order changed
    # Scoring some columns only (what explanations do for the k items returned) gives those columns' scores.
    picked = torch.tensor([7, 0, 3])
    np.testing.assert_allclose(ranker.score_lists(lists8, picked).numpy(), new[:, [7, 0, 3]], rtol=1e-5, atol=1e-5)
    # Round trip through a bundle folder: same scores after load.
    copy = tmp_path / "b"
    shutil.copytree(bundle.path, copy)
    save_ranker(copy, net, items, cfg, bundle.config.dim, bundle.config.max_len, {})
    again = load_ranker(load_bundle(copy))
    np.testing.assert_allclose(again.score_lists(lists8).numpy(), new, rtol=1e-5, atol=1e-5)


def test_serving_requests_match_batch_scores_and_tolerate_unknown_items(parts, ranked_bundle):
    bundle, data, splits, retrieval, items, cfg, lists = parts
    ranker = load_ranker(bundle)
    rows = table_rows_for(ranker.items, splits)
    batch = splits.batch(splits.targets("test", "arts")[:1], "arts")
    lists1, cols, _ = candidate_lists(
        retrieval, batch, rows, ranker.domain_id("arts"), ranker.cfg.top_n, ranker.max_len
    )
    h = batch.histories[0][-ranker.max_len :]
    off = splits.offset["arts"]
    req = RankRequest(
        domain="arts",
        candidates=splits.item_ids[cols[0] + off].tolist(),
        retrieval_scores=lists1.scores[0].numpy(),
        user=lists1.user[0].numpy(),
        history=[(splits.domains[splits.item_domain[i]], splits.item_ids[i]) for i in h],
        history_vectors=retrieval.vecs[h].numpy(),
        candidate_vectors=lists1.cand[0].numpy(),
    )
    np.testing.assert_allclose(ranker.score(req), ranker.score_lists(lists1)[0].numpy(), rtol=1e-5, atol=1e-5)
    # A new item (added online), a text-only history entry, an empty history, an unknown domain: scores, no error.
    req.candidates[0] = "brand-new-item"
    ranker.online_item("arts", "brand-new-item")
    req.history = [*req.history[:-1], ("arts", None)]
    assert np.isfinite(ranker.score(req)).all()
    empty = RankRequest(
        domain="toys",
        candidates=req.candidates,
        retrieval_scores=req.retrieval_scores,
        user=req.user,
        history=[],
        history_vectors=np.zeros((0, len(req.user)), np.float32),
        candidate_vectors=req.candidate_vectors,
    )
    assert ranker.score(empty).shape == (len(req.candidates),)


def test_evaluate_reports_the_pipeline_and_retrieval_alone(ranked_bundle, small_ao, tmp_path):
    js = tmp_path / "e.json"
    assert (
        main(
            [
                "evaluate",
                "--bundle",
                str(ranked_bundle),
                "--data",
                str(small_ao),
                "--baselines",
                "popularity",
                "--json",
                str(js),
                "--quiet",
            ]
        )
        == 0
    )
    res = json.loads(js.read_text())["metrics"]
    assert set(res) == {"crossrec", "crossrec-retrieval", "popularity"}
    meta = load_bundle(ranked_bundle).meta
    ranker_meta = json.loads((ranked_bundle / "ranker" / "ranker.json").read_text())["metrics"]
    for d in ("arts", "office", "all"):
        assert res["crossrec-retrieval"][d]["ndcg@10"] == pytest.approx(meta["metrics"]["test"][d]["ndcg@10"])
        assert res["crossrec"][d]["ndcg@10"] == pytest.approx(ranker_meta["test"][d]["ndcg@10"])
    # Re-ranking only permutes the top-30; ranks 31-50 stay retrieval's: recall@50 is retrieval's.
    for d in ("arts", "office", "all"):
        assert res["crossrec"][d]["recall@50"] == pytest.approx(res["crossrec-retrieval"][d]["recall@50"])


def test_ranker_config_is_validated():
    with pytest.raises(ValueError, match=r"`ranker.top_n` must be > 0, got 0"):
        load_config(overrides=["ranker.top_n=0"])
    with pytest.raises(ValueError, match=r"unknown config key `ranker.depth` \(accepted: ranker.batch_size"):
        load_config(overrides=["ranker.depth=2"])
    with pytest.raises(ValueError, match=r"`ranker.valid_fraction` must be in \(0, 1\), got 1.0"):
        load_config(overrides=["ranker.valid_fraction=1.0"])


def test_recommend_command_answers_in_the_rankers_order(parts, ranked_bundle, capsys):
    """`crossrec recommend` on a bundle with a ranker: retrieval's top-N re-ordered by the ranker, as Serve
    answers, with the ranker's scores and the history items behind each."""
    from crossrec.recommender import HistoryItem, Recommender

    bundle, data, splits, *_ = parts
    h = splits.batch(splits.targets("test", "office")[:1], "office").histories[0][-5:]
    history = [HistoryItem(domain=splits.domains[splits.item_domain[i]], item_id=splits.item_ids[i]) for i in h]
    rec = Recommender(load_bundle(ranked_bundle))
    ranker = load_ranker(bundle)
    c = rec.candidates(history, "office", ranker.cfg.top_n)
    scores = ranker.score(
        RankRequest(
            domain="office",
            candidates=c.item_ids,
            retrieval_scores=c.scores,
            user=c.user,
            history=[(x.domain, x.item_id) for x in history],
            history_vectors=c.history_vectors,
            candidate_vectors=c.candidate_vectors,
        )
    )
    expected = [c.item_ids[j] for j in np.argsort(-scores, kind="stable")[:4]]
    capsys.readouterr()
    tokens = ",".join(f"{x.domain}:{x.item_id}" for x in history)
    assert (
        main(["recommend", "--bundle", str(ranked_bundle), "--domain", "office", "--history", tokens, "--k", "4"]) == 0
    )
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln[:5].strip().rstrip(".").isdigit()]
    assert [ln[1] for ln in lines] == expected
    assert [float(ln[2]) for ln in lines] == pytest.approx(sorted(scores, reverse=True)[:4], abs=0.01)
