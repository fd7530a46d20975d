"""Ratings as model input (`behaviour.rating`, crossrec.config.BehaviourConfig): the option changes what the user
tower reads - the same history scores differently with other ratings, through the one user encoder that evaluation,
`crossrec recommend` and Serve share - and changes nothing when off; a bundle without it loads and scores as before;
training feeds the ratings to the rating embedding; data without ratings is refused at training. Real item titles
(the food-kitchen slice) with constructed, rated interactions; random item vectors stand in for the backbone's (the
tower is under test, not the backbone). No Ray."""

from __future__ import annotations

import numpy as np
import pytest


def _rated(tmp_path, food_kitchen_csv, with_ratings: bool = True):
    from conftest import fk_items, prepare_constructed

    items = [r for rows in fk_items(food_kitchen_csv, 12).values() for r in rows]
    rng = np.random.default_rng(0)
    inter = []
    for u in range(40):
        for t, k in enumerate(rng.choice(len(items), 8, replace=False)):
            row = {"user_id": f"u{u}", "item_id": items[k]["item_id"], "domain": items[k]["domain"], "timestamp": t}
            if with_ratings:
                row["rating"] = int(rng.integers(1, 6))
            inter.append(row)
    keep = ("item_id", "domain", "title")
    return prepare_constructed(tmp_path, [{c: r[c] for c in keep} for r in items], inter)


def _model(rating: str, n_domains: int):
    import torch

    from crossrec.config import TrainConfig
    from crossrec.model import CrossRecModel

    cfg = TrainConfig(
        dim=16, layers=1, text_prior_decay=0.6, text_prior_cross=0.5, behaviour={"rating": rating}, dropout=0.0
    )
    torch.manual_seed(0)
    return cfg, CrossRecModel(cfg, n_domains, in_dim=24).eval()


@pytest.fixture(scope="module")
def rated(tmp_path_factory, food_kitchen_csv):
    import torch

    from crossrec.dataset import Dataset
    from crossrec.splits import Splits

    data = Dataset.load(_rated(tmp_path_factory.mktemp("rated"), food_kitchen_csv))
    sp = Splits(data)
    vecs = torch.from_numpy(np.random.default_rng(1).standard_normal((len(sp.item_ids), 24)).astype(np.float32))
    return data, sp, vecs


def _retriever(rated, rating: str):
    import torch

    from crossrec.retrieval import Retriever

    _, sp, vecs = rated
    cfg, model = _model(rating, len(sp.domains))
    with torch.inference_mode():
        item_vecs = model.item_vectors(vecs)
    return cfg, model, item_vecs, Retriever(model, sp, item_vecs, sp.domains)


def test_config_is_typed_and_off_by_default():
    from crossrec.config import TrainConfig, config_from_dict, config_to_dict, load_config

    assert TrainConfig().behaviour.rating == "off"
    assert load_config(None, ["behaviour.rating=feature"]).behaviour.rating == "feature"
    with pytest.raises(ValueError, match="`behaviour.rating` must be one of off, feature"):
        load_config(None, ["behaviour.rating=stars"])
    with pytest.raises(ValueError, match="behaviour.rating_dropout"):
        load_config(None, ["behaviour.rating_dropout=1.5"])
    old = config_to_dict(TrainConfig())
    del old["behaviour"]  # a bundle.json written before the option existed
    assert config_from_dict(old).behaviour.rating == "off"


def test_splits_carry_ratings_into_histories(rated):
    _, sp, _ = rated
    assert sp.row_rating is not None and np.isfinite(sp.row_rating).all()
    d = sp.domains[0]
    batch = sp.batch(sp.targets("test", d), d)
    assert batch.history_ratings is not None
    for h, r, row in zip(batch.histories, batch.history_ratings, batch.rows):
        start = sp.user_start[sp.row_user[row]]
        assert len(h) == len(r)
        np.testing.assert_array_equal(r, sp.row_rating[start : start + len(r)])


def test_feature_changes_scores_through_the_one_user_encoder(rated):
    _, sp, _ = rated
    d = sp.domains[0]
    batch = sp.batch(sp.targets("test", d), d)
    histories = batch.histories
    low = [np.full(len(h), 1.0, np.float32) for h in histories]
    high = [np.full(len(h), 5.0, np.float32) for h in histories]
    unrated = [np.full(len(h), np.nan, np.float32) for h in histories]

    _, _, _, on = _retriever(rated, "feature")
    u_low, u_high = on.user_vectors(histories, d, low), on.user_vectors(histories, d, high)
    assert not np.allclose(u_low.numpy(), u_high.numpy())
    # No ratings at all (unrated data, a request without them) reads as every entry unrated.
    np.testing.assert_array_equal(on.user_vectors(histories, d).numpy(), on.user_vectors(histories, d, unrated).numpy())
    # Evaluation scores a TargetBatch with its own ratings.
    np.testing.assert_allclose(on(batch), (on.user_vectors(histories, d, batch.history_ratings) @ on.rows(d).T).numpy())

    _, _, _, off = _retriever(rated, "off")
    np.testing.assert_array_equal(off.user_vectors(histories, d, low).numpy(), off.user_vectors(histories, d).numpy())


