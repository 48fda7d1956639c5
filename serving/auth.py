"""API keys with scopes and rate limits: the scope each route needs, the operator's hashed keys,
the bind policy of `recsys serve`, and the ASGI middleware that checks a request before any route.

A route needs the scope ROUTE_SCOPES names for it, none if OPEN_ROUTES lists it, and `admin`
otherwise: a route added without an entry here is admin-only until someone decides otherwise.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from feature_repo.store import FeatureStore
    from serving.outage import Outage
    from serving.settings import ServingSettings

log = logging.getLogger("recsys.serving")

READ, INGEST, ADMIN, METRICS = "read", "ingest", "admin", "metrics"
# `metrics` is for a Prometheus scraper when RECSYS_METRICS_OPEN=0. No scope implies another:
# an admin key reads only if it also has `read`.
SCOPES = (READ, INGEST, ADMIN, METRICS)

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

KEY_PREFIX = "rsk_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


class AuthConfigError(ValueError):
    """The keys file or setting cannot be used, or the bind policy refuses the address."""


@dataclass(frozen=True)
class ApiKey:
    """One key as the operator configured it; only the SHA-256 of the key is ever stored."""

    name: str
    sha256: str
    scopes: frozenset[str]
    rate_limit: float | None = None  # requests per second per scope, instead of the scope's

    def entry(self) -> dict[str, Any]:
        """The key as an entry of the keys file."""
        out: dict[str, Any] = {"name": self.name, "sha256": self.sha256}
        out["scopes"] = sorted(self.scopes)
        if self.rate_limit is not None:
            out["rate_limit"] = self.rate_limit
        return out


def hash_key(key: str) -> str:
    """The hex SHA-256 the keys file stores for `key`. Keys are 256 random bits, so a fast hash
    is enough: there is nothing to guess that a slow one would protect."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A new random key (256 bits, URL-safe, with a prefix that secret scanners recognise)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def parse_key(entry: object, where: str) -> ApiKey:
    """One entry `{name, sha256, scopes, rate_limit?}`; `where` names it in the error."""
    if not isinstance(entry, dict):
        raise AuthConfigError(f"{where}: each key must be an object {{name, sha256, scopes}}")
    unknown = set(entry) - {"name", "sha256", "scopes", "rate_limit"}
    if unknown:
        raise AuthConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
    name, digest, scopes = entry.get("name"), entry.get("sha256"), entry.get("scopes")
    if not isinstance(name, str) or not _NAME.match(name):
        raise AuthConfigError(
            f"{where}: name must be 1-64 letters, digits, '.', '_' or '-': {name!r}"
        )
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise AuthConfigError(
            f"{where} ({name}): sha256 must be the 64 lower-case hex digits of the key's SHA-256 "
            "(the key itself is never stored; `recsys api-key create` writes the entry)"
        )
    if isinstance(scopes, str):
        scopes = [s.strip() for s in scopes.split(",")]
    if not isinstance(scopes, list) or not scopes or not set(scopes) <= set(SCOPES):
        raise AuthConfigError(f"{where} ({name}): scopes must be a list of {SCOPES}: {scopes!r}")
    rate = entry.get("rate_limit")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float)):
        raise AuthConfigError(f"{where} ({name}): rate_limit must be a number: {rate!r}")
    if rate is not None and rate <= 0:
        raise AuthConfigError(f"{where} ({name}): rate_limit must be > 0 requests per second")
    return ApiKey(name, digest, frozenset(scopes), float(rate) if rate is not None else None)


def _entries(document: object, where: str) -> list[object]:
    if isinstance(document, dict) and set(document) == {"keys"}:
        document = document["keys"]
    if not isinstance(document, list):
        raise AuthConfigError(f'{where} must be {{"keys": [{{name, sha256, scopes}}, ...]}}')
    return document


