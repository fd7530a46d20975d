"""Transfer protocols and objectives on tiny real slices: the cold-user split (exact ids hidden from training),
held-out domains that never reach a training batch, the content-addressed vector cache, and the alignment and
self-supervised loss terms (each changes the loss and trains). Real MiniLM vectors, no Ray."""

import hashlib

import numpy as np
import pytest
import torch

from crossrec.config import TrainConfig
from crossrec.dataset import Dataset
from crossrec.splits import Splits, splits_for
from crossrec.training import SequenceData, loss_inputs


def _held_out(users, fraction, seed):
    """Written from DESIGN.md's protocol, not from splits.py: sha256("seed:user") as a fraction of 2^64."""
    out = {}
    for u in users:
        x = int.from_bytes(hashlib.sha256(f"{seed}:{u}".encode()).digest()[:8], "big") / 2.0**64
        if x < fraction:
            out[u] = "valid" if x < fraction / 2 else "test"
    return out


def _rows(data: Dataset):
    t = data.interactions
    users = t.column("user_id").to_pylist()
    items = t.column("item_id").to_pylist()
    doms = t.column("domain").to_pylist()
    ts = t.column("timestamp").to_pylist()
    by_user = {}
    for k, (u, i, d, s) in enumerate(zip(users, items, doms, ts)):
        by_user.setdefault(u, []).append((s, k, i, d))
    return {u: sorted(r) for u, r in by_user.items()}


def test_cold_user_split_hides_exactly_the_right_interactions(cross_fk):
    data = Dataset.load(cross_fk)
    sp = Splits(data, protocol="cold-user", cold_fraction=0.5, cold_seed=7)
    rows = _rows(data)
    multi = [u for u, r in rows.items() if len({d for *_, d in r}) >= 2]
    roles = _held_out(multi, 0.5, 7)
    assert 10 < len(roles) < len(multi)  # some held out, not all
    hidden, targets = set(), {"valid": set(), "test": set()}
    for u, role in roles.items():
        first = rows[u][0][3]
        seen = set()
        for s, _k, i, d in rows[u]:
            if d != first:
                hidden.add((u, i, s))
                if d not in seen:
                    targets[role].add((u, i, s))
                    seen.add(d)

    def key(j):
        return (str(sp.users[sp.row_user[j]]), str(sp.item_ids[sp.row_item[j]]), int(sp.row_time[j]))

    assert {key(j) for j in np.flatnonzero(~sp.is_train)} == hidden
    for split in ("valid", "test"):
        assert {key(j) for j in sp.targets(split)} == targets[split]
    # No hidden interaction in any training sequence, as target or as history input (by ids).
    train_keys = {key(j) for seq in sp.train_sequences() for j in seq}
    assert not train_keys & hidden
    seqs = SequenceData(sp, max_len=5)
    window_keys = {key(j) for w in seqs.windows for j in w}
    assert not window_keys & hidden
    # A target's history: strictly earlier, other domains only.
    for split in ("valid", "test"):
        for d in sp.domains:
            rws = sp.targets(split, d)
            b = sp.batch(rws, d)
            for h, hts, t in zip(b.histories, b.history_ts, b.target_ts):
                assert (sp.item_domain[h] != sp.domain_code[d]).all() and (hts < t).all()
    # Deterministic (not Python's salted hash) and seeded.
    again = Splits(data, protocol="cold-user", cold_fraction=0.5, cold_seed=7)
    assert (again.is_test == sp.is_test).all() and (again.is_valid == sp.is_valid).all()
    other = Splits(data, protocol="cold-user", cold_fraction=0.5, cold_seed=8)
    assert (other.is_train != sp.is_train).any()


def test_cold_user_popularity_counts_only_training(cross_fk):
    from crossrec.baselines import Popularity
    from crossrec.evaluation import evaluate

    data = Dataset.load(cross_fk)
    sp = Splits(data, protocol="cold-user", cold_fraction=0.5)
    res = evaluate(sp, Popularity(sp), "test")
    assert res.n_targets["all"] == len(sp.targets("test")) > 0
    assert "cold_user" not in res.slices["all"]  # leave-one-out never had any; cold-user targets all are
    assert sp.train_count.sum() == sp.is_train.sum()


def test_held_out_domain_never_reaches_a_training_batch(cross_fk):
    data = Dataset.load(cross_fk)
    cfg = TrainConfig(train_domains=["food"], text_prior_decay=0.6, text_prior_cross=0.1)
    sp = splits_for(data, cfg, training=True)
    assert sp.domains == ["food"]
    full = Splits(data)
    kitchen_items = set(full.item_ids[full.item_domain == full.domain_code["kitchen"]])
    assert not kitchen_items & set(sp.item_ids)  # not in the catalog (vectors, graph, adaptor init) either
    titles = data.items.take(sp.item_row).column("domain").to_pylist()
    assert set(titles) == {"food"}  # item_row still points at the right rows of the full table
    seqs = SequenceData(sp, cfg.max_len, cfg.train_domains)
    rng = np.random.default_rng(0)
    n = 0
    for batch in seqs.batches(8, rng):
        ids = set(sp.item_ids[batch.items[batch.valid]]) | set(sp.item_ids[batch.targets[batch.target_valid]])
        assert not ids & kitchen_items
        n += 1
    assert n > 0
    # The held-out domain's validation targets are not there to select epochs or fit the text prior with.
    assert len(sp.targets("valid")) == len(full.targets("valid", "food"))
    # Same food targets as on the whole dataset (evaluating the bundle there is fair), shorter histories.
    assert set(
        map(tuple, zip(sp.users[sp.row_user[sp.targets("test")]], sp.item_ids[sp.row_item[sp.targets("test")]]))
    ) == set(
        map(
            tuple,
            zip(
                full.users[full.row_user[full.targets("test", "food")]],
                full.item_ids[full.row_item[full.targets("test", "food")]],
            ),
        )
    )


