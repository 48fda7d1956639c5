"""The BentoML recommendation service: settings, models, the feature store, lifecycle, readiness and
Redis outages, and the answer behind each route of serving/api.py."""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import threading
import time
import uuid

import bentoml
import numpy as np
import polars as pl
import redis
from starlette.responses import Response

from config import get_settings
from feature_repo.connection import connect, revive_embedded
from feature_repo.definitions import FeatureConfig
from feature_repo.event_store import EventStore, open_event_store
from feature_repo.forget import SuppressionCache, forget_user
from feature_repo.store import FeatureStore
from feature_repo.stream import EventStream
from feature_repo.types import ScoredItems, TrendList
from serving import lists
from serving.api import app, json_response
from serving.auth import Guard, GuardMiddleware
from serving.bundle import ServingModel
from serving.errors import DependencyUnavailable, JSONNotFound
from serving.features import NO_ITEMS, FeatureReader
from serving.metrics import label_http_metrics_by_route, service_metrics
from serving.models import ModelManager, ModelSet
from serving.outage import REDIS_DOWN, Outage
from serving.ranking import Ranker, RankingParams
from serving.reranking import Ranked
from serving.schemas import (
    EventsRequest,
    ItemsRequest,
    PopularRequest,
    RecommendRequest,
    SimilarItemsRequest,
    TrendingRequest,
)
from serving.settings import ServingSettings, blend_weights
from training.events import check_batch

log = logging.getLogger("recsys.serving")
# While Redis is down requests skip it; a probe checks it this often, so this is also about how
# long a recovery takes to be noticed and what Retry-After says.
REDIS_PROBE_SECONDS = 1.0

HOT_PATHS = [
    "/recommend",
    "/events",
    "/similar_items",
    "/popular",
    "/trending",
    "/user_profile",
    "/users",
]


# Before the service's app is built: BentoML's request metrics label by route, not raw path.
label_http_metrics_by_route()


