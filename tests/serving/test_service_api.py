"""The HTTP API of the real service (BentoML's ASGI app), without a registered model: live
features, popularity fallback, caching, bad input, metrics and the OpenAPI document."""

from __future__ import annotations

import json
import time

import pytest
from starlette.testclient import TestClient

from feature_repo.store import FeatureStore


def post_events(client: TestClient, rows: list[tuple], **extra) -> dict:
    """Post (user, item, type, event_id) rows, one second apart, the last one now."""
    start = int(time.time()) - len(rows)
    events = [
        {"user_id": u, "item_id": i, "event_type": t, "timestamp": start + n, **extra}
        | ({"event_id": e} if e else {})
        for n, (u, i, t, e) in enumerate(rows, start=1)
    ]
    response = client.post("/events", json={"events": events})
    assert response.status_code == 200, response.text
    return response.json()


SHOP = [
    ("u1", "shoes", "view", "e1"),
    ("u1", "socks", "view", "e2"),
    ("u2", "shoes", "view", "e3"),
    ("u2", "laces", "purchase", "e4"),
    ("u3", "shoes", "view", "e5"),
    ("u3", "laces", "view", "e6"),
    ("u4", "hat", "view", "e7"),
]


def test_events_shape_the_next_recommendation(client: TestClient) -> None:
    assert post_events(client, SHOP) == {
        "accepted": 7,
        "duplicates": 0,
        "duplicate_indices": [],
        "rejected": [],
        "unknown_items": 0,
    }
    response = client.post("/recommend", json={"user_id": "u1", "k": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["variant"] == "popularity" and body["model_version"] is None
    assert body["request_id"] and body["latency_ms"] > 0 and body["cached"] is False
    items = {item["item_id"]: item for item in body["items"]}
    # Seen items are left out; laces were viewed after shoes by two other users.
    assert "shoes" not in items and "socks" not in items
    assert body["items"][0]["item_id"] == "laces"
    laces = items["laces"]
    assert {"coview", "popularity", "recency"} <= set(laces["sources"])
    assert laces["reason"] == "viewed together with shoes"
    assert items["hat"]["reason"] in ("popular right now", "trending now")


def test_unknown_user_gets_popular_items(client: TestClient) -> None:
    post_events(client, SHOP)
    body = client.post("/recommend", json={"user_id": "never-seen"}).json()
    ids = [item["item_id"] for item in body["items"]]
    assert ids[:2] == ["laces", "shoes"]  # laces: a purchase (10) + a view
    assert all(item["reason"] in ("popular right now", "trending now") for item in body["items"])


def test_empty_shop_answers_with_no_items(client: TestClient) -> None:
    body = client.post("/recommend", json={"user_id": "anyone"}).json()
    assert body["items"] == [] and body["variant"] == "popularity"


def test_events_accept_reject_and_deduplicate(client: TestClient, store: FeatureStore) -> None:
    before = time.time()
    events = [
        {"user_id": "u1", "item_id": "brand-new-item", "event_type": "view", "event_id": "a"},
        {"user_id": "u1", "item_id": "x", "event_type": "teleport"},
        {"user_id": "", "item_id": "x", "event_type": "view"},
        {"user_id": "u1", "item_id": "x", "event_type": "rating"},
        {"user_id": "u1", "item_id": "x", "event_type": "view", "timestamp": time.time() + 86400},
        {
            "user_id": "u1",
            "item_id": "y",
            "event_type": "click",
            "timestamp": "2026-01-02T03:04:05Z",
        },
        {"user_id": "u1", "item_id": "z", "event_type": "rating", "value": 4.5, "event_id": "b"},
    ]
    body = client.post("/events", json={"events": events}).json()
    assert body["accepted"] == 3 and body["duplicates"] == 0
    reasons = {r["index"]: r["reason"] for r in body["rejected"]}
    assert set(reasons) == {1, 2, 3, 4}
    assert reasons[1].startswith("event_type: unknown")
    assert reasons[2] == "user_id: missing"
    assert reasons[3].startswith("value:")
    assert reasons[4].startswith("timestamp:") and "future" in reasons[4]
    # A missing timestamp means now.
    recent = dict(zip(*store.recent_items("u1"), strict=True))
    assert recent["brand-new-item"] >= int(before) and recent["y"] == 1767323045
    again = client.post("/events", json={"events": [events[0], events[6]]}).json()
    assert again == {
        "accepted": 0,
        "duplicates": 2,
        "duplicate_indices": [0, 1],
        "rejected": [],
        "unknown_items": 0,
    }


@pytest.mark.parametrize(
    ("payload", "status", "field"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b"", 400, None),
        ({"k": 5}, 422, "user_id"),
        ({"user_id": "u", "k": 0}, 422, "k"),
        ({"user_id": "u", "k": 101}, 422, "k"),
        ({"user_id": "u", "k": "ten"}, 422, "k"),
        ({"user_id": "u" * 257}, 422, "user_id"),
        ({"user_id": "bad\u0007id"}, 422, "user_id"),
        ({"user_id": "   "}, 422, "user_id"),
        ({"user_id": "u", "filters": {"price_min": -1}}, 422, "filters.price_min"),
        ({"user_id": "u", "unexpected": 1}, 422, "unexpected"),
        # Strict types: no guessing that true, "5" or 0 meant a number or a flag.
        ({"user_id": "u", "k": True}, 422, "k"),
        ({"user_id": "u", "k": "5"}, 422, "k"),
        ({"user_id": "u", "k": 5.0}, 422, "k"),
        ({"user_id": "u", "exclude_seen": 0}, 422, "exclude_seen"),
        ({"user_id": "u", "exclude_seen": "false"}, 422, "exclude_seen"),
        ({"user_id": 42}, 422, "user_id"),
        ({"user_id": "u", "filters": {"in_stock_only": 1}}, 422, "filters.in_stock_only"),
        ({"user_id": "u", "filters": {"colour": "red"}}, 422, "filters.colour"),
    ],
)
def test_bad_recommend_requests_are_4xx_naming_the_field(
    client: TestClient, payload, status: int, field: str | None
) -> None:
    if isinstance(payload, bytes):
        response = client.post(
            "/recommend", content=payload, headers={"content-type": "application/json"}
        )
    else:
        response = client.post("/recommend", json=payload)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]
    assert body["field"] == field
    if field:
        assert field in body["error"]


