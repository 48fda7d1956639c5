"""The event store: every accepted event, deduplicated by event_id, in PostgreSQL or Parquet.

Events are stored as RECORD_SCHEMA (the contract and its optional `context`, JSON text); stores
written before `context` existed are read (Parquet) or migrated (PostgreSQL) in place.

`open_event_store(url)` picks the backend by URL: `postgresql://...` for PostgreSQL, otherwise a
folder of Parquet parts (the embedded default under RECSYS_HOME).
"""

from __future__ import annotations

import io
import os
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path

import polars as pl

from config import redact_url
from training.data import EVENT_SCHEMA, empty_events
from training.events import RECORD_SCHEMA, empty_records, with_event_ids

_INGESTED = "ingested_at"
# What a part holds; older parts lack `context` and read with a null one.
_PART_SCHEMA = {**RECORD_SCHEMA, _INGESTED: pl.Float64()}


class EventStore(ABC):
    """Append-only store of events in the canonical schema, idempotent on event_id."""

    @abstractmethod
    def append(self, events: pl.DataFrame) -> int:
        """Store the events whose event_id is new; return how many were inserted."""

    @abstractmethod
    def read(self, since_timestamp: int | None = None, with_context: bool = False) -> pl.DataFrame:
        """All stored events (optionally with timestamp >= since_timestamp) in EVENT_SCHEMA, or
        RECORD_SCHEMA (with `context`) when `with_context`."""

    @abstractmethod
    def count(self) -> int:
        """Number of stored events."""

    @abstractmethod
    def count_ingested_since(self, ingested_after: float) -> int:
        """Number of events stored after the given wall-clock time (epoch seconds)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prepare(events: pl.DataFrame) -> pl.DataFrame:
    """Record columns and types, ids filled, duplicates within the batch dropped."""
    frame = events
    for name, dtype in RECORD_SCHEMA.items():
        if name not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=dtype).alias(name))
    frame = frame.select([pl.col(n).cast(t) for n, t in RECORD_SCHEMA.items()])
    return with_event_ids(frame).unique("event_id", keep="first", maintain_order=True)


class ParquetEventStore(EventStore):
    """Embedded store: immutable Parquet parts in a folder, compacted when they pile up."""

    def __init__(self, root: str | Path, compact_after: int = 64) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.compact_after = compact_after

    def _parts(self) -> list[Path]:
        return sorted(self.root.glob("part-*.parquet"))

    def _scan(self) -> pl.LazyFrame | None:
        parts = self._parts()
        if not parts:
            return None
        return pl.scan_parquet(parts, schema=_PART_SCHEMA, missing_columns="insert").unique(
            "event_id", keep="first", maintain_order=True
        )

    def append(self, events: pl.DataFrame) -> int:
        batch = _prepare(events)
        if batch.is_empty():
            return 0
        scan = self._scan()
        if scan is not None:
            known = scan.select("event_id").collect()
            batch = batch.join(known, on="event_id", how="anti")
        if batch.is_empty():
            return 0
        batch = batch.with_columns(pl.lit(time.time()).alias(_INGESTED))
        self._write_part(batch)
        if len(self._parts()) > self.compact_after:
            self.compact()
        return batch.height

    def _write_part(self, frame: pl.DataFrame) -> Path:
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.root / f".{name}.tmp"
        frame.write_parquet(tmp)
        final = self.root / name
        os.replace(tmp, final)
        return final

    def compact(self) -> None:
        """Rewrite all parts as one; readers dedupe by event_id, so concurrent reads stay right."""
        parts = self._parts()
        if len(parts) <= 1:
            return
        merged = (
            pl.scan_parquet(parts, schema=_PART_SCHEMA, missing_columns="insert")
            .unique("event_id", keep="first")
            .collect()
        )
        self._write_part(merged.sort("timestamp"))
        for part in parts:
            part.unlink(missing_ok=True)

    def read(self, since_timestamp: int | None = None, with_context: bool = False) -> pl.DataFrame:
        scan = self._scan()
        if scan is None:
            return empty_records() if with_context else empty_events()
        if since_timestamp is not None:
            scan = scan.filter(pl.col("timestamp") >= since_timestamp)
        columns = RECORD_SCHEMA if with_context else EVENT_SCHEMA
        return scan.select(list(columns)).sort("timestamp").collect()

    def count(self) -> int:
        scan = self._scan()
        return 0 if scan is None else scan.select(pl.len()).collect().item()

    def count_ingested_since(self, ingested_after: float) -> int:
        scan = self._scan()
        if scan is None:
            return 0
        return scan.filter(pl.col(_INGESTED) > ingested_after).select(pl.len()).collect().item()


_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    event_id    TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    item_id     TEXT NOT NULL,
    event_type  TEXT NOT NULL,
    timestamp   BIGINT NOT NULL,
    value       DOUBLE PRECISION,
    session_id  TEXT,
    context     TEXT,
    ingested_at DOUBLE PRECISION NOT NULL DEFAULT extract(epoch FROM clock_timestamp())
);
-- A table created before `context` existed gains it (NULL for the events already stored).
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS context TEXT;
CREATE INDEX IF NOT EXISTS {table}_ingested_at ON {table} (ingested_at);
CREATE INDEX IF NOT EXISTS {table}_timestamp ON {table} (timestamp);
"""
_COLUMNS = ", ".join(RECORD_SCHEMA)


