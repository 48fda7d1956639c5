"""Candidate generation, blending and re-ranking of one /recommend request, vectorised over the
candidates (see docs/serving.md for the stages and weights)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import scipy.sparse as sp

from feature_repo.store import EMPTY, ScoredItems, UserProfile
from serving.personalise import SegmentBoost, segment_boost
from serving.schemas import Filters
from serving.settings import (
    DEFAULT_COLD_START_BLEND,
    DEFAULT_SEGMENT_RULES,
    SegmentRule,
    ServingSettings,
    blend_weights,
)
from training.hybrid import HybridRecommender
from training.matrix import lookup

ITEM_ITEM = ("ease", "itemknn")
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
_NO_IDS = np.empty(0, dtype=str)


class ServingModel:
    """A loaded bundle plus the arrays the request path reads, computed once at load."""

    def __init__(self, bundle: HybridRecommender, version: str, variant: str) -> None:
        self.bundle = bundle
        self.version = version
        self.variant = variant
        self.item_ids = np.asarray(bundle.item_ids).astype(str)
        if len(self.item_ids) > 1 and not np.all(self.item_ids[:-1] < self.item_ids[1:]):
            raise ValueError("the bundle's item_ids must be sorted and unique")
        self.user_ids = np.asarray(bundle.user_ids).astype(str)
        catalog = bundle.catalog
        names = catalog["category"].fill_null("").to_numpy().astype(str)
        self.categories, codes = np.unique(names, return_inverse=True)
        self.category_code = np.where(names == "", -1, codes).astype(np.int64)
        self.category = names
        self.price = catalog["price"].cast(float).fill_null(float("nan")).to_numpy()
        self.price_percentile = price_percentiles(catalog)
        brands = catalog["brand"] if "brand" in catalog.columns else pl.Series([None] * len(names))
        self.brand = brands.cast(pl.String).fill_null("").to_numpy().astype(str)
        self.in_stock = catalog["in_stock"].fill_null(True).to_numpy().astype(bool)
        self.weights = dict(bundle.weights)
        # Per-source blend weights; the service sets them from its settings before serving.
        self.blend: dict[str, float] = blend_weights(ServingSettings(), self.weights)
        self.components = bundle.components
        self.item_item = next((n for n in ITEM_ITEM if n in bundle.components), None)
        pop = bundle.components.get("popularity")
        self.popularity = (
            np.asarray(pop.score(sp.csr_matrix((1, bundle.n_items)))[0], dtype=np.float64)
            if pop is not None
            else np.zeros(bundle.n_items)
        )
        ui = bundle.user_items.tocsr()
        self._indptr, self._indices, self._data = ui.indptr, ui.indices, ui.data

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def item_index(self, ids: np.ndarray) -> np.ndarray:
        """Column of each id, -1 for ids the model does not know."""
        return lookup(self.item_ids, np.asarray(ids, dtype=str))

    def user_index(self, user_id: str) -> int:
        return int(lookup(self.user_ids, np.array([user_id], dtype=str))[0])

    def user_row(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """(item columns, confidences) of a known user's training interactions."""
        start, stop = self._indptr[user], self._indptr[user + 1]
        return self._indices[start:stop], self._data[start:stop]

    def category_codes(self, names: list[str]) -> np.ndarray:
        """Codes of category names (names the catalog lacks match nothing)."""
        pos = lookup(self.categories, np.asarray(names, dtype=str))
        return pos[pos >= 0]


def price_percentiles(catalog: pl.DataFrame) -> np.ndarray:
    """Each item's price percentile within its category (0 = cheapest, 0.5 when alone), over
    the whole catalog for items without a category; NaN without a price."""
    price = pl.col("price").cast(pl.Float64).fill_nan(None)
    category = pl.col("category").cast(pl.String)

    def percentile(rank: pl.Expr, count: pl.Expr) -> pl.Expr:
        return pl.when(count > 1).then((rank - 1) / (count - 1)).otherwise(0.5)

    within = percentile(price.rank("average").over(category), price.count().over(category))
    overall = percentile(price.rank("average"), price.count())
    pct = pl.when(price.is_null()).then(None).when(category.is_null()).then(overall)
    out = catalog.select(pct.otherwise(within).cast(pl.Float64).alias("pct"))["pct"]
    return out.fill_null(float("nan")).to_numpy()


