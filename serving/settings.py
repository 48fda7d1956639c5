"""The service's tunables: the settings tree's serving group (config/settings.py) turned into what
the request path uses, read when the service starts (never at import)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from config import get_settings
from config.settings import ServingSettingsEnv

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


# The environment-backed fields take their defaults from the one settings tree.
_ENV = ServingSettingsEnv.model_construct()
# Tree fields of the same name that from_env converts on the way (None to "" or {}, 0 to None).
_CONVERTED = frozenset(
    {"segment_rules", "api_keys_file", "api_keys", "rate_limits", "rate_limit_per_ip"}
)


@dataclass(frozen=True)
class ServingSettings:
    """Everything the request path can be tuned by; see docs/serving.md for each variable."""

    blend_overrides: dict[str, float] = field(default_factory=dict)
    model_share: float = _ENV.model_share
    challenger_share: float = _ENV.challenger_share
    poll_seconds: float = _ENV.poll_seconds
    cache_ttl: int = _ENV.cache_ttl
    max_body_bytes: int = _ENV.max_body_bytes
    global_lists_ttl: float = _ENV.global_lists_ttl
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
    trends_ttl: float = _ENV.trends_ttl
    # How stale the suppression list /events drops forgotten users by may be, in other workers
    # than the one that forgot them.
    suppression_refresh_seconds: float = _ENV.suppression_refresh_seconds
    # Impressions (serving/impressions.py): every read answer, onto the event stream.
    log_impressions: bool = _ENV.log_impressions
    # Monitoring (serving/metrics.py MetricsRefresher): how often the gauges are refreshed and
    # the sliding window of catalog coverage.
    monitor_seconds: float = _ENV.monitor_seconds
    coverage_window_seconds: float = _ENV.coverage_window_seconds
    # API keys and rate limits (serving/keys.py, serving/auth.py): where the hashed keys are, and
    # requests per second per key and scope, per client address, and how many seconds of them a
    # burst may take.
    api_keys_file: str | None = None
    api_keys: str = ""
    metrics_open: bool = _ENV.metrics_open
    rate_limits: dict[str, float] = field(default_factory=dict)
    rate_limit_per_ip: float | None = None
    rate_limit_burst_seconds: float = _ENV.rate_limit_burst_seconds
    rate_limit_lease_seconds: float = _ENV.rate_limit_lease_seconds
    # The catalog gate: items of no catalog are recommended only when new items are allowed,
    # and then only once this many distinct users sent events on them.
    allow_new_items: bool = _ENV.allow_new_items
    new_item_min_users: int = _ENV.new_item_min_users
    # Abuse resistance of the live features (FeatureConfig.repeat_window / repeat_cap).
    repeat_window: int = _ENV.repeat_window
    repeat_cap: int = _ENV.repeat_cap

    @classmethod
    def from_env(cls, env: ServingSettingsEnv | None = None) -> ServingSettings:
        """The service's settings from the settings tree's serving group (default: this
        process's environment)."""
        env = get_settings().serving if env is None else env
        # The fields the tree holds as the request path uses them pass through by name.
        same = {f.name for f in dataclasses.fields(cls)} & set(type(env).model_fields)
        return cls(
            **{name: getattr(env, name) for name in same - _CONVERTED},
            blend_overrides=dict(env.blend_weights or {}),
            cold_start_blend=(
                {k: v for k, v in env.cold_start_weights.items() if v > 0}
                if env.cold_start_weights is not None
                else dict(DEFAULT_COLD_START_BLEND)
            ),
            segment_rules=segment_rules(env) if env.segment_rerank else {},
            api_keys_file=str(env.api_keys_file) if env.api_keys_file else None,
            api_keys=env.api_keys or "",
            rate_limits={k: v for k, v in (env.rate_limits or {}).items() if v > 0},
            rate_limit_per_ip=env.rate_limit_per_ip or None,
        )


def segment_rules(env: ServingSettingsEnv) -> dict[str, SegmentRule]:
    """The default rules, changed by `RECSYS_SEGMENT_RULES` (per segment: fields to override,
    "suggested" for the suggested rule, or null to drop it)."""
    rules = dict(DEFAULT_SEGMENT_RULES)
    if not env.segment_rules:
        return rules
    example = '{"price_sensitive": {"price": 0.5}, "browser": "suggested", "buyer": null}'
    try:
        for segment, fields in env.segment_rules.items():
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
