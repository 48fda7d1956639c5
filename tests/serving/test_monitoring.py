"""Online monitoring on /metrics: impressions, catalog coverage, model age, stream length and
consumer lag by model version and variant, and events attributed through their request id."""

from __future__ import annotations

import time

import bentoml
import numpy as np
import polars as pl
from starlette.testclient import TestClient

from serving.metrics import CoverageWindow
from serving.request_ids import attributed_counts, new_request_id
from tests.serving.conftest import Registered


def scrape(client: TestClient) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    # Imported here: prometheus_client imported before the session's fixtures set
    # PROMETHEUS_MULTIPROC_DIR would leave BentoML's /metrics empty.
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_impressions_coverage_age_and_stream_gauges_by_version(
    service_app, champion: Registered
) -> None:
    with TestClient(service_app) as client:
        service = bentoml.get_current_service()
        # The metrics live as long as the test process: this test's version starts a window.
        service.metrics.coverage_windows.clear()
        before = scrape(client)
        served: set[str] = set()
        users = [f"u{i}" for i in range(12)]
        for user in users:
            answer = client.post("/recommend", json={"user_id": user, "k": 4}).json()
            assert answer["variant"] == "champion"
            served.update(item["item_id"] for item in answer["items"])
        cached = client.post("/recommend", json={"user_id": users[0], "k": 4}).json()
        assert cached["cached"]
        events = [
            {"user_id": "u1", "item_id": f"i{i}", "event_type": "view", "timestamp": time.time()}
            for i in range(3)
        ]
        assert client.post("/events", json={"events": events}).json()["accepted"] == 3
        service.impressions.flush()  # each answer is an impression entry on the stream too
        service.monitor.refresh()
        after = scrape(client)
        entries = [fields for _, fields in service.stream.redis.xrange(service.stream.key)]

    labels = {"variant": "champion", "version": "1"}
    grew = value(after, "recsys_answers_served_total", **labels) - value(
        before, "recsys_answers_served_total", **labels
    )
    assert grew == len(users) + 1  # the cached answer is an impression too
    n_items = len(champion.bundle.item_ids)
    assert value(after, "recsys_catalog_coverage_ratio", **labels) == len(served) / n_items
    age = value(after, "recsys_model_age_seconds", **labels)
    assert 0 < age < 600
    # No consumer runs here: the three events and the 13 impressions (an entry per flush of the
    # buffer, a document per line) wait, undelivered.
    flushes = [f["i"] for f in entries if "i" in f]
    assert sum(len(f.split("\n")) for f in flushes) == len(users) + 1
    assert value(after, "recsys_stream_length") == 3 + len(flushes) == len(entries)
    assert value(after, "recsys_stream_consumer_lag") == 3 + len(flushes)


def test_request_ids_name_variant_and_version_and_events_are_attributed_by_them(
    service_app, champion: Registered
) -> None:
    """Through POST /events with the request id of a real answer."""
    with TestClient(service_app) as client:
        answer = client.post("/recommend", json={"user_id": "u3", "k": 3}).json()
        assert answer["request_id"].endswith("-c1")
        before = scrape(client)
        now = time.time()
        rid = answer["request_id"]
        item = answer["items"][0]["item_id"]
        other = new_request_id("champion", "999")
        sent = [
            (rid, "click"),
            (rid, "purchase"),
            (rid, "view"),
            (other, "click"),
            ("free text", "click"),
        ]
        events = [
            {
                "user_id": "u3",
                "item_id": item,
                "event_type": event_type,
                "timestamp": now - i,
                "request_id": request_id,
                "position": 0,
                **({"value": 1} if event_type == "purchase" else {}),
            }
            for i, (request_id, event_type) in enumerate(sent)
        ]
        posted = client.post("/events", json={"events": events}).json()
        assert posted["accepted"] == len(events), posted
        # A retried batch is all duplicates: nothing is attributed twice.
        assert client.post("/events", json={"events": events}).json()["duplicates"] == 5
        after = scrape(client)

    def grew(**labels: str) -> float:
        name = "recsys_attributed_events_total"
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew(variant="champion", version="1", event_type="click") == 1
    assert grew(variant="champion", version="1", event_type="purchase") == 1
    assert grew(variant="champion", version="1", event_type="view") == 0
    # A version this worker never served, and an id of another shape, do not add label sets.
    assert grew(variant="champion", version="other", event_type="click") == 1
    assert grew(variant="unknown", version="other", event_type="click") == 1


def test_attributed_counts_without_request_ids_is_empty() -> None:
    events = pl.DataFrame({"event_type": ["click"], "user_id": ["u"], "item_id": ["i"]})
    assert attributed_counts(events, ["1"]).is_empty()
    popular = new_request_id("popularity", None)
    counted = attributed_counts(
        pl.DataFrame({"request_id": [popular, None], "event_type": ["add_to_cart", "click"]}), []
    )
    assert counted.rows() == [("popularity", "none", "add_to_cart", 1)]


def test_coverage_window_forgets_items_served_two_half_windows_ago() -> None:
    window = CoverageWindow(10)
    window.mark(np.array([0, 1, -1, 1]))
    assert window.ratio() == 0.2
    window.rotate()
    window.mark(np.array([2]))
    assert window.ratio() == 0.3
    window.rotate()
    assert window.ratio() == 0.1