def _event(**overrides) -> dict:
    return {"user_id": "u", "item_id": "i", "event_type": "view", **overrides}


@pytest.mark.parametrize(
    ("events", "status", "field"),
    [
        ([], 422, "events"),
        ([_event()] * 1001, 422, "events"),
        ([_event(event_type="teleport")], 422, "events[0].event_type"),
        ([_event(user_id=None)], 422, "events[0].user_id"),
        ([_event(item_id="i" * 257)], 422, "events[0].item_id"),
        ([_event(item_id="a\nb")], 422, "events[0].item_id"),
        ([_event(timestamp=4_102_444_800)], 422, "events[0].timestamp"),
        ([_event(item_id=["list"])], 422, "events[0].item_id"),
        ([_event(), 5], 422, "events[1]"),
    ],
)
def test_bad_event_batches_are_4xx_naming_the_field(
    client: TestClient, events: list, status: int, field: str
) -> None:
    response = client.post("/events", json={"events": events})
    assert response.status_code == status, response.text
    body = response.json()
    assert body["field"] == field and body["error"]


@pytest.mark.parametrize(
    "field", ["user_id", "item_id", "session_id", "event_id", "event_type", "timestamp"]
)
def test_a_lone_surrogate_rejects_that_event_only(
    client: TestClient, store: FeatureStore, field: str
) -> None:
    good = [_event(user_id=f"u{n}", event_id=f"ok-{n}") for n in range(999)]
    events = [*good[:500], _event(**{field: "bad\ud800"}), *good[500:]]
    # As a client sends it: JSON escapes the surrogate ("\\ud800"), the bytes are valid UTF-8.
    payload = json.dumps({"events": events}).encode()
    response = client.post("/events", content=payload, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["accepted"] == 999
    assert body["rejected"] == [
        {"index": 500, "reason": f"{field}: not valid Unicode (a lone surrogate)"}
    ]
    assert int(store.redis.hget(store.keys.stats, "accepted")) == 999


def test_values_and_timestamps_out_of_bounds_are_rejected(client: TestClient) -> None:
    events = [
        _event(event_type="rating", value=1e308),
        _event(event_type="rating", value=-1e308),
        _event(event_type="rating", value=11),
        _event(event_type="purchase", value=0),
        _event(event_type="purchase", value=2e6),
        _event(timestamp=-5),
        _event(timestamp=99999999999999999999),
        _event(timestamp="1999-12-31T23:59:59Z"),
        _event(context={"blob": "x" * 250, **{f"k{n}": "y" * 250 for n in range(4)}}),
        _event(event_type="rating", value=10, event_id="ok-rating"),
        _event(event_type="purchase", value=3, event_id="ok-purchase"),
    ]
    body = client.post("/events", json={"events": events}).json()
    reasons = {r["index"]: r["reason"] for r in body["rejected"]}
    assert body["accepted"] == 2 and set(reasons) == set(range(9))
    assert all(reasons[i].startswith("value: a rating must be within 0..10") for i in (0, 1, 2))
    assert all(reasons[i].startswith("value: a quantity") for i in (3, 4))
    assert reasons[5] == reasons[7] == "timestamp: before 2000-01-01"
    assert reasons[6].startswith("timestamp: more than 300 s in the future")
    assert reasons[8] == "context: larger than 1024 bytes as JSON"


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (_event(device="ios"), "events[1].device"),
        (_event(value=True), "events[1].value"),
        (_event(timestamp=False), "events[1].timestamp"),
        (_event(user_id=42), "events[1].user_id"),
        (_event(value="4"), "events[1].value"),
        (_event(context={"nested": {"a": 1}}), "events[1].context.nested"),
        (_event(context=["device"]), "events[1].context"),
        (_event(context={f"k{n}": n for n in range(21)}), "events[1].context"),
        (_event(context={"k" * 65: 1}), "events[1].context"),
        (_event(position=1.5), "events[1].position"),
        (_event(position="3"), "events[1].position"),
        (_event(position=True), "events[1].position"),
        (_event(request_id=7), "events[1].request_id"),
    ],
)
def test_unknown_fields_and_wrong_json_types_are_422_naming_the_field(
    client: TestClient, store: FeatureStore, event: dict, field: str
) -> None:
    response = client.post("/events", json={"events": [_event(event_id="fine"), event]})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["field"].startswith(field) and field in body["error"]
    assert store.redis.hget(store.keys.stats, "accepted") is None


