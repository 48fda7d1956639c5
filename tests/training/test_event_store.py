"""The event store, embedded (Parquet) and PostgreSQL: idempotent appends, reads, counts."""

import time
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import make_events
from training.data import EVENT_SCHEMA
from training.event_store import EventStore, ParquetEventStore, PostgresEventStore, open_event_store


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


def test_parquet_store(tmp_path: Path) -> None:
    _check_store(ParquetEventStore(tmp_path / "events"))


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


def test_unreachable_postgres_is_a_clear_error() -> None:
    with pytest.raises(ConnectionError, match="cannot reach the PostgreSQL event store"):
        PostgresEventStore("postgresql://nobody:secret@127.0.0.1:1/none")


def test_default_store_is_parquet_under_home(tmp_path: Path) -> None:
    store = open_event_store(None, tmp_path)
    assert isinstance(store, ParquetEventStore)
    assert store.root == tmp_path / "events"
