"""What /similar_items, /popular and /trending answer and fall back to: plain functions of the lists
already read, the serving model and a size, so each fallback is tested without HTTP or Redis."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from feature_repo.definitions import ITEM_ITEM_LIST, NEIGHBORS_LIST
from feature_repo.types import GlobalLists, ScoredItems, TrendList
from serving.bundle import ServingModel
from serving.personalise import trend_reasons

# The per-item lists /similar_items falls back to, in order, and the reason each one gives.
SIMILAR_FALLBACKS = (
    ("coview", "viewed together"),
    (ITEM_ITEM_LIST, "often chosen together"),
    (NEIGHBORS_LIST, "similar"),
)
TREND_FIELDS = ("trend_type", "strength", "confidence", "burst", "velocity", "predicted_direction")


def trend_fields(info: dict) -> dict:
    """The trend analysis' fields of one item or category (None where it has none)."""
    return {name: info.get(name) for name in TREND_FIELDS}


def trend_categories(found: TrendList, k: int) -> list[dict]:
    """The first k categories of a trend list with their trend."""
    return [
        {"category": c["category"], "trend_score": c.get("trend_score"), **trend_fields(c)}
        for c in found.categories[:k]
    ]


def trend_analysis_items(found: TrendList) -> list[dict]:
    """The items of a trend list with their category, trend and the reason shown for each."""
    reasons = trend_reasons(found.info)
    return [
        {
            "item_id": item_id,
            "score": round(score, 6),
            "category": info.get("category"),
            "reason": reason,
            **trend_fields(info),
        }
        for item_id, score, info, reason in zip(
            found.items.ids.tolist(),
            found.items.scores.tolist(),
            found.info,
            reasons.tolist(),
            strict=True,
        )
    ]


def scored_items(scored: ScoredItems, reason: str, k: int) -> list[dict]:
    """The first k items as response entries with one reason."""
    return [
        {"item_id": i, "score": round(float(s), 6), "reason": reason}
        for i, s in zip(scored.ids[:k].tolist(), scored.scores[:k].tolist(), strict=True)
    ]


def live_popularity(lists: GlobalLists) -> ScoredItems:
    """Decayed live popularity, else the batch loop's (the live list is empty after a flush)."""
    return lists.popularity if len(lists.popularity) else lists.batch_popularity


def trained_popularity(model: ServingModel | None) -> ScoredItems:
    """The model's training-time popularity, best first (every item of its catalog)."""
    if model is None:
        return ScoredItems(np.empty(0, dtype=str), np.empty(0))
    order = np.argsort(-model.popularity, kind="stable")
    return ScoredItems(model.item_ids[order], model.popularity[order])


def popular(
    lists: GlobalLists, model: ServingModel | None, k: int, category: str | None
) -> ScoredItems:
    """The k most popular items (of a category): live popularity, topped up from the model's
    training-time popularity when it has fewer (e.g. right after a Redis flush). A category needs
    the model's catalog."""
    live = live_popularity(lists)
    if category is None and (len(live.ids) >= k or model is None):
        # Nothing to filter or top up: the list as read (its string array is what the request
        # path's id lookup takes without a copy).
        return ScoredItems(live.ids[:k], live.scores[:k])
    ids = np.asarray(live.ids, dtype=object)
    scores = live.scores
    if category is not None:
        if model is None:
            return ScoredItems(ids[:0], scores[:0])
        idx = model.item_index(ids) if len(ids) else np.empty(0, dtype=int)
        keep = (idx >= 0) & (model.category[np.maximum(idx, 0)] == category)
        ids, scores = ids[keep], scores[keep]
    if len(ids) < k and model is not None:
        extra = model.popularity.copy()
        if category is not None:
            extra[model.category != category] = -np.inf
        extra[model.item_index(ids)] = -np.inf if len(ids) else extra[:0]
        order = np.argsort(-extra, kind="stable")[: k - len(ids)]
        order = order[np.isfinite(extra[order]) & (extra[order] > 0)]
        # Scaled below the live list's best, so a topped-up item never outranks a live one's top.
        top = scores.max() if len(scores) else 1.0
        fill = extra[order] / max(extra[order].max() if len(order) else 1.0, 1e-12) * top * 0.5
        ids = np.concatenate([ids, model.item_ids[order].astype(object)])
        scores = np.concatenate([scores, fill])
    return ScoredItems(ids[:k], scores[:k])


def model_similar(model: ServingModel | None, item_id: str, k: int) -> list[dict]:
    """The model's item-item neighbours of `item_id` (none for an item it does not know)."""
    if model is None:
        return []
    idx = model.item_index(np.array([item_id]))[0]
    if idx < 0:
        return []
    found, scores = model.bundle.similar_items(np.array([idx]), k)
    valid = np.isfinite(scores[0])
    return [
        {"item_id": model.item_ids[j], "score": round(float(s), 6), "reason": "similar"}
        for j, s in zip(found[0][valid], scores[0][valid], strict=True)
    ]


def similar_from_lists(lists: Mapping[str, list[ScoredItems]], k: int) -> list[dict]:
    """The first non-empty of the item's SIMILAR_FALLBACKS lists (read for one item)."""
    for name, reason in SIMILAR_FALLBACKS:
        scored = lists[name][0]
        if len(scored):
            return scored_items(scored, reason, k)
    return []


def popular_instead_of_similar(popular_items: ScoredItems, item_id: str, k: int) -> list[dict]:
    """The last fallback of /similar_items: popular items other than the item itself."""
    items = scored_items(popular_items, "popular right now", k)
    return [i for i in items if i["item_id"] != item_id]


def live_trending(
    lists: GlobalLists, model: ServingModel | None, k: int, category: str | None
) -> list[dict]:
    """The fallback of /trending where the trend analysis has no list: the live 2-hour trending
    list, then live decayed popularity, then the batch loop's popularity, then the model's
    training-time popularity, each item once; its reason names its list.

    Categories are named as in the trend analysis (`unknown`: items the model's catalog gives no
    category or does not list), so a category needs a model.
    """
    if category is not None and model is None:
        return []
    chain = (
        ("trending now", lambda: lists.trending),
        ("popular right now", lambda: lists.popularity),
        ("popular", lambda: lists.batch_popularity),
        ("popular", lambda: trained_popularity(model)),
    )
    items: dict[str, dict] = {}
    for reason, read in chain:
        scored = read()
        ids, scores = np.asarray(scored.ids, dtype=str), scored.scores
        keep = scores > 0
        if category is not None and model is not None and len(ids):
            idx = model.item_index(ids)
            names = np.where(idx >= 0, model.category[np.maximum(idx, 0)], "")
            keep &= np.where(names == "", "unknown", names) == category
        for item in scored_items(ScoredItems(ids[keep], scores[keep]), reason, k):
            items.setdefault(item["item_id"], item)
        if len(items) >= k:
            break
    return list(items.values())[:k]