def test_context_is_accepted_and_canonical(client: TestClient, store: FeatureStore) -> None:
    from feature_repo.stream import EventStream

    context = {"page": "home", "device": "ios", "experiment": None, "n": 2, "beta": True}
    body = client.post("/events", json={"events": [_event(context=context)]}).json()
    assert body["accepted"] == 1
    stream = EventStream(store.redis, store.namespace)
    read = stream.read("test", 10, None).events
    assert read["context"].to_list() == [
        '{"beta":true,"device":"ios","experiment":null,"n":2,"page":"home"}'
    ]


def test_attribution_fields_reach_the_stream(client: TestClient, store: FeatureStore) -> None:
    from feature_repo.stream import EventStream

    events = [
        _event(event_type="click", request_id="req-1", position=2, event_id="a"),
        _event(event_type="click", position=-1),
        _event(event_type="click", request_id="r" * 257),
        _event(event_id="b"),
    ]
    body = client.post("/events", json={"events": events}).json()
    assert body["accepted"] == 2
    assert body["rejected"] == [
        {"index": 1, "reason": "position: must be within 0..1000000"},
        {"index": 2, "reason": "request_id: longer than 256 characters"},
    ]
    read = EventStream(store.redis, store.namespace).read("test", 10, None).events
    assert read.select("event_id", "request_id", "position").rows() == [
        ("a", "req-1", 2),
        ("b", None, None),
    ]


