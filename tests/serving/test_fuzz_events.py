"""Property-based batches for POST /events through the real service: whatever the events hold,
the answer is a documented 200/400/422, every event of a 200 is accounted for exactly once
(accepted, duplicate or rejected), and the stream holds exactly the accepted ones."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from feature_repo.store import FeatureStore
from feature_repo.stream import EventStream
from serving.schemas import EventsResponse
from training.events import EVENT_TYPES

pytestmark = pytest.mark.slow

NOW = int(time.time())
ids = st.one_of(
    st.sampled_from(["u1", "u2", "i1", "i2", " padded ", "", "\x00", "\ud800", "é"]),
    st.text(max_size=300),
)
timestamps = st.one_of(
    st.none(),
    st.integers(NOW - 10 * 365 * 86400, NOW + 600),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["2026-01-02T03:04:05Z", "2026-01-02", "yesterday", "", "1e400"]),
    st.booleans(),
)
values = st.one_of(
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(10**6), 10**7),
    st.sampled_from([1e308, -1e308, 0, 5, "5", True]),
)
contexts = st.one_of(
    st.none(),
    st.dictionaries(
        st.text(max_size=70),
        st.one_of(st.text(max_size=300), st.integers(), st.booleans(), st.none()),
        max_size=25,
    ),
    st.sampled_from([[], "ios", {"a": {"nested": 1}}]),
)
positions = st.one_of(
    st.none(),
    st.integers(-5, 20),
    st.integers(-(10**20), 10**20),
    st.sampled_from([1.5, "3", True, 2.0]),
)


@st.composite
def good_event(draw) -> dict:
    """An event a shop would send (duplicates of one another included, by event_id)."""
    kind = draw(st.sampled_from(EVENT_TYPES))
    body = {
        "user_id": draw(st.sampled_from(["u1", "u2", "u3"])),
        "item_id": draw(st.sampled_from(["i1", "i2", "i3", "new-item"])),
        "event_type": kind,
        "timestamp": draw(st.integers(NOW - 30 * 86400, NOW)),
    }
    if kind == "rating" or draw(st.booleans()):
        body["value"] = draw(st.integers(1, 5))
    if draw(st.booleans()):
        body["event_id"] = draw(st.sampled_from(["e1", "e2", "e3", "e4", "e5"]))
    if draw(st.booleans()):
        body["context"] = {"device": draw(st.sampled_from(["ios", "web"])), "page": "home"}
    if draw(st.booleans()):
        body["request_id"] = draw(st.sampled_from(["r1", "r2"]))
        body["position"] = draw(st.integers(0, 9))
    return body


@st.composite
def nasty_event(draw) -> dict:
    body = {
        "user_id": draw(ids),
        "item_id": draw(ids),
        "event_type": draw(st.one_of(st.sampled_from(EVENT_TYPES), st.text(max_size=12))),
    }
    for name, strategy in (
        ("timestamp", timestamps),
        ("value", values),
        ("session_id", st.one_of(st.none(), ids)),
        ("event_id", st.one_of(st.none(), st.sampled_from(["e1", "e2", "e3"]), ids)),
        ("context", contexts),
        ("request_id", st.one_of(st.none(), ids)),
        ("position", positions),
    ):
        if draw(st.booleans()):
            body[name] = draw(strategy)
    if draw(st.integers(0, 20)) == 0:
        body["device"] = "ios"  # not in the contract: the whole batch is a 422
    return body


# Mostly events a shop would send, some of anything: a batch is often partly valid.
EVENTS = st.one_of(good_event(), good_event(), good_event(), nasty_event())


def test_every_event_of_any_batch_is_accounted_for(client: TestClient, store: FeatureStore) -> None:
    stream = EventStream(store.redis, store.namespace)
    seen: dict[str, int] = {"requests": 0, "accepted": 0}

    @settings(
        max_examples=150,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(batch=st.lists(EVENTS, min_size=1, max_size=20))
    def post(batch: list[dict]) -> None:
        before = stream.length()
        # json.dumps escapes a lone surrogate as \ud800, as a real client's encoder does.
        response = client.post(
            "/events",
            content=json.dumps({"events": batch}),
            headers={"Content-Type": "application/json"},
        )
        seen["requests"] += 1
        assert response.status_code in (200, 400, 422), response.text
        assert response.headers["content-type"].startswith("application/json")
        if response.status_code != 200:
            assert stream.length() == before, "a refused batch wrote to the stream"
            return
        body = EventsResponse.model_validate(response.json())
        rejected = [r["index"] for r in response.json()["rejected"]]
        assert len(set(rejected)) == len(rejected)
        assert set(rejected).isdisjoint(body.duplicate_indices)
        assert body.accepted + body.duplicates + len(rejected) == len(batch)
        assert stream.length() == before + body.accepted
        seen["accepted"] += body.accepted

    post()
    print(f"/events property test: {seen['requests']} batches, {seen['accepted']} events accepted")
    assert seen["accepted"] > 0, "no batch reached the stream: the strategy needs valid events"
