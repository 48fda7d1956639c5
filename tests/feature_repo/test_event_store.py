"""The event store, embedded (Parquet) and PostgreSQL: idempotent appends, reads, counts."""

import time
from pathlib import Path

import polars as pl
import pytest

from feature_repo.event_store import (
    EventStore,
    ParquetEventStore,
    PostgresEventStore,
    open_event_store,
)
from tests.conftest import make_events
from training.data import EVENT_SCHEMA
from training.events import IMPRESSION_SCHEMA, RECORD_SCHEMA


def _check_store(store: EventStore) -> None:
    events = make_events(n_users=10, per_user=5)
    assert store.read().is_empty()
    before = time.time()
    assert store.append(events) == events.height
    assert store.append(events) == 0, "same event_ids are not stored twice"
    assert store.append(events.head(3)) == 0
    extra = events.head(2).with_columns(
        pl.lit(None, dtype=pl.String).alias("event_id"), (pl.col("timestamp") + 1)
    )
    assert store.append(extra) == 2
    assert store.append(extra) == 2 - 2, "derived ids make re-imports idempotent"
    read = store.read()
    assert dict(read.schema) == EVENT_SCHEMA
    assert read.height == events.height + 2
    assert read["timestamp"].is_sorted()
    assert store.count() == events.height + 2
    assert store.count_ingested_since(before - 1) == events.height + 2
    assert store.count_ingested_since(time.time() + 60) == 0
    cut = int(events["timestamp"].median())
    assert store.read(since_timestamp=cut).height == read.filter(pl.col("timestamp") >= cut).height


def _check_context(store: EventStore) -> None:
    events = make_events(n_users=2, per_user=2).with_columns(
        pl.Series("context", ['{"device":"ios"}', None, '{"page":"home","n":3}', None]),
        pl.Series("request_id", ["r1", None, "r2", "r1"]),
        pl.Series("position", [0, None, 7, 3], dtype=pl.Int32),
    )
    assert store.append(events) == 4
    stored = store.read(with_context=True)
    stored = stored.filter(pl.col("event_id").is_in(events["event_id"].to_list())).sort("event_id")
    assert dict(stored.schema) == RECORD_SCHEMA
    for name in ("context", "request_id", "position"):
        assert stored[name].to_list() == events.sort("event_id")[name].to_list()
    assert not {"context", "request_id", "position"} & set(store.read().columns)


def test_parquet_store(tmp_path: Path) -> None:
    _check_store(ParquetEventStore(tmp_path / "events"))


def test_parquet_store_keeps_context_and_reads_parts_written_before_it(tmp_path: Path) -> None:
    store = ParquetEventStore(tmp_path / "events", compact_after=2)
    # A part as the store wrote it before `context` existed.
    old = make_events(n_users=3, per_user=2).with_columns(pl.lit(1.0).alias("ingested_at"))
    old.write_parquet(tmp_path / "events" / "part-00000000000000000001-old.parquet")
    _check_context(store)
    assert store.count() == old.height + 4
    assert (
        store.read(with_context=True)
        .filter(pl.col("event_id").is_in(old["event_id"].to_list()))["context"]
        .null_count()
        == old.height
    )
    assert sorted(store.read(with_context=True)["position"].drop_nulls().to_list()) == [0, 3, 7]
    store.append(make_events(n_users=4, per_user=1, seed=9))  # compacts old and new parts
    assert len(list((tmp_path / "events").glob("part-*.parquet"))) == 1
    assert store.read(with_context=True)["context"].drop_nulls().len() == 2


def test_parquet_store_compacts_small_parts(tmp_path: Path) -> None:
    store = ParquetEventStore(tmp_path / "events", compact_after=3)
    events = make_events(n_users=10, per_user=5)
    for start in range(0, 25, 5):
        store.append(events.slice(start, 5))
    assert len(list((tmp_path / "events").glob("part-*.parquet"))) <= 3
    assert store.count() == 25


@pytest.mark.postgres
def test_postgres_store(postgres_url: str) -> None:
    store = open_event_store(postgres_url, "/unused")
    assert isinstance(store, PostgresEventStore)
    try:
        _check_store(store)
    finally:
        store.close()


@pytest.mark.postgres
def test_postgres_store_keeps_context_and_migrates_an_old_table(postgres_url: str) -> None:
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        # The table as created before `context` existed, with one event in it.
        conn.execute(
            "CREATE TABLE events (event_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, "
            "item_id TEXT NOT NULL, event_type TEXT NOT NULL, timestamp BIGINT NOT NULL, "
            "value DOUBLE PRECISION, session_id TEXT, ingested_at DOUBLE PRECISION NOT NULL "
            "DEFAULT extract(epoch FROM clock_timestamp()))"
        )
        conn.execute(
            "INSERT INTO events (event_id, user_id, item_id, event_type, timestamp) "
            "VALUES ('old', 'u', 'i', 'view', 1700000000)"
        )
    store = PostgresEventStore(postgres_url)
    try:
        _check_context(store)
        old = store.read(with_context=True).filter(pl.col("event_id") == "old")
        assert old["context"].to_list() == [None] and store.count() == 5
        assert old["request_id"].to_list() == [None] and old["position"].to_list() == [None]
    finally:
        store.close()