def test_bodies_over_one_megabyte_are_413(client: TestClient) -> None:
    events = [_event(event_id=f"{n:0>200}") for n in range(900)]  # ~250 KB per 1,000
    big = {"events": events * 5}
    response = client.post("/events", json=big)
    assert response.status_code == 413
    assert "larger than" in response.json()["error"]
    # Without a Content-Length header the limit holds while streaming.
    chunks = (b"x" * 65536 for _ in range(20))
    response = client.post("/events", content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_response_cache_hits_and_is_invalidated_by_the_users_events(client: TestClient) -> None:
    post_events(client, SHOP)
    first = client.post("/recommend", json={"user_id": "u1", "k": 3}).json()
    second = client.post("/recommend", json={"user_id": "u1", "k": 3}).json()
    assert second["cached"] is True and second["items"] == first["items"]
    assert second["request_id"] != first["request_id"]
    # Another k is another cache entry.
    assert client.post("/recommend", json={"user_id": "u1", "k": 2}).json()["cached"] is False
    post_events(client, [("u1", "laces", "view", "e100")])
    third = client.post("/recommend", json={"user_id": "u1", "k": 3}).json()
    assert third["cached"] is False
    assert "laces" not in [i["item_id"] for i in third["items"]]
    # Other users' events leave the entry alone.
    post_events(client, [("u9", "hat", "view", "e101")])
    assert client.post("/recommend", json={"user_id": "u1", "k": 3}).json()["cached"] is True


def test_popular_similar_and_user_activity(client: TestClient) -> None:
    post_events(client, SHOP)
    popular = client.post("/popular", json={"k": 2}).json()
    assert [i["item_id"] for i in popular["items"]] == ["laces", "shoes"]
    # Categories need a catalog, which only a model brings.
    assert client.post("/popular", json={"k": 2, "category": "c1"}).json()["items"] == []

    similar = client.post("/similar_items", json={"item_id": "shoes", "k": 5}).json()
    assert [i["item_id"] for i in similar["items"]][0] == "laces"
    assert similar["items"][0]["reason"] == "viewed together"
    fallback = client.post("/similar_items", json={"item_id": "unheard-of", "k": 3}).json()
    assert fallback["items"] and fallback["items"][0]["reason"] == "popular right now"

    activity = client.get("/users/u2/activity").json()
    assert [r["item_id"] for r in activity["recent"]] == ["laces", "shoes"]
    assert activity["counters"]["purchase"] == 1 and activity["counters"]["events"] == 2
    assert activity["known_to_model"] is False
    assert client.get("/users/" + "x" * 300 + "/activity").status_code == 422
    assert client.get("/users/u2/activity?n=0").status_code == 422


def test_metrics_in_prometheus_format(client: TestClient) -> None:
    post_events(client, SHOP)
    client.post("/events", json={"events": [_event(event_type="teleport"), _event()]})
    client.post("/recommend", json={"user_id": "u1"})
    client.post("/recommend", json={"user_id": "u1"})
    client.post("/recommend", json={"user_id": "u1", "k": 0})
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for needle in (
        'bentoml_service_request_total{endpoint="/recommend",http_response_code="200"',
        'bentoml_service_request_total{endpoint="/recommend",http_response_code="422"',
        'bentoml_service_request_duration_seconds_bucket{endpoint="/events"',
        'recsys_recommend_cache_total{result="hit"}',
        'recsys_recommend_cache_total{result="miss"}',
        'recsys_events_total{outcome="accepted"}',
        'recsys_events_total{outcome="rejected"}',
        'recsys_model_loaded{variant="popularity",version="live"} 1.0',
    ):
        assert needle in text, needle


def test_health_readiness_and_openapi(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    spec = client.get("/docs.json").json()
    for path in (
        "/recommend",
        "/similar_items",
        "/popular",
        "/events",
        "/users/{user_id}/activity",
    ):
        assert path in spec["paths"], path
    recommend = spec["paths"]["/recommend"]["post"]
    assert "requestBody" in recommend and "422" in recommend["responses"]


def test_without_a_model_pushed_lists_and_batch_candidates_serve(
    client: TestClient, store: FeatureStore
) -> None:
    import polars as pl

    store.push_item_lists(
        "itemitem",
        pl.DataFrame(
            {"item_id": ["kettle"] * 2, "neighbor_id": ["teapot", "mug"], "score": [0.9, 0.4]}
        ),
    )
    store.push_item_neighbors(
        pl.DataFrame({"item_id": ["kettle"], "neighbor_id": ["toaster"], "score": [0.8]})
    )
    store.push_batch_candidates(
        pl.DataFrame({"user_id": ["cook"], "item_id": ["apron"], "score": [3.0]})
    )
    post_events(client, [("cook", "kettle", "view", "k1")])
    items = {
        i["item_id"]: i for i in client.post("/recommend", json={"user_id": "cook"}).json()["items"]
    }
    assert items["teapot"]["reason"] == "often chosen with kettle"
    assert "itemitem" in items["teapot"]["sources"]
    assert items["toaster"]["reason"] == "similar to kettle"
    assert items["apron"]["sources"] == {"batch": 1.0}
    similar = client.post("/similar_items", json={"item_id": "kettle", "k": 2}).json()["items"]
    assert [i["item_id"] for i in similar] == ["teapot", "mug"]
    assert similar[0]["reason"] == "often chosen together"


@pytest.mark.parametrize(
    ("path", "payload", "field"),
    [
        ("/popular", {"k": "5"}, "k"),
        ("/popular", {"k": 3, "category": 7}, "category"),
        ("/trending", {"k": True}, "k"),
        ("/similar_items", {"item_id": 12}, "item_id"),
        ("/similar_items", {"item_id": "i1", "n": 3}, "n"),
        ("/user_profile", {"user_id": "u", "verbose": True}, "verbose"),
    ],
)
def test_every_request_model_is_strict_and_names_the_field(
    client: TestClient, path: str, payload: dict, field: str
) -> None:
    response = client.post(path, json=payload)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field


def test_recommend_accepts_integral_floats_for_float_fields(client: TestClient) -> None:
    # Strictness is about types that were never meant: a price of 5 (an int) is a price.
    response = client.post(
        "/recommend", json={"user_id": "u", "filters": {"price_min": 5, "price_max": 9.5}}
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/no/such/path", 404, None),
        ("POST", "/users/u1/nothing", 404, None),
        ("GET", "/recommend", 405, "POST"),
        ("DELETE", "/events", 405, "POST"),
        ("POST", "/healthz", 405, "GET"),
        ("PUT", "/users/u1/profile", 405, "GET"),
    ],
)
def test_unknown_paths_and_methods_answer_json(
    client: TestClient, method: str, path: str, status: int, allow: str | None
) -> None:
    response = client.request(method, path)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]
    if allow is not None:
        assert allow in response.headers["allow"]


