"""The impression buffer (serving/impressions.py): records become IMPRESSION_SCHEMA rows on the
real event stream, in order, in batches; Redis down keeps them (bounded), shutdown flushes."""

from __future__ import annotations

import json
import time
from collections import Counter

import polars as pl
import redis

from feature_repo.store import FeatureStore
from feature_repo.stream import EventStream
from serving.impressions import ImpressionLog
from training.events import IMPRESSION_SCHEMA

PAYLOAD = json.dumps(
    {
        "items": [
            {"item_id": "i3", "score": 0.9, "sources": {"als": 1.0, "coview": 0.5}, "reason": "x"},
            {"item_id": "i1", "score": 0.4, "sources": {"popularity": 1.0}, "reason": "y"},
        ],
        "model_version": "7",
        "variant": "champion",
        "segment": None,
    },
    separators=(",", ":"),
)


def _stream(store: FeatureStore) -> EventStream:
    stream = EventStream(store.redis, store.namespace)
    stream.ensure_group()
    return stream


def test_records_reach_the_stream_as_impressions(store: FeatureStore) -> None:
    stream = _stream(store)
    written: Counter = Counter()
    log = ImpressionLog(stream.add_impressions, on_written=written.update)
    log.recommend(
        "r1", "u1", PAYLOAD, 1.5, False, False, None, {"page": "home", "device": "ios"}, "champion"
    )
    log.recommend("r2", "u2", PAYLOAD, 0.2, True, False, "exp-a", None, "champion")
    items = [{"item_id": "i9", "score": 3.0, "reason": "popular right now"}]
    log.items("/popular", "r3", None, items, None, "popularity", 0.7, True, None)
    assert log.pending() == 3 and store.redis.xlen(stream.key) == 0, "nothing written yet"
    assert log.flush() == 3 and log.pending() == 0
    batch = stream.read("c", 100, None)
    assert len(batch) == 1, "a flush is one stream entry"
    assert batch.events.is_empty()
    got = batch.impressions
    assert dict(got.schema) == IMPRESSION_SCHEMA
    assert got["request_id"].to_list() == ["r1", "r2", "r3"]
    first = got.row(0, named=True)
    assert first["items"] == ["i3", "i1"] and first["scores"] == [0.9, 0.4]
    assert first["sources"] == ["als+coview", "popularity"]
    assert (first["variant"], first["model_version"], first["route"]) == (
        "champion",
        "7",
        "/recommend",
    )
    assert first["context"] == '{"device":"ios","page":"home"}'
    assert (first["status"], first["cached"], first["latency_ms"]) == ("ok", False, 1.5)
    assert abs(first["timestamp"] - time.time()) < 60
    assert got.row(1, named=True)["cached"] is True
    assert got.row(1, named=True)["experiment"] == "exp-a"
    third = got.row(2, named=True)
    assert (third["route"], third["user_id"], third["status"]) == ("/popular", None, "degraded")
    assert third["items"] == ["i9"] and third["sources"] == ["popular right now"]
    assert written == {("/recommend", "champion"): 2, ("/popular", "popularity"): 1}


def test_events_and_impressions_share_the_stream(store: FeatureStore) -> None:
    stream = _stream(store)
    log = ImpressionLog(stream.add_impressions)
    log.recommend("r1", "u1", PAYLOAD, 1.0, False, False, None, None, "champion")
    log.flush()
    events = pl.DataFrame(
        {
            "user_id": ["u1"],
            "item_id": ["i3"],
            "event_type": ["click"],
            "timestamp": [int(time.time())],
            "event_id": ["e1"],
            "request_id": ["r1"],
            "position": [0],
        }
    ).with_columns(
        pl.lit(None, pl.Float64).alias("value"), pl.lit(None, pl.String).alias("session_id")
    )
    store.ingest(events)
    batch = stream.read("c", 100, None)
    assert len(batch) == 2
    assert batch.impressions["request_id"].to_list() == ["r1"]
    assert batch.events.select("event_id", "request_id", "position").rows() == [("e1", "r1", 0)]


def test_batched_and_one_per_entry_impressions_decode_alike(store: FeatureStore) -> None:
    stream = _stream(store)
    log = ImpressionLog(stream.add_impressions)
    log.recommend("r1", "u1", PAYLOAD, 1.0, False, False, None, None, "champion")
    log.recommend("r2", "u2", PAYLOAD, 1.0, True, False, None, None, "champion")
    assert log.flush() == 2
    # An entry of before batching (one document) still in the stream, and a batched one after.
    old = {
        "request_id": "r3",
        "user_id": None,
        "timestamp": time.time(),
        "route": "/popular",
        "items": ["i9"],
        "scores": [3.0],
        "sources": ["popular right now"],
        "variant": "popularity",
        "experiment": None,
        "model_version": None,
        "latency_ms": 0.1,
        "status": "ok",
        "cached": False,
        "context": None,
        "teams": None,
    }
    store.redis.xadd(stream.key, {"i": json.dumps(old)})
    log.recommend("r4", "u4", PAYLOAD, 1.0, False, False, None, None, "champion")
    assert log.flush() == 1
    batch = stream.read("c", 100, None)
    assert len(batch) == 3
    assert batch.impressions["request_id"].to_list() == ["r1", "r2", "r3", "r4"]
    assert batch.impressions["items"].to_list()[3] == ["i3", "i1"]


