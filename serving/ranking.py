"""Candidate generation, blending and re-ranking of one request, vectorised over the candidates.

Stage 1 pools candidates from the loaded model's components (ALS with fold-in, Item2Vec, the
item-item model) and from live Redis features (co-view of recent items, decayed popularity,
trending, the batch loop's candidates and pushed neighbours). Stage 2 normalises each source's
scores and blends them with per-source weights. Stage 3 applies business rules (stock, price,
categories, seen items), a freshness boost for items newer than the model, and a per-category cap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from feature_repo.store import EMPTY, ScoredItems
from serving.schemas import Filters
from training.hybrid import HybridRecommender

ITEM_ITEM = ("ease", "itemknn")
_REASONS = {
    "als": "matches your taste",
    "item2vec": "similar to items you viewed",
    "ease": "often chosen with items in your history",
    "itemknn": "often chosen with items in your history",
    "popularity": "popular right now",
    "trending": "trending now",
    "batch": "picked for you",
    "coview": "viewed together with items you viewed",
    "recency": "related to what you just viewed",
}


class ServingModel:
    """A loaded bundle plus the arrays the request path reads, computed once at load."""

    def __init__(self, bundle: HybridRecommender, version: str, variant: str) -> None:
        self.bundle = bundle
        self.version = version
        self.variant = variant
        self.item_ids = np.asarray(bundle.item_ids).astype(str)
        catalog = bundle.catalog
        self.category = catalog["category"].fill_null("").to_numpy().astype(str)
        self.price = catalog["price"].cast(float).fill_null(float("nan")).to_numpy()
        self.in_stock = catalog["in_stock"].fill_null(True).to_numpy().astype(bool)
        self.weights = dict(bundle.weights)
        self.components = bundle.components
        self.item_item = next((n for n in ITEM_ITEM if n in bundle.components), None)
        pop = bundle.components.get("popularity")
        self.popularity = (
            np.asarray(pop.score(sp.csr_matrix((1, bundle.n_items)))[0], dtype=np.float64)
            if pop is not None
            else np.zeros(bundle.n_items)
        )

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def item_index(self, ids: np.ndarray) -> np.ndarray:
        return self.bundle.item_index(ids)

    def user_index(self, user_id: str) -> int:
        return int(self.bundle.user_index([user_id])[0])


@dataclass(frozen=True)
class LiveFeatures:
    """The Redis features of one request; anchors are the newest recent items."""

    recent: ScoredItems = EMPTY
    candidates: ScoredItems = EMPTY
    popularity: ScoredItems = EMPTY
    trending: ScoredItems = EMPTY
    coview: list[ScoredItems] = field(default_factory=list)
    neighbors: list[ScoredItems] = field(default_factory=list)


@dataclass(frozen=True)
class RankingParams:
    candidates_per_source: int = 200
    anchors: int = 10
    recency_half_life: float = 6 * 3600.0
    freshness_boost: float = 0.1
    category_cap: float = 0.4


@dataclass
class Ranked:
    """The chosen items with their blended scores, per-source scores and reasons."""

    item_ids: list[str]
    scores: list[float]
    sources: list[dict[str, float]]
    reasons: list[str]


class _Pool:
    """Candidate ids (sorted, unique) and, per source, normalised scores and who proposed what."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = ids
        self.scores: dict[str, np.ndarray] = {}
        self.proposed: dict[str, np.ndarray] = {}
        self.anchor = np.full(len(ids), -1, dtype=np.int64)
        self.anchor_weight = np.zeros(len(ids))

    def positions(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ids, ids)


def _as_str(ids: np.ndarray) -> np.ndarray:
    return np.asarray(ids, dtype=str) if len(ids) else np.empty(0, dtype=str)


def _max_normalised(values: np.ndarray) -> np.ndarray:
    top = values.max() if len(values) else 0.0
    return values / top if top > 0 else np.zeros_like(values)


