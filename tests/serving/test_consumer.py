"""The stream consumer: events accepted by the service reach the event store exactly once, also
when a consumer is killed with SIGKILL mid-way and restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest
from starlette.testclient import TestClient

from feature_repo.event_store import open_event_store
from feature_repo.store import FeatureStore
from feature_repo.stream import EventStream
from serving.consumer import main, run_consumer

ROOT = Path(__file__).resolve().parents[2]
NOW = int(time.time())


def synthetic(n: int, start: int = 0, users: int = 50) -> pl.DataFrame:
    ids = range(start, start + n)
    return pl.DataFrame(
        {
            "user_id": [f"u{i % users}" for i in ids],
            "item_id": [f"i{(i * 7) % 97}" for i in ids],
            "event_type": ["view" if i % 5 else "purchase" for i in ids],
            "timestamp": [NOW - 10_000 + i % 10_000 for i in ids],
            "value": [None] * n,
            "session_id": [f"s{i // 10}" for i in ids],
            "event_id": [f"ev-{i}" for i in ids],
        },
        schema_overrides={"value": pl.Float64},
    )


def test_events_accepted_by_the_service_reach_the_store(
    client: TestClient, store: FeatureStore, recsys_home: Path
) -> None:
    events = [
        {"user_id": f"u{n % 7}", "item_id": f"i{n}", "event_type": "click", "event_id": f"c{n}"}
        for n in range(250)
    ]
    events.append({"user_id": "u1", "item_id": "i1", "event_type": "rating", "value": 4.0})
    assert client.post("/events", json={"events": events}).json()["accepted"] == 251
    stats = run_consumer(idle_exit=True, batch_size=100)
    assert (stats.entries, stats.stored) == (251, 251)
    stored = open_event_store(None, recsys_home).read()
    assert stored.height == 251
    rating = stored.filter(pl.col("event_type") == "rating").row(0, named=True)
    assert rating["value"] == 4.0 and rating["event_id"].startswith("h2:")
    stream = EventStream(store.redis, store.namespace)
    assert stream.length() == 0 and stream.pending() == 0
    # Nothing left, nothing stored twice.
    assert run_consumer(idle_exit=True).stored == 0


def test_an_event_id_known_from_another_user_is_a_duplicate_not_a_silent_loss(
    client: TestClient, recsys_home: Path
) -> None:
    first = {"user_id": "alice", "item_id": "a", "event_type": "view", "event_id": "shared"}
    second = {"user_id": "bob", "item_id": "b", "event_type": "click", "event_id": "shared"}
    assert client.post("/events", json={"events": [first]}).json()["accepted"] == 1
    body = client.post("/events", json={"events": [{**first, "event_id": "x"}, second]}).json()
    assert (body["accepted"], body["duplicates"], body["duplicate_indices"]) == (1, 1, [1])
    run_consumer(idle_exit=True)
    stored = open_event_store(None, recsys_home).read()
    assert stored.filter(pl.col("event_id") == "shared")["user_id"].to_list() == ["alice"]
    assert stored.height == 2


def test_different_events_in_one_second_without_ids_are_all_stored(
    client: TestClient, recsys_home: Path
) -> None:
    base = {"user_id": "u", "item_id": "i", "event_type": "view", "timestamp": NOW}
    events = [
        base,
        {**base, "timestamp": NOW * 1000 + 250},  # the same second, 250 ms later
        {**base, "context": {"page": "search"}},
        {**base, "session_id": "s2"},
        {**base, "event_type": "purchase", "value": 1},
        {**base, "event_type": "purchase", "value": 2},
    ]
    body = client.post("/events", json={"events": events}).json()
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (6, 0, [])
    # The very same event again (a retried request) is a duplicate.
    again = client.post("/events", json={"events": events[:3]}).json()
    assert (again["accepted"], again["duplicates"]) == (0, 3)
    assert run_consumer(idle_exit=True).stored == 6
    stored = open_event_store(None, recsys_home).read(with_context=True)
    assert stored.height == 6 and stored["timestamp"].unique().to_list() == [NOW]
    assert stored["context"].drop_nulls().to_list() == ['{"page":"search"}']


@pytest.mark.postgres
def test_context_reaches_the_postgres_store(
    client: TestClient, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_POSTGRES_URL", postgres_url)
    context = {"device": "ios", "page": "home", "ab": "b", "n": 3, "ok": True, "none": None}
    event = {"user_id": "u", "item_id": "i", "event_type": "view", "context": context}
    assert client.post("/events", json={"events": [event]}).json()["accepted"] == 1
    assert run_consumer(idle_exit=True).stored == 1
    with open_event_store(postgres_url, "unused") as pg:
        stored = pg.read(with_context=True)["context"].to_list()
    assert [json.loads(text) for text in stored] == [context]


@pytest.mark.postgres
def test_postgres_event_store(
    store: FeatureStore, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_POSTGRES_URL", postgres_url)
    store.ingest(synthetic(3000))
    assert run_consumer(idle_exit=True, batch_size=500).stored == 3000
    with open_event_store(postgres_url, "unused") as pg:
        assert pg.count() == 3000


def test_redelivery_after_a_crash_between_append_and_ack_stores_nothing_twice(
    store: FeatureStore, recsys_home: Path
) -> None:
    store.ingest(synthetic(500))
    stream = EventStream(store.redis, store.namespace)
    stream.ensure_group()
    event_store = open_event_store(None, recsys_home)
    # A consumer read and stored a batch, then died before acknowledging it.
    batch = stream.read("worker-1", 200, None)
    assert event_store.append(batch.events) == 200
    stats = run_consumer(idle_exit=True, consumer="worker-1", store=event_store)
    assert stats.entries == 500 and stats.stored == 300
    assert event_store.count() == 500 and stream.pending() == 0


def test_entries_of_a_dead_consumer_are_claimed(store: FeatureStore, recsys_home: Path) -> None:
    store.ingest(synthetic(300))
    stream = EventStream(store.redis, store.namespace)
    stream.ensure_group()
    stream.read("dead-host", 120, None)  # delivered, never acknowledged
    stats = run_consumer(idle_exit=True, consumer="other-host", claim_idle_ms=0)
    assert stats.claimed == 120 and stats.stored == 300
    assert stream.pending() == 0


def _consumer_process(env: dict[str, str], *args: str) -> subprocess.Popen:
    code = "import sys; from serving.consumer import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigkill_mid_way_then_restart_loses_and_duplicates_nothing(
    store: FeatureStore, recsys_home: Path
) -> None:
    total = 30_000
    for start in range(0, total, 1000):
        store.ingest(synthetic(1000, start))
    event_store = open_event_store(None, recsys_home)
    process = _consumer_process(
        dict(os.environ), "--batch-size", "250", "--consumer", "host-a", "--block-ms", "100"
    )
    try:
        deadline = time.monotonic() + 120
        while event_store.count() < 2000:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the consumer made no progress"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    stored_before = event_store.count()
    assert 0 < stored_before < total, "the kill did not land mid-way; make the batch smaller"
    # Restarted under the same name, it resumes from its own unacknowledged entries.
    stats = run_consumer(idle_exit=True, consumer="host-a", batch_size=1000)
    assert stats.stored == total - stored_before
    stored = event_store.read()
    assert stored.height == total
    assert stored["event_id"].n_unique() == total
    assert set(stored["event_id"]) == {f"ev-{i}" for i in range(total)}
    stream = EventStream(store.redis, store.namespace)
    assert stream.pending() == 0 and stream.length() == 0


def test_sigterm_finishes_the_batch_and_exits_cleanly(store: FeatureStore) -> None:
    store.ingest(synthetic(200))
    process = _consumer_process(dict(os.environ), "--block-ms", "200")
    time.sleep(0.5)
    deadline = time.monotonic() + 60
    while EventStream(store.redis, store.namespace).lag() and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "consumer stopped: " in output and "200 new events stored" in output


def test_main_arguments(store: FeatureStore) -> None:
    store.ingest(synthetic(10))
    assert main(["--until-idle", "--batch-size", "3"]) == 0
    with pytest.raises(SystemExit):
        main(["--batch-size", "0"])


def test_stop_event_ends_a_blocking_consumer(store: FeatureStore) -> None:
    stop = threading.Event()
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(stats=run_consumer(stop_event=stop, block_ms=100))
    )
    thread.start()
    store.ingest(synthetic(20))
    deadline = time.monotonic() + 30
    while EventStream(store.redis, store.namespace).lag() and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive() and result["stats"].stored == 20


def test_recsys_consume_options_work_through_the_cli(
    store: FeatureStore, recsys_home: Path
) -> None:
    """The documented options of `recsys consume` reach the consumer (they once exited 2 with
    "unrecognized arguments")."""
    recsys = Path(sys.executable).with_name("recsys")
    shown = subprocess.run([recsys, "consume", "--help"], capture_output=True, text=True)
    assert shown.returncode == 0
    for option in ("--batch-size", "--block-ms", "--consumer", "--claim-idle-ms", "--max-batches"):
        assert option in shown.stdout
    store.ingest(synthetic(250))
    done = subprocess.run(
        [recsys, "consume", "--until-idle", "--batch-size", "100", "--block-ms", "100"],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "250 new events stored" in done.stderr
    assert open_event_store(None, recsys_home).count() == 250
    bad = subprocess.run([recsys, "consume", "--batch-size", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--batch-size must be >= 1" in bad.stderr
