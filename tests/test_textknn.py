"""textknn on the art-office slice with real minilm vectors: the formula by hand, recency, masking, and quality."""

from __future__ import annotations

import numpy as np
import pytest

import crossrec.embedding
from crossrec.baselines import BASELINES, Popularity, TextKNN
from crossrec.dataset import Dataset
from crossrec.evaluation import evaluate
from crossrec.inference import backbone_vectors
from crossrec.splits import Splits


@pytest.fixture(scope="module")
def ao(art_office, tmp_path_factory):
    """(dataset, splits, minilm vectors of the whole slice catalog); the vectors cached in a tmp dir."""
    data = Dataset.load(art_office)
    splits = Splits(data)
    vec_dir = tmp_path_factory.mktemp("crossrec-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(crossrec.embedding, "cache_dir", lambda: vec_dir)
        vectors = backbone_vectors(data, splits, "minilm", "", 64)
    assert list(vec_dir.glob("vectors/minilm-*.npy"))
    return data, splits, vectors, vec_dir


def _batch(splits: Splits, domain: str, min_history: int = 0):
    rows = splits.targets("test", domain)
    batch = splits.batch(rows, domain)
    keep = [k for k, h in enumerate(batch.histories) if len(h) >= min_history]
    return splits.batch(rows[keep], domain)


def test_scores_shape_and_empty_history(ao):
    _, splits, vectors, _ = ao
    knn = TextKNN(splits, vectors)
    for d in splits.domains:
        batch = _batch(splits, d)
        scores = knn(batch)
        assert scores.shape == (len(batch), splits.n_items[d])
        assert scores.dtype == np.float32
        assert np.isfinite(scores).all() and np.abs(scores).max() <= 1 + 1e-5  # cosines
    # A user with no history at all: every candidate scores 0.
    empty = splits.batch(splits.targets("test", "arts")[:2], "arts")
    empty.histories = [np.zeros(0, np.int64), empty.histories[1]]
    scores = knn(empty)
    assert not scores[0].any() and scores[1].any()


def test_weighted_mean_by_hand(ao):
    _, splits, vectors, _ = ao
    batch = _batch(splits, "office", min_history=4)
    hist = batch.histories[0]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    w = 0.5 ** np.arange(len(hist))[::-1]  # most recent (last) item: weight 1
    q = (w[:, None] * unit[hist]).sum(0) / w.sum()
    off, n = splits.offset["office"], splits.n_items["office"]
    expected = unit[off : off + n] @ q / np.linalg.norm(q)
    np.testing.assert_allclose(TextKNN(splits, vectors, decay=0.5)(batch)[0], expected, atol=1e-5)


def test_recency_decay_matters(ao):
    _, splits, vectors, _ = ao
    batch = _batch(splits, "arts", min_history=2)
    flat = TextKNN(splits, vectors, decay=1.0)(batch)
    recent = TextKNN(splits, vectors, decay=0.5)(batch)
    assert not np.allclose(flat, recent, atol=1e-3)
    # One-item histories do not depend on the decay.
    one = splits.batch(batch.rows[:1], "arts")
    one.histories = [one.histories[0][-1:]]
    np.testing.assert_allclose(
        TextKNN(splits, vectors, decay=1.0)(one), TextKNN(splits, vectors, decay=0.5)(one), atol=1e-6
    )


def test_history_items_masked_by_evaluator(ao):
    """textknn scores what the user already has near the top; the evaluator, not the scorer, masks it."""
    _, splits, vectors, _ = ao
    knn = TextKNN(splits, vectors, decay=0.01)  # the query is almost the last history item itself
    d = "office"
    off, n = splits.offset[d], splits.n_items[d]
    batch = _batch(splits, d, min_history=1)
    scores = knn(batch)
    last_in_domain = [h[-1] - off for h in batch.histories if off <= h[-1] < off + n]
    rows_last = [k for k, h in enumerate(batch.histories) if off <= h[-1] < off + n]
    assert rows_last  # the slice has targets whose latest history item is in the target domain
    assert (scores[rows_last].argmax(1) == np.array(last_in_domain)).all()  # not masked by the scorer

    res = evaluate(splits, knn, domains=[d])
    for k, h in enumerate(batch.histories):
        own = np.unique(h[(h >= off) & (h < off + n)] - off)
        t = splits.row_item[batch.rows[k]] - off
        s = scores[k].astype(np.float64)
        if t in own:
            expect = np.inf
        else:
            keep = np.setdiff1d(np.arange(n), own)
            expect = 1 + np.count_nonzero((s[keep] > s[t]) | ((s[keep] == s[t]) & (keep < t)))
        assert res.ranks[d][list(splits.targets("test", d)).index(batch.rows[k])] == expect
    unmasked = evaluate(splits, knn, domains=[d], mask_history=False)
    assert (unmasked.ranks[d][np.isfinite(res.ranks[d])] >= res.ranks[d][np.isfinite(res.ranks[d])]).all()


def test_textknn_beats_popularity(ao):
    _, splits, vectors, _ = ao
    knn = evaluate(splits, TextKNN(splits, vectors))
    pop = evaluate(splits, Popularity(splits))
    assert knn.metrics["all"]["ndcg@10"] > pop.metrics["all"]["ndcg@10"]


def test_registry_factories(ao, monkeypatch):
    data, splits, vectors, vec_dir = ao
    monkeypatch.setattr(crossrec.embedding, "cache_dir", lambda: vec_dir)  # the fixture's vectors: a cache hit
    assert set(BASELINES) >= {"popularity", "textknn"}
    assert isinstance(BASELINES["popularity"](splits, data, "minilm", "", 64), Popularity)
    knn = BASELINES["textknn"](splits, data, "minilm", "", 64)
    assert isinstance(knn, TextKNN)
    np.testing.assert_allclose(knn.vectors.numpy(), vectors / np.linalg.norm(vectors, axis=1, keepdims=True), atol=1e-5)


def test_bad_arguments(ao):
    _, splits, vectors, _ = ao
    with pytest.raises(ValueError, match=r"`decay` must be in \(0, 1\], got 1.5"):
        TextKNN(splits, vectors, decay=1.5)
    with pytest.raises(ValueError, match=r"`vectors` must be \(n_items, dim\)"):
        TextKNN(splits, vectors[:-1])


def test_cross_domain_weight_by_hand(ao):
    """cross_weight scales history items from other domains than the target's; 0 keeps the target domain only."""
    _, splits, vectors, _ = ao
    d = "office"
    batch = _batch(splits, d, min_history=4)
    k = next(
        i for i, h in enumerate(batch.histories) if len(set(splits.item_domain[h])) == 2
    )  # a history with both domains
    hist = batch.histories[k]
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    other = splits.item_domain[hist] != splits.domain_code[d]
    off, n = splits.offset[d], splits.n_items[d]
    for cw in (0.0, 0.25):
        w = 0.5 ** np.arange(len(hist))[::-1] * np.where(other, cw, 1.0)
        q = (w[:, None] * unit[hist]).sum(0)
        expected = unit[off : off + n] @ q / np.linalg.norm(q)
        np.testing.assert_allclose(TextKNN(splits, vectors, decay=0.5, cross_weight=cw)(batch)[k], expected, atol=1e-5)
    with pytest.raises(ValueError, match="cross_weight"):
        TextKNN(splits, vectors, cross_weight=1.5)


def test_fit_textknn_picks_the_best_validation_point(ao):
    from crossrec.baselines.textknn import fit_textknn

    _, splits, vectors, _ = ao
    grid = {
        (dc, cw): np.mean(
            [
                evaluate(splits, TextKNN(splits, vectors, dc, cw), "valid", ks=(10,)).metrics[d]["ndcg@10"]
                for d in splits.domains
            ]
        )
        for dc in (0.3, 0.8)
        for cw in (0.0, 1.0)
    }
    knn = fit_textknn(splits, vectors, decays=(0.3, 0.8), cross_weights=(0.0, 1.0), max_targets=0)
    assert (knn.decay, knn.cross_weight) == max(grid, key=grid.get)  # ties: the first grid point, as max
    assert knn.valid_ndcg10 == pytest.approx(max(grid.values()))
    assert knn.params == {"decay": knn.decay, "cross_weight": knn.cross_weight}


def test_model_text_prior_is_textknn_and_tells_unseen_domains_apart(ao):
    """The text prior's half of a crossrec user vector is textknn's query, also for a model that never saw the
    dataset's domains (zero-shot: both map to the model's one "unknown" id, yet cross_weight must still apply)."""
    import torch

    from crossrec.config import TrainConfig
    from crossrec.model import CrossRecModel
    from crossrec.retrieval import Retriever

    _, splits, vectors, _ = ao
    cfg = TrainConfig(text_prior_decay=0.5, text_prior_cross=0.25, max_len=5)  # the prior reads whole histories
    model = CrossRecModel(cfg, n_domains=1, in_dim=vectors.shape[1]).eval()
    with torch.inference_mode():
        item_vecs = model.item_vectors(torch.from_numpy(vectors))
    scorer = Retriever(model, splits, item_vecs, ["other"])  # every dataset domain is the model's unknown one
    knn = TextKNN(splits, vectors, decay=0.5, cross_weight=0.25)
    beta = float(model.log_beta.detach().exp())
    for d in splits.domains:
        batch = _batch(splits, d, min_history=1)
        mixed = [h for h in batch.histories if len(set(splits.item_domain[h])) == 2]
        assert mixed and max(map(len, mixed)) > cfg.max_len
        prior = scorer.user_vectors(mixed, d)[:, cfg.dim :] / beta
        np.testing.assert_allclose(prior.numpy(), knn.user_vectors(mixed, d).numpy(), atol=1e-5)


def test_unset_text_prior_is_chosen_like_textknn_on_validation(ao):
    from crossrec.baselines.textknn import fit_textknn
    from crossrec.config import TrainConfig
    from crossrec.model import CrossRecModel
    from crossrec.training import resolve_text_prior

    _, splits, vectors, _ = ao
    with pytest.raises(ValueError, match="`text_prior_decay` / `text_prior_cross` are unset"):
        CrossRecModel(TrainConfig(), n_domains=2, in_dim=vectors.shape[1])
    best = fit_textknn(splits, vectors)
    cfg = resolve_text_prior(TrainConfig(), splits, vectors)
    assert (cfg.text_prior_decay, cfg.text_prior_cross) == (best.decay, best.cross_weight)
    # A value that is set stays; only the other one is searched (on the training domains' validation).
    only = resolve_text_prior(TrainConfig(text_prior_decay=0.8, train_domains=["arts"]), splits, vectors)
    arts = fit_textknn(splits, vectors, decays=(0.8,), domains=["arts"])
    assert (only.text_prior_decay, only.text_prior_cross) == (0.8, arts.cross_weight)
    ids = TrainConfig(item_encoder="id")
    assert resolve_text_prior(ids, splits, vectors) is ids
    with pytest.raises(ValueError, match=r"`text_prior_decay` must be in \(0, 1\] \(or null"):
        TrainConfig(text_prior_decay=0)
