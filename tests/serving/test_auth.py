"""API keys, scopes and rate limits on the real service: every route answers 401 without or with an
unknown key, 403 with a key lacking its scope, and passes with the right one (Bearer and X-API-Key);
limits answer 429 with Retry-After from buckets in Redis, and fail open while Redis is down."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.routing import APIRoute
from starlette.testclient import TestClient

from feature_repo.definitions import Keys
from feature_repo.store import FeatureStore
from serving.api import app
from serving.auth import OPEN_ROUTES, ROUTE_SCOPES, Guard, RouteScopes
from serving.keys import (
    ADMIN,
    INGEST,
    READ,
    AuthConfigError,
    KeyRing,
    add_key,
    bind_policy,
    hash_key,
    read_keys_file,
)
from serving.outage import Outage
from serving.settings import ServingSettings
from tests.serving.conftest import RedisServer, free_port, wait_ready

BODIES = {
    "/recommend": {"user_id": "u1", "k": 3},
    "/similar_items": {"item_id": "i1", "k": 3},
    "/popular": {"k": 3},
    "/trending": {"k": 3},
    "/user_profile": {"user_id": "u1"},
    "/events": {"events": [{"user_id": "u1", "item_id": "i1", "event_type": "view"}]},
}


def every_route() -> list[tuple[str, str, str]]:
    """(method, concrete path, scope it needs) of every route of the app, those the other
    pieces add included: a route without a ROUTE_SCOPES entry needs admin."""
    out = []
    for route in app.routes:
        if not isinstance(route, APIRoute) or route.path == "/docs.json":
            continue
        path = re.sub(r"\{[^}]+\}", "u1", route.path)
        for method in sorted(route.methods):
            out.append((method, path, ROUTE_SCOPES.get((method, route.path), ADMIN)))
    return out


def call(client: TestClient, method: str, path: str, headers: dict[str, str] | None = None):
    body = BODIES.get(path)
    if method in ("POST", "PUT", "PATCH", "DELETE") and body is not None:
        return client.request(method, path, json=body, headers=headers)
    return client.request(method, path, headers=headers)


@pytest.fixture
def keys(recsys_home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """One key per scope and one with read+ingest, in a keys file the service reads."""
    path = recsys_home / "api-keys.json"
    made = {
        "reader": add_key(path, "reader", [READ], None),
        "ingester": add_key(path, "ingester", [INGEST], None),
        "admin": add_key(path, "admin", [ADMIN], None),
        "shop": add_key(path, "shop", [READ, INGEST], None),
        "scraper": add_key(path, "scraper", ["metrics"], None),
    }
    monkeypatch.setenv("RECSYS_API_KEYS_FILE", str(path))
    return made


@pytest.fixture
def guarded(service_app, namespace: str, keys: dict[str, str]) -> Iterator[TestClient]:
    """The real service, started with the keys file configured."""
    with TestClient(service_app) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_the_keys_file_holds_hashes_only(keys: dict[str, str], recsys_home: Path) -> None:
    path = recsys_home / "api-keys.json"
    text = path.read_text()
    assert path.stat().st_mode & 0o077 == 0
    for key in keys.values():
        assert key.startswith("rsk_") and len(key) >= 40
        assert key not in text
        assert hashlib.sha256(key.encode()).hexdigest() in text
    assert {k.name for k in read_keys_file(path)} == set(keys)
    ring = KeyRing(read_keys_file(path))
    assert ring.find(keys["reader"]).scopes == {READ}
    assert ring.find(keys["reader"] + "x") is None
    with pytest.raises(AuthConfigError, match="two API keys are named 'reader'"):
        add_key(path, "reader", [READ], None)


def test_every_route_needs_its_scope(guarded: TestClient, keys: dict[str, str]) -> None:
    routes = every_route()
    assert {(m, p) for m, p, _ in routes} >= {("POST", "/events"), ("POST", "/recommend")}
    holders = {READ: {"reader", "shop"}, INGEST: {"ingester", "shop"}, ADMIN: {"admin"}}
    for method, path, scope in routes:
        missing = call(guarded, method, path)
        assert missing.status_code == 401, (method, path, missing.text)
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert "API key is required" in missing.json()["error"]
        unknown = call(guarded, method, path, bearer("rsk_not-a-key"))
        assert unknown.status_code == 401 and unknown.json()["error"] == "unknown API key"
        assert 'error="invalid_token"' in unknown.headers["www-authenticate"]
        for name, key in keys.items():
            allowed = name in holders[scope]
            for headers in (bearer(key), {"X-API-Key": key}):
                response = call(guarded, method, path, headers)
                if allowed:
                    assert response.status_code not in (401, 403), (method, path, name)
                else:
                    assert response.status_code == 403, (method, path, name, response.text)
                    assert f"lacks the scope '{scope}'" in response.json()["error"]
    # The read and ingest routes really answer with the right key.
    assert call(guarded, "POST", "/popular", bearer(keys["reader"])).status_code == 200
    fresh = {"events": [{"user_id": "u2", "item_id": "i2", "event_type": "view", "event_id": "e1"}]}
    events = guarded.post("/events", json=fresh, headers={"X-API-Key": keys["ingester"]})
    assert events.status_code == 200 and events.json()["accepted"] == 1


def test_routes_no_table_names_need_admin(guarded: TestClient, keys: dict[str, str]) -> None:
    """Deny by default: a path or method no table names (DELETE /users/{id}, POST /items, an
    unknown path) takes an admin key; with one it reaches the router (404/405 if no route)."""
    for method, path in (("DELETE", "/users/u1"), ("POST", "/items"), ("GET", "/nowhere")):
        assert guarded.request(method, path).status_code == 401
        for name in ("reader", "ingester", "shop"):
            assert guarded.request(method, path, headers=bearer(keys[name])).status_code == 403
        assert guarded.request(method, path, headers=bearer(keys["admin"])).status_code not in (
            401,
            403,
        )


def test_health_docs_and_metrics_stay_open(guarded: TestClient) -> None:
    for method, path in sorted(OPEN_ROUTES):
        if method == "GET" and path != "/":
            assert guarded.get(path).status_code == 200, path
    assert guarded.get("/metrics").status_code == 200
    spec = guarded.get("/docs.json").json()
    assert spec["paths"]["/recommend"]["post"]["x-required-scope"] == READ
    assert spec["paths"]["/events"]["post"]["x-required-scope"] == INGEST
    assert {"bearer", "apiKey"} <= set(spec["components"]["securitySchemes"])
    assert "security" not in spec["paths"]["/healthz"]["get"]


def test_metrics_can_require_their_own_scope(
    service_app, namespace: str, keys: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_METRICS_OPEN", "0")
    with TestClient(service_app) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=bearer(keys["reader"])).status_code == 403
        assert client.get("/metrics", headers=bearer(keys["scraper"])).status_code == 200
        assert client.get("/readyz").status_code == 200


def test_inline_hashed_keys(service_app, namespace: str, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = {"name": "ci", "sha256": hash_key("rsk_inline-secret"), "scopes": ["read"]}
    monkeypatch.setenv("RECSYS_API_KEYS", json.dumps([entry]))
    with TestClient(service_app) as client:
        assert client.post("/popular", json={"k": 3}).status_code == 401
        ok = client.post("/popular", json={"k": 3}, headers={"X-API-Key": "rsk_inline-secret"})
        assert ok.status_code == 200


def test_no_keys_runs_open(client: TestClient) -> None:
    # Open on loopback means open: the admin routes too (the launcher says so at start).
    assert client.post("/popular", json={"k": 3}).status_code == 200
    assert client.request("DELETE", "/users/u1").status_code == 200


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"keys": [{"name": "a", "sha256": "abc", "scopes": ["read"]}]}', "64 lower-case hex"),
        ('{"keys": [{"name": "a", "sha256": "' + "0" * 64 + '", "scopes": ["root"]}]}', "scopes"),
    ],
)
def test_a_bad_keys_file_is_named_at_start(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(AuthConfigError, match=message):
        read_keys_file(path)
    with pytest.raises(AuthConfigError, match="does not exist"):
        read_keys_file(tmp_path / "missing.json")


def test_route_scopes_follow_the_router() -> None:
    scopes = RouteScopes(app.routes, metrics_open=True)
    assert scopes.scope_of("POST", "/recommend") == READ
    assert scopes.scope_of("GET", "/users/someone/activity") == READ
    assert scopes.scope_of("HEAD", "/users/someone/profile") == READ
    assert scopes.scope_of("POST", "/users/someone/profile") == ADMIN
    assert scopes.scope_of("GET", "/users/a/b/profile") == ADMIN
    assert scopes.scope_of("POST", "/events") == INGEST
    assert scopes.scope_of("GET", "/events") == ADMIN
    assert scopes.scope_of("GET", "/healthz") is None
    assert scopes.scope_of("GET", "/metrics") is None
    assert scopes.scope_of("GET", "/static_content/index.css") is None
    assert RouteScopes(app.routes, metrics_open=False).scope_of("GET", "/metrics") == "metrics"


# -- the bind policy ----------------------------------------------------------------------------


def test_bind_policy() -> None:
    empty = KeyRing([])
    assert "without a key" in bind_policy("127.0.0.1", empty, insecure=False)
    assert "without a key" in bind_policy("::1", empty, insecure=False)
    assert "without a key" in bind_policy("localhost", empty, insecure=False)
    for host in ("0.0.0.0", "::", "10.1.2.3", "shop.example"):
        with pytest.raises(AuthConfigError, match="--insecure"):
            bind_policy(host, empty, insecure=False)
        assert "INSECURE" in bind_policy(host, empty, insecure=True)
    one = KeyRing(read_keys_file_of({"name": "a", "scopes": ["read"]}))
    assert "1 configured" in bind_policy("0.0.0.0", one, insecure=False)


def read_keys_file_of(*entries: dict) -> list:
    from serving.keys import parse_key

    return [parse_key({**e, "sha256": hash_key(e["name"])}, "test") for e in entries]


def test_serve_refuses_a_public_address_without_keys(recsys_home: Path) -> None:
    """The real `recsys serve`: refuses before starting anything (exit 2, the reason)."""
    result = subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "refusing to serve on 0.0.0.0 without API keys" in result.stderr
    assert "--insecure" in result.stderr


def test_api_key_create_prints_the_key_once(recsys_home: Path, tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    command = [sys.executable, "-m", "orchestration.cli", "api-key", "create", "--name", "web"]
    result = subprocess.run(
        [*command, "--scopes", "read,ingest", "--file", str(path), "--rate-limit", "20"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert key.startswith("rsk_") and key not in path.read_text()
    (entry,) = read_keys_file(path)
    assert (entry.name, entry.scopes, entry.rate_limit) == ("web", {"read", "ingest"}, 20.0)
    assert entry.sha256 == hash_key(key)
    bad = subprocess.run(
        [*command, "--scopes", "read,root", "--file", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "scopes must be" in bad.stderr


# -- rate limits ----------------------------------------------------------------------------------


def burst(client: TestClient, n: int, headers: dict[str, str] | None = None):
    started = time.monotonic()
    responses = [client.post("/popular", json={"k": 3}, headers=headers) for _ in range(n)]
    return responses, time.monotonic() - started


def test_a_key_over_its_limit_gets_429_with_retry_after(
    service_app,
    namespace: str,
    recsys_home: Path,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = recsys_home / "api-keys.json"
    slow = add_key(path, "slow", [READ], 1.0)  # its own limit: 1/s
    fast = add_key(path, "fast", [READ, INGEST], None)  # the scope's: read 1000/s
    monkeypatch.setenv("RECSYS_API_KEYS_FILE", str(path))
    monkeypatch.setenv("RECSYS_RATE_LIMITS", '{"read": 1000, "ingest": 1}')
    monkeypatch.setenv("RECSYS_RATE_LIMIT_BURST_SECONDS", "3")  # a burst of 3 at 1/s
    with TestClient(service_app) as client:
        responses, elapsed = burst(client, 8, bearer(slow))
        statuses = [r.status_code for r in responses]
        assert statuses[:3] == [200, 200, 200], statuses
        assert statuses.count(200) <= 3 + math.floor(elapsed), (statuses, elapsed)
        refused = [r for r in responses if r.status_code == 429]
        assert refused
        for response in refused:
            assert int(response.headers["retry-after"]) >= 1
            assert "rate limit exceeded for the API key 'slow'" in response.json()["error"]
            assert 0 < response.json()["retry_after_ms"] <= 1000
        # Another key, and another scope of a key, have buckets of their own.
        assert {r.status_code for r in burst(client, 8, bearer(fast))[0]} == {200}
        events = {"events": [{"user_id": "u1", "item_id": "i1", "event_type": "view"}]}
        ingest = [client.post("/events", json=events, headers=bearer(fast)) for _ in range(5)]
        assert [r.status_code for r in ingest][:3] == [200, 200, 200]
        assert 429 in {r.status_code for r in ingest}
        # Open routes are not limited.
        assert {client.get("/healthz").status_code for _ in range(10)} == {200}
    # The buckets live in Redis (shared by every worker and replica), under the namespace.
    keys = Keys(namespace)
    assert redis_client.exists(keys.rate_limit("key:slow:read"))
    assert redis_client.exists(keys.rate_limit("key:fast:ingest"))
    assert redis_client.pttl(keys.rate_limit("key:slow:read")) <= 4000


def test_a_client_address_over_its_limit_gets_429(
    service_app, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_RATE_LIMIT_PER_IP", "1")
    monkeypatch.setenv("RECSYS_RATE_LIMIT_BURST_SECONDS", "2")
    with TestClient(service_app) as client:
        responses, elapsed = burst(client, 6)
        statuses = [r.status_code for r in responses]
        assert statuses[:2] == [200, 200]
        assert statuses.count(200) <= 2 + math.floor(elapsed), statuses
        assert "this client address" in responses[-1].json()["error"]
        assert responses[-1].headers["retry-after"] == "1"


@pytest.mark.slow
def test_the_limiter_fails_open_while_redis_is_down(
    own_redis: RedisServer,
    service_app,
    recsys_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    path = recsys_home / "api-keys.json"
    key = add_key(path, "slow", [READ], 1.0)
    monkeypatch.setenv("RECSYS_API_KEYS_FILE", str(path))
    with TestClient(service_app) as client:
        assert client.post("/popular", json={"k": 3}, headers=bearer(key)).status_code == 200
        assert client.post("/popular", json={"k": 3}, headers=bearer(key)).status_code == 429
        own_redis.kill()
        responses, _ = burst(client, 20, bearer(key))
        # No 429 and no 500: /popular answers from its fallback (503 without a model).
        assert {r.status_code for r in responses} <= {200, 503}, [r.text for r in responses]
        assert burst(client, 2)[0][0].status_code == 401  # keys are still checked
        lines = [r.getMessage() for r in caplog.records if r.name.startswith("recsys")]
        assert sum("rate limits are not enforced" in m for m in lines) == 1


# -- `recsys serve` over a socket ----------------------------------------------------------------


@contextlib.contextmanager
def recsys_serve(home: Path, workers: int) -> Iterator[tuple[str, Path]]:
    """The real `recsys serve` on 127.0.0.1 with `workers` workers: its URL and its log."""
    port = free_port()
    log_path = home.parent / f"recsys-serve-{port}.log"
    env = {**os.environ, "RECSYS_SERVE_WORKERS": str(workers)}
    command = [sys.executable, "-m", "orchestration.cli", "serve", "--port", str(port)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log_path)
        yield url, log_path
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.slow
def test_recsys_serve_with_keys_shares_one_limit_across_workers(
    namespace: str, recsys_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = recsys_home / "api-keys.json"
    key = add_key(path, "shop", [READ], None)
    monkeypatch.setenv("RECSYS_API_KEYS_FILE", str(path))
    monkeypatch.setenv("RECSYS_RATE_LIMITS", '{"read": 10}')
    with recsys_serve(recsys_home, workers=2) as (url, log_path):
        assert "API keys: 1 configured" in log_path.read_text()
        assert httpx.post(f"{url}/popular", json={"k": 3}).status_code == 401
        time.sleep(1.1)  # the bucket is full again after the readiness checks
        with httpx.Client(headers=bearer(key)) as client, ThreadPoolExecutor(8) as pool:
            started = time.monotonic()
            statuses = list(
                pool.map(
                    lambda _: client.post(f"{url}/popular", json={"k": 3}).status_code, range(60)
                )
            )
            elapsed = time.monotonic() - started
        # One bucket of 10 (plus 10/s refill) for both workers; per worker it would be twice.
        assert set(statuses) == {200, 429}, statuses
        assert statuses.count(200) <= 10 + math.ceil(10 * elapsed), (statuses, elapsed)
        assert statuses.count(200) >= 10


@pytest.mark.slow
def test_recsys_serve_on_loopback_without_keys_runs_open_and_says_so(
    namespace: str, recsys_home: Path
) -> None:
    with recsys_serve(recsys_home, workers=1) as (url, log_path):
        assert httpx.post(f"{url}/popular", json={"k": 3}).status_code == 200
        lines = [line for line in log_path.read_text().splitlines() if "API keys" in line]
        assert len(lines) == 1 and "answers every request without a key" in lines[0]


def test_workers_share_one_bucket_through_leases(
    store: FeatureStore, recsys_home: Path, redis_client: redis.Redis
) -> None:
    """Two workers' guards over one Redis: together they never admit more than the bucket gives
    (capacity + refill), and leases lose at most a lease per worker."""
    path = recsys_home / "api-keys.json"
    key = add_key(path, "shop", [READ], None)
    settings = ServingSettings(api_keys_file=str(path), rate_limits={READ: 1000.0})
    workers = [Guard(settings, app.routes, lambda: store, Outage("Redis")) for _ in range(2)]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/recommend",
        "headers": [(b"authorization", f"Bearer {key}".encode())],
        "client": ("10.0.0.1", 1234),
    }
    statuses = []
    started = time.monotonic()
    for i in range(3000):
        refused = workers[i % 2].check(dict(scope))
        statuses.append(200 if refused is None else refused.status_code)
    elapsed = time.monotonic() - started
    lease = int(1000 * settings.rate_limit_lease_seconds)
    assert set(statuses) == {200, 429}
    assert statuses.count(200) <= 1000 + math.ceil(1000 * elapsed), elapsed
    assert statuses.count(200) >= 1000 - 2 * lease
    assert redis_client.exists(store.keys.rate_limit("key:shop:read"))


def test_a_deletion_audit_names_the_admin_key(guarded: TestClient, keys: dict[str, str]) -> None:
    from config import get_settings
    from feature_repo.event_store import open_event_store

    answer = guarded.request("DELETE", "/users/gone", headers=bearer(keys["admin"]))
    assert answer.status_code == 200
    config = get_settings()
    with open_event_store(config.store.postgres_url, config.home) as store:
        audit = store.deletion_audit()
    assert audit["actor"].to_list()[-1] == "api-key:admin"
