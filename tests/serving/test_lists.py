"""The list endpoints' answers and fallbacks (serving/lists.py), without HTTP or Redis."""

from __future__ import annotations

import numpy as np
import pytest

from feature_repo.definitions import ITEM_ITEM_LIST, NEIGHBORS_LIST
from feature_repo.types import GlobalLists, ScoredItems, TrendList
from serving import lists
from serving.bundle import ServingModel
from serving.personalise import trend_reasons

NONE = ScoredItems(np.empty(0, dtype=str), np.empty(0))


def scored(ids: list[str], scores: list[float]) -> ScoredItems:
    return ScoredItems(np.array(ids, dtype=str), np.array(scores, dtype=float))


def glob(
    popularity: ScoredItems = NONE, trending: ScoredItems = NONE, batch: ScoredItems = NONE
) -> GlobalLists:
    return GlobalLists(popularity, trending, batch)


@pytest.fixture(scope="module")
def model(trained_bundle) -> ServingModel:
    return ServingModel(trained_bundle, "1", "champion")


def trained_order(model: ServingModel, category: str | None = None) -> list[str]:
    """Items by training-time popularity (of a category), positive scores only."""
    keep = model.popularity > 0
    if category is not None:
        keep &= model.category == category
    order = np.argsort(-np.where(keep, model.popularity, -np.inf), kind="stable")
    return model.item_ids[order[: keep.sum()]].tolist()


def ids(items: list[dict] | ScoredItems) -> list[str]:
    if isinstance(items, ScoredItems):
        return list(items.ids)
    return [i["item_id"] for i in items]


def test_live_popularity_falls_back_to_the_batch_list_only_when_empty() -> None:
    live, batch = scored(["a"], [2.0]), scored(["b"], [1.0])
    assert lists.live_popularity(glob(popularity=live, batch=batch)) is live
    assert lists.live_popularity(glob(batch=batch)) is batch
    assert not len(lists.live_popularity(glob()))


def test_popular_without_a_model_is_the_live_list_and_no_category() -> None:
    live = scored(["a", "b", "c"], [3.0, 2.0, 1.0])
    assert ids(lists.popular(glob(popularity=live), None, 2, None)) == ["a", "b"]
    assert ids(lists.popular(glob(batch=live), None, 5, None)) == ["a", "b", "c"]
    assert not len(lists.popular(glob(popularity=live), None, 2, "c1"))


def test_popular_tops_up_from_training_time_popularity_below_the_live_items(
    model: ServingModel,
) -> None:
    first = trained_order(model)[3]
    live = scored([first, "not-in-catalog"], [4.0, 2.0])
    got = lists.popular(glob(popularity=live), model, 6, None)
    rest = [i for i in trained_order(model) if i != first][:4]
    assert ids(got) == [first, "not-in-catalog", *rest]
    # The fill is scaled to at most half the live list's best score, in trained order.
    assert got.scores[2] == pytest.approx(2.0) and np.all(np.diff(got.scores[2:]) <= 0)


def test_popular_of_a_category_keeps_the_category_and_tops_up_within_it(
    model: ServingModel,
) -> None:
    c1, c2 = trained_order(model, "c1"), trained_order(model, "c2")
    live = scored([c2[0], c1[2], "not-in-catalog"], [5.0, 3.0, 1.0])
    got = lists.popular(glob(popularity=live), model, 4, "c1")
    assert ids(got) == [c1[2], *[i for i in c1 if i != c1[2]][:3]]
    assert set(model.category[model.item_index(got.ids)]) == {"c1"}


def test_trained_popularity_is_every_item_best_first(model: ServingModel) -> None:
    assert not len(lists.trained_popularity(None))
    found = lists.trained_popularity(model)
    assert len(found) == model.n_items and np.all(np.diff(found.scores) <= 0)


def test_live_trending_walks_the_chain_each_item_once(model: ServingModel) -> None:
    trained = trained_order(model)
    lists_read = glob(
        trending=scored(["hot", "cold"], [2.0, 0.0]),  # a zero score is not trending
        popularity=scored(["hot", "pop"], [5.0, 4.0]),
        batch=scored(["batch"], [1.0]),
    )
    got = lists.live_trending(lists_read, model, 6, None)
    assert ids(got) == ["hot", "pop", "batch", *trained[:3]]
    assert [i["reason"] for i in got] == ["trending now", "popular right now"] + ["popular"] * 4
    # Without a model the chain ends at the batch list; k stops it early.
    assert ids(lists.live_trending(lists_read, None, 6, None)) == ["hot", "pop", "batch"]
    assert ids(lists.live_trending(lists_read, None, 1, None)) == ["hot"]


def test_live_trending_of_a_category_needs_a_model_and_names_unknown_items(
    model: ServingModel,
) -> None:
    c1 = trained_order(model, "c1")
    lists_read = glob(trending=scored(["new-sku", c1[1]], [3.0, 2.0]))
    assert lists.live_trending(lists_read, None, 3, "c1") == []
    assert ids(lists.live_trending(lists_read, model, 3, "unknown")) == ["new-sku"]
    assert ids(lists.live_trending(lists_read, model, 3, "c1")) == [c1[1], c1[0], c1[2]]


def test_similar_items_fall_back_through_the_item_lists_then_popular(
    model: ServingModel,
) -> None:
    empty = {name: [NONE] for name, _ in lists.SIMILAR_FALLBACKS}
    assert lists.similar_from_lists(empty, 3) == []
    pushed = {
        **empty,
        ITEM_ITEM_LIST: [scored(["x"], [1.0])],
        NEIGHBORS_LIST: [scored(["y"], [1.0])],
    }
    assert [(i["item_id"], i["reason"]) for i in lists.similar_from_lists(pushed, 3)] == [
        ("x", "often chosen together")
    ]
    popular = scored(["a", "b", "c"], [3.0, 2.0, 1.0])
    assert ids(lists.popular_instead_of_similar(popular, "b", 3)) == ["a", "c"]
    assert lists.model_similar(None, "i1", 3) == [] == lists.model_similar(model, "nope", 3)
    similar = lists.model_similar(model, model.item_ids[0], 3)
    assert 0 < len(similar) <= 3 and {i["reason"] for i in similar} == {"similar"}


def test_a_trend_list_answers_with_each_item_s_trend_and_reason() -> None:
    info = [
        {"category": "c1", "trend_type": "burst", "strength": 0.9},
        {"category": None, "trend_type": "rising"},
    ]
    categories = [{"category": "c1", "trend_score": 2.0, "trend_type": "burst"}, {"category": "c2"}]
    found = TrendList(scored(["a", "b"], [2.0, 1.0000004]), info, categories)
    items = lists.trend_analysis_items(found)
    assert [(i["item_id"], i["score"], i["category"]) for i in items] == [
        ("a", 2.0, "c1"),
        ("b", 1.0, None),
    ]
    assert [i["reason"] for i in items] == trend_reasons(info).tolist()
    assert items[0]["trend_type"] == "burst" and items[0]["burst"] is None
    assert set(items[0]) == {"item_id", "score", "category", "reason", *lists.TREND_FIELDS}
    assert lists.trend_categories(found, 1) == [
        {"category": "c1", "trend_score": 2.0, **lists.trend_fields(categories[0])}
    ]
    assert lists.trend_categories(found, 5)[1]["trend_score"] is None
