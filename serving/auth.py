"""The request guard: the scope each route needs, and the ASGI middleware that checks a request's
API key (serving/keys.py), scope and rate limits before any route.

A route needs the scope ROUTE_SCOPES names for it, none if OPEN_ROUTES lists it, and `admin`
otherwise: a route added without an entry here is admin-only until someone decides otherwise.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.keys import ADMIN, INGEST, METRICS, READ, ApiKey, KeyRing

if TYPE_CHECKING:
    from feature_repo.store import FeatureStore
    from serving.outage import Outage
    from serving.settings import ServingSettings

log = logging.getLogger("recsys.serving")

ROUTE_SCOPES: dict[tuple[str, str], str] = {
    ("POST", "/events"): INGEST,
    ("POST", "/recommend"): READ,
    ("POST", "/similar_items"): READ,
    ("POST", "/popular"): READ,
    ("POST", "/trending"): READ,
    ("POST", "/user_profile"): READ,
    ("GET", "/users/{user_id}/profile"): READ,
    ("GET", "/users/{user_id}/activity"): READ,
    ("DELETE", "/users/{user_id}"): ADMIN,
    ("POST", "/items"): ADMIN,
    ("GET", "/experiments"): ADMIN,
    ("POST", "/experiments"): ADMIN,
    ("GET", "/experiments/{name}"): ADMIN,
    ("POST", "/experiments/{name}/stop"): ADMIN,
}
# BentoML's probes, its OpenAPI document and docs page (and their static files), ours at
# /docs.json; HEAD is answered like GET.
OPEN_ROUTES: frozenset[tuple[str, str]] = frozenset(
    (method, path)
    for path in ("/livez", "/healthz", "/readyz", "/docs.json", "/schema.json", "/")
    for method in ("GET", "HEAD")
)
OPEN_PREFIXES = ("/static_content/", "/assets/")
METRICS_ROUTE = ("GET", "/metrics")


# -- per request ------------------------------------------------------------------------------


class RouteScopes:
    """The scope a (method, path) needs, resolved the way the app's router matches it: static
    paths from a dict, the others by the routes' own patterns in the router's order."""

    def __init__(self, routes: Sequence[BaseRoute], metrics_open: bool) -> None:
        self.routes = [r for r in routes if hasattr(r, "path_regex")]
        self.open = set(OPEN_ROUTES)
        self.fixed: dict[tuple[str, str], str] = {}
        if metrics_open:
            self.open |= {METRICS_ROUTE, ("HEAD", "/metrics")}
        else:
            self.fixed[METRICS_ROUTE] = self.fixed[("HEAD", "/metrics")] = METRICS
        for route in self.routes:
            path = getattr(route, "path", "")
            if "{" in path:
                continue
            for method in getattr(route, "methods", None) or ():
                if (method, path) not in self.open and (method, path) not in self.fixed:
                    self.fixed[(method, path)] = self._match(method, path)

    def scope_of(self, method: str, path: str) -> str | None:
        """The scope the request needs; None for an open route."""
        if method == "HEAD":
            method = "GET"
        key = (method, path)
        if key in self.open:
            return None
        found = self.fixed.get(key)
        if found is not None:
            return found
        if method == "GET" and path.startswith(OPEN_PREFIXES):
            return None
        return self._match(method, path)

    def _match(self, method: str, path: str) -> str:
        for route in self.routes:
            if route.path_regex.match(path) is None:  # type: ignore[attr-defined]
                continue
            methods = getattr(route, "methods", None)
            if methods is None or method in methods:
                return ROUTE_SCOPES.get((method, route.path), ADMIN)  # type: ignore[attr-defined]
        return ADMIN  # no route: the same answer as a route that needs admin


def document_security(spec: dict[str, Any]) -> None:
    """Name the two ways to send a key in an OpenAPI document, and on each operation that needs
    one the scope it needs (`x-required-scope`)."""
    spec.setdefault("components", {})["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer`"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    }
    for path, operations in spec.get("paths", {}).items():
        for method, operation in operations.items():
            key = (method.upper(), path)
            if key in OPEN_ROUTES or key == METRICS_ROUTE or not isinstance(operation, dict):
                continue
            operation["security"] = [{"bearer": []}, {"apiKey": []}]
            operation["x-required-scope"] = ROUTE_SCOPES.get(key, ADMIN)


def _error(status: int, message: str, headers: dict[str, str], **extra: object) -> JSONResponse:
    return JSONResponse({"error": message, "field": None, **extra}, status, headers=headers)


UNAUTHORIZED = 'Bearer realm="recsys"'
# Tokens a worker leased from a bucket and has not spent within this long are forgotten (never
# handed back: a lease can only make the limit stricter, never looser).
LEASE_TTL = 1.0
MAX_LEASES = 100_000  # past this many buckets a worker drops its leases (many addresses)
INVALID = 'Bearer realm="recsys", error="invalid_token"'


class Guard:
    """One service instance's keys, route scopes and rate limits: `check` answers a request that
    must not reach its route (401, 403, 429) and lets the others through (None)."""

    def __init__(
        self,
        settings: ServingSettings,
        routes: Sequence[BaseRoute],
        store: Callable[[], FeatureStore],
        outage: Outage,
    ) -> None:
        self.keys = KeyRing.from_settings(settings)
        self.routes = RouteScopes(routes, settings.metrics_open)
        self.rates = dict(settings.rate_limits)
        self.per_ip = settings.rate_limit_per_ip
        self.burst = settings.rate_limit_burst_seconds
        self.lease_seconds = settings.rate_limit_lease_seconds
        # bucket -> [tokens this worker took from Redis and has not spent, when they lapse]
        self._leases: dict[str, list[float]] = {}
        self.store = store
        self.outage = outage
        self._unlimited_outage = 0  # the outage whose fail-open was logged last
        self.enforcing = bool(len(self.keys) or self.per_ip)

    def check(self, scope: Scope) -> JSONResponse | None:
        needed = self.routes.scope_of(scope["method"], scope["path"])
        if needed is None:
            return None
        key: ApiKey | None = None
        if len(self.keys):
            presented = _presented_key(scope["headers"])
            if presented is None:
                return _error(
                    401,
                    "an API key is required: send `Authorization: Bearer <key>` or "
                    "`X-API-Key: <key>`",
                    {"WWW-Authenticate": UNAUTHORIZED},
                )
            key = self.keys.find(presented)
            if key is None:
                return _error(401, "unknown API key", {"WWW-Authenticate": INVALID})
            if needed not in key.scopes:
                return _error(
                    403,
                    f"the API key {key.name!r} lacks the scope {needed!r} this route needs "
                    f"(it has: {', '.join(sorted(key.scopes))})",
                    {},
                )
            # For routes that record who did something (deletion audits): request.state.api_key.
            scope.setdefault("state", {})["api_key"] = key.name
        return self._limit(scope, key, needed)

    def _buckets(self, scope: Scope, key: ApiKey | None, needed: str) -> list[tuple]:
        """(bucket, rate, capacity) of each limit the request counts against."""
        buckets = []
        if key is not None:
            rate = key.rate_limit or self.rates.get(needed)
            if rate:
                buckets.append((f"key:{key.name}:{needed}", rate, max(1.0, rate * self.burst)))
        if self.per_ip:
            client = scope.get("client")
            address = client[0] if client else "unknown"
            buckets.append((f"ip:{address}", self.per_ip, max(1.0, self.per_ip * self.burst)))
        return buckets

    def _limit(self, scope: Scope, key: ApiKey | None, needed: str) -> JSONResponse | None:
        """Spend one token of each bucket. A worker takes up to `lease_seconds` of a bucket's
        rate from Redis at once and spends them locally, so a busy key costs a round trip per
        lease, not per request; a limit below 1 / lease_seconds per second leases one token, so
        each of its requests asks Redis."""
        buckets = self._buckets(scope, key, needed)
        if not buckets:
            return None
        now = time.monotonic()
        leases = self._leases
        missing = []
        for bucket in buckets:
            lease = leases.get(bucket[0])
            if lease is None or lease[0] < 1 or lease[1] < now:
                missing.append(bucket)
        if missing:
            refused = self._lease(missing, now)
            if refused is not None:
                return self._too_many(refused, key)
        for bucket in buckets:
            lease = leases.get(bucket[0])
            if lease is not None:  # None: Redis is down and the limiter fails open
                lease[0] -= 1
        return None

    def _lease(self, buckets: list[tuple], now: float) -> int | None:
        """Lease tokens of `buckets` from Redis: None when leased (or Redis is down), else the
        milliseconds to wait."""
        if self.outage.down:
            self._fail_open()
            return None
        from serving.outage import REDIS_DOWN

        wants = [(*b, max(1, min(int(b[1] * self.lease_seconds), int(b[2])))) for b in buckets]
        try:
            wait_ms, taken = self.store().take_tokens(wants)
        except REDIS_DOWN as exc:
            self.outage.failed(exc)
            self._fail_open()
            return None
        if wait_ms:
            return wait_ms
        if len(self._leases) > MAX_LEASES:
            self._leases.clear()
        for bucket, tokens in zip(buckets, taken, strict=True):
            self._leases[bucket[0]] = [float(tokens), now + LEASE_TTL]
        return None

    def _too_many(self, wait_ms: int, key: ApiKey | None) -> JSONResponse:
        retry_after = max(1, math.ceil(wait_ms / 1000))
        who = f"the API key {key.name!r}" if key is not None else "this client address"
        return _error(
            429,
            f"rate limit exceeded for {who}; retry after {retry_after} s",
            {"Retry-After": str(retry_after)},
            retry_after_ms=wait_ms,
        )

    def _fail_open(self) -> None:
        # Redis down must not take the service down with it: requests pass unlimited, and that
        # is said once per outage.
        if self._unlimited_outage != self.outage.outages:
            self._unlimited_outage = self.outage.outages
            log.warning("rate limits are not enforced while Redis is down (failing open)")


def _presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key of `Authorization: Bearer <key>`, else of `X-API-Key`, else None."""
    found = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value.strip():
            found = value.decode("latin-1").strip()
    return found


class GuardMiddleware:
    """Runs the current service instance's Guard before BentoML's router: its routes, ours and
    any added later alike."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            import bentoml

            guard: Guard = bentoml.get_current_service().guard
            if guard.enforcing:
                refused = guard.check(scope)
                if refused is not None:
                    await refused(scope, receive, send)
                    return
        await self.app(scope, receive, send)
