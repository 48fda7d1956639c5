"""Ranking one /recommend request in three stages, vectorised over the candidates: candidates
(serving/candidates.py), scoring and blending (here), re-ranking (serving/reranking.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from feature_repo.types import EMPTY, ScoredItems, UserProfile
from serving.bundle import ServingModel
from serving.candidates import Candidates, pool_candidates
from serving.catalog import CatalogPolicy, ItemAttributes, item_attributes
from serving.personalise import SegmentBoost, segment_boost
from serving.reranking import EMPTY_RANKED, Ranked, diversify, explain, member, rules
from serving.schemas import Filters
from serving.settings import (
    SegmentRule,
    ServingSettings,
)

_DEFAULTS = ServingSettings()


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
    """The settings the ranker reads; each default is ServingSettings' (one home)."""

    candidates_per_source: int = _DEFAULTS.candidates_per_source
    anchors: int = _DEFAULTS.anchors
    recency_half_life: float = _DEFAULTS.recency_half_life
    freshness_boost: float = _DEFAULTS.freshness_boost
    category_cap: float = _DEFAULTS.category_cap
    cold_start_blend: dict[str, float] = field(
        default_factory=lambda: dict(_DEFAULTS.cold_start_blend)
    )
    segment_rules: dict[str, SegmentRule] = field(
        default_factory=lambda: dict(_DEFAULTS.segment_rules)
    )

    @classmethod
    def from_settings(cls, settings: ServingSettings) -> RankingParams:
        """The ranker's part of the service's settings."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class Scored:
    """Stage 2's result over the pool: per-source scores, which sources proposed each
    candidate, the blend, and what re-ranking and the explanation need."""

    scores: dict[str, np.ndarray]
    proposed: dict[str, np.ndarray]
    blended: np.ndarray
    in_model: np.ndarray
    fresh: np.ndarray
    anchor: np.ndarray  # per candidate, the recent item that contributed most (-1: none)
    labels: np.ndarray | None
    boost: SegmentBoost | None
    cap_share: float
    segment: str | None  # the segment whose rule re-ranked the answer
    attributes: ItemAttributes  # per pool position: known, stock, price, category, ...


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
        *,
        model: ServingModel | None,
        weights: dict[str, float],
        user_id: str,
        k: int,
        filters: Filters | None,
        exclude_seen: bool,
        live: LiveFeatures,
        now: float,
        attributes: Callable[[np.ndarray], ItemAttributes] | None = None,
        fields: Sequence[str] = (),
    ) -> Ranked:
        """The top-k of one request: candidates, then scoring, then re-ranking.

        `attributes` reads the catalog attributes of the pool (the live catalog, one round
        trip); without it the model's frozen catalog serves. `fields` are the attributes each
        chosen item carries in the answer.
        """
        params = self.params
        filters = filters or Filters()
        weights = self._blend(model, weights, user_id, live)
        recent_w = self.anchor_weights(live.recent, now)
        n_anchor = min(params.anchors, len(live.recent))
        found = pool_candidates(
            model=model,
            weights=weights,
            user_id=user_id,
            live=live,
            excluded=np.asarray(filters.exclude_item_ids or [], dtype=str),
            exclude_seen=exclude_seen,
            recent_w=recent_w,
            n_anchor=n_anchor,
            per_source=params.candidates_per_source,
        )
        if found is None:
            return EMPTY_RANKED
        names = found.ids.names(found.pool).astype(str)
        attrs = (
            attributes(names)
            if attributes is not None
            else item_attributes(names, None, model, CatalogPolicy())
        )
        scored = self._score(model, weights, live, found, recent_w[:n_anchor], attrs)
        ranked = self._rerank(weights, k, filters, exclude_seen, found, scored, n_anchor)
        if fields and ranked.positions is not None:
            ranked.fields = _fields(attrs, ranked.positions, fields)
        return ranked

    def _blend(
        self,
        model: ServingModel | None,
        weights: dict[str, float],
        user_id: str,
        live: LiveFeatures,
    ) -> dict[str, float]:
        """The request's blend weights: the caller's, or the cold-start blend for a new visitor."""
        params = self.params
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
            return params.cold_start_blend
        return weights

    def _score(
        self,
        model: ServingModel | None,
        weights: dict[str, float],
        live: LiveFeatures,
        found: Candidates,
        anchor_w: np.ndarray,
        attrs: ItemAttributes,
    ) -> Scored:
        """Stage 2: normalised per-source scores over the pool, the blend, the freshness boost
        and the boosts of the user's segment. Items the catalog gate refuses score nothing and
        are left out before any normalisation, so their presence changes no other score."""
        params = self.params
        pool = found.pool
        size = len(pool)
        known = attrs.known
        scores: dict[str, np.ndarray] = {}
        proposed: dict[str, np.ndarray] = {}
        in_model = pool < found.ids.n_model
        for name, values in found.dense.items():
            column = np.zeros(size)
            column[in_model] = values[pool[in_model]]
            scores[name] = np.where(np.isfinite(column) & known, column, 0.0)
            mark = np.zeros(size, dtype=bool)
            mark[np.searchsorted(pool, found.proposed_dense[name])] = True
            proposed[name] = mark
        anchor = np.full(size, -1, dtype=np.int64)
        anchor_best = np.zeros(size)
        recency = np.zeros(size)
        for name, per_anchor, per_idx in found.anchored:
            if per_idx:
                _anchored(
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
                    known,
                )
        if len(anchor_w):
            scores["recency"] = recency
            proposed["recency"] = recency > 0
        for name, scored in found.flat_lists.items():
            if weights.get(name, 0) > 0 and len(scored):
                column = np.zeros(size)
                column[np.searchsorted(pool, found.flat_idx[name])] = np.maximum(scored.scores, 0.0)
                column[~known] = 0.0
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
            boost = segment_boost(rule, profile, attrs, scores.get("trend"))
            blended = blended * boost.multiplier
            if rule.category_cap is not None:
                cap_share = rule.category_cap
        labels = None
        reasons = live.trend_reasons
        if reasons is not None and len(reasons) == len(live.trend) and "trend" in scores:
            labels = np.full(size, "", dtype=object)
            labels[np.searchsorted(pool, found.flat_idx["trend"])] = reasons
        return Scored(
            scores=scores,
            proposed=proposed,
            blended=blended,
            in_model=in_model,
            fresh=fresh,
            anchor=anchor,
            labels=labels,
            boost=boost,
            cap_share=cap_share,
            segment=profile.segment if rule is not None and profile is not None else None,
            attributes=attrs,
        )

    @staticmethod
    def _rerank(
        weights: dict[str, float],
        k: int,
        filters: Filters,
        exclude_seen: bool,
        found: Candidates,
        scored: Scored,
        n_anchor: int,
    ) -> Ranked:
        """Stage 3: business rules, seen items, then the category cap; the chosen explained."""
        pool = found.pool
        attrs = scored.attributes
        keep = rules(attrs, filters) & attrs.known & (scored.blended > 0)
        keep &= ~member(pool, found.excluded_idx)
        if exclude_seen:
            keep &= ~member(pool, found.seen)
        chosen = diversify(attrs.category, scored.blended, keep, k, scored.cap_share)
        if not len(chosen):
            return EMPTY_RANKED
        anchors = found.ids.names(found.recent_idx[:n_anchor])
        names = found.ids.names(pool[chosen])
        ranked = explain(
            names,
            chosen,
            scored.blended,
            scored.scores,
            scored.proposed,
            weights,
            scored.anchor,
            anchors,
            scored.fresh,
            scored.labels,
            scored.boost,
        )
        ranked.segment = scored.segment
        ranked.positions = chosen
        return ranked


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
    known: np.ndarray,
) -> None:
    """Sum over anchors of recency-weighted, per-anchor max-normalised list scores (items the
    catalog gate refuses taken out first); the strongest single contribution names the anchor
    in the reason."""
    sizes = [len(i) for i in per_idx]
    if not sum(sizes):
        return
    pos = np.searchsorted(pool, np.concatenate(per_idx))
    which = np.repeat(np.arange(len(per_idx)), sizes)
    raw = np.where(known[pos], np.concatenate([s.scores for s in per_anchor]), 0.0)
    tops = np.zeros(len(per_idx))
    np.maximum.at(tops, which, raw)
    values = raw / np.where(tops > 0, tops, 1.0)[which]
    contrib = values * anchor_w[which]
    column = np.zeros(len(pool))
    np.add.at(column, pos, contrib)
    scores[name] = _max_normalised(column)
    proposed[name] = column > 0
    np.maximum.at(recency, pos, np.where(known[pos], anchor_w[which], 0.0))
    order = np.argsort(contrib, kind="stable")
    stronger = contrib[order] > anchor_best[pos[order]]
    anchor[pos[order][stronger]] = which[order][stronger]
    np.maximum.at(anchor_best, pos, contrib)


def _fields(attrs: ItemAttributes, positions: np.ndarray, fields: Sequence[str]) -> list[dict]:
    """The catalog fields asked for, per chosen pool position (None where unknown)."""
    out: dict[str, list] = {}
    for name in fields:
        values = getattr(attrs, name)[positions]
        if name == "price":
            out[name] = [None if v != v else float(v) for v in values.tolist()]
        elif name == "in_stock":
            out[name] = [bool(v) for v in values.tolist()]
        else:
            out[name] = [v or None for v in values.tolist()]
    return [dict(zip(out, row, strict=True)) for row in zip(*out.values(), strict=True)]


def _max_normalised(values: np.ndarray) -> np.ndarray:
    top = values.max() if len(values) else 0.0
    return values / top if top > 0 else np.zeros_like(values)
