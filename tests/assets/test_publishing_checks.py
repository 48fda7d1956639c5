"""The publishing checks that guard registration: batch lists and item neighbours."""

import polars as pl

from assets.publishing import batch_recommendations_exclude_seen, item_neighbors_valid
from tests.conftest import make_events
from training.train import interactions_from

_RECS = {"user_id": pl.String, "item_id": pl.String, "rank": pl.Int64, "score": pl.Float64}


def test_an_empty_batch_list_passes_instead_of_crashing() -> None:
    # A user who has seen every item gets no list; scipy's empty fancy index used to crash here.
    matrix = interactions_from(make_events(n_users=4, n_items=8))
    result = batch_recommendations_exclude_seen(
        interaction_matrix=matrix, batch_recommendations=pl.DataFrame(schema=_RECS)
    )
    assert result.passed


def test_a_seen_item_in_a_batch_list_fails() -> None:
    events = make_events(n_users=4, n_items=8)
    matrix = interactions_from(events)
    seen = events.row(0, named=True)
    recs = pl.DataFrame(
        {"user_id": [seen["user_id"]], "item_id": [seen["item_id"]], "rank": [1], "score": [1.0]},
        schema=_RECS,
    )
    result = batch_recommendations_exclude_seen(
        interaction_matrix=matrix, batch_recommendations=recs
    )
    assert not result.passed and result.metadata["seen_items"].value == 1


def test_item_neighbors_fail_on_self_pairs_duplicates_and_nan() -> None:
    good = pl.DataFrame(
        {
            "item_id": ["i1", "i1", "i2"],
            "neighbor_id": ["i2", "i3", "i1"],
            "rank": [1, 2, 1],
            "score": [0.9, 0.5, 0.9],
        }
    )
    assert item_neighbors_valid(item_neighbors=good).passed
    assert item_neighbors_valid(item_neighbors=good.head(0)).passed
    self_pair = good.with_columns(neighbor_id=pl.Series(["i1", "i3", "i1"]))
    duplicate = pl.concat([good, good.head(1)])
    nan = good.with_columns(score=pl.Series([0.9, float("nan"), 0.9]))
    for bad in (self_pair, duplicate, nan):
        assert not item_neighbors_valid(item_neighbors=bad).passed