class PostgresEventStore(EventStore):
    """Production store: one PostgreSQL table, COPY in and out, ON CONFLICT DO NOTHING."""

    def __init__(self, url: str, table: str = "events") -> None:
        import psycopg

        if not table.isidentifier():
            raise ValueError(f"invalid table name {table!r}")
        self.url = url.replace("postgresql+psycopg://", "postgresql://")
        self.table = table
        try:
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise ConnectionError(
                f"cannot reach the PostgreSQL event store at {redact_url(url)}: {exc}".strip()
            ) from exc
        with self._conn.cursor() as cur:
            cur.execute(_DDL.format(table=table))

    def append(self, events: pl.DataFrame) -> int:
        batch = _prepare(events).with_columns(pl.col("event_type").cast(pl.String))
        if batch.is_empty():
            return 0
        buffer = io.BytesIO()
        batch.write_csv(buffer, include_header=False, null_value="\\N")
        with self._conn.transaction(), self._conn.cursor() as cur:
            cur.execute(
                f"CREATE TEMP TABLE _incoming (LIKE {self.table} INCLUDING DEFAULTS) ON COMMIT DROP"
            )
            with cur.copy(
                f"COPY _incoming ({_COLUMNS}) FROM STDIN WITH (FORMAT csv, NULL '\\N')"
            ) as copy:
                copy.write(buffer.getvalue())
            cur.execute(
                f"INSERT INTO {self.table} ({_COLUMNS}, ingested_at) "
                f"SELECT {_COLUMNS}, extract(epoch FROM clock_timestamp()) FROM _incoming "
                "ON CONFLICT (event_id) DO NOTHING"
            )
            return cur.rowcount

    def read(self, since_timestamp: int | None = None, with_context: bool = False) -> pl.DataFrame:
        schema = RECORD_SCHEMA if with_context else EVENT_SCHEMA
        where = "" if since_timestamp is None else f" WHERE timestamp >= {int(since_timestamp)}"
        query = f"SELECT {', '.join(schema)} FROM {self.table}{where} ORDER BY timestamp"
        buffer = io.BytesIO()
        with self._conn.cursor() as cur:
            with cur.copy(f"COPY ({query}) TO STDOUT WITH (FORMAT csv, HEADER true)") as copy:
                for block in copy:
                    buffer.write(block)
        empty = empty_records() if with_context else empty_events()
        if buffer.tell() == 0:
            return empty
        buffer.seek(0)
        frame = pl.read_csv(buffer, infer_schema=False)
        if frame.is_empty():
            return empty
        return frame.select([pl.col(n).cast(t) for n, t in schema.items()])

    def count(self) -> int:
        with self._conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {self.table}")
            return int(cur.fetchone()[0])

    def count_ingested_since(self, ingested_after: float) -> int:
        with self._conn.cursor() as cur:
            cur.execute(
                f"SELECT count(*) FROM {self.table} WHERE ingested_at > %s", (ingested_after,)
            )
            return int(cur.fetchone()[0])

    def close(self) -> None:
        self._conn.close()


def open_event_store(url: str | None, home: str | Path) -> EventStore:
    """The store for a URL: PostgreSQL for `postgresql://`, else Parquet under `home/events`."""
    if url and url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        return PostgresEventStore(url)
    if url:
        return ParquetEventStore(Path(url.removeprefix("file://")))
    return ParquetEventStore(Path(home) / "events")
