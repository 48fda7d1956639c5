"""The request's feature reader (serving/features.py) over a real Redis, without HTTP."""

from __future__ import annotations

import time

import pytest

from feature_repo.definitions import ITEM_ITEM_LIST, NEIGHBORS_LIST
from feature_repo.store import FeatureStore
from serving.bundle import ServingModel
from serving.errors import DependencyUnavailable
from serving.features import FeatureReader, cache_signature, list_names
from serving.lists import trained_popularity
from serving.metrics import service_metrics
from serving.outage import Outage
from serving.ranking import Ranker, RankingParams
from serving.schemas import RecommendRequest
from serving.settings import ServingSettings
from training.events import EventLimits, check_batch


@pytest.fixture(scope="module")
def model(trained_bundle) -> ServingModel:
    return ServingModel(trained_bundle, "7", "challenger")


def reader(store: FeatureStore, outage: Outage | None = None) -> FeatureReader:
    return FeatureReader(
        lambda: store, ServingSettings(), outage or Outage("Redis"), service_metrics()
    )


def test_list_names_read_only_the_pushed_lists_the_model_lacks(model: ServingModel) -> None:
    assert list_names(None) == ["coview", NEIGHBORS_LIST, ITEM_ITEM_LIST]
    expected = ["coview"]
    if "item2vec" not in model.components:
        expected.append(NEIGHBORS_LIST)
    if model.item_item is None:
        expected.append(ITEM_ITEM_LIST)
    assert list_names(model) == expected


def test_cache_signature_names_the_model_and_the_request(model: ServingModel) -> None:
    body = RecommendRequest(user_id="u1", k=5)
    assert cache_signature(None, body) == "popularity|None|5|1|||None"
    assert cache_signature(model, body).startswith("challenger|7|5|1|")
    filtered = RecommendRequest(user_id="u1", k=5, filters={"in_stock_only": True})
    assert cache_signature(model, filtered) != cache_signature(model, body)
    # Asked-for fields and the live catalog's version are part of it too.
    fields = RecommendRequest(user_id="u1", k=5, fields=["title"])
    assert cache_signature(model, fields) != cache_signature(model, body)
    assert cache_signature(model, body, "3") != cache_signature(model, body, "4")


def test_a_request_reads_its_features_then_its_cached_answer(store: FeatureStore) -> None:
    now = time.time()
    raw = [
        {"user_id": "u1", "item_id": "a", "event_type": "view", "timestamp": int(now) - 2},
        {"user_id": "u2", "item_id": "b", "event_type": "purchase", "timestamp": int(now) - 1},
    ]
    # As /events stores them.
    store.ingest(check_batch(raw, now, EventLimits()).events)
    features = reader(store)
    body = RecommendRequest(user_id="u1", k=3)
    read = features.for_request(body, None, now)
    assert read.cached is None and not read.degraded
    assert list(read.live.recent.ids) == ["a"]
    assert set(read.live.popularity.ids) == {"a", "b"}
    features.cache_answer("u1", read, '{"items":[]}', now)
    again = features.for_request(body, None, now)
    assert again.cached == '{"items":[]}' and again.signature == read.signature


def test_while_redis_is_down_only_a_model_answers(store: FeatureStore, model: ServingModel) -> None:
    outage = Outage("Redis")
    outage.failed(ConnectionError("gone"))
    try:
        features = reader(store, outage)
        body = RecommendRequest(user_id="u1", k=3)
        with pytest.raises(DependencyUnavailable, match="no model is loaded"):
            features.for_request(body, None, time.time())
        read = features.for_request(body, model, time.time())
        assert read.degraded and read.cached is None and not len(read.live.recent)
        # No list read yet: the degraded global lists are empty.
        lists, degraded = features.global_lists()
        assert degraded and not len(lists.popularity)
        # The model's own popularity serves instead, so a new visitor still gets items.
        assert list(read.live.popularity.ids) == list(trained_popularity(model).ids[:100])
        ranked = Ranker(RankingParams()).recommend(
            model=model,
            weights=model.blend,
            user_id="a-new-visitor",
            k=3,
            filters=None,
            exclude_seen=True,
            live=read.live,
            now=time.time(),
        )
        assert len(ranked.item_ids) == 3
    finally:
        outage.stop()


def test_the_trend_list_leaves_out_what_the_catalog_gate_refuses(store: FeatureStore) -> None:
    import polars as pl

    from tests.feature_repo.test_analytics_features import trend_items

    store.push_trends(trend_items())
    # A live catalog that lists every trend item but "c": "c" may not be recommended.
    listed = pl.DataFrame({"item_id": ["a", "b", "d", "e", "f"], "title": ["x"] * 5})
    store.write_catalog(listed)
    features = reader(store)
    features.global_lists()  # the catalog version the gate reads, as a request would
    for _ in range(2):  # the fresh read and the one reused for trends_ttl agree
        items, reasons = features.trend_list(time.time())
        assert "c" not in set(items.ids) and len(reasons) == len(items)
