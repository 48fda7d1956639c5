"""Forgetting a user and retention: the event store (both backends), Redis, the audit record,
the suppression list and the `user_recommendations` table."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
import redis

from feature_repo.definitions import FEATURES, USER, Keys
from feature_repo.event_store import (
    EventStore,
    ParquetEventStore,
    PostgresEventStore,
    user_hash,
    without_users,
)
from feature_repo.forget import forget_user
from feature_repo.store import FeatureStore

T0 = 1_750_000_000


def events(user: str, n: int, start: int = T0, prefix: str = "") -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": [user] * n,
            "item_id": [f"i{k % 50}" for k in range(n)],
            "event_type": ["view"] * n,
            "timestamp": [start + k for k in range(n)],
            "event_id": [f"{prefix or user}-e{k}" for k in range(n)],
            "value": pl.Series([None] * n, dtype=pl.Float64),
            "session_id": pl.Series([None] * n, dtype=pl.String),
        }
    )


@pytest.fixture(params=["parquet", "postgres"])
def event_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EventStore]:
    if request.param == "parquet":
        store: EventStore = ParquetEventStore(tmp_path / "events")
    else:
        store = PostgresEventStore(request.getfixturevalue("postgres_url"))
    yield store
    store.close()


def test_delete_users_removes_their_events_and_suppresses_them(event_store: EventStore) -> None:
    event_store.append(events("gone", 1000))
    event_store.append(pl.concat([events("u1", 30), events("u2", 30)]))
    event_store.append(events("gone", 5, start=T0 + 5000, prefix="gone-late"))

    deleted = event_store.delete_users(["gone"])

    assert deleted.events == 1005
    assert len(deleted.event_ids) == 1005 and "gone-e0" in deleted.event_ids
    left = event_store.read()
    assert "gone" not in set(left["user_id"])
    assert left.height == 60 and event_store.count() == 60
    assert event_store.is_suppressed("gone") and not event_store.is_suppressed("u1")
    assert user_hash("gone") in set(event_store.suppressed())
    # A late event of the forgotten user is dropped; the others' are stored.
    late = pl.concat([events("gone", 3, prefix="gone-later"), events("u3", 2)])
    assert event_store.append(late) == 2
    assert "gone" not in set(event_store.read()["user_id"])
    # Idempotent: forgetting again removes nothing and keeps one suppression entry.
    assert event_store.delete_users(["gone"]).events == 0
    assert event_store.suppressed().to_list().count(user_hash("gone")) == 1


def test_postgres_and_python_compute_the_same_user_hash(postgres_url: str) -> None:
    # The INSERT filter hashes in SQL, the suppression list is written from Python: one
    # digest, or a forgotten user's late events would slip in.
    with PostgresEventStore(postgres_url) as store:
        store.delete_users(["ü-ser 1"])
        assert store.append(events("ü-ser 1", 4)) == 0
        assert store.append(events("other", 4)) == 4


def test_without_users_drops_only_suppressed_users() -> None:
    frame = pl.concat([events("a", 3), events("b", 2), events("c", 1)])
    kept = without_users(frame, pl.Series([user_hash("a"), user_hash("c")]))
    assert kept["user_id"].to_list() == ["b", "b"]
    assert without_users(frame, pl.Series([], dtype=pl.String)).height == 6


def test_parquet_deletion_interrupted_after_the_rename_loses_nothing(tmp_path: Path) -> None:
    store = ParquetEventStore(tmp_path / "events")
    store.append(pl.concat([events("gone", 20), events("kept", 20)]))
    (part,) = store._parts()
    saved = tmp_path / "old-part.parquet"
    shutil.copy(part, saved)
    store.delete_users(["gone"])
    # The state a crash between "new part renamed in" and "old part removed" leaves behind.
    shutil.copy(saved, part)
    both = store.read()
    assert both.filter(pl.col("user_id") == "kept").height == 20, "no accepted event lost"
    assert both["event_id"].n_unique() == both.height, "and none duplicated"
    # Forgetting again (the audit was never written, so the operator re-runs it) finishes it.
    assert store.delete_users(["gone"]).events == 20
    assert set(store.read()["user_id"]) == {"kept"}
    assert not list(store.root.glob(".*.tmp"))


def test_delete_events_before_counts_what_it_removed(event_store: EventStore) -> None:
    event_store.append(events("u1", 100, start=T0))
    event_store.append(events("u2", 100, start=T0 + 50))
    assert event_store.delete_events_before(T0 + 60) == 60 + 10
    left = event_store.read()
    assert left.height == 130 and int(left["timestamp"].min()) == T0 + 60
    assert event_store.delete_events_before(T0) == 0


def _recs(version: str, expires_in: float, users: int = 3, k: int = 4) -> pl.DataFrame:
    now = time.time()
    utc = pl.Datetime("us", "UTC")
    return pl.DataFrame(
        {
            "user_id": [f"u{u}" for u in range(users) for _ in range(k)],
            "item_id": [f"i{r}" for _ in range(users) for r in range(k)],
            "rank": [r + 1 for _ in range(users) for r in range(k)],
            "score": [float(k - r) for _ in range(users) for r in range(k)],
            "model_version": version,
            "generated_at": int(now * 1e6),
            "expires_at": int((now + expires_in) * 1e6),
        }
    ).with_columns(pl.col("generated_at", "expires_at").cast(pl.Datetime("us")).cast(utc))


def test_user_recommendations_replaced_whole_and_expired_rows_ignored(
    event_store: EventStore,
) -> None:
    assert event_store.replace_recommendations(_recs("v1", 3600)) == 12
    mine = event_store.read_recommendations("u1")
    assert mine["item_id"].to_list() == ["i0", "i1", "i2", "i3"]
    assert mine["score"].to_list() == sorted(mine["score"].to_list(), reverse=True)
    # A new model version replaces every row: nothing of v1 remains beside v2.
    assert event_store.replace_recommendations(_recs("v2", 3600, users=2)) == 8
    everything = event_store.read_recommendations()
    assert set(everything["model_version"]) == {"v2"} and everything.height == 8
    assert event_store.relabel_recommendations("v2", "7") == 8
    assert event_store.relabel_recommendations("v2", "7") == 0
    assert set(event_store.read_recommendations()["model_version"]) == {"7"}
    # A list with an item twice for one user is refused and the table keeps the last lists.
    bad = pl.concat([_recs("v3", 3600, users=1), _recs("v3", 3600, users=1)])
    with pytest.raises(ValueError, match="twice"):
        event_store.replace_recommendations(bad)
    assert set(event_store.read_recommendations()["model_version"]) == {"7"}
    # Expired rows are invisible to readers, then removed by retention.
    event_store.replace_recommendations(_recs("v4", -1))
    assert event_store.read_recommendations().is_empty()
    assert event_store.read_recommendations("u0").is_empty()
    assert event_store.delete_expired_recommendations() == 12
    assert event_store.delete_expired_recommendations() == 0


def test_postgres_user_recommendations_has_its_constraint_and_indexes(postgres_url: str) -> None:
    import psycopg

    PostgresEventStore(postgres_url).close()
    with psycopg.connect(postgres_url) as conn:
        defs = [
            row[0]
            for row in conn.execute(
                "SELECT indexdef FROM pg_indexes WHERE tablename = 'user_recommendations'"
            )
        ]
    assert any("UNIQUE" in d and "(user_id, item_id)" in d for d in defs)
    assert any("(user_id, score DESC)" in d for d in defs)
    assert any("(expires_at)" in d for d in defs)


def test_user_keys_cover_every_per_user_feature() -> None:
    keys = Keys("ns")
    listed = set(keys.user_keys("U"))
    for feature in FEATURES:
        if feature.entity is USER:
            key = feature.key.replace("{ns}", "ns").replace("<user_id>", "U")
            assert key in listed, f"forgetting a user would leave {feature.name}"


def test_forget_user_clears_store_redis_and_writes_the_audit(
    event_store: EventStore, redis_client: redis.Redis, namespace: str
) -> None:
    features = FeatureStore(redis_client, namespace)
    now = time.time()
    both = pl.concat(
        [events("gone", 20, start=int(now) - 100), events("kept", 20, start=int(now) - 100)]
    ).with_columns(pl.col("event_type").cast(pl.Categorical))
    features.ingest(both, now=now)
    event_store.append(both)
    features.push_batch_candidates(
        pl.DataFrame({"user_id": ["gone", "kept"], "item_id": ["i1", "i2"], "score": [1.0, 1.0]})
    )
    features.push_user_profiles(pl.DataFrame({"user_id": ["gone", "kept"], "segment": ["a", "b"]}))
    keys = Keys(namespace)
    features.cache_response("gone", "sig", "{}", now=now)
    assert redis_client.exists(*keys.user_keys("gone")) >= 4

    done = forget_user("gone", "dpo@shop", event_store, redis_client, namespace)

    assert redis_client.exists(*keys.user_keys("gone")) == 0
    assert not redis_client.exists(*[keys.seen_event(f"gone-e{k}") for k in range(20)])
    assert redis_client.exists(keys.recent("kept"), keys.candidates("kept"), keys.profile("kept"))
    assert redis_client.exists(keys.seen_event("kept-e0"))
    # Nothing under the user's hash tag is left, whatever its name.
    assert not list(redis_client.scan_iter(match=keys.user_prefix("gone") + "*"))
    assert done.removed["events"] == 20 and done.removed["redis_keys"] >= 4 + 20
    assert "gone" not in set(event_store.read()["user_id"])
    (record,) = event_store.deletion_audit().to_dicts()
    assert record["actor"] == "dpo@shop"
    assert record["user_hash"] == user_hash("gone") and "gone" not in record.values()
    assert json.loads(record["removed"]) == done.removed
    assert abs(record["deleted_at"] - time.time()) < 60
    with pytest.raises(ValueError, match="actor"):
        forget_user("kept", " ", event_store, redis_client, namespace)


def test_forget_interrupted_by_a_redis_outage_is_finished_by_running_it_again(
    tmp_path: Path, redis_client: redis.Redis, namespace: str
) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    down = redis.Redis(port=closed_port, socket_connect_timeout=0.5)
    store = ParquetEventStore(tmp_path / "events")
    store.append(events("gone", 10))
    features = FeatureStore(redis_client, namespace)
    features.ingest(events("gone", 10).with_columns(pl.col("event_type").cast(pl.Categorical)))
    with pytest.raises(redis.ConnectionError):
        forget_user("gone", "dpo", store, down, namespace)
    # Suppressed and deleted from the store first; no audit claims a deletion that did not end.
    assert store.is_suppressed("gone") and store.count() == 0
    assert store.deletion_audit().is_empty()
    done = forget_user("gone", "dpo", store, redis_client, namespace)
    assert done.removed["redis_keys"] >= 2 and done.removed["events"] == 0
    assert redis_client.exists(*Keys(namespace).user_keys("gone")) == 0
    assert store.deletion_audit().height == 1


def test_postgres_deletion_waits_for_an_append_in_flight(postgres_url: str) -> None:
    import threading

    import psycopg

    store = PostgresEventStore(postgres_url)
    other = PostgresEventStore(postgres_url)
    store.append(events("gone", 5))
    # An append of the user's events in flight: its transaction holds the table's insert lock.
    writer = psycopg.connect(postgres_url)
    writer.execute(
        "INSERT INTO events (event_id, user_id, item_id, event_type, timestamp) "
        "VALUES ('in-flight', 'gone', 'i1', 'view', %s)",
        (T0,),
    )
    result: list = []
    deleting = threading.Thread(target=lambda: result.append(other.delete_users(["gone"])))
    deleting.start()
    deleting.join(0.5)
    assert deleting.is_alive(), "the deletion waits for the append to commit"
    writer.commit()
    deleting.join(10)
    assert result and result[0].events == 6, "and then deletes its events too"
    assert store.count() == 0
    writer.close()
    store.close()
    other.close()


def test_forgetting_a_user_deletes_their_impressions_and_drops_late_ones(
    event_store: EventStore,
) -> None:
    from tests.feature_repo.test_event_store import impressions

    event_store.append_impressions(impressions(["gone", "kept", None, "gone"], start=T0))
    deleted = event_store.delete_users(["gone"])
    assert deleted.recommendation_logs == 2
    assert deleted.counts()["recommendation_logs"] == 2
    left = event_store.read_impressions()
    assert left["user_id"].to_list() == ["kept", None]
    # An impression of the forgotten user still in the stream is not stored again.
    late = impressions(["gone", "other"], start=T0 + 100)
    assert event_store.append_impressions(late) == 1
    assert "gone" not in set(event_store.read_impressions()["user_id"].drop_nulls())


def test_retention_deletes_old_impressions_with_old_events(event_store: EventStore) -> None:
    from tests.feature_repo.test_event_store import impressions

    event_store.append(events("u1", 100, start=T0))
    event_store.append_impressions(impressions(["u1"] * 10, start=T0 + 55))
    assert event_store.delete_events_before(T0 + 60) == 60
    assert event_store.read_impressions()["timestamp"].min() == T0 + 60
    assert event_store.read_impressions().height == 5
