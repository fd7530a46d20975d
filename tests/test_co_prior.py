"""The transition prior (crossrec.priors.transition) on a tiny real slice: the transitions are counted from training rows
only (the cold-user protocol's hidden rows never count), beta is chosen on validation targets and moves the lists
to the items users went on to, the bundle stores it, the evaluation scorer and the serving Recommender score and
explain alike; older bundles load without it. Real MiniLM vectors, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fit_priors, fk_items, prepare_constructed, save_with_priors, untrained_cold_user_setup

from crossrec.evaluation import evaluate, top_k_lists

N_USERS = 160


@pytest.fixture(scope="module")
def next_fk(tmp_path_factory, food_kitchen_csv):
    """Constructed: 40 real food and 40 real kitchen items of the food-kitchen slice (real titles); each user buys
    3 food items, then 3 kitchen items, the first of which is NEXT[the last food item] (a fixed random mapping
    the item texts know nothing of), the others random (seeded). Returns (prepared dataset, NEXT as item ids)."""
    items = fk_items(food_kitchen_csv, 40)
    rng = np.random.default_rng(1)
    nxt = rng.permutation(40)
    inter = []
    for u in range(N_USERS):
        food = rng.choice(40, 3, replace=False)
        kitchen = [int(nxt[food[-1]]), *rng.choice(40, 2, replace=False).tolist()]
        seq = [("food", int(k)) for k in food] + [("kitchen", k) for k in kitchen]
        for t, (d, k) in enumerate(seq):
            inter.append({"user_id": f"u{u:03d}", "item_id": items[d][k]["item_id"], "domain": d, "timestamp": t})
    out = prepare_constructed(tmp_path_factory.mktemp("next"), items["food"] + items["kitchen"], inter)
    mapping = {items["food"][k]["item_id"]: items["kitchen"][int(nxt[k])]["item_id"] for k in range(40)}
    return out, mapping


@pytest.fixture(scope="module")
def setup(vector_cache, next_fk):
    """Cold-user splits of the slice and an untrained text model (it starts as textknn)."""
    path, mapping = next_fk
    return (*untrained_cold_user_setup(path), mapping)


def _key(sp, k):
    return (sp.domains[sp.item_domain[k]], str(sp.item_ids[k]))


def test_transitions_count_training_rows_only(setup):
    from crossrec.priors.transition import LAGS, Transitions

    data, sp, *_ = setup
    t = Transitions.from_splits(sp)
    pairs = {(_key(sp, a), _key(sp, b)): float(w) for a, b, w in zip(t.src, t.dst, t.weight)}
    # Expected, from the raw interactions: consecutive (lag 1) and next-but-one (lag 2) pairs of each user's
    # training rows; a cold user's hidden kitchen rows are neither source nor destination.
    hidden = {int(r) for r in np.flatnonzero(~sp.is_train)}
    assert hidden and all(sp.row_domain[r] == sp.domain_code["kitchen"] for r in hidden)
    want: dict = {}
    for u in range(len(sp.users)):
        rows = [r for r in range(sp.user_start[u], sp.user_start[u + 1]) if r not in hidden]
        for lag, w in enumerate(LAGS, start=1):
            for a, b in zip(rows, rows[lag:]):
                key = (_key(sp, sp.row_item[a]), _key(sp, sp.row_item[b]))
                want[key] = want.get(key, 0.0) + w
    assert pairs == pytest.approx(want)
    # Counting the hidden rows too would give other pairs: the assertion above is the one that can fail.
    everything: dict = {}
    for u in range(len(sp.users)):
        rows = list(range(sp.user_start[u], sp.user_start[u + 1]))
        for a, b in zip(rows, rows[1:]):
            key = (_key(sp, sp.row_item[a]), _key(sp, sp.row_item[b]))
            everything[key] = everything.get(key, 0.0) + 1.0
    assert any(everything.get(k, 0.0) > pairs.get(k, 0.0) + 0.25 for k in everything)


def test_beta_is_chosen_on_validation_and_moves_lists_to_what_users_went_on_to(setup):
    data, sp, cfg, model, item_vecs, make, mapping = setup
    scorer = make()
    before = evaluate(sp, scorer, "valid", ks=(10,), domains=["kitchen"]).metrics["kitchen"]["ndcg@10"]
    choices = fit_priors(scorer, ["transition"], domains=["kitchen"])["transition"]
    ch = choices["kitchen"]
    assert ch.weight > 0 and ch.valid_ndcg10 > ch.base_ndcg10 + 0.2
    assert ch.base_ndcg10 == pytest.approx(before)
    # What the evaluation loop measures with the choice installed is what the choice recorded.
    after = evaluate(sp, scorer, "valid", ks=(10,), domains=["kitchen"]).metrics["kitchen"]["ndcg@10"]
    assert after == pytest.approx(ch.valid_ndcg10)
    # Validation users' lists now start, far more often than before, with the item that follows their last food item.
    rows = sp.targets("valid", "kitchen")
    off = sp.offset["kitchen"]
    follows = [mapping[str(sp.item_ids[sp.batch(np.array([r]), "kitchen").histories[0][-1]])] for r in rows]

    def share_first(lists):
        return float(np.mean([sp.item_ids[off + top[0]] == f for top, f in zip(lists, follows)]))

    lists, _ = top_k_lists(sp, scorer, "kitchen", "valid")
    plain, _ = top_k_lists(sp, make(), "kitchen", "valid")
    assert share_first(lists) >= 0.6 and share_first(plain) < 0.2


def _save(setup, tmp_path, with_prior: bool = True):
    data, sp, cfg, model, item_vecs, make, _ = setup
    scorer = make()
    fit_priors(scorer, ["popularity", "transition"] if with_prior else ["popularity"])
    return save_with_priors(tmp_path / ("with" if with_prior else "without"), data, sp, cfg, model, item_vecs, scorer)


def _history(sp, h):
    from crossrec.recommender import HistoryItem

    return [HistoryItem(domain=sp.domains[sp.item_domain[i]], item_id=str(sp.item_ids[i])) for i in h]


def test_serving_and_evaluation_score_and_explain_alike(setup, tmp_path):
    from crossrec.bundle import load_bundle
    from crossrec.inference import bundle_retriever
    from crossrec.recommender import Recommender

    data, sp, *_ = setup
    bundle = load_bundle(_save(setup, tmp_path))
    assert bundle.meta["co_prior"]["weights"]["kitchen"] > 0 and (bundle.path / "co_prior.parquet").is_file()
    scorer = bundle_retriever(bundle, data, sp)
    assert [p.name for p in scorer.priors] == ["popularity", "transition"] and "co_weight[kitchen]" in scorer.params
    rec = Recommender(bundle)
    off = sp.offset["kitchen"]
    batch = sp.batch(sp.targets("valid", "kitchen")[:6], "kitchen")
    full = scorer(batch)  # what `crossrec evaluate` ranks
    assert scorer.prior_terms("kitchen", batch.histories, upto=None) is not None
    for r, h in enumerate(batch.histories):
        got = rec.recommend(_history(sp, h), "kitchen", k=10, exclude_seen=False)
        top = np.argsort(-full[r], kind="stable")[:10]
        assert [g.item_id for g in got] == sp.item_ids[off + top].tolist()
        np.testing.assert_allclose([g.score for g in got], full[r, top], rtol=1e-5, atol=1e-5)
    # Explanations are score drops with the entry left out, and the transition prior depends on the entry: the
    # weight of each entry is exactly the score lost by asking again without it.
    hist = _history(sp, batch.histories[0])
    recs = rec.recommend(hist, "kitchen", k=3, explain=True, exclude_seen=False)
    for x in recs:
        for reason in x.reasons:
            i = next(j for j, h in enumerate(hist) if h.item_id == reason["item_id"])
            alone = rec.recommend(hist[:i] + hist[i + 1 :], "kitchen", k=1, exclude_seen=False, candidates=[x.item_id])
            assert reason["weight"] == pytest.approx(x.score - alone[0].score, abs=2e-4)
    # The last food item's transition dominates: leaving it out costs the first item more than any other entry.
    first = recs[0]
    assert first.reasons[0]["item_id"] == hist[-1].item_id
    # An item added online has no transitions: its score is the model's and the popularity prior's only.
    vec = rec.vecs["kitchen"][0].clone()
    rec.upsert("kitchen", "new-item", "a new item", vec)
    got = {g.item_id: g.score for g in rec.recommend(hist, "kitchen", k=len(rec.ids["kitchen"]), exclude_seen=False)}
    pop, co = rec.retriever.priors
    beta = co.weight["kitchen"]
    hidx = np.array([sp.offset[h.domain] + rec.pos[h.domain][h.item_id] for h in hist])
    t0 = float(co.term("kitchen", [hidx])[0, 0])
    pw = pop.weight.get("kitchen", 0.0)
    p0 = float(pop.term("kitchen", [])[0, 0])
    assert got["new-item"] == pytest.approx(
        got[rec.ids["kitchen"][0]] - beta * t0 + pw * (pop.new_item_term("kitchen") - p0), abs=1e-4
    )


def test_a_bundle_without_the_prior_scores_without_it(setup, tmp_path):
    from crossrec.bundle import load_bundle
    from crossrec.inference import bundle_retriever
    from crossrec.recommender import Recommender

    data, sp, *_ = setup
    bundle = load_bundle(_save(setup, tmp_path, with_prior=False))  # as written before the prior existed
    assert "co_prior" not in bundle.meta and not (bundle.path / "co_prior.parquet").exists()
    scorer = bundle_retriever(bundle, data, sp)
    batch = sp.batch(sp.targets("valid", "kitchen")[:1], "kitchen")
    assert [p.name for p in scorer.priors] == ["popularity"]
    off, n = sp.offset["kitchen"], sp.n_items["kitchen"]
    users = scorer.user_vectors(batch.histories, "kitchen")
    bias = scorer.prior_terms("kitchen", batch.histories)
    want = users @ scorer.vecs[off : off + n].T + (0 if bias is None else bias)
    np.testing.assert_allclose(scorer(batch), want.numpy(), rtol=1e-6)
    rec = Recommender(bundle)
    assert [p.name for p in rec.retriever.priors] == ["popularity"]
    got = rec.recommend(_history(sp, batch.histories[0]), "kitchen", k=3, exclude_seen=False)
    np.testing.assert_allclose([g.score for g in got], np.sort(scorer(batch)[0])[::-1][:3], rtol=1e-5, atol=1e-5)


def test_explanations_through_a_ranker_leave_the_entry_out_of_the_prior(setup, tmp_path):
    """An untrained ranker scores exactly retrieval's score (its MLP starts at zero), so its explanations must equal
    retrieval's: each entry's weight includes what that entry added through the transition prior. Reusing the
    full history's prior for every left-out entry (the popularity prior's shortcut) would make them differ."""
    from crossrec.bundle import load_bundle
    from crossrec.ranker import FEATURES, Ranker, RankerConfig, RankerNet, build_item_table
    from crossrec.recommender import Recommender

    data, sp, cfg, *_ = setup
    bundle = load_bundle(_save(setup, tmp_path))
    torch.manual_seed(0)
    ranker = Ranker(
        RankerNet(len(FEATURES), len(bundle.domains), 8),
        build_item_table(sp, bundle.domains),
        RankerConfig(top_n=20),
        32,
        cfg.max_len,
    )
    plain, ranked = Recommender(bundle), Recommender(bundle, ranker)
    hist = _history(sp, sp.batch(sp.targets("valid", "kitchen")[:1], "kitchen").histories[0])
    a = plain.recommend(hist, "kitchen", k=5, explain=True, exclude_seen=False)
    b = ranked.recommend(hist, "kitchen", k=5, explain=True, exclude_seen=False)
    assert [x.item_id for x in a] == [x.item_id for x in b]
    for x, y in zip(a, b):
        assert [r["item_id"] for r in x.reasons] == [r["item_id"] for r in y.reasons]
        np.testing.assert_allclose([r["weight"] for r in x.reasons], [r["weight"] for r in y.reasons], atol=2e-4)
    # The transition prior is a real part of these weights: the last food item's weight exceeds what the model
    # alone loses without it.
    top = a[0]
    assert top.reasons[0]["item_id"] == hist[-1].item_id and top.reasons[0]["weight"] > 1.0
