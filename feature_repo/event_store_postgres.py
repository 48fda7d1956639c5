"""The production event store backend: one PostgreSQL table of events, `recommendation_logs` and
the governance tables beside it.

The contract (`EventStore`, the governance schemas, `user_hash`) is `feature_repo/event_store.py`;
import `PostgresEventStore` from there or from here.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import TYPE_CHECKING

import polars as pl

from config import redact_url
from feature_repo.event_store import (
    _SQL_USER_HASH,
    AUDIT_SCHEMA,
    RECOMMENDATION_SCHEMA,
    EventStore,
    UserDeletion,
    _audit_record,
    _now_utc,
    _prepare,
    _prepare_impressions,
    _recommendation_rows,
    user_hash,
)
from training.data import EVENT_SCHEMA, empty_events
from training.events import IMPRESSION_SCHEMA, RECORD_SCHEMA, empty_impressions, empty_records

if TYPE_CHECKING:
    import psycopg

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
    request_id  TEXT,
    position    INTEGER,
    ingested_at DOUBLE PRECISION NOT NULL DEFAULT extract(epoch FROM clock_timestamp())
);
-- A table created before `context` existed gains it (NULL for the events already stored).
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS context TEXT;
-- ... and the attribution fields (NULL for the events already stored).
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS request_id TEXT;
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS position INTEGER;
CREATE INDEX IF NOT EXISTS {table}_ingested_at ON {table} (ingested_at);
CREATE INDEX IF NOT EXISTS {table}_timestamp ON {table} (timestamp);
-- Forgetting a user deletes by user_id.
CREATE INDEX IF NOT EXISTS {table}_user_id ON {table} (user_id);
CREATE TABLE IF NOT EXISTS suppressed_users (
    user_hash     TEXT PRIMARY KEY,
    suppressed_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS deletion_audit (
    deletion_id TEXT PRIMARY KEY,
    user_hash   TEXT NOT NULL,
    actor       TEXT NOT NULL,
    deleted_at  DOUBLE PRECISION NOT NULL,
    removed     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS deletion_audit_user_hash ON deletion_audit (user_hash);
CREATE TABLE IF NOT EXISTS user_recommendations (
    user_id       TEXT NOT NULL,
    item_id       TEXT NOT NULL,
    rank          INTEGER NOT NULL,
    score         DOUBLE PRECISION NOT NULL,
    model_version TEXT NOT NULL,
    generated_at  TIMESTAMPTZ NOT NULL,
    expires_at    TIMESTAMPTZ NOT NULL,
    UNIQUE (user_id, item_id)
);
CREATE INDEX IF NOT EXISTS user_recommendations_user_score
    ON user_recommendations (user_id, score DESC);
CREATE INDEX IF NOT EXISTS user_recommendations_expires_at ON user_recommendations (expires_at);
-- One row per answer served; the lists are arrays in answer order (position = index - 1).
CREATE TABLE IF NOT EXISTS recommendation_logs (
    request_id    TEXT PRIMARY KEY,
    user_id       TEXT,
    timestamp     DOUBLE PRECISION NOT NULL,
    route         TEXT,
    items         TEXT[],
    scores        DOUBLE PRECISION[],
    sources       TEXT[],
    variant       TEXT,
    experiment    TEXT,
    model_version TEXT,
    latency_ms    DOUBLE PRECISION,
    status        TEXT,
    cached        BOOLEAN,
    context       TEXT,
    teams         TEXT[],
    ingested_at   DOUBLE PRECISION NOT NULL DEFAULT extract(epoch FROM clock_timestamp())
);
-- Interleaving's teams came after the table: a table from before gains the column.
ALTER TABLE recommendation_logs ADD COLUMN IF NOT EXISTS teams TEXT[];
-- Attribution looks up a user's impressions by time; retention deletes by time.
CREATE INDEX IF NOT EXISTS recommendation_logs_user_time
    ON recommendation_logs (user_id, timestamp);
CREATE INDEX IF NOT EXISTS recommendation_logs_timestamp ON recommendation_logs (timestamp);
"""
_COLUMNS = ", ".join(RECORD_SCHEMA)
_IMPRESSION_COLUMNS = ", ".join(IMPRESSION_SCHEMA)


def connect_with_schema(url: str, what: str, lock: str, ddl: str) -> psycopg.Connection:
    """An autocommit psycopg connection to `url` with `ddl` applied; ConnectionError naming
    `what` (and never the password) when the server cannot be reached.

    Two processes starting at once would race on CREATE ... IF NOT EXISTS (a duplicate key in
    pg_type): the schema is created by one at a time, under the advisory lock `lock`."""
    import psycopg

    try:
        plain = url.replace("postgresql+psycopg://", "postgresql://")
        conn = psycopg.connect(plain, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise ConnectionError(f"cannot reach {what} at {redact_url(url)}: {exc}".strip()) from exc
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (lock,))
        cur.execute(ddl)
    return conn


