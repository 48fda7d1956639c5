"""Stage 3 of ranking a request: business rules, the per-category cap, and the explanation of
each chosen item (its per-source scores and the reason shown)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from serving.catalog import ItemAttributes
from serving.personalise import SegmentBoost
from serving.schemas import Filters

_REASONS = {
    "als": "matches your taste",
    "item2vec": "similar to items you viewed",
    "ease": "often chosen with items in your history",
    "itemknn": "often chosen with items in your history",
    "popularity": "popular right now",
    "trending": "trending now",
    "trend": "popular this week",
    "batch": "picked for you",
    "coview": "viewed together with items you viewed",
    "itemitem": "often chosen with items you viewed",
    "recency": "related to what you just viewed",
}
_ANCHORED_VERBS = {
    "coview": "viewed together with",
    "item2vec": "similar to",
    "itemitem": "often chosen with",
    "recency": "similar to",
}


@dataclass
class Ranked:
    """The chosen items with their blended scores, per-source scores and reasons."""

    item_ids: list[str]
    scores: list[float]
    sources: list[dict[str, float]]
    reasons: list[str]
    segment: str | None = None  # the segment whose rule re-ranked the answer
    positions: np.ndarray | None = None  # pool positions of the chosen items
    fields: list[dict] | None = None  # the catalog fields the request asked for, per item
    teams: list[str] | None = None  # interleaving: the arm that drafted each item


EMPTY_RANKED = Ranked([], [], [], [])


def merge_ranked(items: list[str], teams: list[str], by_team: dict[str, Ranked]) -> Ranked:
    """The ranking of an interleaved list: each item with the score, sources, reason and
    fields its team's ranking gave it."""
    index = {team: {item: i for i, item in enumerate(r.item_ids)} for team, r in by_team.items()}
    picked = [(by_team[team], index[team][item]) for item, team in zip(items, teams, strict=True)]
    with_fields = all(r.fields is not None for r in by_team.values())
    return Ranked(
        item_ids=list(items),
        scores=[r.scores[i] for r, i in picked],
        sources=[r.sources[i] for r, i in picked],
        reasons=[r.reasons[i] for r, i in picked],
        fields=[r.fields[i] for r, i in picked] if with_fields else None,  # type: ignore[index]
        teams=list(teams),
    )


def rules(attrs: ItemAttributes, filters: Filters) -> np.ndarray:
    """The request's business rules over the pool, on its live catalog attributes."""
    keep = np.ones(len(attrs.known), dtype=bool)
    price = attrs.price
    if filters.in_stock_only:
        keep &= attrs.in_stock
    if filters.categories:
        keep &= np.isin(attrs.category, np.asarray(filters.categories, dtype=object))
    if filters.exclude_categories:
        keep &= ~np.isin(attrs.category, np.asarray(filters.exclude_categories, dtype=object))
    # An item of unknown price cannot be shown to satisfy a price range.
    if filters.price_min is not None:
        keep &= price >= filters.price_min
    if filters.price_max is not None:
        keep &= price <= filters.price_max
    return keep


def diversify(
    category: np.ndarray,
    blended: np.ndarray,
    keep: np.ndarray,
    k: int,
    cap_share: float,
) -> np.ndarray:
    """Best-first pool positions, at most cap_share*k per category ('' is none) while others
    remain."""
    candidates = np.flatnonzero(keep)
    order = candidates[np.argsort(-blended[candidates], kind="stable")]
    if len(order) <= 1:
        return order[:k]
    names = category[order].astype(str)
    _, code = np.unique(names, return_inverse=True)
    code = np.where(names == "", -1, code).astype(np.int64)
    cap = max(1, math.ceil(cap_share * k))
    by_code = np.argsort(code, kind="stable")
    sorted_code = code[by_code]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_code)) + 1]
    lengths = np.diff(np.r_[starts, len(order)])
    rank = np.empty(len(order), dtype=np.int64)
    rank[by_code] = np.arange(len(order)) - np.repeat(starts, lengths)
    within = (rank < cap) | (code < 0)
    # When the cap leaves fewer than k items, the best capped-out ones fill the rest.
    return np.concatenate([order[within], order[~within]])[:k]


def member(pool: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Which pool entries (sorted) are among `ids`."""
    out = np.zeros(len(pool), dtype=bool)
    if len(ids):
        pos = np.minimum(np.searchsorted(pool, ids), len(pool) - 1)
        out[pos[pool[pos] == ids]] = True
    return out


def explain(
    names: np.ndarray,
    chosen: np.ndarray,
    blended: np.ndarray,
    scores: dict[str, np.ndarray],
    proposed: dict[str, np.ndarray],
    weights: dict[str, float],
    anchor: np.ndarray,
    anchors: np.ndarray,
    fresh: np.ndarray,
    labels: np.ndarray | None = None,
    boost: SegmentBoost | None = None,
) -> Ranked:
    sources = list(scores)
    matrix = np.stack([scores[n][chosen] for n in sources])
    marks = np.stack([proposed[n][chosen] for n in sources])
    contribution = matrix * np.array([weights.get(n, 0.0) for n in sources])[:, None]
    best = np.argmax(np.where(marks, contribution, -1.0), axis=0)
    # Python lists once: per-item dicts from them cost far less than numpy per item.
    values = matrix.round(4).T.tolist()
    flags = marks.T.tolist()
    tops = best.tolist()
    per_item, reasons = [], []
    for col, position in enumerate(chosen.tolist()):
        mark = flags[col]
        per_item.append({n: v for n, v, m in zip(sources, values[col], mark, strict=True) if m})
        top = sources[tops[col]]
        which = anchor[position]
        if top in _ANCHORED_VERBS and which >= 0:
            reason = f"{_ANCHORED_VERBS[top]} {anchors[which]}"
        elif top == "trend" and labels is not None and labels[position]:
            reason = labels[position]
        else:
            reason = _REASONS.get(top, "recommended")
        if fresh[position]:
            reason += "; new arrival"
        if boost is not None:
            reason += boost.note(position)
        reasons.append(reason)
    return Ranked(names.tolist(), blended[chosen].round(6).tolist(), per_item, reasons)