def _row(n: int, columns: np.ndarray, values: np.ndarray, unique: bool = False) -> sp.csr_matrix:
    """A 1 x n CSR row; duplicate columns are summed unless the caller knows there are none."""
    if len(columns) and not unique:
        columns, inverse = np.unique(columns, return_inverse=True)
        values = np.bincount(inverse, weights=values)
    indptr = np.array([0, len(columns)], dtype=np.int32)
    return sp.csr_matrix(
        (values.astype(np.float32), columns.astype(np.int32), indptr), shape=(1, n)
    )


@dataclass(frozen=True)
class LiveFeatures:
    """The Redis features of one request; anchors are the newest recent items."""

    recent: ScoredItems = EMPTY
    candidates: ScoredItems = EMPTY
    popularity: ScoredItems = EMPTY
    trending: ScoredItems = EMPTY
    # The trend analysis' list (trend_score) and the reason shown for each of its items.
    trend: ScoredItems = EMPTY
    trend_reasons: np.ndarray | None = None
    profile: UserProfile | None = None
    coview: list[ScoredItems] = field(default_factory=list)
    neighbors: list[ScoredItems] = field(default_factory=list)
    item_item: list[ScoredItems] = field(default_factory=list)


@dataclass(frozen=True)
class RankingParams:
    candidates_per_source: int = 100
    anchors: int = 10
    recency_half_life: float = 6 * 3600.0
    freshness_boost: float = 0.1
    category_cap: float = 0.4
    cold_start_blend: dict[str, float] = field(
        default_factory=lambda: dict(DEFAULT_COLD_START_BLEND)
    )
    segment_rules: dict[str, SegmentRule] = field(
        default_factory=lambda: dict(DEFAULT_SEGMENT_RULES)
    )


@dataclass
class Ranked:
    """The chosen items with their blended scores, per-source scores and reasons."""

    item_ids: list[str]
    scores: list[float]
    sources: list[dict[str, float]]
    reasons: list[str]
    segment: str | None = None  # the segment whose rule re-ranked the answer


EMPTY_RANKED = Ranked([], [], [], [])


