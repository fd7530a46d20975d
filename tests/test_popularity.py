"""Popularity through the evaluator vs a brute-force recomputation of the protocol in plain Python."""

import math
from collections import Counter

import numpy as np
import pytest

from crossrec.baselines import Popularity
from crossrec.dataset import Dataset
from crossrec.evaluation import evaluate
from crossrec.splits import Splits


def brute_force(sp: Splits, domain: str, k: int = 10):
    counts = Counter(int(sp.row_item[j]) for j in np.flatnonzero(sp.is_train))
    cands = [g for g in range(len(sp.item_ids)) if sp.item_domain[g] == sp.domain_code[domain]]
    recall = ndcg = 0.0
    rows = sp.targets("test", domain)
    for j in rows:
        start, stop = sp.user_start[sp.row_user[j]], sp.user_start[sp.row_user[j] + 1]
        hist = {int(sp.row_item[x]) for x in range(start, stop) if sp.row_time[x] < sp.row_time[j]}
        target = int(sp.row_item[j])
        if target in hist:
            continue  # masked target: a miss
        # Rank: by count descending, then item id ascending.
        order = sorted((g for g in cands if g not in hist), key=lambda g: (-counts[g], sp.item_ids[g]))
        rank = order.index(target) + 1
        if rank <= k:
            recall += 1
            ndcg += 1 / math.log2(rank + 1)
    return recall / len(rows), ndcg / len(rows)


@pytest.mark.parametrize("name", ["art_office", "food_kitchen"])
def test_popularity_matches_brute_force(name, request):
    sp = Splits(Dataset.load(request.getfixturevalue(name)))
    res = evaluate(sp, Popularity(sp))
    for d in sp.domains:
        r, n = brute_force(sp, d)
        assert res.metrics[d]["recall@10"] == pytest.approx(r)
        assert res.metrics[d]["ndcg@10"] == pytest.approx(n)
    total = sum(res.n_targets[d] for d in sp.domains)
    assert res.n_targets["all"] == total
    assert res.metrics["all"]["recall@10"] == pytest.approx(
        sum(res.metrics[d]["recall@10"] * res.n_targets[d] for d in sp.domains) / total
    )


def test_target_counts_and_cold_item_slice(art_office):
    sp = Splits(Dataset.load(art_office))
    res = evaluate(sp, Popularity(sp))
    assert res.n_targets == {"arts": 150, "office": 150, "all": 300}
    assert res.slices["all"]["cold_item"]["n"] == int((sp.train_count[sp.row_item[sp.targets()]] == 0).sum())
