"""The service's own Prometheus metrics, beside BentoML's per-endpoint request counts and latency
histograms (labelled by route template, see label_http_metrics_by_route); created when the service
starts, after BentoML's multiprocess set-up."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import redis
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)


class ServiceMetrics:
    """Counters and histograms the service updates; created once per worker process."""

    def __init__(self) -> None:
        import prometheus_client as prom

        self.cache = prom.Counter(
            "recsys_recommend_cache_total",
            "Response cache lookups of /recommend, by result (hit, miss).",
            ["result"],
        )
        self.events = prom.Counter(
            "recsys_events_total",
            "Events posted to /events, by outcome (accepted, duplicate, rejected, suppressed).",
            ["outcome"],
        )
        self.unknown_items = prom.Counter(
            "recsys_events_unknown_items_total",
            "Accepted events whose item the serving model does not know (new items).",
        )
        self.stage_latency = prom.Histogram(
            "recsys_recommend_stage_seconds",
            "Time of each /recommend stage (features, ranking).",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
        )
        self.variant = prom.Counter(
            "recsys_recommend_variant_total",
            "/recommend responses by variant (champion, challenger, popularity).",
            ["variant"],
        )
        self.degraded = prom.Counter(
            "recsys_feature_store_errors_total",
            "Redis reads that failed or were skipped because Redis was down (degraded answers).",
        )
        # livemax: across live workers the largest value, so a swapped-out version drops to 0
        # once every worker swapped.
        self.model_info = prom.Gauge(
            "recsys_model_loaded",
            "1 for each model version a worker serves, by variant.",
            ["variant", "version"],
            multiprocess_mode="livemax",
        )
        self.model_checks = prom.Counter(
            "recsys_model_registry_checks_total",
            "Polls of the model registry, by outcome (ok, error).",
            ["outcome"],
        )
        self.impressions = prom.Counter(
            "recsys_impressions_total",
            "Impressions (answers served) written to the event stream, by route and variant.",
            ["route", "variant"],
        )
        self.impressions_dropped = prom.Counter(
            "recsys_impressions_dropped_total",
            "Impressions dropped: the worker's buffer was full (Redis down too long).",
        )
        # -- online monitoring by model version and variant (docs/experiments.md) --
        self.answers_served = prom.Counter(
            "recsys_answers_served_total",
            "/recommend answers served, by variant and model version (each an impression).",
            ["variant", "version"],
        )
        self.attributed = prom.Counter(
            "recsys_attributed_events_total",
            "Accepted click, add_to_cart and purchase events that name the request_id of an "
            "answer, by the variant and model version that answer came from.",
            ["variant", "version", "event_type"],
        )
        self.coverage = prom.Gauge(
            "recsys_catalog_coverage_ratio",
            "Share of the model's catalog served in the sliding coverage window.",
            ["variant", "version"],
            multiprocess_mode="livemax",
        )
        self.model_age = prom.Gauge(
            "recsys_model_age_seconds",
            "Seconds since the served model version was registered.",
            ["variant", "version"],
            multiprocess_mode="livemax",
        )
        self.stream_length = prom.Gauge(
            "recsys_stream_length",
            "Entries in the event stream (acknowledged entries are trimmed).",
            multiprocess_mode="livemostrecent",
        )
        self.consumer_lag = prom.Gauge(
            "recsys_stream_consumer_lag",
            "Stream entries the consumer group has not stored yet (undelivered + pending).",
            multiprocess_mode="livemostrecent",
        )
        self.coverage_windows: dict[str, CoverageWindow] = {}
        # The versions this worker served lately, oldest first: request ids naming another
        # version are attributed to `other` (see serving/request_ids.py).
        self.known_versions: dict[str, None] = {}
        self._shown: set[tuple[str, str]] = set()

    def show_models(self, loaded: dict[str, Any]) -> None:
        """Set recsys_model_loaded to 1 for `{variant: version or None}`, 0 for the rest."""
        current = {(variant, str(version)) for variant, version in loaded.items() if version}
        for _variant, version in sorted(current):
            self.known_versions.pop(version, None)
            self.known_versions[version] = None
        while len(self.known_versions) > KNOWN_VERSIONS:
            del self.known_versions[next(iter(self.known_versions))]
        for labels in self._shown - current:
            self.model_info.labels(*labels).set(0)
        for labels in current:
            self.model_info.labels(*labels).set(1)
        for labels in self._shown - current:
            # A version that no longer serves reads 0, as recsys_model_loaded does: the
            # multiprocess mode cannot remove a label set.
            self.coverage.labels(*labels).set(0)
            self.model_age.labels(*labels).set(0)
        self._shown = current

    def attribute(self, events: Any) -> None:
        """Count the accepted events that name a request id, by the answer's variant/version."""
        from serving.request_ids import attributed_counts

        counts = attributed_counts(events, list(self.known_versions))
        for variant, version, event_type, n in counts.iter_rows():
            self.attributed.labels(variant, version, event_type).inc(n)

    def served(
        self,
        variant: str,
        version: str | None,
        columns: np.ndarray | None = None,
        catalog_size: int = 0,
    ) -> None:
        """One answer served: the one place answers are counted by variant and version.
        With the items' model columns (-1: unknown to the model), marks them for coverage."""
        label = version or NO_VERSION
        self.answers_served.labels(variant, label).inc()
        if columns is not None and version is not None and catalog_size > 0:
            window = self.coverage_windows.get(version)
            if window is None or window.size != catalog_size:
                window = self.coverage_windows[version] = CoverageWindow(catalog_size)
            window.mark(columns)


