"""The answers of the read routes that are not personalised (/similar_items, /popular, /trending):
plain functions of the feature reader and the serving model over serving/lists.py's fallbacks,
each returning its response body (the service sends it and logs it as an impression); and the
JSON of a /recommend answer, spliced once so a cached answer is sent without parsing it."""

from __future__ import annotations

import json
import time
import uuid

import numpy as np

from feature_repo.types import ScoredItems, TrendList
from serving import lists
from serving.bundle import ServingModel
from serving.features import NO_ITEMS, FeatureReader
from serving.reranking import Ranked
from serving.schemas import PopularRequest, SimilarItemsRequest, TrendingRequest

# -- /similar_items and /popular ---------------------------------------------------------------


def similar_items(
    features: FeatureReader, model: ServingModel | None, body: SimilarItemsRequest
) -> dict:
    """Items like `item_id`: the model's item-item neighbours, else live co-view, else pushed
    neighbours, else popular items (the reason says which)."""
    items = lists.model_similar(model, body.item_id, body.k)
    degraded = False
    if not items:
        names = [name for name, _ in lists.SIMILAR_FALLBACKS]
        found = features.live(lambda: features.store().item_lists([body.item_id], names, body.k))
        degraded = found is None
        if found is not None:
            items = lists.similar_from_lists(found, body.k)
    items = allowed(features, items, model, body.k)
    if not items:
        popular_items, stale = popular_now(features, model, body.k + 1, None)
        degraded = degraded or stale
        items = lists.popular_instead_of_similar(popular_items, body.item_id, body.k)
    return _items(features, items, model, degraded)


def popular(features: FeatureReader, model: ServingModel | None, body: PopularRequest) -> dict:
    """Most popular items now (decayed live popularity), optionally of one category."""
    found, degraded = popular_now(features, model, body.k, body.category)
    items = lists.scored_items(found, "popular right now", body.k)
    return _items(features, items, model, degraded)


def allowed(
    features: FeatureReader, items: list[dict], model: ServingModel | None, k: int
) -> list[dict]:
    """The first k of `items` that the catalog gate lets through."""
    if not items:
        return items
    keep = features.known(np.array([i["item_id"] for i in items], dtype=str), model)
    return [item for item, ok in zip(items, keep.tolist(), strict=True) if ok][:k]


def _items(
    features: FeatureReader, items: list[dict], model: ServingModel | None, degraded: bool
) -> dict:
    """The body of /similar_items and /popular; nothing to show while degraded and without a
    model is a 503, not an empty list."""
    if degraded and not items and model is None:
        raise features.unavailable("no model is loaded")
    return {
        "items": items,
        "model_version": model.version if model else None,
        "lineage": model.lineage_json if model else None,
        "request_id": uuid.uuid4().hex,
        "degraded": degraded,
    }


def popular_now(
    features: FeatureReader, model: ServingModel | None, k: int, category: str | None
) -> tuple[ScoredItems, bool]:
    """The k most popular items (of a category), and whether Redis was down: then the last
    lists read, topped up from the model's training-time popularity."""
    glob, degraded = features.global_lists(time.time())
    # The live lists are gated already; the model's popularity that tops them up is not.
    found = lists.popular(glob, model, k + 50, category)
    keep = features.known(np.asarray(found.ids, dtype=str), model) if len(found) else []
    return ScoredItems(found.ids[keep][:k], found.scores[keep][:k]), degraded


# -- /trending ---------------------------------------------------------------------------------


def trending(features: FeatureReader, model: ServingModel | None, body: TrendingRequest) -> dict:
    """The trend analysis' top items (of a category) with their trend, and the categories'
    trends; where the analysis has no list, live trending and popular items."""
    # Deeper than k: items the catalog gate refuses are dropped from it.
    depth = 3 * body.k + 20
    found = features.live(lambda: features.store().trending_items(depth, body.category))
    degraded = found is None
    if found is None:
        found = TrendList(NO_ITEMS, [], [])
    categories = lists.trend_categories(found, body.k)
    items = allowed(features, lists.trend_analysis_items(found), model, body.k)
    if items:
        source = "trend_analysis"
    else:
        live, stale = _live_trending(features, model, depth, body.category)
        live = allowed(features, live, model, body.k)
        degraded = degraded or stale
        no_trend = lists.trend_fields({})
        items = [{**item, "category": body.category, **no_trend} for item in live]
        source = "live" if items else "none"
    if degraded and not items and model is None:
        raise features.unavailable("no model is loaded")
    return {
        "items": items,
        "categories": categories,
        "source": source,
        "analysed_at": found.analysed_at,
        "lineage": model.lineage_json if model else None,
        "request_id": uuid.uuid4().hex,
        "degraded": degraded,
    }


def _live_trending(
    features: FeatureReader, model: ServingModel | None, k: int, category: str | None
) -> tuple[list[dict], bool]:
    """lists.live_trending over the global lists, and whether Redis was down (then the last
    lists read, if any, and the model's popularity)."""
    # A category needs the model's catalog: without one, Redis is not asked.
    if category is not None and model is None:
        return [], features.outage.down
    glob, degraded = features.global_lists(time.time())
    return lists.live_trending(glob, model, k, category), degraded


# -- /recommend's JSON -------------------------------------------------------------------------


def recommend_payload(ranked: Ranked, model: ServingModel | None, variant: str) -> str:
    """The cacheable `{items, model_version, lineage, variant, segment}` JSON object of a
    ranking."""
    items = [
        {"item_id": i, "score": s, "sources": src, "reason": r}
        for i, s, src, r in zip(
            ranked.item_ids, ranked.scores, ranked.sources, ranked.reasons, strict=True
        )
    ]
    if ranked.fields is not None:
        for item, fields in zip(items, ranked.fields, strict=True):
            item.update(fields)
    return json.dumps(
        {
            "items": items,
            "model_version": model.version if model is not None else None,
            "lineage": model.lineage_json if model is not None else None,
            "variant": variant,
            "segment": ranked.segment,
        },
        separators=(",", ":"),
    )


def latency_ms(started: float) -> float:
    """Milliseconds since `started` (a time.perf_counter() reading)."""
    return (time.perf_counter() - started) * 1000.0


def envelope(
    payload: str, request_id: str, latency: float, cached: bool, degraded: bool = False
) -> str:
    """Wrap a cached-or-fresh `{items, model_version, variant}` JSON object with request fields
    (`latency`: milliseconds)."""
    return (
        f'{payload[:-1]},"request_id":"{request_id}","latency_ms":{latency:.3f},'
        f'"cached":{"true" if cached else "false"},"degraded":{"true" if degraded else "false"}}}'
    )