def _top(values: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest finite values (unordered)."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.empty(0, dtype=np.int64)
    n = min(n, int(finite.sum()))
    masked = np.where(finite, values, -np.inf)
    return np.argpartition(-masked, n - 1)[:n]


class Ranker:
    """Turns a model (or none) and live features into the top-k items of one request."""

    def __init__(self, params: RankingParams) -> None:
        self.params = params

    def anchor_weights(self, recent: ScoredItems, now: float) -> np.ndarray:
        """Recency weight of each recent item: 1 now, halving every recency_half_life."""
        age = np.maximum(now - recent.scores, 0.0)
        return np.power(0.5, age / self.params.recency_half_life)

    def recommend(
        self,
        model: ServingModel | None,
        weights: dict[str, float],
        user_id: str,
        k: int,
        filters: Filters | None,
        exclude_seen: bool,
        live: LiveFeatures,
        now: float,
    ) -> Ranked:
        params = self.params
        filters = filters or Filters()
        recent_w = self.anchor_weights(live.recent, now)
        anchors = live.recent.ids[: params.anchors]
        anchor_w = recent_w[: params.anchors]

        dense: dict[str, np.ndarray] = {}
        seen_model = np.empty(0, dtype=np.int64)
        if model is not None:
            dense, seen_model = self._model_scores(
                model, weights, user_id, live, recent_w, exclude_seen
            )

        # Stage 1: the pool of candidate ids from every source.
        parts: list[np.ndarray] = []
        model_top: dict[str, np.ndarray] = {}
        for name, scores in dense.items():
            top = _top(scores, params.candidates_per_source)
            model_top[name] = model.item_ids[top]
            parts.append(model_top[name])
        lists = {"coview": live.coview}
        if model is None or "item2vec" not in dense:
            lists["item2vec"] = live.neighbors
        for per_anchor in lists.values():
            parts.extend(_as_str(s.ids) for s in per_anchor)
        flat = {"popularity": live.popularity, "trending": live.trending, "batch": live.candidates}
        for name, scored in flat.items():
            if weights.get(name, 0) > 0:
                parts.append(_as_str(scored.ids))
        joined = np.concatenate(parts) if parts else np.empty(0, dtype=str)
        pool = _Pool(np.unique(joined))
        if not len(pool.ids):
            return Ranked([], [], [], [])

        # Stage 2: normalised per-source scores over the pool, and the blend.
        pool_idx = model.item_index(pool.ids) if model is not None else None
        for name, scores in dense.items():
            values = np.where(pool_idx >= 0, scores[np.maximum(pool_idx, 0)], 0.0)
            pool.scores[name] = np.where(np.isfinite(values), values, 0.0)
            proposed = np.zeros(len(pool.ids), dtype=bool)
            proposed[pool.positions(model_top[name])] = True
            pool.proposed[name] = proposed
        recency = np.zeros(len(pool.ids))
        for name, per_anchor in lists.items():
            self._anchored(pool, name, per_anchor, anchor_w, recency)
        if len(anchors):
            pool.scores["recency"] = recency
            pool.proposed["recency"] = recency > 0
        for name, scored in flat.items():
            if weights.get(name, 0) > 0 and len(scored):
                values = np.zeros(len(pool.ids))
                values[pool.positions(_as_str(scored.ids))] = np.maximum(scored.scores, 0.0)
                pool.scores[name] = _max_normalised(values)
                pool.proposed[name] = values > 0

        blended = np.zeros(len(pool.ids))
        for name, values in pool.scores.items():
            blended += weights.get(name, 0.0) * values
        fresh = np.zeros(len(pool.ids), dtype=bool)
        if model is not None:
            # Items the model has never seen are newer than it: a small boost lets them surface.
            fresh = pool_idx < 0
            blended = np.where(fresh, blended * (1.0 + params.freshness_boost), blended)

        # Stage 3: business rules, seen items, then the category cap.
        keep = self._rules(pool, model, pool_idx, filters)
        if exclude_seen:
            seen = [_as_str(live.recent.ids)]
            if model is not None and len(seen_model):
                seen.append(model.item_ids[seen_model])
            keep &= ~np.isin(pool.ids, np.concatenate(seen))
        keep &= blended > 0
        chosen = self._diversify(pool, model, pool_idx, blended, keep, k)
        return self._explain(pool, chosen, blended, weights, anchors, fresh)

    def _model_scores(
        self,
        model: ServingModel,
        weights: dict[str, float],
        user_id: str,
        live: LiveFeatures,
        recent_w: np.ndarray,
        exclude_seen: bool,
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Per-row min-max normalised scores of each weighted component over all items."""
        n = model.n_items
        user = model.user_index(user_id)
        train_row = (
            model.bundle.user_items[user] if user >= 0 else sp.csr_matrix((1, n), dtype=np.float32)
        )
        idx = model.item_index(live.recent.ids) if len(live.recent) else np.empty(0, dtype=int)
        known = idx >= 0
        live_row = sp.csr_matrix(
            (recent_w[known].astype(np.float32), (np.zeros(known.sum(), dtype=int), idx[known])),
            shape=(1, n),
        )
        row = (train_row + live_row).tocsr()
        seen = row.indices.astype(np.int64)
        out: dict[str, np.ndarray] = {}
        for name, component in model.components.items():
            if weights.get(name, 0.0) <= 0 or name == "popularity":
                continue
            if name == "als":
                if user >= 0:
                    raw = component.score(train_row, np.array([user]))
                elif live_row.nnz:
                    raw = component.score(live_row, np.array([-1]))  # fold-in from live items
                else:
                    continue
            elif name == "item2vec":
                source = live_row if live_row.nnz else train_row
                if not source.nnz:
                    continue
                raw = component.score(source)
            else:
                if not row.nnz:
                    continue
                raw = component.score(row)
            raw = np.array(raw, dtype=np.float32, copy=True)
            if exclude_seen and len(seen):
                raw[0, seen] = -np.inf
            out[name] = model.bundle.normalise(raw)[0].astype(np.float64)
        return out, seen

    @staticmethod
    def _anchored(
        pool: _Pool,
        name: str,
        per_anchor: list[ScoredItems],
        anchor_w: np.ndarray,
        recency: np.ndarray,
    ) -> None:
        """Sum of recency-weighted, per-anchor max-normalised list scores; remembers the anchor."""
        chunks = [
            (j, _as_str(s.ids), _max_normalised(s.scores))
            for j, s in enumerate(per_anchor[: len(anchor_w)])
            if len(s)
        ]
        if not chunks:
            return
        pos = np.concatenate([pool.positions(ids) for _, ids, _ in chunks])
        which = np.concatenate([np.full(len(ids), j) for j, ids, _ in chunks])
        contrib = np.concatenate([v for _, _, v in chunks]) * anchor_w[which]
        values = np.zeros(len(pool.ids))
        np.add.at(values, pos, contrib)
        pool.scores[name] = _max_normalised(values)
        pool.proposed[name] = values > 0
        np.maximum.at(recency, pos, anchor_w[which])
        # The strongest single contribution names the anchor in the reason.
        order = np.argsort(contrib, kind="stable")
        stronger = contrib[order] > pool.anchor_weight[pos[order]]
        pool.anchor[pos[order][stronger]] = which[order][stronger]
        np.maximum.at(pool.anchor_weight, pos, contrib)

    @staticmethod
    def _rules(
        pool: _Pool, model: ServingModel | None, pool_idx: np.ndarray | None, filters: Filters
    ) -> np.ndarray:
        n = len(pool.ids)
        keep = np.ones(n, dtype=bool)
        if filters.exclude_item_ids:
            keep &= ~np.isin(pool.ids, np.asarray(filters.exclude_item_ids, dtype=str))
        known = pool_idx >= 0 if pool_idx is not None else np.zeros(n, dtype=bool)
        safe = np.maximum(pool_idx, 0) if pool_idx is not None else None
        category = np.full(n, "", dtype=object)
        price = np.full(n, np.nan)
        if model is not None:
            category = np.where(known, model.category[safe], "")
            price = np.where(known, model.price[safe], np.nan)
            if filters.in_stock_only:
                keep &= ~known | model.in_stock[safe]
        if filters.categories:
            keep &= np.isin(category, filters.categories)
        if filters.exclude_categories:
            keep &= ~np.isin(category, filters.exclude_categories)
        # An item of unknown price cannot be shown to satisfy a price range.
        if filters.price_min is not None:
            keep &= price >= filters.price_min
        if filters.price_max is not None:
            keep &= price <= filters.price_max
        return keep

    def _diversify(
        self,
        pool: _Pool,
        model: ServingModel | None,
        pool_idx: np.ndarray | None,
        blended: np.ndarray,
        keep: np.ndarray,
        k: int,
    ) -> np.ndarray:
        """Best-first pool positions, at most category_cap*k per category while others remain."""
        candidates = np.flatnonzero(keep)
        order = candidates[np.argsort(-blended[candidates], kind="stable")]
        if model is None or not len(order):
            return order[:k]
        idx = pool_idx[order]
        category = np.where(idx >= 0, model.category[np.maximum(idx, 0)], "")
        cap = max(1, math.ceil(self.params.category_cap * k))
        codes = np.unique(category, return_inverse=True)[1]
        by_code = np.argsort(codes, kind="stable")
        sorted_codes = codes[by_code]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_codes)) + 1]
        rank = np.empty(len(order), dtype=np.int64)
        rank[by_code] = np.arange(len(order)) - np.repeat(
            starts, np.diff(np.r_[starts, len(order)])
        )
        within = (rank < cap) | (category == "")
        # When the cap leaves fewer than k items, the best capped-out ones fill the rest.
        return np.concatenate([order[within], order[~within]])[:k]

    @staticmethod
    def _explain(
        pool: _Pool,
        chosen: np.ndarray,
        blended: np.ndarray,
        weights: dict[str, float],
        anchors: np.ndarray,
        fresh: np.ndarray,
    ) -> Ranked:
        names = list(pool.scores)
        if not len(chosen):
            return Ranked([], [], [], [])
        matrix = np.stack([pool.scores[n][chosen] for n in names])
        proposed = np.stack([pool.proposed[n][chosen] for n in names])
        contribution = matrix * np.array([weights.get(n, 0.0) for n in names])[:, None]
        best = np.argmax(np.where(proposed, contribution, -1.0), axis=0)
        item_ids = pool.ids[chosen].tolist()
        sources, reasons = [], []
        for col, position in enumerate(chosen):
            sources.append(
                {
                    names[r]: round(float(matrix[r, col]), 4)
                    for r in np.flatnonzero(proposed[:, col])
                }
            )
            top = names[best[col]]
            anchor = pool.anchor[position]
            if top in ("coview", "item2vec", "recency") and anchor >= 0:
                verb = "viewed together with" if top == "coview" else "similar to"
                reason = f"{verb} {anchors[anchor]}"
            else:
                reason = _REASONS.get(top, "recommended")
            if fresh[position]:
                reason += "; new arrival"
            reasons.append(reason)
        return Ranked(item_ids, blended[chosen].round(6).tolist(), sources, reasons)