@bentoml.asgi_app(app, path="/")
@bentoml.service(
    name="recsys",
    workers=1,
    traffic={"timeout": 30},
    # Access logs at thousands of requests per second are noise: /metrics counts requests.
    logging={"access": {"enabled": False}},
    # Spans on every hot request cost more than the request itself; trace the rest.
    tracing={"excluded_urls": HOT_PATHS},
)
class RecommendationService:
    """Serves the champion model blended with live features; ingests events durably."""

    def __init__(self) -> None:
        # The one read of the environment; a bad value stops the worker with the variable named.
        self.config = get_settings()
        self.settings = ServingSettings.from_env(self.config.serving)
        self.limits = self.config.store.event_limits()
        self.home = self.config.home_dir()
        self.metrics = service_metrics()
        self.ranker = Ranker(RankingParams.from_settings(self.settings))
        self._popularity_blend = blend_weights(self.settings, None)
        self.models = ModelManager(
            self._open_registry,
            state_dir=self.home / "serving",
            poll_seconds=self.settings.poll_seconds,
            challenger_share=self.settings.challenger_share,
            on_change=self._models_changed,
            prepare=lambda model: setattr(
                model, "blend", blend_weights(self.settings, model.weights)
            ),
        )
        self._models_changed(self.models.current)
        self.models.load_initial()
        self.redis_outage = Outage(
            "Redis",
            probe=self._probe_redis,
            probe_seconds=REDIS_PROBE_SECONDS,
            on_recovery=self._ensure_group,
        )
        self._store: FeatureStore | None = None
        self._store_lock = threading.Lock()
        self.guard = Guard(self.settings, app.routes, lambda: self.store, self.redis_outage)
        self.features = FeatureReader(
            lambda: self.store,
            self.settings,
            self.redis_outage,
            self.metrics,
            champion=lambda: self.models.current.champion,
        )
        self._suppression_store: EventStore | None = None
        self.suppressed = SuppressionCache(
            self._load_suppressed, self.settings.suppression_refresh_seconds
        )

    # -- lifecycle -----------------------------------------------------------------------------

    def _load_suppressed(self) -> pl.Series:
        # One connection kept for the reloads (only the reload thread uses it); dropped on a
        # failure, so the next reload connects again.
        if self._suppression_store is None:
            self._suppression_store = open_event_store(self.config.store.postgres_url, self.home)
        try:
            return self._suppression_store.suppressed()
        except Exception:
            self._suppression_store.close()
            self._suppression_store = None
            raise

    @staticmethod
    def _open_registry():
        from training.registry import ModelRegistry

        # An unreachable MLflow server must fail fast, not retry for minutes on the start path.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        config = get_settings()
        return ModelRegistry(
            config.mlflow_tracking_uri(), config.mlflow.model_name, cache_dir=config.model_cache()
        )

    @bentoml.on_startup
    def start(self) -> None:
        """Open Redis, make sure the stream's consumer group exists, start the registry poller.

        Redis down at start is an outage like any other: the service starts degraded and the
        group is created when Redis is back (the group starts from the stream's first entry, so
        nothing written before is skipped).
        """
        try:
            self._ensure_group()
        except REDIS_DOWN as exc:
            self.redis_outage.failed(exc)
        self.models.start()
        self.suppressed.start()
        # Everything loaded so far lives as long as the worker: keep it out of the cyclic GC's
        # full passes, which otherwise stall requests for milliseconds.
        gc.collect()
        gc.freeze()

    @bentoml.on_shutdown
    def stop(self) -> None:
        self.models.stop()
        self.suppressed.stop()
        self.redis_outage.stop()

    def _ensure_group(self) -> None:
        EventStream(self.store.redis, self.store.namespace).ensure_group()

    def __is_ready__(self) -> bool:
        # While Redis is known to be down the probe says so; a probe request does not wait on it.
        if self.redis_outage.down:
            return False
        try:
            return bool(self.store.redis.ping())
        except REDIS_DOWN as exc:
            self.redis_outage.failed(exc)
            return False
        except redis.RedisError:
            return False

    def _probe_redis(self) -> bool:
        """PING; the embedded server, which nobody else would restart, is started again."""
        try:
            return bool(self.store.redis.ping())
        except REDIS_DOWN:
            if self.config.redis.url is None and revive_embedded(self.store.redis, self.home):
                log.warning("the embedded Redis server had stopped: started it again")
                return True
            raise

    @property
    def store(self) -> FeatureStore:
        if self._store is None:
            with self._store_lock:
                if self._store is None:
                    client = connect(self.config.redis.url, self.home)
                    config = FeatureConfig(
                        cache_ttl=self.settings.cache_ttl,
                        repeat_window=self.settings.repeat_window,
                        repeat_cap=self.settings.repeat_cap,
                        count_new_item_users=self.settings.allow_new_items,
                    )
                    self._store = FeatureStore(client, self.config.redis.namespace, config)
        return self._store

    def _models_changed(self, models: ModelSet) -> None:
        shown = {
            m.variant: m.version for m in (models.champion, models.challenger) if m is not None
        }
        self.metrics.show_models(shown or {"popularity": "live"})

    # -- /recommend ----------------------------------------------------------------------------

    def recommend_json(self, body: RecommendRequest) -> str:
        """The /recommend response body for a validated request."""
        started = time.perf_counter()
        now = time.time()
        request_id = uuid.uuid4().hex
        model = self.models.current.for_user(body.user_id)
        variant = model.variant if model is not None else "popularity"
        read = self.features.for_request(body, model, now)
        if read.cached is not None:
            self.metrics.variant.labels(variant).inc()
            return _envelope(read.cached, request_id, started, cached=True)
        features_done = time.perf_counter()
        fields = tuple(body.fields or ())
        ranked = self.ranker.recommend(
            model=model,
            weights=model.blend if model is not None else self._popularity_blend,
            user_id=body.user_id,
            k=body.k,
            filters=body.filters,
            exclude_seen=body.exclude_seen,
            live=read.live,
            now=now,
            attributes=lambda ids: self.features.attributes(ids, model),
            fields=fields,
        )
        payload = _answer(ranked, model, variant)
        self.features.cache_answer(body.user_id, read, payload, now)
        done = time.perf_counter()
        self.metrics.stage_latency.labels("features").observe(features_done - started)
        self.metrics.stage_latency.labels("ranking").observe(done - features_done)
        self.metrics.variant.labels(variant).inc()
        return _envelope(payload, request_id, started, cached=False, degraded=read.degraded)

    # -- /similar_items and /popular -----------------------------------------------------------

    def similar_items(self, body: SimilarItemsRequest) -> Response:
        """Items like `item_id`: the model's item-item neighbours, else live co-view, else
        pushed neighbours, else popular items (the reason says which)."""
        model = self.models.current.champion
        items = lists.model_similar(model, body.item_id, body.k)
        degraded = False
        if not items:
            names = [name for name, _ in lists.SIMILAR_FALLBACKS]
            found = self.features.live(lambda: self.store.item_lists([body.item_id], names, body.k))
            degraded = found is None
            if found is not None:
                items = lists.similar_from_lists(found, body.k)
        items = self._allowed(items, model, body.k)
        if not items:
            popular, stale = self._popular(body.k + 1, None)
            degraded = degraded or stale
            items = lists.popular_instead_of_similar(popular, body.item_id, body.k)
        return self._items(items, model, degraded)

    def _allowed(self, items: list[dict], model: ServingModel | None, k: int) -> list[dict]:
        """The first k of `items` that the catalog gate lets through."""
        if not items:
            return items
        keep = self.features.known(np.array([i["item_id"] for i in items], dtype=str), model)
        return [item for item, ok in zip(items, keep.tolist(), strict=True) if ok][:k]

    def popular(self, body: PopularRequest) -> Response:
        """Most popular items now (decayed live popularity), optionally of one category."""
        model = self.models.current.champion
        popular, degraded = self._popular(body.k, body.category)
        items = lists.scored_items(popular, "popular right now", body.k)
        return self._items(items, model, degraded)

    def _items(self, items: list[dict], model: ServingModel | None, degraded: bool) -> Response:
        """The body of /similar_items and /popular; nothing to show while degraded and without a
        model is a 503, not an empty list."""
        if degraded and not items and model is None:
            raise self.features.unavailable("no model is loaded")
        return json_response(
            {
                "items": items,
                "model_version": model.version if model else None,
                "request_id": uuid.uuid4().hex,
                "degraded": degraded,
            }
        )

    def _popular(self, k: int, category: str | None) -> tuple[ScoredItems, bool]:
        """The k most popular items (of a category), and whether Redis was down: then the last
        lists read, topped up from the model's training-time popularity."""
        glob, degraded = self.features.global_lists(time.time())
        model = self.models.current.champion
        # The live lists are gated already; the model's popularity that tops them up is not.
        found = lists.popular(glob, model, k + 50, category)
        keep = self.features.known(np.asarray(found.ids, dtype=str), model) if len(found) else []
        return ScoredItems(found.ids[keep][:k], found.scores[keep][:k]), degraded

    # -- /trending and profiles ----------------------------------------------------------------

    def trending(self, body: TrendingRequest) -> Response:
        """The trend analysis' top items (of a category) with their trend, and the categories'
        trends; where the analysis has no list, live trending and popular items."""
        # Deeper than k: items the catalog gate refuses are dropped from it.
        depth = 3 * body.k + 20
        found = self.features.live(lambda: self.store.trending_items(depth, body.category))
        degraded = found is None
        if found is None:
            found = TrendList(NO_ITEMS, [], [])
        categories = lists.trend_categories(found, body.k)
        model = self.models.current.champion
        items = self._allowed(lists.trend_analysis_items(found), model, body.k)
        if items:
            source = "trend_analysis"
        else:
            live, stale = self._live_trending(depth, body.category)
            live = self._allowed(live, model, body.k)
            degraded = degraded or stale
            no_trend = lists.trend_fields({})
            items = [{**item, "category": body.category, **no_trend} for item in live]
            source = "live" if items else "none"
        if degraded and not items and self.models.current.champion is None:
            raise self.features.unavailable("no model is loaded")
        return json_response(
            {
                "items": items,
                "categories": categories,
                "source": source,
                "analysed_at": found.analysed_at,
                "request_id": uuid.uuid4().hex,
                "degraded": degraded,
            }
        )

    def _live_trending(self, k: int, category: str | None) -> tuple[list[dict], bool]:
        """lists.live_trending over the global lists, and whether Redis was down (then the last
        lists read, if any, and the model's popularity)."""
        model = self.models.current.champion
        # A category needs the model's catalog: without one, Redis is not asked.
        if category is not None and model is None:
            return [], self.redis_outage.down
        glob, degraded = self.features.global_lists(time.time())
        return lists.live_trending(glob, model, k, category), degraded

    def user_profile(self, user_id: str) -> Response:
        """The user's segment, RFM scores, engagement, churn risk, value and preferences."""
        profile = self.features.live(lambda: self.store.user_profile(user_id))
        if profile is None:
            raise self.features.unavailable("profiles live only there")
        rule = self.settings.segment_rules.get(profile.segment)
        body = dataclasses.asdict(profile)
        body["known"] = profile.known
        body["ranking_rule"] = dataclasses.asdict(rule) if rule is not None else None
        return json_response(body)

    # -- /events -------------------------------------------------------------------------------

    def ingest_events(self, body: EventsRequest) -> Response:
        checked = check_batch(body.events, time.time(), self.limits)
        rejected = checked.rejected
        self.metrics.events.labels("rejected").inc(len(rejected))
        if checked.events.is_empty():
            first = rejected[0]
            return json_response(
                {
                    "error": f"no valid event in the batch; events[{first['index']}]: "
                    f"{first['reason']}",
                    "field": f"events[{first['index']}].{str(first['reason']).split(':')[0]}",
                    "rejected": rejected,
                },
                422,
            )
        # Events of a forgotten user are accepted and dropped: refusing would fail the other
        # users' events of the batch, and would tell any ingest key holder who was forgotten.
        keep = self.suppressed.keep_mask(checked.events)
        suppressed = int((~keep).sum())
        if suppressed:
            checked = dataclasses.replace(
                checked, events=checked.events.filter(keep), indices=checked.indices[keep]
            )
            self.metrics.events.labels("suppressed").inc(suppressed)
        if checked.events.is_empty():
            return json_response(
                {
                    "accepted": suppressed,
                    "duplicates": 0,
                    "duplicate_indices": [],
                    "rejected": rejected,
                    "unknown_items": 0,
                }
            )
        result = self.features.live(lambda: self.store.ingest(checked.events))
        if result is None:
            # Nothing of the batch was stored: the client retries all of it (event ids dedupe).
            raise DependencyUnavailable(
                "the event store (Redis) is unavailable; retry the batch",
                self.redis_outage.retry_after,
            )
        new = np.ones(checked.events.height, dtype=bool)
        new[result.duplicate_rows] = False
        unknown = 0
        model = self.models.current.champion
        if model is not None and result.accepted:
            unknown = int((model.item_index(checked.events["item_id"].to_numpy()[new]) < 0).sum())
        self.metrics.events.labels("accepted").inc(result.accepted)
        self.metrics.events.labels("duplicate").inc(result.duplicates)
        self.metrics.unknown_items.inc(unknown)
        return json_response(
            {
                "accepted": result.accepted + suppressed,
                "duplicates": result.duplicates,
                "duplicate_indices": checked.indices[~new].tolist(),
                "rejected": rejected,
                "unknown_items": unknown,
            }
        )

    # -- forgetting a user (DELETE /users/{id}) --------------------------------------------------

    def forget_user(self, user_id: str, actor: str) -> Response:
        """Delete everything of the user in the event store and Redis, suppress them, audit it.

        Unlike a read, a deletion has no fallback: with Redis or the event store down it is a
        503 and the client retries (forgetting is idempotent, the suppression comes first)."""
        try:
            events = open_event_store(self.config.store.postgres_url, self.home)
        except ConnectionError as exc:
            raise DependencyUnavailable(f"{exc}; retry the deletion", 5) from exc
        try:
            # Suppressed here first: this worker's /events drops the user from now on.
            self.suppressed.add(user_id)
            done = forget_user(user_id, actor, events, self.store.redis, self.store.namespace)
        except REDIS_DOWN as exc:
            self.redis_outage.failed(exc)
            raise DependencyUnavailable(
                "Redis is unavailable: the user is suppressed but their live features are not "
                "deleted yet; retry the deletion",
                self.redis_outage.retry_after,
            ) from exc
        finally:
            events.close()
        return json_response(done.as_dict())

    # -- the live catalog ----------------------------------------------------------------------

    def write_items(self, body: ItemsRequest) -> Response:
        """Upsert items into the live catalog: ranking reads them from the next request on."""
        frame = pl.DataFrame(
            [item.model_dump() for item in body.items],
            schema={
                "item_id": pl.String,
                "title": pl.String,
                "category": pl.String,
                "brand": pl.String,
                "price": pl.Float64,
                "in_stock": pl.Boolean,
            },
        )
        written = self.features.live(lambda: self.store.write_catalog(frame))
        if written is None:
            raise DependencyUnavailable(
                "the live catalog (Redis) is unavailable; retry the batch",
                self.redis_outage.retry_after,
            )
        return json_response({"written": written})

    # -- user activity -------------------------------------------------------------------------

    def user_activity(self, user_id: str, n: int) -> Response:
        """The user's recent items (newest first) and event counters."""
        found = self.features.live(
            lambda: (self.store.recent_items(user_id, n), self.store.counters(user_id))
        )
        if found is None:
            raise self.features.unavailable("user activity lives only there")
        recent, counters = found
        model = self.models.current.champion
        return json_response(
            {
                "user_id": user_id,
                "recent": [
                    {"item_id": i, "timestamp": int(t)}
                    for i, t in zip(recent.ids.tolist(), recent.scores.tolist(), strict=True)
                ],
                "counters": counters,
                "known_to_model": bool(model is not None and model.user_index(user_id) >= 0),
            }
        )


def _answer(ranked: Ranked, model: ServingModel | None, variant: str) -> str:
    """The cacheable `{items, model_version, variant, segment}` JSON object of a ranking."""
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
            "variant": variant,
            "segment": ranked.segment,
        },
        separators=(",", ":"),
    )


def _envelope(
    payload: str, request_id: str, started: float, cached: bool, degraded: bool = False
) -> str:
    """Wrap a cached-or-fresh `{items, model_version, variant}` JSON object with request fields."""
    latency = (time.perf_counter() - started) * 1000.0
    return (
        f'{payload[:-1]},"request_id":"{request_id}","latency_ms":{latency:.3f},'
        f'"cached":{"true" if cached else "false"},"degraded":{"true" if degraded else "false"}}}'
    )


# Around BentoML's router, whose own 404 and 405 answers are plain text.
RecommendationService.add_asgi_middleware(JSONNotFound)
# API keys, scopes and rate limits, before any route (BentoML's and ours).
RecommendationService.add_asgi_middleware(GuardMiddleware)
