"""DELETE /users/{id} against the real service: the event store (both backends), Redis, the
audit, and late events dropped by /events and by the stream consumer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from config import get_settings
from feature_repo.event_store import open_event_store, user_hash
from feature_repo.store import FeatureStore
from feature_repo.stream import EventStream
from serving.consumer import run_consumer


def _events(user: str, n: int, tag: str) -> list[dict]:
    return [
        {"user_id": user, "item_id": f"i{k}", "event_type": "click", "event_id": f"{tag}-{k}"}
        for k in range(n)
    ]


@pytest.fixture(params=["parquet", "postgres"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "postgres":
        monkeypatch.setenv("RECSYS_POSTGRES_URL", request.getfixturevalue("postgres_url"))
    return request.param


def test_delete_user_forgets_everything_and_late_events_are_dropped(
    backend: str, client: TestClient, store: FeatureStore, recsys_home: Path
) -> None:
    body = {"events": _events("gone", 40, "g") + _events("kept", 10, "k")}
    assert client.post("/events", json=body).json()["accepted"] == 50
    run_consumer(idle_exit=True)
    # Late: in the stream, not yet stored, when the user is forgotten.
    assert client.post("/events", json={"events": _events("gone", 5, "late")}).status_code == 200

    answer = client.delete("/users/gone")

    assert answer.status_code == 200, answer.text
    done = answer.json()
    assert done["removed"]["events"] == 40 and done["removed"]["redis_keys"] >= 2
    assert done["suppressed"] and done["user_hash"] == user_hash("gone")
    assert done["actor"].startswith("http:")
    activity = client.get("/users/gone/activity").json()
    assert activity["recent"] == [] and activity["counters"] == {}
    # Accepted and dropped: not in Redis, not in the store.
    again = client.post("/events", json={"events": _events("gone", 3, "after")})
    assert again.status_code == 200 and again.json()["accepted"] == 3
    assert client.get("/users/gone/activity").json()["recent"] == []
    assert not list(store.redis.scan_iter(match=store.keys.user_prefix("gone") + "*"))
    stats = run_consumer(idle_exit=True)
    assert stats.entries == 5 and stats.stored == 0, "the late events were dropped"
    stream = EventStream(store.redis, store.namespace)
    assert stream.pending() == 0 and stream.length() == 0
    with open_event_store(get_settings().store.postgres_url, recsys_home) as events:
        stored = events.read()
        assert set(stored["user_id"]) == {"kept"} and stored.height == 10
        (record,) = events.deletion_audit().to_dicts()
    assert record["actor"] == done["actor"] and json.loads(record["removed"]) == done["removed"]
    # Forgetting again is harmless and audited again.
    assert client.delete("/users/gone").json()["removed"]["events"] == 0


def test_delete_user_with_an_invalid_id_is_a_json_error(client: TestClient) -> None:
    answer = client.delete("/users/" + "x" * 1000)
    assert answer.status_code in (404, 422)
    assert "error" in answer.json()
