"""The service's own Prometheus metrics, beside BentoML's per-endpoint request counts and latency
histograms; created when the service starts, after BentoML's multiprocess set-up."""

from __future__ import annotations

import threading
from typing import Any

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
            "Events posted to /events, by outcome (accepted, duplicate, rejected).",
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
            "Requests served without live features because Redis failed.",
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
