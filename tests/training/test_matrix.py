"""Interaction matrix construction and the per-user split."""

import numpy as np
import polars as pl
import pytest

from training.data import EVENT_TYPE_DTYPE
from training.matrix import build_interaction_matrix, decayed_popularity, split_per_user


def _events(rows: list[tuple[str, str, str, int, float | None]]) -> pl.DataFrame:
    return pl.DataFrame(
        rows,
        schema={
            "user_id": pl.String,
            "item_id": pl.String,
            "event_type": pl.String,
            "timestamp": pl.Int64,
            "value": pl.Float64,
        },
        orient="row",
    ).with_columns(pl.col("event_type").cast(EVENT_TYPE_DTYPE))


def test_weights_sum_per_pair_and_ratings_use_value() -> None:
    events = _events(
        [
            ("u1", "a", "view", 100, None),
            ("u1", "a", "purchase", 100, None),
            ("u2", "b", "rating", 100, 4.0),
            ("u2", "a", "click", 100, None),
        ]
    )
    m = build_interaction_matrix(events)
    assert list(m.user_ids) == ["u1", "u2"] and list(m.item_ids) == ["a", "b"]
    dense = m.matrix.toarray()
    np.testing.assert_allclose(dense, [[11.0, 0.0], [3.0, 4.0]])


def test_half_life_halves_weight_of_old_events() -> None:
    day = 86400
    events = _events([("u", "old", "view", 0, None), ("u", "new", "view", 10 * day, None)])
    m = build_interaction_matrix(events, half_life_days=10.0)
    row = dict(zip(m.item_ids, m.matrix.toarray()[0], strict=True))
    assert row["new"] == pytest.approx(1.0)
    assert row["old"] == pytest.approx(0.5)


def test_catalog_items_without_events_get_columns_and_lookups() -> None:
    events = _events([("u", "a", "view", 0, None)])
    m = build_interaction_matrix(events, item_ids=["a", "z"])
    assert list(m.item_ids) == ["a", "z"]
    assert m.item_index(["z", "missing"]).tolist() == [1, -1]
    assert m.user_index(["u", "nobody"]).tolist() == [0, -1]


def test_empty_events_raise() -> None:
    with pytest.raises(ValueError, match="no events"):
        build_interaction_matrix(_events([]))


def test_split_per_user_partitions_and_keeps_a_training_item() -> None:
    rng = np.random.default_rng(0)
    import scipy.sparse as sp

    dense = (rng.random((50, 30)) < 0.3).astype(np.float32)
    dense[0] = 0
    dense[0, 3] = 1  # a user with one interaction stays entirely in train
    matrix = sp.csr_matrix(dense)
    train, test = split_per_user(matrix, 0.25, seed=1)
    assert (train + test - matrix).nnz == 0
    assert train.multiply(test).nnz == 0
    assert test[0].nnz == 0
    assert (np.diff(train.indptr)[np.diff(matrix.indptr) > 0] >= 1).all()
    share = test.nnz / matrix.nnz
    assert 0.18 < share < 0.32
    again, _ = split_per_user(matrix, 0.25, seed=1)
    assert (again != train).nnz == 0


def test_decayed_popularity_orders_recent_first() -> None:
    day = 86400
    events = _events(
        [
            ("u1", "old", "view", 0, None),
            ("u2", "old", "view", 0, None),
            ("u3", "new", "view", 30 * day, None),
        ]
    )
    table = decayed_popularity(events, half_life_days=7.0)
    assert table["item_id"].to_list() == ["new", "old"]


def test_values_breaking_the_contract_are_left_out_and_counted() -> None:
    events = _events(
        [
            ("u1", "a", "rating", 100, 4.0),
            ("u1", "b", "rating", 100, 1e308),
            ("u2", "a", "rating", 100, -1e308),
            ("u2", "b", "rating", 100, float("nan")),
            ("u2", "c", "purchase", 100, float("inf")),
            ("u3", "c", "purchase", 100, 2.0),
            ("u3", "a", "view", 100, None),
        ]
    )
    m = build_interaction_matrix(events)
    assert m.dropped_events == 4
    assert np.isfinite(m.matrix.data).all()
    assert list(m.user_ids) == ["u1", "u3"]
    assert list(m.item_ids) == ["a", "c"]
    np.testing.assert_allclose(m.matrix.toarray(), [[4.0, 0.0], [1.0, 10.0]])
    popular = decayed_popularity(events, now=100)
    assert popular["score"].is_finite().all() and popular["events"].sum() == 3
    with pytest.raises(ValueError, match="no usable events"):
        build_interaction_matrix(events.slice(1, 1))
