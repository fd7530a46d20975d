from collections import defaultdict

import numpy as np
import pytest

from crossrec.dataset import Dataset
from crossrec.splits import Splits


@pytest.fixture(scope="module")
def ao(art_office):
    return Splits(Dataset.load(art_office))


@pytest.fixture(scope="module")
def fk(food_kitchen):
    return Splits(Dataset.load(food_kitchen))


def _by_user_domain(sp: Splits):
    groups = defaultdict(list)
    for j in range(len(sp.row_user)):
        groups[(sp.row_user[j], sp.row_domain[j])].append(j)
    return groups


@pytest.mark.parametrize("which", ["ao", "fk"])
def test_leave_one_out_per_user_and_domain(which, request):
    sp = request.getfixturevalue(which)
    for rows in _by_user_domain(sp).values():
        ts = sp.row_time[rows]
        assert list(ts) == sorted(ts)
        if len(rows) >= 3:
            assert sp.is_test[rows[-1]] and sp.is_valid[rows[-2]] and sp.is_train[rows[:-2]].all()
        else:
            assert sp.is_train[rows].all()
    assert not (sp.is_test & sp.is_valid).any()


def test_history_is_cross_domain_and_strictly_earlier(ao):
    rows = ao.targets("test", "arts")
    batch = ao.batch(rows, "arts")
    for j, hist, hts, t in zip(rows, batch.histories, batch.history_ts, batch.target_ts):
        start = ao.user_start[ao.row_user[j]]
        expect = [ao.row_item[k] for k in range(start, ao.user_start[ao.row_user[j] + 1]) if ao.row_time[k] < t]
        assert list(hist) == expect and (hts < t).all()
        assert set(ao.item_domain[hist]) == {0, 1}  # both domains feed the history


def test_simultaneous_targets_are_not_in_each_others_history(ao):
    # Art-office users end with one item per domain sharing one timestamp (data README).
    arts, office = ao.targets("test", "arts"), ao.targets("test", "office")
    by_user = {ao.row_user[j]: j for j in office}
    n_simul = 0
    for j in arts:
        k = by_user.get(ao.row_user[j])
        if k is not None and ao.row_time[k] == ao.row_time[j]:
            n_simul += 1
            hist = ao.batch(np.array([j]), "arts").histories[0]
            assert len(hist) == ao.history_end(np.array([j]))[0] - ao.user_start[ao.row_user[j]]
            assert ao.history_end(np.array([j]))[0] == ao.history_end(np.array([k]))[0]
    assert n_simul > 100


def test_training_sequences_never_contain_targets(fk):
    seqs = fk.train_sequences()
    rows = np.concatenate(seqs)
    assert len(rows) == fk.is_train.sum() and fk.is_train[rows].all()
    assert len(seqs) == len(fk.users)
    for s in seqs:
        assert (np.diff(fk.row_time[s]) >= 0).all()


def test_min_per_domain_and_unknown_domain(food_kitchen):
    ds = Dataset.load(food_kitchen)
    s3, s4 = Splits(ds, 3), Splits(ds, 4)
    assert len(s4.targets()) < len(s3.targets())
    with pytest.raises(ValueError, match=r"`min_per_domain` must be >= 2"):
        Splits(ds, 1)
    with pytest.raises(ValueError, match=r"unknown domain 'toys' \(domains: food, kitchen\)"):
        s3.targets("test", "toys")


def test_item_index_is_domain_then_id_order(fk):
    for d in fk.domains:
        ids = fk.item_ids[fk.offset[d] : fk.offset[d] + fk.n_items[d]]
        assert list(ids) == sorted(ids.tolist())
        assert (fk.item_domain[fk.offset[d] : fk.offset[d] + fk.n_items[d]] == fk.domain_code[d]).all()