def test_a_bug_answers_a_json_500_logged_once(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    import bentoml

    service = bentoml.get_current_service()

    def broken(user_id: str):
        raise ZeroDivisionError("a bug")

    service.user_profile = broken  # fault injection: the route calls the instance's method
    for n in range(20):
        # The TestClient re-raises what escapes the app: nothing does.
        response = client.get(f"/users/u{n}/profile")
        assert response.status_code == 500
        assert response.json() == {"error": "internal error; see the service log", "field": None}
    tracebacks = [r for r in caplog.records if r.exc_info and "unhandled error" in r.getMessage()]
    assert len(tracebacks) == 1
    assert "/users/{user_id}/profile" in tracebacks[0].getMessage()


def test_metrics_are_labelled_by_route_not_by_path(client: TestClient) -> None:
    import uuid

    for path in ("/users/warm-up/profile", "/users/warm-up/activity", "/no/such/path"):
        client.get(path)
    before = client.get("/metrics").text
    ids = [uuid.uuid4().hex for _ in range(2000)]
    for n, user_id in enumerate(ids):
        kind = ("profile", "activity")[n % 2]
        assert client.get(f"/users/{user_id}/{kind}").status_code == 200
    for user_id in ids[:200]:
        client.get(f"/scan/{user_id}")  # unknown paths share one label too
    after = client.get("/metrics").text
    print(f"/metrics: {len(before):,} bytes before, {len(after):,} after 2,200 random paths")
    assert not any(user_id in after for user_id in ids)
    assert 'endpoint="/users/{user_id}/profile",http_response_code="200"' in after
    assert 'endpoint="/users/{user_id}/activity",http_response_code="200"' in after
    assert 'endpoint="unmatched",http_response_code="404"' in after
    # Only counts change, no label set is added: the size stays within a few digits per line.
    assert len(after) - len(before) < len(before.splitlines()) * 8


def test_openapi_carries_the_project_and_an_example_per_body(client: TestClient) -> None:
    from importlib.metadata import version

    spec = client.get("/docs.json").json()
    info = spec["info"]
    assert info["version"] == version("recsys-platform")
    assert info["title"].startswith("recsys-platform")
    assert "BentoML" not in info["description"] and "contact" not in info
    schemas = spec["components"]["schemas"]
    bodies = 0
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            body = operation.get("requestBody")
            if body is None:
                continue
            bodies += 1
            media = body["content"]["application/json"]
            schema = media["schema"]
            examples = schema.get("examples") or media.get("examples")
            if not examples and "$ref" in schema:
                examples = schemas[schema["$ref"].rsplit("/", 1)[1]].get("examples")
            assert examples, f"{method.upper()} {path} has no example body"
    assert bodies == 7


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("/recommend", "RecommendRequest"),
        ("/similar_items", "SimilarItemsRequest"),
        ("/popular", "PopularRequest"),
        ("/trending", "TrendingRequest"),
        ("/user_profile", "UserProfileRequest"),
    ],
)
def test_documented_examples_are_accepted(client: TestClient, path: str, model: str) -> None:
    spec = client.get("/docs.json").json()
    for example in spec["components"]["schemas"][model]["examples"]:
        response = client.post(path, json=example)
        assert response.status_code == 200, (example, response.text)


@pytest.fixture
def ratings_one_to_five(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shop with 1-5 stars (set before the `client` fixture starts the service)."""
    monkeypatch.setenv("RECSYS_RATING_RANGE", "1,5")


def test_the_configured_rating_range_bounds_events(ratings_one_to_five, client: TestClient) -> None:
    events = [
        {"user_id": "u1", "item_id": "i1", "event_type": "rating", "value": value}
        for value in (4, 6, 0.5)
    ]
    body = client.post("/events", json={"events": events}).json()
    assert body["accepted"] == 1
    assert [r["index"] for r in body["rejected"]] == [1, 2]
    assert all("1..5" in r["reason"] or "1.0..5.0" in r["reason"] for r in body["rejected"])
