"""The BentoML recommendation service: settings, models, the feature store, lifecycle, readiness and
Redis outages, and the method behind each route of serving/api.py (the non-personalised read
answers are serving/answers.py, forgetting a user serving/forgetting.py)."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import threading
import time

import bentoml
import numpy as np
import polars as pl
import redis
from starlette.responses import Response

from config import get_settings
from feature_repo.connection import connect, revive_embedded
from feature_repo.definitions import FeatureConfig
from feature_repo.experiment_store import ExperimentStore, open_experiment_store
from feature_repo.forget import SuppressionCache
from feature_repo.store import FeatureStore
from feature_repo.stream import EventStream
from serving import answers
from serving.api import app, json_response
from serving.auth import Guard, GuardMiddleware
from serving.bundle import ServingModel
from serving.errors import DependencyUnavailable, JSONNotFound
from serving.experiments import ExperimentLoader, ExperimentRouter, Served
from serving.features import FeatureReader, RequestRead
from serving.forgetting import SuppressedLoader, forget
from serving.impressions import ImpressionLog
from serving.metrics import MetricsRefresher, label_http_metrics_by_route, service_metrics
from serving.models import ModelManager, ModelSet
from serving.outage import REDIS_DOWN, Outage
from serving.ranking import Ranker, RankingParams
from serving.request_ids import new_request_id
from serving.reranking import Ranked, merge_ranked
from serving.schemas import (
    EventsRequest,
    ExperimentStartRequest,
    ItemsRequest,
    PopularRequest,
    RecommendRequest,
    SimilarItemsRequest,
    TrendingRequest,
)
from serving.settings import ServingSettings, blend_weights
from training.events import check_batch
from training.experiments import check_arms, new_experiment
from training.interleaving import seed_for, team_draft

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
        # The running experiments first: the models they name load with the aliases' ones.
        self.experiments = ExperimentRouter(
            ExperimentLoader(self.config.store.postgres_url, self.home)
        )
        self.experiments.reload()
        self.models = ModelManager(
            self._open_registry,
            state_dir=self.home / "serving",
            poll_seconds=self.settings.poll_seconds,
            challenger_share=self.settings.challenger_share,
            on_change=self._models_changed,
            prepare=lambda model: setattr(
                model, "blend", blend_weights(self.settings, model.weights)
            ),
            wanted_versions=self.experiments.versions,
        )
        # An experiment that names a version not loaded yet has it loaded at once.
        self.experiments.on_change = lambda _: self.models.refresh()
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
        self.monitor = MetricsRefresher(
            self.metrics,
            lambda: self.stream,
            lambda: (self.models.current.champion, self.models.current.challenger),
            self.settings.monitor_seconds,
            self.settings.coverage_window_seconds,
            redis_down=lambda: self.redis_outage.down,
        )
        self.guard = Guard(self.settings, app.routes, lambda: self.store, self.redis_outage)
        self.features = FeatureReader(
            lambda: self.store,
            self.settings,
            self.redis_outage,
            self.metrics,
            champion=lambda: self.models.current.champion,
        )
        self.suppressed = SuppressionCache(
            SuppressedLoader(self.config.store.postgres_url, self.home),
            self.settings.suppression_refresh_seconds,
        )
        self._stream: EventStream | None = None
        self.impressions = ImpressionLog(
            lambda payloads: self.stream.add_impressions(payloads),
            enabled=self.settings.log_impressions,
            ready=lambda: not self.redis_outage.down,
            on_written=self._impressions_written,
            on_dropped=self.metrics.impressions_dropped.inc,
        )

    # -- lifecycle -----------------------------------------------------------------------------

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
        self.experiments.start()
        self.impressions.start()
        self.monitor.start()
        # Everything loaded so far lives as long as the worker: keep it out of the cyclic GC's
        # full passes, which otherwise stall requests for milliseconds.
        gc.collect()
        gc.freeze()

    @bentoml.on_shutdown
    def stop(self) -> None:
        self.models.stop()
        self.suppressed.stop()
        self.experiments.stop()
        # Before Redis' outage probe stops: the last impressions are written on the way out.
        self.impressions.stop()
        self.monitor.stop()
        self.features.close()
        self.redis_outage.stop()

    def _ensure_group(self) -> None:
        self.stream.ensure_group()

    @property
    def stream(self) -> EventStream:
        if self._stream is None:
            self._stream = EventStream(self.store.redis, self.store.namespace)
        return self._stream

    def _impressions_written(self, counts: dict[tuple[str, str], int]) -> None:
        for (route, variant), n in counts.items():
            self.metrics.impressions.labels(route, variant).inc(n)

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

    # -- which arm serves a request ----------------------------------------------------------

    def assignment(self, user_id: str | None) -> Served:
        """The model, variant and experiment of a request: the one place they are decided (the
        running experiments, else the champion or its challenger's share)."""
        return self.experiments.route(self.models.current, user_id)

    # -- /recommend ----------------------------------------------------------------------------

    def recommend_json(self, body: RecommendRequest) -> str:
        """The /recommend response body for a validated request; logged as an impression (a
        failure too, as an error of its variant)."""
        started = time.perf_counter()
        served = self.assignment(body.user_id)
        model = served.model
        request_id = new_request_id(served.variant, model.version if model is not None else None)
        try:
            return self._recommend(body, served, request_id, started)
        except Exception:
            self.impressions.failed(
                "/recommend",
                request_id,
                body.user_id,
                model.version if model is not None else None,
                served.variant,
                answers.latency_ms(started),
                served.experiment,
            )
            raise

    def _recommend(
        self, body: RecommendRequest, served: Served, request_id: str, started: float
    ) -> str:
        now = time.time()
        model, variant = served.model, served.variant
        version = model.version if model is not None else None
        # An interleaved answer is drawn per request, so it is never cached.
        label = f"{variant}|{served.experiment}" if not served.rivals else request_id
        read = self.features.for_request(body, model, now, label)
        if read.cached is not None:
            self.metrics.variant.labels(variant).inc()
            # Coverage counts fresh answers only: a cached one repeats items marked within TTL.
            self.metrics.served(variant, version)
            latency = answers.latency_ms(started)
            self.impressions.recommend(
                request_id,
                body.user_id,
                read.cached,
                latency,
                True,
                False,
                served.experiment,
                body.context,
                variant,
            )
            return answers.envelope(read.cached, request_id, latency, cached=True)
        features_done = time.perf_counter()
        if served.rivals:
            ranked = self._interleaved(served, body, read, now, request_id)
        else:
            ranked = self._ranked(model, body, read, now)
        payload = answers.recommend_payload(ranked, model, variant, served.experiment)
        if not served.rivals:
            self.features.cache_answer(body.user_id, read, payload, now)
        done = time.perf_counter()
        self.metrics.stage_latency.labels("features").observe(features_done - started)
        self.metrics.stage_latency.labels("ranking").observe(done - features_done)
        self.metrics.variant.labels(variant).inc()
        self.metrics.served(
            variant,
            version,
            model.item_index(np.asarray(ranked.item_ids, dtype=str)) if model else None,
            model.n_items if model else 0,
        )
        latency = answers.latency_ms(started)
        self.impressions.recommend(
            request_id,
            body.user_id,
            payload,
            latency,
            False,
            read.degraded,
            served.experiment,
            body.context,
            variant,
            ranked.teams,
        )
        return answers.envelope(payload, request_id, latency, cached=False, degraded=read.degraded)

    def _ranked(
        self, model: ServingModel | None, body: RecommendRequest, read: RequestRead, now: float
    ) -> Ranked:
        return self.ranker.recommend(
            model=model,
            weights=model.blend if model is not None else self._popularity_blend,
            user_id=body.user_id,
            k=body.k,
            filters=body.filters,
            exclude_seen=body.exclude_seen,
            live=read.live,
            now=now,
            attributes=lambda ids: self.features.attributes(ids, model),
            fields=tuple(body.fields or ()),
        )

    def _interleaved(
        self, served: Served, body: RecommendRequest, read: RequestRead, now: float, request_id: str
    ) -> Ranked:
        """Team-draft interleaving of the two rivals' rankings (seeded by the request id, so a
        replay gives the same teams); the merged ranking names each position's arm (`teams`)."""
        (name_a, model_a), (name_b, model_b) = served.rivals
        ranked_a = self._ranked(model_a, body, read, now)
        ranked_b = self._ranked(model_b, body, read, now)
        items, teams = team_draft(
            ranked_a.item_ids, ranked_b.item_ids, body.k, seed_for(request_id), (name_a, name_b)
        )
        return merge_ranked(items, teams, {name_a: ranked_a, name_b: ranked_b})

    # -- /similar_items, /popular, /trending and profiles ---------------------------------------

    def similar_items(self, body: SimilarItemsRequest) -> Response:
        started, arm = time.perf_counter(), self.assignment(None)
        answer = answers.similar_items(self.features, arm.model, body)
        return self._items_answer("/similar_items", answer, arm, started)

    def popular(self, body: PopularRequest) -> Response:
        started, arm = time.perf_counter(), self.assignment(None)
        answer = answers.popular(self.features, arm.model, body)
        return self._items_answer("/popular", answer, arm, started)

    def trending(self, body: TrendingRequest) -> Response:
        started, arm = time.perf_counter(), self.assignment(None)
        answer = answers.trending(self.features, arm.model, body)
        return self._items_answer("/trending", answer, arm, started)

    def _items_answer(self, route: str, answer: dict, arm: Served, started: float) -> Response:
        """Send a non-personal answer and log it as an impression (no user: these routes have
        none)."""
        self.impressions.items(
            route,
            answer["request_id"],
            None,
            answer["items"],
            arm.model.version if arm.model is not None else None,
            arm.variant,
            answers.latency_ms(started),
            answer["degraded"],
            arm.experiment,
        )
        return json_response(answer)

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
        self.metrics.attribute(checked.events.filter(pl.Series(new)))
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
        return forget(
            user_id,
            actor,
            features=self.features,
            suppressed=self.suppressed,
            postgres_url=self.config.store.postgres_url,
            home=self.home,
        )

    # -- online experiments (admin) ------------------------------------------------------------

    def list_experiments(self) -> Response:
        with self._experiment_store() as store:
            return json_response([e.to_dict() for e in store.all()])

    def get_experiment(self, name: str) -> Response:
        with self._experiment_store() as store:
            return json_response(store.get(name).to_dict())

    def start_experiment(self, body: ExperimentStartRequest) -> Response:
        """Check the arms against the registry, store the experiment, serve it in this worker at
        once (the others reload within seconds)."""
        fields = body.model_dump(exclude={"min_hours", "max_days"})
        fields.update(
            min_duration_s=body.min_hours * 3600.0, max_duration_s=body.max_days * 86400.0
        )
        experiment = new_experiment(**fields)
        check_arms(experiment, self.models.registry)
        with self._experiment_store() as store:
            store.start(experiment)
        self.experiments.reload()
        return json_response(experiment.to_dict())

    def stop_experiment(self, name: str) -> Response:
        with self._experiment_store() as store:
            stopped = store.stop(name)
        self.experiments.reload()
        return json_response(stopped.to_dict())

    def _experiment_store(self) -> ExperimentStore:
        try:
            return open_experiment_store(self.config.store.postgres_url, self.home)
        except ConnectionError as exc:
            raise DependencyUnavailable(f"{exc}; retry", 5) from exc

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


# Around BentoML's router, whose own 404 and 405 answers are plain text.
RecommendationService.add_asgi_middleware(JSONNotFound)
# API keys, scopes and rate limits, before any route (BentoML's and ours).
RecommendationService.add_asgi_middleware(GuardMiddleware)
