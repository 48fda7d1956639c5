"""Every real-time feature in one place (entity, Redis key and type, TTL, cap); `Keys` is the
only place a Redis key is spelled; hash tags put each user's and each item's keys in one slot.

Longer than the other modules (about 440 lines) on purpose: the key schema is one table a reader
audits whole (what is kept about a user, for how long), and splitting it would spell keys in two
places."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from config.settings import ServingSettingsEnv
from training.analytics_common import PREFERENCES, SEGMENT_SCORES
from training.events import DEFAULT_EVENT_WEIGHTS

# The defaults of the settings the service passes in (config/settings.py).
_SERVING = ServingSettingsEnv.model_construct()

DAY = 86_400
HOUR = 3_600


@dataclass(frozen=True)
class Entity:
    """What a feature is about, and the id that addresses it."""

    name: str
    join_key: str | None
    description: str


USER = Entity("user", "user_id", "a shopper, by the user_id of the event contract")
ITEM = Entity("item", "item_id", "a catalog item, by item_id (unknown items are welcome)")
GLOBAL = Entity("global", None, "one value for the whole deployment")
STREAM = Entity("stream", None, "the durable log of accepted events")
EVENT = Entity("event", "event_id", "one event, by its event_id: the global idempotency key")


@dataclass(frozen=True)
class Feature:
    """One Redis structure: where it lives, what type it is and how long it is kept."""

    name: str
    entity: Entity
    key: str
    redis_type: str
    description: str
    ttl_seconds: int | None = None
    cap: int | None = None


# The contract's confidence of each event type, so that live popularity and the trained models
# weigh behaviour alike; a rating weighs 1 times its value.
EVENT_WEIGHTS: dict[str, float] = {**DEFAULT_EVENT_WEIGHTS, "rating": 1.0}


@dataclass(frozen=True)
class FeatureConfig:
    """The tunable numbers behind the features; defaults suit a shop with daily traffic cycles."""

    recent_cap: int = 100
    recent_ttl: int = 30 * DAY
    counters_ttl: int = 90 * DAY
    coview_window_items: int = 10
    coview_window_seconds: int = DAY
    coview_cap: int = 200
    coview_ttl: int = 30 * DAY
    popularity_half_life: float = 3 * DAY
    trending_half_life: float = 2 * HOUR
    dedupe_ttl: int = DAY
    cache_ttl: int = _SERVING.cache_ttl  # RECSYS_CACHE_TTL
    offline_ttl: int = 14 * DAY
    # The analytics pushes: segments are daily, trends hourly; what a stopped pipeline leaves
    # behind expires after these.
    profile_ttl: int = 7 * DAY
    trends_ttl: int = 2 * DAY
    trend_list_cap: int = 1000
    # Abuse resistance: within `repeat_window` seconds, the n-th event of one user on one item
    # adds weight / n to the item's popularity and trending, and nothing from the
    # (repeat_cap + 1)-th on, so one user moves an item by at most weight * H(repeat_cap) per
    # window (H(5) = 2.28); only a user's first event on an item in the window adds co-view.
    # repeat_window 0 turns the bound off.
    repeat_window: int = _SERVING.repeat_window  # RECSYS_REPEAT_WINDOW_SECONDS
    repeat_cap: int = _SERVING.repeat_cap  # RECSYS_REPEAT_CAP
    # Distinct users of items the live catalog lacks, which the new-item gate reads: counted only
    # where the service allows new items (a HyperLogLog write per new user of such an item).
    count_new_item_users: bool = False
    item_users_ttl: int = 30 * DAY
    event_weights: dict[str, float] = field(default_factory=lambda: dict(EVENT_WEIGHTS))

    @property
    def popularity_rate(self) -> float:
        """Decay rate (1/s) of the popularity score."""
        return math.log(2.0) / self.popularity_half_life

    @property
    def trending_rate(self) -> float:
        """Decay rate (1/s) of the trending score."""
        return math.log(2.0) / self.trending_half_life


FEATURES: tuple[Feature, ...] = (
    Feature(
        "recent_items",
        USER,
        "{ns}:{user:<user_id>}:recent",
        "zset",
        "items the user touched, scored by the time of the latest event; newest kept",
        ttl_seconds=FeatureConfig.recent_ttl,
        cap=FeatureConfig.recent_cap,
    ),
    Feature(
        "counters",
        USER,
        "{ns}:{user:<user_id>}:counters",
        "hash",
        "events per event_type and `last_seen` (epoch s); readers add up `events`",
        ttl_seconds=FeatureConfig.counters_ttl,
    ),
    Feature(
        "response_cache",
        USER,
        "{ns}:{user:<user_id>}:cache",
        "hash",
        "cached /recommend bodies by request signature; deleted by any event of the user",
        ttl_seconds=FeatureConfig.cache_ttl,
    ),
    Feature(
        "seen_event",
        EVENT,
        "{ns}:{event:<event_id>}:seen",
        "string",
        "marks an event_id as ingested (whichever user sent it: the id is global, as in the "
        "event store), so a retried batch or a reused id is a duplicate, never stored twice",
        ttl_seconds=FeatureConfig.dedupe_ttl,
    ),
    Feature(
        "batch_candidates",
        USER,
        "{ns}:{user:<user_id>}:candidates",
        "zset",
        "the batch loop's recommendations for the user (pushed after a promotion)",
        ttl_seconds=FeatureConfig.offline_ttl,
    ),
    Feature(
        "user_profile",
        USER,
        "{ns}:{user:<user_id>}:profile",
        "hash",
        "the daily segmentation: `segment`, RFM scores, `engagement`, `churn_risk`, "
        "`lifetime_value`, `price_percentile`, `preferences` (JSON), `updated_at`",
        ttl_seconds=FeatureConfig.profile_ttl,
    ),
    Feature(
        "item_repeats",
        USER,
        "{ns}:{user:<user_id>}:repeats",
        "hash",
        "events per item of the user in the current repeat window (abuse resistance: repeats "
        "count with diminishing weight); the window starts with the key",
        ttl_seconds=FeatureConfig.repeat_window,
    ),
    Feature(
        "coview",
        ITEM,
        "{ns}:{item:<item_id>}:coview",
        "zset",
        "how often each other item was touched after this one by one user, within the window",
        ttl_seconds=FeatureConfig.coview_ttl,
        cap=FeatureConfig.coview_cap,
    ),
    Feature(
        "item_list",
        ITEM,
        "{ns}:{item:<item_id>}:list:<name>",
        "zset",
        "offline per-item lists: `neighbors` (embedding), `itemitem` (the item-item model)",
        ttl_seconds=FeatureConfig.offline_ttl,
    ),
    Feature(
        "popularity",
        GLOBAL,
        "{ns}:{global}:popularity",
        "zset",
        "decayed event weight per item, stored as w*exp(rate*(t - t0)); read *exp(-rate*(now-t0))",
    ),
    Feature(
        "trending",
        GLOBAL,
        "{ns}:{global}:trending",
        "zset",
        "like popularity with a short half-life: what is taking off right now",
    ),
    Feature(
        "batch_popularity",
        GLOBAL,
        "{ns}:{global}:batch_popularity",
        "zset",
        "popularity computed by the batch loop; serves when no live events arrived yet",
        ttl_seconds=FeatureConfig.offline_ttl,
    ),
    Feature(
        "decay_reference",
        GLOBAL,
        "{ns}:{global}:decay",
        "hash",
        "t0 of each decayed score (`popularity`, `trending`); moved forward when scores grow",
    ),
    Feature(
        "item_first_seen",
        GLOBAL,
        "{ns}:{global}:first_seen",
        "hash",
        "epoch seconds of each item's first live event (new items are counted)",
    ),
    Feature(
        "stats",
        GLOBAL,
        "{ns}:{global}:stats",
        "hash",
        "deployment counters: accepted, duplicates, new_items",
    ),
    Feature(
        "trend_items",
        GLOBAL,
        "{ns}:{global}:trends:items",
        "zset",
        "trend_score of the trend analysis (expected weighted events over the forecast horizon), "
        "top items with a positive score",
        ttl_seconds=FeatureConfig.trends_ttl,
        cap=FeatureConfig.trend_list_cap,
    ),
    Feature(
        "trend_category_items",
        GLOBAL,
        "{ns}:{global}:trends:category:<category>",
        "zset",
        "the same within one category (`unknown` for items without one)",
        ttl_seconds=FeatureConfig.trends_ttl,
        cap=FeatureConfig.trend_list_cap,
    ),
    Feature(
        "trend_info",
        GLOBAL,
        "{ns}:{global}:trends:info",
        "hash",
        "per listed item, JSON: category, trend_type, strength, confidence, burst, velocity, "
        "predicted_direction",
        ttl_seconds=FeatureConfig.trends_ttl,
    ),
    Feature(
        "trend_categories",
        GLOBAL,
        "{ns}:{global}:trends:categories",
        "hash",
        "per category, JSON of its trend (the same fields and trend_score)",
        ttl_seconds=FeatureConfig.trends_ttl,
    ),
    Feature(
        "trend_meta",
        GLOBAL,
        "{ns}:{global}:trends:meta",
        "hash",
        "`analysed_at` (end of the analysed window), `pushed_at`, `items`, `categories`",
        ttl_seconds=FeatureConfig.trends_ttl,
    ),
    Feature(
        "catalog_attribute",
        GLOBAL,
        "{ns}:{global}:catalog:<attribute>",
        "hash",
        "the live catalog, one hash per attribute (title, category, brand, price, in_stock) "
        "by item_id, written by POST /items and the online_catalog asset; an item is known to "
        "the live catalog when it has an `in_stock` field",
    ),
    Feature(
        "catalog_meta",
        GLOBAL,
        "{ns}:{global}:catalog:meta",
        "hash",
        "`version` (bumped by every catalog write; part of the response cache's signature) and "
        "`updated_at`",
    ),
    Feature(
        "item_users",
        GLOBAL,
        "{ns}:{global}:item_users:<item_id>",
        "hyperloglog",
        "distinct users who sent events on an item the live catalog lacks (new-item gate)",
        ttl_seconds=FeatureConfig.item_users_ttl,
    ),
    Feature(
        "events_stream",
        STREAM,
        "{ns}:{stream}:events",
        "stream",
        "every accepted event (one `e` field of JSON), read by the consumer group `event-store`",
    ),
)
FEATURES_BY_NAME: dict[str, Feature] = {f.name: f for f in FEATURES}

CONSUMER_GROUP = "event-store"
# Names of the per-item lists the batch loop pushes (`item_list` feature).
NEIGHBORS_LIST = "neighbors"  # embedding (Item2Vec) neighbours
ITEM_ITEM_LIST = "itemitem"  # the item-item model's (EASE / item-kNN) neighbours


class Keys:
    """Builds the Redis key of every feature for one namespace."""

    def __init__(self, namespace: str) -> None:
        if not namespace or any(c in namespace for c in "{}*?[] \t\n"):
            raise ValueError(
                f"invalid Redis namespace {namespace!r}: use letters, digits, '-', '_', ':' or '.'"
            )
        self.namespace = namespace
        self.popularity = f"{namespace}:{{global}}:popularity"
        self.trending = f"{namespace}:{{global}}:trending"
        self.batch_popularity = f"{namespace}:{{global}}:batch_popularity"
        self.decay = f"{namespace}:{{global}}:decay"
        self.first_seen = f"{namespace}:{{global}}:first_seen"
        self.stats = f"{namespace}:{{global}}:stats"
        self.stream = f"{namespace}:{{stream}}:events"
        self.trend_items = f"{namespace}:{{global}}:trends:items"
        self.trend_info = f"{namespace}:{{global}}:trends:info"
        self.trend_categories = f"{namespace}:{{global}}:trends:categories"
        self.trend_meta = f"{namespace}:{{global}}:trends:meta"
        self.catalog_meta = f"{namespace}:{{global}}:catalog:meta"

    @staticmethod
    def affixes(key_of: Callable[[str], str]) -> tuple[str, str]:
        """(prefix, suffix) around the id in the keys `key_of` builds (`keys.recent`, ...): a
        script that builds keys of the ids it reads gets them from here."""
        head, tail = key_of("\0").split("\0")
        return head, tail

    def user_prefix(self, user_id: str) -> str:
        """Prefix of every key of one user."""
        return f"{self.namespace}:{{user:{user_id}}}:"

    def item_prefix(self, item_id: str) -> str:
        """Prefix of every key of one item."""
        return f"{self.namespace}:{{item:{item_id}}}:"

    def recent(self, user_id: str) -> str:
        return self.user_prefix(user_id) + "recent"

    def counters(self, user_id: str) -> str:
        return self.user_prefix(user_id) + "counters"

    def cache(self, user_id: str) -> str:
        return self.user_prefix(user_id) + "cache"

    def seen_event_affixes(self) -> tuple[str, str]:
        """(prefix, suffix) around an event_id in its `seen_event` key, for building the keys of
        a whole batch at once; `seen_event` is the same key for one id."""
        return f"{self.namespace}:{{event:", "}:seen"

    def seen_event(self, event_id: str) -> str:
        prefix, suffix = self.seen_event_affixes()
        return prefix + event_id + suffix

    def candidates(self, user_id: str) -> str:
        return self.user_prefix(user_id) + "candidates"

    def profile(self, user_id: str) -> str:
        return self.user_prefix(user_id) + "profile"

    def user_keys(self, user_id: str) -> list[str]:
        """Every key holding something of one user (each USER feature, and the staging copy a
        push writes aside): what forgetting the user deletes."""
        keys = [
            self.recent(user_id),
            self.counters(user_id),
            self.cache(user_id),
            self.candidates(user_id),
            self.profile(user_id),
        ]
        # The repeat counts are written by ingest only, never staged.
        return [*keys, *(self.staging(key) for key in keys), self.repeats(user_id)]

    def trend_category(self, category: str) -> str:
        """The trend list of one category (in the `{global}` slot with the other trend keys)."""
        return f"{self.namespace}:{{global}}:trends:category:{category}"

    def repeats(self, user_id: str) -> str:
        """The user's events per item in the current repeat window (the abuse bound)."""
        return self.user_prefix(user_id) + "repeats"

    def catalog(self, attribute: str) -> str:
        """The live catalog's hash of one attribute (CATALOG_FIELDS), by item_id."""
        return f"{self.namespace}:{{global}}:catalog:{attribute}"

    def item_users(self, item_id: str) -> str:
        """Distinct users of an item the live catalog lacks (in the `{global}` slot, so the
        ingest's global script and the catalog read reach it)."""
        return f"{self.namespace}:{{global}}:item_users:{item_id}"

    def coview(self, item_id: str) -> str:
        return self.item_prefix(item_id) + "coview"

    def item_list(self, item_id: str, name: str) -> str:
        return self.item_prefix(item_id) + "list:" + name

    @staticmethod
    def staging(key: str) -> str:
        """Where a push writes `key`'s replacement before it RENAMEs it over `key` (same slot)."""
        return key + ":staging"

    def rate_limit(self, bucket: str) -> str:
        """The token bucket `bucket` of the service's rate limiter (`key:<name>:<scope>`,
        `ip:<address>`). Every bucket shares one slot: a request's buckets (its key's and its
        address') are checked and taken together by one script, which Redis Cluster allows only
        within a slot."""
        return f"{self.namespace}:{{ratelimit}}:{bucket}"

    def pattern(self) -> str:
        """SCAN pattern matching every key of the namespace."""
        return f"{self.namespace}:*"


# Fields of the `user_profile` hash: the scores of the daily segmentation, `preferences` (JSON of
# whichever of PREFERENCE_KEYS are known) and `updated_at`; a user without one is `unknown`.
PROFILE_SCORES = (*SEGMENT_SCORES, "price_percentile")
PREFERENCE_KEYS = PREFERENCES
PROFILE_FIELDS = (*PROFILE_SCORES, "preferences", "updated_at")
UNKNOWN_SEGMENT = "unknown"
# Attributes of the live catalog (the catalog contract's columns besides item_id), one hash each.
CATALOG_FIELDS = ("title", "category", "brand", "price", "in_stock")
# Fields of each item's (and category's) JSON in `trend_info` / `trend_categories`.
TREND_INFO_FIELDS = (
    "category",
    "trend_type",
    "strength",
    "confidence",
    "burst",
    "velocity",
    "predicted_direction",
)
