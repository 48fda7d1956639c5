"""EventStream: the consumer group's read, acknowledge, restart, claim and trim semantics."""

from __future__ import annotations

import polars as pl

from feature_repo.store import FeatureStore
from feature_repo.stream import EventStream, decode_payloads

NOW = 1_800_000_000


def batch(n: int, start: int = 0) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": [f"u{i % 3}" for i in range(start, start + n)],
            "item_id": [f"i{i}" for i in range(start, start + n)],
            "event_type": ["rating" if i % 2 else "view" for i in range(start, start + n)],
            "timestamp": [NOW - 100 + i for i in range(start, start + n)],
            "value": [4.5 if i % 2 else None for i in range(start, start + n)],
            "session_id": [f"s{i}" if i % 3 else None for i in range(start, start + n)],
            "event_id": [f"ev-{i}" for i in range(start, start + n)],
            "context": [
                '{"device":"ios"}' if i % 4 == 0 else None for i in range(start, start + n)
            ],
            "request_id": [f"r{i // 2}" if i % 3 == 1 else None for i in range(start, start + n)],
            "position": [i % 5 if i % 3 == 1 else None for i in range(start, start + n)],
        },
        schema_overrides={"position": pl.Int32},
    )


def test_payloads_round_trip_the_event_contract(store: FeatureStore) -> None:
    stream = EventStream(store.redis, store.namespace)
    stream.ensure_group()
    stream.ensure_group()  # idempotent
    sent = batch(7)
    store.ingest(sent, now=NOW)
    got = stream.read("c1", count=100, block_ms=None)
    assert len(got) == 7
    assert got.events.equals(sent)
    assert decode_payloads([]).columns == sent.columns


def test_unacknowledged_entries_survive_a_restart_and_are_claimable(store: FeatureStore) -> None:
    stream = EventStream(store.redis, store.namespace)
    stream.ensure_group()
    store.ingest(batch(10), now=NOW)
    first = stream.read("worker-a", count=4, block_ms=None)
    assert len(first) == 4 and stream.pending() == 4
    # worker-a dies without acknowledging; restarted under its name it gets the same entries.
    again = stream.read_own_pending("worker-a", count=100)
    assert again.ids == first.ids
    # Another consumer can take them over once they are idle long enough.
    claimed = stream.claim_stale("worker-b", min_idle_ms=0, count=100)
    assert claimed.ids == first.ids
    assert stream.read_own_pending("worker-a", count=100).ids == []
    rest = stream.read("worker-b", count=100, block_ms=None)
    assert len(rest) == 6 and stream.lag() == 10
    assert stream.ack(claimed.ids + rest.ids) == 10
    assert stream.lag() == 0


def test_trim_keeps_everything_not_acknowledged(store: FeatureStore) -> None:
    stream = EventStream(store.redis, store.namespace)
    stream.ensure_group()
    store.ingest(batch(6), now=NOW)
    got = stream.read("c", count=6, block_ms=None)
    stream.ack(got.ids[:2] + got.ids[3:4])
    # Entry 2 is pending: nothing from it onwards may go.
    assert stream.trim() == 2
    assert stream.length() == 4
    stream.ack(got.ids)
    assert stream.trim() == 4 and stream.length() == 0
    store.ingest(batch(3, start=10), now=NOW)
    assert stream.trim() == 0  # undelivered entries stay
    assert stream.undelivered() == 3


def test_blocking_read_returns_empty_after_timeout(store: FeatureStore) -> None:
    stream = EventStream(store.redis, store.namespace)
    stream.ensure_group()
    assert len(stream.read("c", count=10, block_ms=50)) == 0


def test_undelivered_entries_are_counted_past_a_page(store: FeatureStore) -> None:
    stream = EventStream(store.redis, store.namespace)
    stream.ensure_group()
    for start in range(0, 2500, 500):
        store.ingest(batch(500, start=start), now=NOW)
    assert stream.undelivered() == 2500  # nothing delivered yet
    got = stream.read("c", count=700, block_ms=None)
    assert stream.undelivered() == 1800
    # Counted inside Redis (for a server without XINFO's lag), in pages of 1,000 entries.
    last = got.ids[-1]
    assert store.scripts.run("STREAM_COUNT_AFTER", [stream.key], [last]) == 1800
    assert store.scripts.run("STREAM_COUNT_AFTER", [stream.key], [got.ids[0]]) == 2499
