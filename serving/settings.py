"""The service's tunables, read from the environment when the service starts (never at import)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

# The design's blend when the training run gives no weights: co-view 0.4, embedding 0.3,
# popularity 0.2, recency 0.1. Trending, the trend analysis' list, the batch loop's candidates
# and its pushed item-item lists join with smaller shares.
DEFAULT_BLEND: dict[str, float] = {
    "coview": 0.4,
    "item2vec": 0.3,
    "popularity": 0.2,
    "recency": 0.1,
    "trending": 0.1,
    "trend": 0.1,
    "batch": 0.2,
    "itemitem": 0.2,
}
# A user with no history anywhere (not in the model, no live events, no batch candidates) is
# ranked by the trend analysis' list, live trending and popularity only filling behind it; when
# no trend list was pushed, live trending then popularity.
DEFAULT_COLD_START_BLEND: dict[str, float] = {"trend": 1.0, "trending": 0.1, "popularity": 0.05}


@dataclass(frozen=True)
class SegmentRule:
    """How re-ranking treats one segment: boosts that multiply an item's blended score by
    (1 + the sum of those that apply) and the share of k one category may take."""

    price: float = 0.0  # + price for the cheapest item of its category, falling to 0 at cutoff
    price_cutoff: float = 0.5  # within-category price percentile where the price boost ends
    brand: float = 0.0  # + brand for items of one of the user's top brands
    category: float = 0.0  # + category for items of one of the user's top categories
    trend: float = 0.0  # + trend x the item's normalised trend score
    category_cap: float | None = None  # None: the service's category_cap

    def __post_init__(self) -> None:
        for name in ("price", "brand", "category", "trend"):
            if getattr(self, name) < 0:
                raise ValueError(f"segment rule {name} must be >= 0")
        if not 0.0 < self.price_cutoff <= 1.0:
            raise ValueError("segment rule price_cutoff must be in (0, 1]")
        if self.category_cap is not None and not 0.0 < self.category_cap <= 1.0:
            raise ValueError("segment rule category_cap must be in (0, 1]")


# Segment-aware re-ranking (segments of training/segments.py). On by default: the rules that
# benchmarks/segment_rerank.py measured to help (price_sensitive: +3% to +8% nDCG@10 on five
# seeds of generated data).
DEFAULT_SEGMENT_RULES: dict[str, SegmentRule] = {
    "price_sensitive": SegmentRule(price=0.3),
}
# Measured without a consistent gain on generated data, whose users have no brand loyalty and no
# taste for variety beyond their categories (see docs/serving.md): switched on per deployment
# with RECSYS_SEGMENT_RULES, e.g. '{"loyal_customer": {"brand": 0.2}}'.
SUGGESTED_SEGMENT_RULES: dict[str, SegmentRule] = {
    "loyal_customer": SegmentRule(brand=0.2),
    "buyer": SegmentRule(category=0.1),
    "impulse_buyer": SegmentRule(trend=0.2),
    "browser": SegmentRule(category_cap=0.3),
    "researcher": SegmentRule(category_cap=0.3),
}
# Sources whose weight comes from the training run when a model is loaded.
MODEL_SOURCES = ("als", "item2vec", "ease", "itemknn", "popularity")
# Share of the blend the trained components take together; live sources keep the rest.
DEFAULT_MODEL_SHARE = 0.5


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not a number") from exc


@dataclass(frozen=True)
class ServingSettings:
    """Everything the request path can be tuned by; see docs/serving.md for each variable."""

    blend_overrides: dict[str, float] = field(default_factory=dict)
    model_share: float = DEFAULT_MODEL_SHARE
    challenger_share: float = 0.1
    poll_seconds: float = 30.0
    cache_ttl: int = 60
    max_body_bytes: int = 1_048_576
    global_lists_ttl: float = 0.05
    candidates_per_source: int = 100
    anchors: int = 10
    per_anchor: int = 20
    recency_half_life: float = 6 * 3600.0
    freshness_boost: float = 0.1
    category_cap: float = 0.4
    cold_start_blend: dict[str, float] = field(
        default_factory=lambda: dict(DEFAULT_COLD_START_BLEND)
    )
    segment_rules: dict[str, SegmentRule] = field(
        default_factory=lambda: dict(DEFAULT_SEGMENT_RULES)
    )
    trends_ttl: float = 10.0
    # The catalog gate: items of no catalog are recommended only when new items are allowed,
    # and then only once this many distinct users sent events on them.
    allow_new_items: bool = False
    new_item_min_users: int = 3
    # Abuse resistance of the live features (FeatureConfig.repeat_window / repeat_cap).
    repeat_window: int = 86_400
    repeat_cap: int = 5

    @classmethod
    def from_env(cls) -> ServingSettings:
        raw = os.environ.get("RECSYS_BLEND_WEIGHTS", "")
        overrides: dict[str, float] = {}
        if raw.strip():
            try:
                parsed = json.loads(raw)
                overrides = {str(k): float(v) for k, v in parsed.items()}
            except (ValueError, AttributeError, TypeError) as exc:
                raise ValueError(
                    f'RECSYS_BLEND_WEIGHTS must be a JSON object like {{"coview": 0.4}}: {raw!r}'
                ) from exc
        settings = cls(
            blend_overrides=overrides,
            cold_start_blend=_weights_env("RECSYS_COLD_START_WEIGHTS", DEFAULT_COLD_START_BLEND),
            segment_rules=segment_rules_from_env(),
            trends_ttl=_float("RECSYS_TRENDS_TTL", 10.0),
            model_share=_float("RECSYS_MODEL_SHARE", DEFAULT_MODEL_SHARE),
            challenger_share=_float("RECSYS_CHALLENGER_SHARE", 0.1),
            poll_seconds=_float("RECSYS_MODEL_POLL_SECONDS", 30.0),
            cache_ttl=int(_float("RECSYS_CACHE_TTL", 60)),
            max_body_bytes=int(_float("RECSYS_MAX_BODY_BYTES", 1_048_576)),
            global_lists_ttl=_float("RECSYS_GLOBAL_LISTS_TTL", 0.05),
            allow_new_items=os.environ.get("RECSYS_ALLOW_NEW_ITEMS", "0").strip().lower()
            in ("1", "true", "yes", "on"),
            new_item_min_users=int(_float("RECSYS_NEW_ITEM_MIN_USERS", 3)),
            repeat_window=int(_float("RECSYS_REPEAT_WINDOW_SECONDS", 86_400)),
            repeat_cap=int(_float("RECSYS_REPEAT_CAP", 5)),
        )
        if settings.new_item_min_users < 1:
            raise ValueError("RECSYS_NEW_ITEM_MIN_USERS must be at least 1")
        if settings.repeat_window < 0 or settings.repeat_cap < 1:
            raise ValueError(
                "RECSYS_REPEAT_WINDOW_SECONDS must be >= 0 and RECSYS_REPEAT_CAP at least 1"
            )
        if not 0.0 <= settings.challenger_share <= 1.0:
            raise ValueError("RECSYS_CHALLENGER_SHARE must be between 0 and 1")
        if not 0.0 <= settings.model_share <= 1.0:
            raise ValueError("RECSYS_MODEL_SHARE must be between 0 and 1")
        return settings


def _weights_env(name: str, default: dict[str, float]) -> dict[str, float]:
    raw = os.environ.get(name, "")
    if not raw.strip():
        return dict(default)
    try:
        parsed = json.loads(raw)
        return {str(k): float(v) for k, v in parsed.items() if float(v) > 0}
    except (ValueError, AttributeError, TypeError) as exc:
        raise ValueError(f'{name} must be a JSON object like {{"trend": 1.0}}: {raw!r}') from exc


def segment_rules_from_env() -> dict[str, SegmentRule]:
    """The default rules, changed by `RECSYS_SEGMENT_RULES` (per segment: fields to override,
    "suggested" for the suggested rule, or null to drop it); `RECSYS_SEGMENT_RERANK=0` drops all."""
    if os.environ.get("RECSYS_SEGMENT_RERANK", "1").strip() in ("0", "false", "no", "off"):
        return {}
    rules = dict(DEFAULT_SEGMENT_RULES)
    raw = os.environ.get("RECSYS_SEGMENT_RULES", "")
    if not raw.strip():
        return rules
    example = '{"price_sensitive": {"price": 0.5}, "browser": "suggested", "buyer": null}'
    try:
        parsed = json.loads(raw)
        if not isinstance(parsed, dict):
            raise TypeError("not an object")
        for segment, fields in parsed.items():
            if fields is None:
                rules.pop(segment, None)
                continue
            if fields == "suggested":
                rules[segment] = SUGGESTED_SEGMENT_RULES[segment]
                continue
            base = dataclasses.asdict(rules.get(segment, SegmentRule()))
            base.update(fields)
            rules[segment] = SegmentRule(**base)
    except (ValueError, AttributeError, TypeError, KeyError) as exc:
        raise ValueError(
            f"RECSYS_SEGMENT_RULES must be a JSON object like {example}: {exc}"
        ) from exc
    return rules


def blend_weights(settings: ServingSettings, trained: dict[str, float] | None) -> dict[str, float]:
    """Per-source weights: the training run's for model components, the defaults for the rest.

    The trained weights are rescaled to `model_share` in total; `popularity` is served from the
    live decayed popularity, with the weight the training run gave the popularity component.
    Explicit RECSYS_BLEND_WEIGHTS entries win over both.
    """
    weights = dict(DEFAULT_BLEND)
    if trained:
        usable = {k: max(float(v), 0.0) for k, v in trained.items() if k in MODEL_SOURCES}
        total = sum(usable.values())
        if total > 0:
            for name in MODEL_SOURCES:
                weights.pop(name, None)
            # The loaded model supersedes its own batch output and pushed item-item lists.
            weights.pop("batch", None)
            weights.pop("itemitem", None)
            for name, value in usable.items():
                weights[name] = settings.model_share * value / total
    weights.update(settings.blend_overrides)
    return {k: v for k, v in weights.items() if v > 0}