def test_unreachable_postgres_is_a_clear_error() -> None:
    with pytest.raises(ConnectionError, match="cannot reach the PostgreSQL event store"):
        PostgresEventStore("postgresql://nobody:secret@127.0.0.1:1/none")


def test_default_store_is_parquet_under_home(tmp_path: Path) -> None:
    store = open_event_store(None, tmp_path)
    assert isinstance(store, ParquetEventStore)
    assert store.root == tmp_path / "events"


def test_unreachable_store_messages_never_show_the_password() -> None:
    from config import redact_url

    assert (
        redact_url("postgresql://shop:s3cret@db:5432/events") == "postgresql://shop@db:5432/events"
    )
    assert redact_url("redis://:s3cret@cache:6379/0") == "redis://cache:6379/0"
    assert redact_url("redis://cache:6379/0") == "redis://cache:6379/0"


def impressions(users: list[str | None], start: float = 1_750_000_000.0) -> pl.DataFrame:
    """One impression per user (None: a non-personal route), a second apart."""
    n = len(users)
    return pl.DataFrame(
        {
            "request_id": [f"req-{start + k:.0f}-{k}" for k in range(n)],
            "user_id": users,
            "timestamp": [start + k for k in range(n)],
            "route": ["/recommend" if u else "/popular" for u in users],
            "items": [[f"i{k}", f"i{k + 1}", 'q"\\uote'] for k in range(n)],
            "scores": [[1.0, 0.5, 0.25] for _ in range(n)],
            "sources": [["als+coview", "popularity", ""] for _ in range(n)],
            "variant": ["champion"] * n,
            "experiment": [None] * n,
            "model_version": ["3"] * n,
            "latency_ms": [1.25] * n,
            "status": ["ok"] * n,
            "cached": [False] * n,
            "context": ['{"page":"a\\\\b \\"home\\""}'] + [None] * (n - 1),
            "teams": [["a", "b", "a"]] + [None] * (n - 1),
        },
        schema=IMPRESSION_SCHEMA,
    )


def _check_impressions(store: EventStore) -> None:
    assert store.read_impressions().is_empty()
    assert dict(store.read_impressions().schema) == IMPRESSION_SCHEMA
    sent = impressions(["u1", "u2", None, "u1"])
    assert store.append_impressions(sent) == 4
    assert store.append_impressions(sent) == 0, "idempotent by request_id"
    # Only some columns given: the rest are null.
    partial = (
        sent.head(1)
        .select("request_id", "timestamp")
        .with_columns(pl.lit("other").alias("request_id"))
    )
    assert store.append_impressions(partial) == 1
    read = store.read_impressions()
    assert dict(read.schema) == IMPRESSION_SCHEMA
    assert read.height == 5 and read["timestamp"].is_sorted()
    assert (
        read.filter(pl.col("request_id") != "other")
        .sort("request_id")
        .equals(sent.sort("request_id"))
    ), "lists, quotes and backslashes read back exactly"
    t0 = sent["timestamp"][0]
    window = store.read_impressions(since=t0 + 1, until=t0 + 3)
    assert window["timestamp"].to_list() == [t0 + 1, t0 + 2]
    assert store.read_impressions(since=t0 + 3)["request_id"].to_list() == [sent["request_id"][3]]
    assert store.delete_impressions_before(t0 + 2) == 3  # two of `sent`, and `other`
    assert store.read_impressions().height == 2


def test_parquet_impressions(tmp_path: Path) -> None:
    store = ParquetEventStore(tmp_path / "events", compact_after=2)
    _check_impressions(store)
    for n in range(4):  # compacts the impression parts
        store.append_impressions(impressions([f"v{n}"], start=1_760_000_000.0 + n))
    assert len(list((tmp_path / "events" / "recommendation_logs").glob("part-*"))) <= 2
    assert store.read_impressions().height == 6


@pytest.mark.postgres
def test_postgres_impressions(postgres_url: str) -> None:
    import psycopg

    with PostgresEventStore(postgres_url) as store:
        _check_impressions(store)
    with psycopg.connect(postgres_url) as conn:
        indexes = {
            row[0]
            for row in conn.execute(
                "SELECT indexdef FROM pg_indexes WHERE tablename = 'recommendation_logs'"
            )
        }
    assert any('(user_id, "timestamp")' in i or "(user_id, timestamp)" in i for i in indexes)
    assert any("UNIQUE" in i and "(request_id)" in i for i in indexes)
