"""The service's own Prometheus metrics, beside BentoML's per-endpoint request counts and latency
histograms (labelled by route template, see label_http_metrics_by_route); created when the service
starts, after BentoML's multiprocess set-up."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Receive, Scope, Send

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
        self._shown: set[tuple[str, str]] = set()

    def show_models(self, loaded: dict[str, Any]) -> None:
        """Set recsys_model_loaded to 1 for `{variant: version or None}`, 0 for the rest."""
        current = {(variant, str(version)) for variant, version in loaded.items() if version}
        for labels in self._shown - current:
            self.model_info.labels(*labels).set(0)
        for labels in current:
            self.model_info.labels(*labels).set(1)
        self._shown = current


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
