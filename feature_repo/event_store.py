"""The event store: every accepted event, deduplicated by event_id, in PostgreSQL or Parquet.

Events are stored as RECORD_SCHEMA (the contract and its optional `context`, JSON text); stores
written before `context` existed are read (Parquet) or migrated (PostgreSQL) in place.

Beside the events each store keeps the governance tables: the suppression list of forgotten users
(by `user_hash`, never the raw id), the `deletion_audit` and the batch `user_recommendations`.

`open_event_store(url)` picks the backend by URL: `postgresql://...` for PostgreSQL, otherwise a
folder of Parquet parts (the embedded default under RECSYS_HOME).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from config import redact_url
from training.data import EVENT_SCHEMA, empty_events
from training.events import RECORD_SCHEMA, empty_records, with_event_ids

_INGESTED = "ingested_at"
# What a part holds; older parts lack `context` and read with a null one.
_PART_SCHEMA = {**RECORD_SCHEMA, _INGESTED: pl.Float64()}

# The suppression list and the audit name a person by this digest, not by the id: a table kept
# forever about people who asked to be forgotten should not list them in clear, while a DPO can
# still answer "was user X deleted, when, by whom?" by hashing X. It is a pseudonym (guessable ids
# can be hashed and compared), not anonymisation. PostgreSQL computes the same digest in SQL.
_HASH_PREFIX = "recsys-user:"
_SQL_USER_HASH = "encode(sha256(convert_to('" + _HASH_PREFIX + "' || {col}, 'UTF8')), 'hex')"

SUPPRESSION_SCHEMA = {"user_hash": pl.String(), "suppressed_at": pl.Float64()}
AUDIT_SCHEMA = {
    "deletion_id": pl.String(),
    "user_hash": pl.String(),
    "actor": pl.String(),
    "deleted_at": pl.Float64(),
    "removed": pl.String(),  # JSON: counts per part (events, user_recommendations, redis_keys)
}
_UTC = pl.Datetime("us", "UTC")
RECOMMENDATION_SCHEMA = {
    "user_id": pl.String(),
    "item_id": pl.String(),
    "rank": pl.Int32(),
    "score": pl.Float64(),
    "model_version": pl.String(),
    "generated_at": _UTC,
    "expires_at": _UTC,
}


def user_hash(user_id: str) -> str:
    """The digest that names a user in the suppression list and the deletion audit."""
    return hashlib.sha256((_HASH_PREFIX + user_id).encode()).hexdigest()


def user_hashes(user_ids: pl.Series) -> pl.Series:
    """`user_hash` of each id; hashes each distinct id once (hashlib has no vector form)."""
    distinct = user_ids.unique()
    digests = pl.Series("user_hash", [user_hash(u) for u in distinct.to_list()], pl.String)
    lookup = pl.DataFrame({"user_id": distinct, "user_hash": digests})
    return user_ids.to_frame("user_id").join(lookup, on="user_id", how="left")["user_hash"]


def without_users(events: pl.DataFrame, suppressed: pl.Series) -> pl.DataFrame:
    """`events` minus those of users whose hash is in `suppressed`."""
    if events.is_empty() or suppressed.is_empty():
        return events
    return events.filter(~user_hashes(events["user_id"]).is_in(suppressed.implode()))


@dataclass(frozen=True)
class UserDeletion:
    """What `delete_users` removed: counts per part and the ids of the deleted events (so the
    Redis dedupe markers of those events can go too)."""

    events: int
    user_recommendations: int
    event_ids: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"events": self.events, "user_recommendations": self.user_recommendations}


def _recommendation_rows(frame: pl.DataFrame) -> pl.DataFrame:
    """A batch list in RECOMMENDATION_SCHEMA, refusing one that breaks unique (user, item)."""
    missing = [c for c in RECOMMENDATION_SCHEMA if c not in frame.columns]
    if missing:
        raise ValueError(f"user_recommendations needs the columns {missing}")
    rows = frame.select([pl.col(n).cast(t) for n, t in RECOMMENDATION_SCHEMA.items()])
    if rows.select("user_id", "item_id").is_duplicated().any():
        raise ValueError("user_recommendations: an item is listed twice for one user")
    return rows


def _now_utc(now: float | None) -> float:
    return time.time() if now is None else now


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

    # -- forgetting users and retention ---------------------------------------------------------

    @abstractmethod
    def delete_users(self, user_ids: Iterable[str]) -> UserDeletion:
        """Suppress the users (first, so nothing of theirs is stored again), then delete their
        events and batch recommendations; idempotent."""

    @abstractmethod
    def suppressed(self) -> pl.Series:
        """The `user_hash` of every forgotten user."""

    def is_suppressed(self, user_id: str) -> bool:
        """Whether the user was forgotten."""
        return bool(self.suppressed().is_in([user_hash(user_id)]).any())

    @abstractmethod
    def record_deletion(self, user_id: str, actor: str, removed: dict[str, int]) -> dict:
        """Append a `deletion_audit` record (hashing the id) and return it."""

    @abstractmethod
    def deletion_audit(self) -> pl.DataFrame:
        """Every deletion record, oldest first, in AUDIT_SCHEMA."""

    @abstractmethod
    def delete_events_before(self, timestamp: int) -> int:
        """Delete events with timestamp < `timestamp` (retention); return how many."""

    # -- batch recommendations (`user_recommendations`) -----------------------------------------

    @abstractmethod
    def replace_recommendations(self, frame: pl.DataFrame) -> int:
        """Replace the whole table with a model version's lists in one step; readers see the old
        or the new lists, never a mix. Returns the rows written."""

    @abstractmethod
    def read_recommendations(
        self, user_id: str | None = None, now: float | None = None
    ) -> pl.DataFrame:
        """Unexpired rows (of one user, or all), by user and score descending."""

    @abstractmethod
    def delete_expired_recommendations(self, now: float | None = None) -> int:
        """Delete rows whose expires_at has passed; return how many."""

    @abstractmethod
    def relabel_recommendations(self, model_version: str, new_version: str) -> int:
        """Rename the rows' `model_version` (the registry numbers a version only once the lists
        are written); returns the rows relabelled."""

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
    """Embedded store: immutable Parquet parts in a folder, compacted when they pile up.

    Writers (append, compact, deletion, retention) take turns under an exclusive file lock, so
    a deletion never races a compaction that would write the deleted events back. A part is
    never edited: its replacement is written aside and renamed in, then the old part removed,
    so a crash at any point leaves every accepted event in some part (readers dedupe by
    event_id). The governance tables are single Parquet files beside the parts, each replaced by
    a rename.
    """

    def __init__(self, root: str | Path, compact_after: int = 64) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.compact_after = compact_after
        self._suppression = self.root / "suppressed_users.parquet"
        self._audit = self.root / "deletion_audit.parquet"
        self._recommendations = self.root / "user_recommendations.parquet"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.root / ".write.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

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
        with self._locked():
            batch = without_users(batch, self.suppressed())
            scan = self._scan()
            if scan is not None and not batch.is_empty():
                known = scan.select("event_id").collect()
                batch = batch.join(known, on="event_id", how="anti")
            if batch.is_empty():
                return 0
            batch = batch.with_columns(pl.lit(time.time()).alias(_INGESTED))
            self._write_part(batch)
            if len(self._parts()) > self.compact_after:
                self._compact()
        return batch.height

    def _write_part(self, frame: pl.DataFrame) -> Path:
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.root / f".{name}.tmp"
        frame.write_parquet(tmp)
        final = self.root / name
        os.replace(tmp, final)
        return final

    def _replace_file(self, path: Path, frame: pl.DataFrame) -> None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        frame.write_parquet(tmp)
        os.replace(tmp, path)

    def compact(self) -> None:
        """Rewrite all parts as one; readers dedupe by event_id, so concurrent reads stay right."""
        with self._locked():
            self._compact()

    def _compact(self) -> None:
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

    def _rewrite_parts(self, drop: pl.Expr) -> pl.DataFrame:
        """Rewrite each part holding rows matching `drop` without them (new part renamed in,
        then the old removed); returns the event ids removed."""
        removed = []
        for part in self._parts():
            frame = pl.read_parquet(part)
            for name, dtype in _PART_SCHEMA.items():
                if name not in frame.columns:
                    frame = frame.with_columns(pl.lit(None, dtype=dtype).alias(name))
            gone = frame.filter(drop)
            if gone.is_empty():
                continue
            kept = frame.filter(~drop)
            if not kept.is_empty():
                self._write_part(kept.select(list(_PART_SCHEMA)))
            part.unlink()
            removed.append(gone.select("event_id"))
        if not removed:
            return pl.DataFrame(schema={"event_id": pl.String()})
        return pl.concat(removed).unique()

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

    # -- forgetting users and retention ---------------------------------------------------------

    def delete_users(self, user_ids: Iterable[str]) -> UserDeletion:
        ids = sorted(set(user_ids))
        if not ids:
            return UserDeletion(0, 0)
        with self._locked():
            known = self._read_or_empty(self._suppression, SUPPRESSION_SCHEMA)
            new = pl.DataFrame(
                {"user_hash": [user_hash(u) for u in ids], "suppressed_at": time.time()},
                schema=SUPPRESSION_SCHEMA,
            )
            merged = pl.concat([known, new]).unique("user_hash", keep="first", maintain_order=True)
            if merged.height > known.height:
                self._replace_file(self._suppression, merged)
            gone = self._rewrite_parts(pl.col("user_id").is_in(ids))
            recs = self._read_or_empty(self._recommendations, RECOMMENDATION_SCHEMA)
            mine = recs["user_id"].is_in(ids)
            removed_recs = int(mine.sum())
            if removed_recs:
                self._replace_file(self._recommendations, recs.filter(~mine))
        return UserDeletion(gone.height, removed_recs, gone["event_id"].to_list())

    @staticmethod
    def _read_or_empty(path: Path, schema: dict) -> pl.DataFrame:
        return pl.read_parquet(path) if path.exists() else pl.DataFrame(schema=schema)

    def suppressed(self) -> pl.Series:
        return self._read_or_empty(self._suppression, SUPPRESSION_SCHEMA)["user_hash"]

    def record_deletion(self, user_id: str, actor: str, removed: dict[str, int]) -> dict:
        record = _audit_record(user_id, actor, removed)
        with self._locked():
            audit = self._read_or_empty(self._audit, AUDIT_SCHEMA)
            row = pl.DataFrame([record], schema=AUDIT_SCHEMA)
            self._replace_file(self._audit, pl.concat([audit, row]))
        return record

    def deletion_audit(self) -> pl.DataFrame:
        return self._read_or_empty(self._audit, AUDIT_SCHEMA).sort("deleted_at")

    def delete_events_before(self, timestamp: int) -> int:
        with self._locked():
            return self._rewrite_parts(pl.col("timestamp") < int(timestamp)).height

    # -- batch recommendations ------------------------------------------------------------------

    def replace_recommendations(self, frame: pl.DataFrame) -> int:
        rows = _recommendation_rows(frame).sort("user_id", "score", descending=[False, True])
        with self._locked():
            self._replace_file(self._recommendations, rows)
        return rows.height

    def read_recommendations(
        self, user_id: str | None = None, now: float | None = None
    ) -> pl.DataFrame:
        if not self._recommendations.exists():
            return pl.DataFrame(schema=RECOMMENDATION_SCHEMA)
        cutoff = pl.from_epoch(pl.lit(_now_utc(now)), time_unit="s").dt.replace_time_zone("UTC")
        scan = pl.scan_parquet(self._recommendations).filter(pl.col("expires_at") > cutoff)
        if user_id is not None:
            scan = scan.filter(pl.col("user_id") == user_id)
        return scan.sort("user_id", "score", descending=[False, True]).collect()

    def relabel_recommendations(self, model_version: str, new_version: str) -> int:
        with self._locked():
            recs = self._read_or_empty(self._recommendations, RECOMMENDATION_SCHEMA)
            mine = recs["model_version"] == model_version
            count = int(mine.sum())
            if count:
                relabelled = recs.with_columns(
                    pl.when(mine)
                    .then(pl.lit(new_version))
                    .otherwise(pl.col("model_version"))
                    .alias("model_version")
                )
                self._replace_file(self._recommendations, relabelled)
            return count

    def delete_expired_recommendations(self, now: float | None = None) -> int:
        with self._locked():
            if not self._recommendations.exists():
                return 0
            recs = pl.read_parquet(self._recommendations)
            cutoff = pl.from_epoch(pl.lit(_now_utc(now)), time_unit="s").dt.replace_time_zone("UTC")
            expired = recs.select((pl.col("expires_at") <= cutoff).sum()).item()
            if expired:
                self._replace_file(
                    self._recommendations, recs.filter(pl.col("expires_at") > cutoff)
                )
            return int(expired)


def _audit_record(user_id: str, actor: str, removed: dict[str, int]) -> dict:
    if not actor or not actor.strip():
        raise ValueError("a deletion needs an actor (who asked for it)")
    return {
        "deletion_id": uuid.uuid4().hex,
        "user_hash": user_hash(user_id),
        "actor": actor.strip(),
        "deleted_at": time.time(),
        "removed": json.dumps(removed, sort_keys=True),
    }


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
        # Two processes starting at once would race on CREATE ... IF NOT EXISTS (a duplicate
        # key in pg_type): the schema is created by one at a time.
        with self._conn.transaction(), self._conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('recsys-event-store-schema'))")
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
        return UserDeletion(len(event_ids), recs, event_ids)

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


def open_event_store(url: str | None, home: str | Path) -> EventStore:
    """The store for a URL: PostgreSQL for `postgresql://`, else Parquet under `home/events`."""
    if url and url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        return PostgresEventStore(url)
    if url:
        return ParquetEventStore(Path(url.removeprefix("file://")))
    return ParquetEventStore(Path(home) / "events")