NO_VERSION = "none"
KNOWN_VERSIONS = 32


class CoverageWindow:
    """Which of a catalog's items were served recently: two bitmaps, each covering half the
    window, so the union spans between one half and one whole window. Marking an answer is one
    numpy fancy assignment; the ratio is counted only when the gauge is refreshed."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.current = np.zeros(size, dtype=bool)
        self.previous = np.zeros(size, dtype=bool)

    def mark(self, columns: np.ndarray) -> None:
        self.current[columns[columns >= 0]] = True

    def rotate(self) -> None:
        """Start a new half window: the oldest half is forgotten."""
        self.previous, self.current = self.current, self.previous
        self.current[:] = False

    def ratio(self) -> float:
        if not self.size:
            return 0.0
        return float(np.count_nonzero(self.current | self.previous)) / self.size


class MetricsRefresher:
    """Refreshes the gauges that are not per request, in a daemon thread every `interval`
    seconds: stream length and consumer lag (one XLEN, XINFO GROUPS and XPENDING per refresh),
    the served versions' age and their catalog coverage (rotating its half windows)."""

    def __init__(
        self,
        metrics: ServiceMetrics,
        stream: Callable[[], Any],
        models: Callable[[], Sequence[Any]],
        interval: float,
        coverage_window: float,
        redis_down: Callable[[], bool] = lambda: False,
    ) -> None:
        self.metrics = metrics
        self._stream = stream
        self._models = models
        self.interval = interval
        self.half_window = coverage_window / 2.0
        self._redis_down = redis_down
        self._rotated = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> None:
        """One refresh of every gauge; Redis errors leave the stream gauges as they were."""
        now = time.time()
        models = [m for m in self._models() if m is not None]
        rotate = time.monotonic() - self._rotated >= self.half_window
        if rotate:
            self._rotated = time.monotonic()
        for model in models:
            labels = (model.variant, model.version)
            created = model.lineage.created_at
            if created is not None:
                self.metrics.model_age.labels(*labels).set(max(0.0, now - created))
            window = self.metrics.coverage_windows.get(model.version)
            if window is not None:
                self.metrics.coverage.labels(*labels).set(window.ratio())
                if rotate:
                    window.rotate()
        serving = {m.version for m in models}
        for version in set(self.metrics.coverage_windows) - serving:
            del self.metrics.coverage_windows[version]
        if self._redis_down():
            return
        try:
            stream = self._stream()
            self.metrics.stream_length.set(stream.length())
            self.metrics.consumer_lag.set(stream.lag())
        except redis.RedisError as exc:
            # The request path reports Redis outages; the gauges keep their last values.
            log.debug("stream gauges not refreshed: %s", exc)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="metrics-refresher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self.refresh()
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


_INSTANCE: ServiceMetrics | None = None
_LOCK = threading.Lock()


def service_metrics() -> ServiceMetrics:
    """The process's metrics, created on first use (a metric name registers once per process)."""
    global _INSTANCE
    with _LOCK:
        if _INSTANCE is None:
            _INSTANCE = ServiceMetrics()
        return _INSTANCE


# The raw path, carried past BentoML's metrics middleware in the scope it sees.
_RAW_PATH = "recsys.raw_path"
UNMATCHED = "unmatched"


def route_template(routes: Sequence[BaseRoute], scope: Scope) -> str | None:
    """The template (`/users/{user_id}/profile`) of the route that serves `scope`, looking into
    mounted apps; a route that matches the path but not the method counts too (it answers 405)."""
    partial: str | None = None
    for route in routes:
        match, child = route.matches(scope)
        if match == Match.NONE:
            continue
        if isinstance(route, Mount):
            inner = getattr(route.app, "routes", None)
            found = route_template(inner, {**scope, **child}) if inner is not None else "/{path}"
            if found is None:
                continue
            template = route.path + found
        else:
            template = getattr(route, "path", None)
            if template is None:
                continue
        if match == Match.FULL:
            return template
        partial = partial or template
    return partial


class _RestorePath:
    """Inside BentoML's metrics middleware: gives the rest of the stack the raw path back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.pop(_RAW_PATH, None)
        if raw is not None:
            scope["path"] = raw
        await self.app(scope, receive, send)


def label_http_metrics_by_route() -> None:
    """Make BentoML's `bentoml_service_request_*` metrics label requests by route template.

    BentoML 1.4 labels them `endpoint=scope["path"]`, so every user id in a path
    (`/users/{user_id}/activity`) and every unknown path scanned adds label sets without bound,
    and it has no setting to change that. Its service app picks its metrics middleware class from
    this module attribute when the app is built, so a subclass put there before (it runs
    outermost, where our own middleware cannot reach) sees the template as the path and hands the
    raw path back to the app behind it. Unknown paths share the label `unmatched`.
    """
    from bentoml._internal.server.http import instruments

    base = instruments.RunnerTrafficMetricsMiddleware
    if getattr(base, "labels_by_route", False):
        return

    class RouteLabelledMetrics(base):  # type: ignore[misc, valid-type]
        labels_by_route = True

        def __init__(self, app: ASGIApp, *args: Any, **kwargs: Any) -> None:
            super().__init__(_RestorePath(app), *args, **kwargs)

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await super().__call__(scope, receive, send)
                return
            router = getattr(scope.get("app"), "router", None)
            template = route_template(getattr(router, "routes", ()), scope) or UNMATCHED
            if template == scope["path"]:
                await super().__call__(scope, receive, send)
                return
            labelled = {**scope, "path": template, _RAW_PATH: scope["path"]}
            await super().__call__(labelled, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = RouteLabelledMetrics
