"""The popularity prior (crossrec.priors.popularity) on a tiny real slice: gamma is chosen on validation targets, moves
the ranking towards popular items where popularity helps, is stored in the bundle and applied alike by the
evaluation scorer and the serving Recommender; older bundles load without it. Real MiniLM vectors, no Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import fit_priors, fk_items, prepare_constructed, save_with_priors, untrained_cold_user_setup

from crossrec.baselines import Popularity
from crossrec.evaluation import evaluate, top_k_lists


@pytest.fixture(scope="module")
def hits_fk(tmp_path_factory, food_kitchen_csv):
    """A slice where popularity clearly helps, constructed: 60 real items per domain of the food-kitchen slice
    (their real titles), 120 users with 4 interactions in one domain, then 4 in the other; each interaction is
    one of the domain's 5 "hits" with chance 0.6, else any of its items (seeded)."""
    items = fk_items(food_kitchen_csv, 60)
    rng = np.random.default_rng(0)
    inter = []
    for u in range(120):
        order = ("food", "kitchen") if u % 2 else ("kitchen", "food")
        t = 0
        for d in order:
            for _ in range(4):
                k = int(rng.integers(5)) if rng.random() < 0.6 else int(rng.integers(len(items[d])))
                inter.append({"user_id": f"u{u:03d}", "item_id": items[d][k]["item_id"], "domain": d, "timestamp": t})
                t += 1
    return prepare_constructed(tmp_path_factory.mktemp("hits"), items["food"] + items["kitchen"], inter)


@pytest.fixture(scope="module")
def setup(vector_cache, hits_fk):
    """Cold-user splits of the slice, and an untrained text model (it starts as textknn: adaptor on the catalog's
    principal components, the text prior at its initial weight)."""
    return untrained_cold_user_setup(hits_fk)


def _valid_ndcg(sp, scorer, domain):
    return evaluate(sp, scorer, "valid", ks=(10,), domains=[domain]).metrics[domain]["ndcg@10"]


def test_gamma_is_chosen_on_validation_and_moves_the_ranking_to_popular_items(setup):
    data, sp, cfg, model, item_vecs, make = setup
    scorer = make()
    # The premise: for users new to food, food's popularity ranks its validation targets better than the model.
    assert _valid_ndcg(sp, Popularity(sp), "food") > _valid_ndcg(sp, scorer, "food")
    before, _ = top_k_lists(sp, scorer, "food", "valid")
    choices = fit_priors(scorer, ["popularity"])["popularity"]
    food = choices["food"]
    assert food.weight > 0 and food.valid_ndcg10 > food.base_ndcg10
    assert scorer.priors[0].weight["food"] == food.weight
    # The choice is what the evaluation loop measures on VALIDATION targets, with and without the prior.
    assert _valid_ndcg(sp, scorer, "food") == pytest.approx(food.valid_ndcg10)
    without = make()
    assert _valid_ndcg(sp, without, "food") == pytest.approx(food.base_ndcg10)
    # The ranked lists change, towards items with more training interactions.
    after, _ = top_k_lists(sp, scorer, "food", "valid")
    assert (after != before).any()
    counts = sp.train_count[sp.offset["food"] :]
    assert counts[after[after >= 0]].mean() > counts[before[before >= 0]].mean()
    # A domain where no grid point beats gamma 0 on validation keeps the model's scores exactly.
    for d, ch in choices.items():
        if ch.weight == 0:
            assert scorer.prior_terms(d, []) is None


def _save(setup, tmp_path, with_prior: bool = True):
    data, sp, cfg, model, item_vecs, make = setup
    scorer = make()
    if with_prior:
        fit_priors(scorer, ["popularity"])
    return save_with_priors(tmp_path / ("with" if with_prior else "without"), data, sp, cfg, model, item_vecs, scorer)