def test_an_answer_with_a_raw_newline_is_dropped_not_its_batch() -> None:
    sent: list[str] = []
    log = ImpressionLog(sent.extend)
    log.recommend("bad", "u1", '{"items":[],\n"x":1}', 1.0, False, False, None, None, "c")
    log.recommend("good", "u1", PAYLOAD, 1.0, False, False, None, None, "champion")
    assert log.flush() == 1 and log.dropped == 1
    assert json.loads(sent[0])["request_id"] == "good"


def test_a_failed_write_keeps_the_records_and_the_buffer_is_bounded() -> None:
    sent: list[str] = []
    up = {"ok": False}

    def write(payloads: list[str]) -> None:
        if not up["ok"]:
            raise redis.ConnectionError("Redis is down")
        sent.extend(payloads)

    dropped: list[int] = []
    log = ImpressionLog(write, capacity=5, on_dropped=dropped.append)
    for n in range(4):
        log.items("/popular", f"r{n}", None, [], None, "popularity", 0.1, False, None)
    assert log.flush() == 0 and log.pending() == 4
    for n in range(4, 8):
        log.items("/popular", f"r{n}", None, [], None, "popularity", 0.1, False, None)
    log.flush()
    # Eight records, room for five: the three oldest are dropped and counted.
    assert log.pending() == 5 and sum(dropped) == 3 and log.dropped == 3
    up["ok"] = True
    assert log.flush() == 5
    assert [json.loads(p)["request_id"] for p in sent] == ["r3", "r4", "r5", "r6", "r7"]


def test_the_full_buffer_drops_its_oldest_records_on_the_hot_path() -> None:
    sent: list[str] = []
    log = ImpressionLog(sent.extend, capacity=3)
    for n in range(5):
        log.items("/trending", f"r{n}", None, [], None, "champion", 0.1, False, None)
    assert log.flush() == 3 and log.dropped == 2
    assert [json.loads(p)["request_id"] for p in sent] == ["r2", "r3", "r4"]


def test_not_ready_means_no_write_attempt() -> None:
    calls: list[int] = []
    ready = {"up": False}
    log = ImpressionLog(lambda p: calls.append(len(p)), ready=lambda: ready["up"])
    log.recommend("r1", "u1", PAYLOAD, 1.0, False, False, None, None, "champion")
    assert log.flush() == 0 and calls == [] and log.pending() == 1
    ready["up"] = True
    assert log.flush() == 1 and calls == [1]


def test_a_record_that_cannot_be_encoded_is_dropped_not_the_batch() -> None:
    sent: list[str] = []
    log = ImpressionLog(sent.extend)
    log.recommend("bad", "u1", "not json", 1.0, False, False, None, None, "champion")
    nan = [{"item_id": "i", "score": float("nan"), "reason": "r"}]
    log.items("/popular", "nan", None, nan, None, "popularity", 0.1, False, None)
    log.recommend("good", "u1", PAYLOAD, 1.0, False, False, None, None, "champion")
    assert log.flush() == 1 and log.dropped == 2
    assert json.loads(sent[0])["request_id"] == "good"


def test_disabled_logs_nothing() -> None:
    sent: list[str] = []
    log = ImpressionLog(sent.extend, enabled=False)
    log.start()
    log.recommend("r1", "u1", PAYLOAD, 1.0, False, False, None, None, "champion")
    log.stop()
    assert log.pending() == 0 and sent == []


def test_the_thread_flushes_soon_in_batches_and_on_stop() -> None:
    batches: list[int] = []
    log = ImpressionLog(lambda p: batches.append(len(p)), flush_seconds=0.02, flush_records=50)
    log.start()
    try:
        for n in range(120):
            log.items("/popular", f"r{n}", None, [], None, "popularity", 0.1, False, None)
        deadline = time.monotonic() + 10
        while sum(batches) < 120 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sum(batches) == 120
        assert len(batches) < 120, "records are written in batches, not one by one"
        # Stopping writes what is still buffered, however long the flush interval.
        log.flush_seconds = 60.0
        time.sleep(0.05)
        log.items("/popular", "last", None, [], None, "popularity", 0.1, False, None)
    finally:
        log.stop()
    assert sum(batches) == 121 and log.pending() == 0


def test_an_interleaved_answer_keeps_its_teams_and_a_failure_is_an_error(
    store: FeatureStore,
) -> None:
    stream = _stream(store)
    log = ImpressionLog(stream.add_impressions)
    log.recommend(
        "r1", "u1", PAYLOAD, 1.0, False, False, "mix", None, "interleaved", ["champion", "als"]
    )
    log.failed("/recommend", "r2", "u2", "7", "champion", 3.0, "mix")
    assert log.flush() == 2
    got = stream.read("c", 100, None).impressions
    first, second = got.row(0, named=True), got.row(1, named=True)
    assert first["teams"] == ["champion", "als"]  # the variant is the answer's own
    assert (second["status"], second["items"], second["experiment"]) == ("error", [], "mix")
    assert second["teams"] is None