def read_keys_file(path: Path) -> list[ApiKey]:
    """The keys of a keys file (JSON `{"keys": [...]}`)."""
    if not path.exists():
        raise AuthConfigError(
            f"the API keys file {path} does not exist: create a key with "
            f"`recsys api-key create --name NAME --scopes read --file {path}`"
        )
    try:
        document = json.loads(path.read_text() or '{"keys": []}')
    except ValueError as exc:
        raise AuthConfigError(f"the API keys file {path} is not valid JSON: {exc}") from exc
    entries = _entries(document, str(path))
    return [parse_key(e, f"{path}: keys[{i}]") for i, e in enumerate(entries)]


def _parse_inline(raw: str) -> list[ApiKey]:
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise AuthConfigError(f"RECSYS_API_KEYS is not valid JSON: {exc}") from exc
    entries = _entries(document, "RECSYS_API_KEYS")
    return [parse_key(e, f"RECSYS_API_KEYS[{i}]") for i, e in enumerate(entries)]


class KeyRing:
    """The configured keys, looked up by the hash of the presented key."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._by_hash: dict[bytes, tuple[bytes, ApiKey]] = {}
        names: set[str] = set()
        for key in keys:
            if key.name in names:
                raise AuthConfigError(f"two API keys are named {key.name!r}")
            digest = bytes.fromhex(key.sha256)
            if digest in self._by_hash:
                raise AuthConfigError(
                    f"API keys {self._by_hash[digest][1].name!r} and {key.name!r} are the same key"
                )
            names.add(key.name)
            self._by_hash[digest] = (digest, key)

    @classmethod
    def from_settings(cls, settings: ServingSettings) -> KeyRing:
        """The keys of RECSYS_API_KEYS_FILE and RECSYS_API_KEYS together."""
        keys: list[ApiKey] = []
        if settings.api_keys_file:
            keys += read_keys_file(Path(settings.api_keys_file).expanduser())
        if settings.api_keys.strip():
            keys += _parse_inline(settings.api_keys)
        return cls(keys)

    def __len__(self) -> int:
        return len(self._by_hash)

    @property
    def keys(self) -> list[ApiKey]:
        return [key for _, key in self._by_hash.values()]

    def find(self, presented: str) -> ApiKey | None:
        """The key whose hash is the hash of `presented`, else None.

        The dict lookup runs on the SHA-256 of what the client sent, so its timing says
        something about that digest only, never about a stored key; the final comparison is
        constant-time all the same."""
        digest = hashlib.sha256(presented.encode()).digest()
        found = self._by_hash.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            return None
        return found[1]


def add_key(path: Path, name: str, scopes: Sequence[str], rate_limit: float | None) -> str:
    """Create a key, append its hash to the keys file `path` (created with mode 0600) and return
    the key: the only time anyone sees it."""
    key = new_key()
    entry = parse_key(
        {"name": name, "sha256": hash_key(key), "scopes": list(scopes), "rate_limit": rate_limit}
        if rate_limit is not None
        else {"name": name, "sha256": hash_key(key), "scopes": list(scopes)},
        "the new key",
    )
    existing = read_keys_file(path) if path.exists() else []
    KeyRing([*existing, entry])  # refuses a second key of the same name
    document = {"keys": [k.entry() for k in (*existing, entry)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed over: a crash leaves the old file whole.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(document, out, indent=2)
            out.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return key


# -- the bind policy of `recsys serve` ------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def bind_policy(host: str, keys: KeyRing, insecure: bool) -> str:
    """The start-up line for serving on `host` with `keys`; refuses (AuthConfigError) to serve
    beyond loopback without keys unless `insecure`."""
    if len(keys):
        return f"API keys: {len(keys)} configured; requests without a valid key get 401"
    if is_loopback(host):
        return (
            f"no API keys configured: the service on {host} answers every request without a "
            "key (loopback only; set RECSYS_API_KEYS_FILE to require keys)"
        )
    if insecure:
        return (
            f"INSECURE: no API keys configured and --insecure given: anyone who can reach "
            f"{host} can read, write events and call admin routes"
        )
    raise AuthConfigError(
        f"refusing to serve on {host} without API keys: anyone who can reach it could write "
        "events and call admin routes. Create one with `recsys api-key create --name NAME "
        "--scopes read,ingest --file FILE` and set RECSYS_API_KEYS_FILE=FILE, serve on "
        "127.0.0.1, or pass --insecure to serve open on purpose"
    )


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
