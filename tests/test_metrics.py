"""Metric code against hand-computed cases."""

import math

import numpy as np
import pytest

from crossrec.metrics import metrics_from_ranks, rank_targets

L2, L3, L4 = (1 / math.log2(k) for k in (2, 3, 4))


def test_ranks_without_ties():
    s = np.array(
        [
            [0.1, 0.9, 0.3, 0.5],  # target col 3 (0.5): only 0.9 above -> 2
            [4.0, 3.0, 2.0, 1.0],  # target col 0: best -> 1
            [1.0, 2.0, 3.0, 4.0],
        ]
    )  # target col 0: worst -> 4
    assert rank_targets(s, [3, 0, 0]).tolist() == [2, 1, 4]


def test_ties_go_to_the_smaller_item_id():
    s = np.array(
        [
            [1.0, 1.0, 1.0, 1.0],  # target col 2 loses to cols 0, 1 -> 3
            [0.0, 5.0, 5.0, 5.0],
        ]
    )  # target col 1 wins ties against cols 2, 3 -> 1
    assert rank_targets(s, [2, 1]).tolist() == [3, 1]


def test_masking_removes_candidates_and_a_masked_target_is_a_miss():
    s = np.array([[9.0, 8.0, 7.0, 6.0], [9.0, 8.0, 7.0, 6.0]])
    r = rank_targets(s, [2, 2], mask=[np.array([0]), np.array([2, 1])])
    assert r[0] == 2 and r[1] == np.inf


def test_metric_values_by_hand():
    ranks = np.array([1, 2, 3, 11, np.inf])
    m = metrics_from_ranks(ranks, ks=(1, 3, 10))
    assert m["recall@1"] == pytest.approx(1 / 5)
    assert m["recall@3"] == pytest.approx(3 / 5)
    assert m["recall@10"] == pytest.approx(3 / 5)
    assert m["ndcg@1"] == pytest.approx(L2 / 5)
    assert m["ndcg@3"] == pytest.approx((L2 + L3 + L4) / 5)
    assert m["mrr@3"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 5)
    assert m["mrr@1"] == pytest.approx(1 / 5)
    assert metrics_from_ranks(np.array([]))["ndcg@10"] is None


def test_nan_scores_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        rank_targets(np.array([[np.nan, 1.0]]), [1])