def test_serving_and_evaluation_score_alike_with_the_prior(setup, tmp_path):
    from crossrec.bundle import load_bundle
    from crossrec.inference import bundle_retriever
    from crossrec.recommender import HistoryItem, Recommender

    data, sp, *_ = setup
    bundle = load_bundle(_save(setup, tmp_path))
    pop_meta = bundle.meta["pop_prior"]
    assert pop_meta["weights"]["food"] > 0
    scorer = bundle_retriever(bundle, data, sp)
    rec = Recommender(bundle)
    off, n = sp.offset["food"], sp.n_items["food"]
    rows = sp.targets("valid", "food")[:5]
    batch = sp.batch(rows, "food")
    full = scorer(batch)  # (B, n) what `crossrec evaluate` ranks
    for r, h in enumerate(batch.histories):
        hist = [HistoryItem(domain=sp.domains[sp.item_domain[i]], item_id=str(sp.item_ids[i])) for i in h]
        got = rec.recommend(hist, "food", k=10, exclude_seen=False)
        top = np.argsort(-full[r], kind="stable")[:10]
        assert [g.item_id for g in got] == sp.item_ids[off + top].tolist()
        np.testing.assert_allclose([g.score for g in got], full[r, top], rtol=1e-5, atol=1e-5)
    # An item added online has the p of zero interactions, as the catalog's never-seen items had.
    hist = [HistoryItem(domain="kitchen", item_id=str(sp.item_ids[sp.offset["kitchen"]]))]
    vec = rec.vecs["food"][0].clone()
    rec.upsert("food", "new-item", "a new item", vec)
    got = {g.item_id: g.score for g in rec.recommend(hist, "food", k=n + 1, exclude_seen=False)}
    p0 = float(rec.retriever.priors[0].term("food", [])[0, 0])
    assert got["new-item"] == pytest.approx(
        got[rec.ids["food"][0]] + pop_meta["weights"]["food"] * (pop_meta["cold"]["food"] - p0), abs=1e-4
    )
    # Explanations are score drops: the prior (the same with or without a history entry) cancels out.
    plain = Recommender(load_bundle(_save(setup, tmp_path, with_prior=False)))  # same model, no prior
    h = [HistoryItem(domain=sp.domains[sp.item_domain[i]], item_id=str(sp.item_ids[i])) for i in batch.histories[0]]
    assert len(h) > 1
    cands = sp.item_ids[off : off + 5].tolist()
    a = {x.item_id: x.reasons for x in rec.recommend(h, "food", k=5, explain=True, candidates=cands)}
    b = {x.item_id: x.reasons for x in plain.recommend(h, "food", k=5, explain=True, candidates=cands)}
    assert set(a) == set(b) == set(cands)
    for i in cands:
        assert [(r["item_id"], r["domain"]) for r in a[i]] == [(r["item_id"], r["domain"]) for r in b[i]]
        np.testing.assert_allclose([r["weight"] for r in a[i]], [r["weight"] for r in b[i]], atol=2e-4)


def test_a_bundle_without_the_prior_loads_with_gamma_zero(setup, tmp_path):
    from crossrec.bundle import load_bundle
    from crossrec.inference import bundle_retriever
    from crossrec.recommender import HistoryItem, Recommender

    data, sp, *_ = setup
    path = _save(setup, tmp_path, with_prior=False)
    meta = json.loads((path / "bundle.json").read_text())
    del meta["config"]["priors"], meta["priors"]  # as written before the priors existed (no key, no `pop` column)
    (path / "bundle.json").write_text(json.dumps(meta))
    bundle = load_bundle(path)
    assert "pop_prior" not in bundle.meta and "pop" not in bundle.items["food"].column_names
    scorer = bundle_retriever(bundle, data, sp)
    assert scorer.priors == [] and scorer.prior_terms("food", []) is None
    batch = sp.batch(sp.targets("valid", "food")[:1], "food")
    users = scorer.user_vectors(batch.histories, "food")
    off, n = sp.offset["food"], sp.n_items["food"]
    np.testing.assert_allclose(scorer(batch), (users @ scorer.vecs[off : off + n].T).numpy(), rtol=1e-6)
    rec = Recommender(bundle)
    hist = [HistoryItem(domain=sp.domains[sp.item_domain[i]], item_id=str(sp.item_ids[i])) for i in batch.histories[0]]
    got = rec.recommend(hist, "food", k=3, exclude_seen=False)
    np.testing.assert_allclose([g.score for g in got], np.sort(scorer(batch)[0])[::-1][:3], rtol=1e-5, atol=1e-5)


def test_zero_shot_calibration_chooses_gamma_on_the_new_domains_validation(setup):
    """calibrate_zero_shot chooses gamma on the calibrated domain's validation targets, with that domain's
    training-window popularity from the evaluated dataset (a bundle without the popularity prior keeps gamma 0)."""
    import copy
    import dataclasses

    from crossrec.inference import calibrate_zero_shot
    from crossrec.retrieval import Retriever

    data, sp, cfg, model, item_vecs, _ = setup

    def zero_shot(pop_prior: bool):
        m = copy.deepcopy(model)
        m.cfg = dataclasses.replace(m.cfg, priors=["popularity"] if pop_prior else [])
        s = Retriever(m, sp, item_vecs, sp.domains)
        return s, calibrate_zero_shot(s, ["food"])

    with_prior, params = zero_shot(True)
    without, plain = zero_shot(False)
    assert "pop_weight[food]" in params and "pop_weight[food]" not in plain
    assert params["pop_weight[food]"] > 0 and with_prior.prior_terms("food", []) is not None
    assert _valid_ndcg(sp, with_prior, "food") > _valid_ndcg(sp, without, "food")
