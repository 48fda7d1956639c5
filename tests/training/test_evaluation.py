"""Ranking metrics: perfect ranking = 1, no hits = 0, and one hand-computed value."""

import math

import numpy as np
import pytest
import scipy.sparse as sp

from training.evaluation import (
    catalog_coverage,
    evaluate_all,
    hit_rate_at_k,
    map_at_k,
    ndcg_at_k,
    novelty,
    precision_at_k,
    recall_at_k,
)

HELD = sp.csr_matrix(np.array([[1, 1, 0, 0, 0], [0, 0, 1, 0, 0]], dtype=np.float32))


def test_perfect_ranking_scores_one() -> None:
    recs = np.array([[0, 1], [2, 3]])
    assert ndcg_at_k(recs, HELD, 2) == pytest.approx(1.0)
    assert map_at_k(recs, HELD, 2) == pytest.approx(1.0)
    assert recall_at_k(recs, HELD, 2) == pytest.approx(1.0)
    assert hit_rate_at_k(recs, HELD, 2) == pytest.approx(1.0)


def test_no_hits_score_zero() -> None:
    recs = np.array([[3, 4], [0, 1]])
    for metric in (precision_at_k, recall_at_k, ndcg_at_k, map_at_k, hit_rate_at_k):
        assert metric(recs, HELD, 2) == 0.0


def test_hand_computed_values() -> None:
    # user 0: hit at rank 2 of 2 relevant; user 1: hit at rank 1 of 1 relevant.
    recs = np.array([[4, 1], [2, 0]])
    dcg0 = 1 / math.log2(3)
    idcg0 = 1 + 1 / math.log2(3)
    assert ndcg_at_k(recs, HELD, 2) == pytest.approx((dcg0 / idcg0 + 1.0) / 2)
    assert precision_at_k(recs, HELD, 2) == pytest.approx((0.5 + 0.5) / 2)
    assert recall_at_k(recs, HELD, 2) == pytest.approx((0.5 + 1.0) / 2)
    assert map_at_k(recs, HELD, 2) == pytest.approx((0.5 / 2 + 1.0) / 2)


def test_users_without_held_out_items_are_ignored_and_padding_is_no_hit() -> None:
    held = sp.csr_matrix(np.array([[1, 0, 0], [0, 0, 0]], dtype=np.float32))
    recs = np.array([[0, -1], [1, 2]])
    assert ndcg_at_k(recs, held, 2) == pytest.approx(1.0)
    assert precision_at_k(recs, held, 2) == pytest.approx(0.5)


def test_coverage_and_novelty() -> None:
    recs = np.array([[0, 1], [0, 2]])
    assert catalog_coverage(recs, 10, 2) == pytest.approx(0.3)
    popularity = np.array([4, 1, 1, 0])
    assert novelty(recs, popularity, 4, 2) == pytest.approx(np.mean([0, 2, 0, 2]))


def test_evaluate_all_keys() -> None:
    train = sp.csr_matrix(np.ones((2, 5), dtype=np.float32))
    out = evaluate_all(np.array([[0, 1], [2, 3]]), HELD, train, k=2)
    assert set(out) == {
        f"{m}@2" for m in ("precision", "recall", "ndcg", "map", "hit_rate", "coverage", "novelty")
    }