class PostgresEventStore(EventStore):
    """Production store: one PostgreSQL table, COPY in and out, ON CONFLICT DO NOTHING."""

    def __init__(self, url: str, table: str = "events") -> None:

        if not table.isidentifier():
            raise ValueError(f"invalid table name {table!r}")
        self.url = url.replace("postgresql+psycopg://", "postgresql://")
        self.table = table
        self._conn = connect_with_schema(
            url, "the PostgreSQL event store", "recsys-event-store-schema", _DDL.format(table=table)
        )

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
            # Events of forgotten users are dropped in the insert itself: `delete_users` holds a
            # lock that waits for this statement, so no event slips in beside a deletion.
            cur.execute(
                f"INSERT INTO {self.table} ({_COLUMNS}, ingested_at) "
                f"SELECT {_COLUMNS}, extract(epoch FROM clock_timestamp()) FROM _incoming i "
                "WHERE NOT EXISTS (SELECT 1 FROM suppressed_users s WHERE s.user_hash = "
                f"{_SQL_USER_HASH.format(col='i.user_id')}) "
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

    # -- impressions ----------------------------------------------------------------------------

    def append_impressions(self, impressions: pl.DataFrame) -> int:
        batch = _prepare_impressions(impressions)
        if batch.is_empty():
            return 0
        # One statement: the batch as one JSON array, the lists become arrays on the way.
        with self._conn.cursor() as cur:
            cur.execute(
                f"INSERT INTO recommendation_logs ({_IMPRESSION_COLUMNS}) "
                f"SELECT {_IMPRESSION_COLUMNS} "
                "FROM json_populate_recordset(NULL::recommendation_logs, %s::json) i "
                "WHERE i.user_id IS NULL OR NOT EXISTS (SELECT 1 FROM suppressed_users s "
                f"WHERE s.user_hash = {_SQL_USER_HASH.format(col='i.user_id')}) "
                "ON CONFLICT (request_id) DO NOTHING",
                (batch.write_json(),),
            )
            return cur.rowcount

    def read_impressions(
        self, since: float | None = None, until: float | None = None
    ) -> pl.DataFrame:
        where = []
        if since is not None:
            where.append(f"timestamp >= {float(since)!r}")
        if until is not None:
            where.append(f"timestamp < {float(until)!r}")
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        query = (
            f"SELECT row_to_json(r) FROM (SELECT {_IMPRESSION_COLUMNS} FROM recommendation_logs"
            f"{clause} ORDER BY timestamp, request_id) r"
        )
        buffer = io.BytesIO()
        with self._conn.cursor() as cur:
            with cur.copy(f"COPY ({query}) TO STDOUT") as copy:
                for block in copy:
                    buffer.write(block)
        if buffer.tell() == 0:
            return empty_impressions()
        # COPY's text format doubles backslashes; JSON has no raw control characters, so that is
        # its only escape here.
        text = buffer.getvalue().replace(b"\\\\", b"\\")
        return pl.read_ndjson(io.BytesIO(text), schema=IMPRESSION_SCHEMA)

    def delete_impressions_before(self, timestamp: float) -> int:
        with self._conn.cursor() as cur:
            cur.execute("DELETE FROM recommendation_logs WHERE timestamp < %s", (float(timestamp),))
            return cur.rowcount

    # -- forgetting users and retention ---------------------------------------------------------

    def delete_users(self, user_ids: Iterable[str]) -> UserDeletion:
        ids = sorted(set(user_ids))
        if not ids:
            return UserDeletion(0, 0)
        hashes = [user_hash(u) for u in ids]
        with self._conn.transaction(), self._conn.cursor() as cur:
            # SHARE ROW EXCLUSIVE waits for appends in flight and holds new ones until commit,
            # when they see the suppression: no late event lands after the DELETE's snapshot.
            cur.execute(f"LOCK TABLE {self.table} IN SHARE ROW EXCLUSIVE MODE")
            cur.execute("LOCK TABLE recommendation_logs IN SHARE ROW EXCLUSIVE MODE")
            cur.execute(
                "INSERT INTO suppressed_users (user_hash, suppressed_at) "
                "SELECT unnest(%s::text[]), extract(epoch FROM clock_timestamp()) "
                "ON CONFLICT (user_hash) DO NOTHING",
                (hashes,),
            )
            cur.execute(
                f"DELETE FROM {self.table} WHERE user_id = ANY(%s) RETURNING event_id", (ids,)
            )
            event_ids = [row[0] for row in cur.fetchall()]
            cur.execute("DELETE FROM user_recommendations WHERE user_id = ANY(%s)", (ids,))
            recs = cur.rowcount
            cur.execute("DELETE FROM recommendation_logs WHERE user_id = ANY(%s)", (ids,))
            logs = cur.rowcount
        return UserDeletion(len(event_ids), recs, event_ids, recommendation_logs=logs)

    def suppressed(self) -> pl.Series:
        with self._conn.cursor() as cur:
            cur.execute("SELECT user_hash FROM suppressed_users")
            return pl.Series("user_hash", [row[0] for row in cur.fetchall()], pl.String)

    def is_suppressed(self, user_id: str) -> bool:
        with self._conn.cursor() as cur:
            cur.execute(
                "SELECT 1 FROM suppressed_users WHERE user_hash = %s", (user_hash(user_id),)
            )
            return cur.fetchone() is not None

    def record_deletion(self, user_id: str, actor: str, removed: dict[str, int]) -> dict:
        record = _audit_record(user_id, actor, removed)
        with self._conn.cursor() as cur:
            cur.execute(
                "INSERT INTO deletion_audit (deletion_id, user_hash, actor, deleted_at, removed) "
                "VALUES (%(deletion_id)s, %(user_hash)s, %(actor)s, %(deleted_at)s, %(removed)s)",
                record,
            )
        return record

    def deletion_audit(self) -> pl.DataFrame:
        with self._conn.cursor() as cur:
            cur.execute(f"SELECT {', '.join(AUDIT_SCHEMA)} FROM deletion_audit ORDER BY deleted_at")
            rows = cur.fetchall()
        return pl.DataFrame(rows, schema=AUDIT_SCHEMA, orient="row")

    def delete_events_before(self, timestamp: int) -> int:
        self.delete_impressions_before(timestamp)
        with self._conn.cursor() as cur:
            cur.execute(f"DELETE FROM {self.table} WHERE timestamp < %s", (int(timestamp),))
            return cur.rowcount

    # -- batch recommendations ------------------------------------------------------------------

    def replace_recommendations(self, frame: pl.DataFrame) -> int:
        rows = _recommendation_rows(frame).with_columns(
            pl.col("generated_at").dt.epoch("us").truediv(1e6),
            pl.col("expires_at").dt.epoch("us").truediv(1e6),
        )
        buffer = io.BytesIO()
        rows.write_csv(buffer, include_header=False)
        columns = ", ".join(RECOMMENDATION_SCHEMA)
        # One transaction: readers see the previous lists until the commit, then the new ones.
        with self._conn.transaction(), self._conn.cursor() as cur:
            cur.execute(
                "CREATE TEMP TABLE _recs (user_id TEXT, item_id TEXT, rank INTEGER, "
                "score DOUBLE PRECISION, model_version TEXT, generated_at DOUBLE PRECISION, "
                "expires_at DOUBLE PRECISION) ON COMMIT DROP"
            )
            with cur.copy(f"COPY _recs ({columns}) FROM STDIN WITH (FORMAT csv)") as copy:
                copy.write(buffer.getvalue())
            cur.execute("DELETE FROM user_recommendations")
            cur.execute(
                f"INSERT INTO user_recommendations ({columns}) "
                "SELECT user_id, item_id, rank, score, model_version, to_timestamp(generated_at), "
                "to_timestamp(expires_at) FROM _recs"
            )
            return cur.rowcount

    def read_recommendations(
        self, user_id: str | None = None, now: float | None = None
    ) -> pl.DataFrame:
        where = "expires_at > to_timestamp(%s)"
        params: list = [_now_utc(now)]
        if user_id is not None:
            where += " AND user_id = %s"
            params.append(user_id)
        with self._conn.cursor() as cur:
            cur.execute(
                "SELECT user_id, item_id, rank, score, model_version, "
                "extract(epoch FROM generated_at)::float8, extract(epoch FROM expires_at)::float8 "
                f"FROM user_recommendations WHERE {where} ORDER BY user_id, score DESC",
                params,
            )
            rows = cur.fetchall()
        names = list(RECOMMENDATION_SCHEMA)
        frame = pl.DataFrame(
            rows,
            schema={**RECOMMENDATION_SCHEMA, "generated_at": pl.Float64, "expires_at": pl.Float64},
            orient="row",
        )
        return frame.with_columns(
            (pl.col(c) * 1e6).cast(pl.Int64).cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
            for c in ("generated_at", "expires_at")
        ).select(names)

    def relabel_recommendations(self, model_version: str, new_version: str) -> int:
        with self._conn.cursor() as cur:
            cur.execute(
                "UPDATE user_recommendations SET model_version = %s WHERE model_version = %s",
                (new_version, model_version),
            )
            return cur.rowcount

    def delete_expired_recommendations(self, now: float | None = None) -> int:
        with self._conn.cursor() as cur:
            cur.execute(
                "DELETE FROM user_recommendations WHERE expires_at <= to_timestamp(%s)",
                (_now_utc(now),),
            )
            return cur.rowcount

    def close(self) -> None:
        self._conn.close()