def test_vector_cache_is_per_text_pooling_embeds_only_new_texts(vector_cache, tiny_ao, tiny_fk, tmp_path):
    from crossrec.embedding import cached_text_vectors, catalog_texts, embed_texts, template_of
    from crossrec.inference import backbone_vectors

    def texts_of(path):
        d = Dataset.load(path)
        s = Splits(d)
        return d, s, catalog_texts(d.items.take(s.item_row), template_of("", 64))

    _, _, ao_texts = texts_of(tiny_ao)
    _, _, fk_texts = texts_of(tiny_fk)
    for texts in (ao_texts, fk_texts):  # each dataset once (maybe cached already by another test)
        cached_text_vectors(texts, "minilm", 64, lambda new: embed_texts(new, "minilm", 64))
    embedded = []

    def embed(new):
        embedded.extend(new)
        return embed_texts(new, "minilm", 64)

    pd, ps, pool_texts = texts_of(tiny_ao)
    new_text = "a brand-new item nobody embedded: ceramic pour-over kettle, matte black"
    vecs, n = cached_text_vectors([*pool_texts, *fk_texts, new_text], "minilm", 64, embed)
    assert n == 1 and embedded == [new_text]  # only the one new text went through the backbone
    np.testing.assert_allclose(vecs[: len(pool_texts)], backbone_vectors(pd, ps, "minilm", "", 64), atol=1e-5)
    direct = embed_texts(fk_texts[:5], "minilm", 64)
    np.testing.assert_allclose(vecs[len(pool_texts) : len(pool_texts) + 5], direct, atol=1e-5)
    # Another truncation is another vector: not served from the 64-token entries (texts no other test embeds).
    probes = [f"{t} (truncation probe)" for t in fk_texts[:3]]
    assert cached_text_vectors(probes, "minilm", 64, lambda new: embed_texts(new, "minilm", 64))[1] == 3
    _, n16 = cached_text_vectors(probes, "minilm", 16, lambda new: embed_texts(new, "minilm", 16))
    assert n16 == 3


def _loss_setup(data_path, **overrides):
    from crossrec.inference import backbone_vectors
    from crossrec.model import CrossRecModel

    data = Dataset.load(data_path)
    sp = Splits(data)
    vecs = torch.from_numpy(backbone_vectors(data, sp, "minilm", "", 64))
    cfg = TrainConfig(
        dim=32,
        layers=1,
        dropout=0.0,
        domain_dropout=0.0,
        text_prior_decay=0.6,
        text_prior_cross=0.1,
        n_negatives=16,
        **overrides,
    )
    torch.manual_seed(0)
    model = CrossRecModel(cfg, len(sp.domains), in_dim=vecs.shape[1])
    model.adaptor.init_from_vectors(vecs)
    seqs = SequenceData(sp, cfg.max_len)
    batch = next(seqs.batches(32, np.random.default_rng(0)))
    domain_items = [torch.arange(sp.offset[d], sp.offset[d] + sp.n_items[d]) for d in sp.domains]
    inputs = loss_inputs(
        batch,
        lambda idx: vecs[idx],
        torch.from_numpy(sp.item_domain),
        domain_items,
        cfg.n_negatives,
        np.random.default_rng(1),
        len(sp.domains),
        0.0,
        cfg.ssl_mask if cfg.ssl_weight else None,
    )
    return model, inputs


@pytest.mark.parametrize("term", ["align_weight", "ssl_weight"])
def test_each_loss_term_changes_the_loss_and_trains(vector_cache, tiny_fk, term):
    model, inputs = _loss_setup(tiny_fk, **{term: 1.0})
    base, _ = _loss_setup(tiny_fk)
    base.load_state_dict(model.state_dict())
    with torch.no_grad():
        with_term, without = float(model(**inputs)), float(base(**inputs))
    assert with_term != pytest.approx(without, abs=1e-6)  # the term is in the loss (same weights, same batch)

    # Training on the total loss lowers the term itself (it is not a constant).
    def term_value():
        with torch.no_grad():
            return float(model(**inputs)) - float(base(**inputs))

    start = term_value()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        model(**inputs).backward()
        opt.step()
    base.load_state_dict(model.state_dict())
    assert start > 0 and term_value() < 0.7 * start, (start, term_value())


def test_loss_term_inputs(cross_fk):
    from crossrec.model import domain_mmd, view_infonce
    from crossrec.training import ssl_views

    valid = np.zeros((3, 6), bool)
    valid[0, 2:] = valid[1, 5:] = valid[2, :] = True
    views = ssl_views(valid, 0.5, np.random.default_rng(0))
    assert views.shape == (2, 3, 6) and not (views & ~valid).any() and views[:, :, -1].all()
    x = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1)
    same = torch.zeros(40, dtype=torch.long)
    assert float(domain_mmd(x, same)) == 0.0  # one domain: nothing to align
    two = torch.arange(40) % 2
    shifted = x.clone()
    shifted[two == 1] = torch.nn.functional.normalize(x[two == 1] + 2.0, dim=-1)
    assert float(domain_mmd(shifted, two)) > float(domain_mmd(x, two)) >= 0
    a = torch.randn(16, 8)
    assert float(view_infonce(a, a)) < float(view_infonce(a, torch.randn(16, 8)))