def test_recommend_reads_request_ratings_and_an_old_bundle_loads(rated, tmp_path):
    from conftest import bundle_items

    from crossrec.bundle import BundleContents, load_bundle, save_bundle
    from crossrec.recommender import HistoryItem, Recommender

    data, sp, _ = rated
    d = sp.domains[0]
    ids = [str(i) for i in sp.item_ids[sp.offset[d] : sp.offset[d] + 4]]
    for rating in ("feature", "off"):
        cfg, model, item_vecs, _ = _retriever(rated, rating)
        path = save_bundle(
            tmp_path / rating,
            BundleContents(model, cfg, list(sp.domains), bundle_items(data, sp, item_vecs), {}, data.content_hash, 24),
        )
        bundle = load_bundle(path)
        assert ("tower.rating.weight" in bundle.model.state_dict()) == (rating == "feature")
        rec = Recommender(bundle)

        def scores(r, rec=rec):
            got = rec.recommend([HistoryItem(d, i, rating=r) for i in ids], d, k=5, exclude_seen=False)
            return [(g.item_id, round(g.score, 5)) for g in got]

        if rating == "feature":
            assert scores(1.0) != scores(5.0)
            assert scores(None) == scores(float("nan"))
        else:
            assert scores(1.0) == scores(5.0) == scores(None)

    # A bundle.json from before the option (no `behaviour` key) loads as off, weights and all.
    import json

    meta = json.loads((tmp_path / "off" / "bundle.json").read_text())
    del meta["config"]["behaviour"]
    (tmp_path / "off" / "bundle.json").write_text(json.dumps(meta))
    assert load_bundle(tmp_path / "off").config.behaviour.rating == "off"


def test_serve_history_entries_carry_a_rating():
    from pydantic import ValidationError

    from serving.schemas import RecommendRequest

    req = RecommendRequest.model_validate(
        {
            "domain": "food",
            "history": [{"domain": "food", "item_id": "a", "rating": 4}, {"domain": "food", "text": "x"}],
        }
    )
    assert [h.rating for h in req.history] == [4.0, None]
    with pytest.raises(ValidationError, match="rating"):
        RecommendRequest.model_validate(
            {"domain": "food", "history": [{"domain": "food", "item_id": "a", "rating": "nan"}]}
        )


def test_training_feeds_ratings_to_the_rating_embedding(rated):
    import torch

    from crossrec.model import RATING_UNKNOWN
    from crossrec.training import SequenceData, loss_inputs

    _, sp, vecs = rated
    cfg, model = _model("feature", len(sp.domains))
    seqs = SequenceData(sp, cfg.max_len)
    batch = next(seqs.batches(16, np.random.default_rng(0)))
    assert batch.ratings is not None
    assert set(np.unique(batch.ratings[batch.valid])) <= {1, 2, 3, 4, 5}
    assert (batch.ratings[~batch.valid] == RATING_UNKNOWN).all()
    domain_items = [torch.arange(sp.offset[d], sp.offset[d] + sp.n_items[d]) for d in sp.domains]
    inputs = loss_inputs(
        batch, lambda idx: vecs[idx], torch.from_numpy(sp.item_domain), domain_items, 8, np.random.default_rng(0), 2
    )
    model.train()
    model(**inputs).backward()
    grad = model.tower.rating.weight.grad
    assert grad is not None
    assert grad[[1, 2, 3, 4, 5]].abs().sum(1).gt(0).all()  # every rating present in the batch was read


def test_training_refuses_data_without_ratings(tmp_path, food_kitchen_csv):
    from crossrec.config import TrainConfig
    from crossrec.dataset import Dataset
    from crossrec.splits import splits_for

    data = Dataset.load(_rated(tmp_path, food_kitchen_csv, with_ratings=False))
    splits_for(data, TrainConfig(), training=True)
    with pytest.raises(ValueError, match="`behaviour.rating` is 'feature' but the dataset has no ratings"):
        splits_for(data, TrainConfig(behaviour={"rating": "feature"}), training=True)
    # Evaluating a rating bundle on unrated data is allowed: its histories read 'unknown'.
    splits_for(data, TrainConfig(behaviour={"rating": "feature"}), training=False)