class _Ids:
    """Maps item id strings to candidate ids: model columns, then per-request ids for the rest."""

    def __init__(self, model: ServingModel | None, arrays: list[np.ndarray]) -> None:
        self.n_model = model.n_items if model is not None else 0
        self.model = model
        sizes = [len(a) for a in arrays]
        flat = np.concatenate([np.asarray(a, dtype=str) for a in arrays]) if arrays else _NO_IDS
        idx = model.item_index(flat) if model is not None else np.full(len(flat), -1)
        unknown = idx < 0
        self.extra, inverse = np.unique(flat[unknown], return_inverse=True)
        idx[unknown] = self.n_model + inverse
        bounds = np.cumsum([0, *sizes]).tolist()
        self.parts = [idx[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def names(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty(len(ids), dtype=object)
        known = ids < self.n_model
        if self.model is not None:
            out[known] = self.model.item_ids[ids[known]]
        out[~known] = self.extra[ids[~known] - self.n_model]
        return out


class Ranker:
    """Turns a model (or none) and live features into the top-k items of one request.

    Stage 1 pools candidates from the model's components and the live lists; stage 2 normalises
    each source's scores and blends them; stage 3 applies business rules, seen items, a freshness
    boost for items newer than the model, the boosts of the user's segment and a per-category
    cap. A user with no history anywhere is ranked by the cold-start blend (the trend analysis'
    list first) when a trend list is there. Candidates are integer ids (the
    model's item columns, then one per request for each item the model does not know), so every
    step is an array operation.
    """

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
        # A user with no history anywhere gets the cold-start blend when a trend list was
        # pushed, and also when the blend has no live list that could serve them: a trained
        # blend leaves popularity out when it loses on validation, and the 2-hour trending list
        # is often empty, which left a new visitor with nothing.
        cold = (
            not len(live.recent)
            and not len(live.candidates)
            and (model is None or model.user_index(user_id) < 0)
        )
        if (
            params.cold_start_blend
            and cold
            and (
                len(live.trend)
                or not any(
                    weights.get(name, 0) > 0 and len(getattr(live, name))
                    for name in ("popularity", "trending")
                )
            )
        ):
            weights = params.cold_start_blend
        recent_w = self.anchor_weights(live.recent, now)
        n_anchor = min(params.anchors, len(live.recent))
        anchor_w = recent_w[:n_anchor]

        # Every id string of the request mapped at once; lists are [recent, exclusions,
        # popularity, trending, trend, batch, coview per anchor..., neighbours per anchor...].
        coview = live.coview[:n_anchor]
        use_neighbors = (
            model is None or weights.get("item2vec", 0) <= 0 or ("item2vec" not in model.components)
        )
        neighbors = live.neighbors[:n_anchor] if use_neighbors else []
        use_item_item = (
            model is None or model.item_item is None or (weights.get(model.item_item, 0) <= 0)
        )
        item_item = live.item_item[:n_anchor] if use_item_item else []
        flat_lists = {
            "popularity": live.popularity,
            "trending": live.trending,
            "trend": live.trend,
            "batch": live.candidates,
        }
        excluded = np.asarray(filters.exclude_item_ids or [], dtype=str)
        ids = _Ids(
            model,
            [live.recent.ids, excluded]
            + [s.ids for s in flat_lists.values()]
            + [s.ids for s in coview]
            + [s.ids for s in neighbors]
            + [s.ids for s in item_item],
        )
        recent_idx, excluded_idx, *rest = ids.parts
        n_flat = len(flat_lists)
        flat_idx = dict(zip(flat_lists, rest[:n_flat], strict=True))
        coview_idx = rest[n_flat : n_flat + len(coview)]
        neighbor_idx = rest[n_flat + len(coview) : n_flat + len(coview) + len(neighbors)]
        item_item_idx = rest[n_flat + len(coview) + len(neighbors) :]

        dense: dict[str, np.ndarray] = {}
        seen = recent_idx
        if model is not None:
            dense, seen = self._model_scores(
                model, weights, user_id, recent_idx, recent_w, exclude_seen
            )

        # Stage 1: the candidate pool.
        parts = [_top(s, params.candidates_per_source) for s in dense.values()]
        proposed_dense = dict(zip(dense, parts, strict=True))
        parts += [flat_idx[n] for n in flat_lists if weights.get(n, 0) > 0]
        parts += coview_idx + neighbor_idx + item_item_idx
        pool = np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)
        if not len(pool):
            return EMPTY_RANKED
        size = len(pool)

        # Stage 2: normalised per-source scores over the pool, and the blend.
        scores: dict[str, np.ndarray] = {}
        proposed: dict[str, np.ndarray] = {}
        in_model = pool < ids.n_model
        for name, values in dense.items():
            column = np.zeros(size)
            column[in_model] = values[pool[in_model]]
            scores[name] = np.where(np.isfinite(column), column, 0.0)
            mark = np.zeros(size, dtype=bool)
            mark[np.searchsorted(pool, proposed_dense[name])] = True
            proposed[name] = mark
        anchor = np.full(size, -1, dtype=np.int64)
        anchor_best = np.zeros(size)
        recency = np.zeros(size)
        for name, per_anchor, per_idx in (
            ("coview", coview, coview_idx),
            ("item2vec", neighbors, neighbor_idx),
            ("itemitem", item_item, item_item_idx),
        ):
            if per_idx:
                self._anchored(
                    pool,
                    name,
                    per_anchor,
                    per_idx,
                    anchor_w,
                    scores,
                    proposed,
                    recency,
                    anchor,
                    anchor_best,
                )
        if n_anchor:
            scores["recency"] = recency
            proposed["recency"] = recency > 0
        for name, scored in flat_lists.items():
            if weights.get(name, 0) > 0 and len(scored):
                column = np.zeros(size)
                column[np.searchsorted(pool, flat_idx[name])] = np.maximum(scored.scores, 0.0)
                scores[name] = _max_normalised(column)
                proposed[name] = column > 0

        blended = np.zeros(size)
        for name, column in scores.items():
            blended += weights.get(name, 0.0) * column
        fresh = ~in_model if model is not None else np.zeros(size, dtype=bool)
        # Items the model has never seen are newer than it: a small boost lets them surface.
        blended = np.where(fresh, blended * (1.0 + params.freshness_boost), blended)
        profile = live.profile
        rule = params.segment_rules.get(profile.segment) if profile is not None else None
        boost: SegmentBoost | None = None
        cap_share = params.category_cap
        if rule is not None and profile is not None:
            boost = segment_boost(rule, profile, pool, in_model, model, scores.get("trend"))
            blended = blended * boost.multiplier
            if rule.category_cap is not None:
                cap_share = rule.category_cap
        labels = None
        reasons = live.trend_reasons
        if reasons is not None and len(reasons) == len(live.trend) and "trend" in scores:
            labels = np.full(size, "", dtype=object)
            labels[np.searchsorted(pool, flat_idx["trend"])] = reasons

        # Stage 3: business rules, seen items, then the category cap.
        keep = self._rules(pool, in_model, model, filters) & (blended > 0)
        keep &= ~_member(pool, excluded_idx)
        if exclude_seen:
            keep &= ~_member(pool, seen)
        chosen = self._diversify(pool, in_model, model, blended, keep, k, cap_share)
        if not len(chosen):
            return EMPTY_RANKED
        anchors = ids.names(recent_idx[:n_anchor])
        names = ids.names(pool[chosen])
        ranked = _explain(
            names, chosen, blended, scores, proposed, weights, anchor, anchors, fresh, labels, boost
        )
        ranked.segment = profile.segment if rule is not None and profile is not None else None
        return ranked

    def _model_scores(
        self,
        model: ServingModel,
        weights: dict[str, float],
        user_id: str,
        recent_idx: np.ndarray,
        recent_w: np.ndarray,
        exclude_seen: bool,
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Per-row min-max normalised scores of each weighted component over all items, and
        the columns the user has seen (training history and live items)."""
        n = model.n_items
        user = model.user_index(user_id)
        hist_cols, hist_vals = model.user_row(user) if user >= 0 else (_NO_INT, _NO_FLOAT)
        known = recent_idx < n
        live_cols, live_vals = recent_idx[known], recent_w[known]
        # Training columns are unique, and so are the live ones (members of a sorted set).
        seen = np.union1d(hist_cols, live_cols).astype(np.int64)
        rows: dict[str, sp.csr_matrix] = {}

        def row(kind: str) -> sp.csr_matrix:
            """The user's live, training or combined (summed) row, built on first use: a CSR
            row costs more than most of the scoring."""
            if kind not in rows:
                if kind == "live" or (kind == "both" and not len(hist_cols)):
                    rows[kind] = _row(n, live_cols, live_vals, unique=True)
                elif kind == "train" or not len(live_cols):
                    rows[kind] = _row(n, hist_cols, hist_vals, unique=True)
                else:
                    values = np.zeros(len(seen))
                    values[np.searchsorted(seen, hist_cols)] += hist_vals
                    values[np.searchsorted(seen, live_cols)] += live_vals
                    rows[kind] = _row(n, seen, values, unique=True)
            return rows[kind]

        out: dict[str, np.ndarray] = {}
        for name, component in model.components.items():
            if weights.get(name, 0.0) <= 0 or name == "popularity":
                continue
            if name == "als":
                if user >= 0:
                    raw = component.score(row("train"), np.array([user]))
                elif len(live_cols):
                    raw = component.score(row("live"), np.array([-1]))  # fold-in from live items
                else:
                    continue
            elif name == "item2vec":
                if not len(seen):
                    continue
                raw = component.score(row("live" if len(live_cols) else "train"))
            else:
                if not len(seen):
                    continue
                raw = component.score(row("both"))
            raw = np.array(raw, dtype=np.float32)
            if exclude_seen:
                raw[0, seen] = -np.inf
            out[name] = model.bundle.normalise(raw)[0].astype(np.float64)
        return out, seen

    @staticmethod
    def _anchored(
        pool: np.ndarray,
        name: str,
        per_anchor: list[ScoredItems],
        per_idx: list[np.ndarray],
        anchor_w: np.ndarray,
        scores: dict[str, np.ndarray],
        proposed: dict[str, np.ndarray],
        recency: np.ndarray,
        anchor: np.ndarray,
        anchor_best: np.ndarray,
    ) -> None:
        """Sum over anchors of recency-weighted, per-anchor max-normalised list scores; the
        strongest single contribution names the anchor in the reason."""
        sizes = [len(i) for i in per_idx]
        if not sum(sizes):
            return
        pos = np.searchsorted(pool, np.concatenate(per_idx))
        which = np.repeat(np.arange(len(per_idx)), sizes)
        tops = np.array([s.scores.max() if len(s) else 1.0 for s in per_anchor])
        values = np.concatenate([s.scores for s in per_anchor]) / np.repeat(tops, sizes)
        contrib = values * anchor_w[which]
        column = np.zeros(len(pool))
        np.add.at(column, pos, contrib)
        scores[name] = _max_normalised(column)
        proposed[name] = column > 0
        np.maximum.at(recency, pos, anchor_w[which])
        order = np.argsort(contrib, kind="stable")
        stronger = contrib[order] > anchor_best[pos[order]]
        anchor[pos[order][stronger]] = which[order][stronger]
        np.maximum.at(anchor_best, pos, contrib)

    @staticmethod
    def _rules(
        pool: np.ndarray, in_model: np.ndarray, model: ServingModel | None, filters: Filters
    ) -> np.ndarray:
        size = len(pool)
        keep = np.ones(size, dtype=bool)
        code = np.full(size, -1, dtype=np.int64)
        price = np.full(size, np.nan)
        if model is not None:
            cols = pool[in_model]
            code[in_model] = model.category_code[cols]
            price[in_model] = model.price[cols]
            if filters.in_stock_only:
                keep[in_model] &= model.in_stock[cols]
        if filters.categories:
            wanted = model.category_codes(filters.categories) if model is not None else []
            keep &= np.isin(code, wanted)
        if filters.exclude_categories and model is not None:
            keep &= ~np.isin(code, model.category_codes(filters.exclude_categories))
        # An item of unknown price cannot be shown to satisfy a price range.
        if filters.price_min is not None:
            keep &= price >= filters.price_min
        if filters.price_max is not None:
            keep &= price <= filters.price_max
        return keep

    def _diversify(
        self,
        pool: np.ndarray,
        in_model: np.ndarray,
        model: ServingModel | None,
        blended: np.ndarray,
        keep: np.ndarray,
        k: int,
        cap_share: float | None = None,
    ) -> np.ndarray:
        """Best-first pool positions, at most cap_share*k per category (the params' category_cap
        by default) while others remain."""
        candidates = np.flatnonzero(keep)
        order = candidates[np.argsort(-blended[candidates], kind="stable")]
        if model is None or len(order) <= 1:
            return order[:k]
        code = np.full(len(order), -1, dtype=np.int64)
        known = in_model[order]
        code[known] = model.category_code[pool[order][known]]
        share = self.params.category_cap if cap_share is None else cap_share
        cap = max(1, math.ceil(share * k))
        by_code = np.argsort(code, kind="stable")
        sorted_code = code[by_code]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_code)) + 1]
        lengths = np.diff(np.r_[starts, len(order)])
        rank = np.empty(len(order), dtype=np.int64)
        rank[by_code] = np.arange(len(order)) - np.repeat(starts, lengths)
        within = (rank < cap) | (code < 0)
        # When the cap leaves fewer than k items, the best capped-out ones fill the rest.
        return np.concatenate([order[within], order[~within]])[:k]


_NO_INT = np.empty(0, dtype=np.int64)
_NO_FLOAT = np.empty(0, dtype=np.float64)


def _top(values: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest finite values (unordered); scores are finite or -inf."""
    n = min(n, len(values))
    if n <= 0:
        return _NO_INT
    top = np.argpartition(-values, n - 1)[:n]
    return top[np.isfinite(values[top])]


def _max_normalised(values: np.ndarray) -> np.ndarray:
    top = values.max() if len(values) else 0.0
    return values / top if top > 0 else np.zeros_like(values)


def _member(pool: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Which pool entries (sorted) are among `ids`."""
    out = np.zeros(len(pool), dtype=bool)
    if len(ids):
        pos = np.minimum(np.searchsorted(pool, ids), len(pool) - 1)
        out[pos[pool[pos] == ids]] = True
    return out


def _explain(
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
