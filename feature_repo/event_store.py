"""The event store contract: every accepted event, deduplicated by event_id, behind one ABC.

Events are stored as RECORD_SCHEMA (the contract, its optional `context`, JSON text, and the
attribution fields `request_id` and `position`); stores written before those existed are read
(Parquet) or migrated (PostgreSQL) in place.

Beside the events each store keeps the impressions (`recommendation_logs`, IMPRESSION_SCHEMA:
one row per answer served, idempotent on request_id) and the governance tables: the suppression
list of forgotten users (by `user_hash`, never the raw id), the `deletion_audit` and the batch
`user_recommendations`.

This module holds what both backends share: the `EventStore` ABC, the schemas of the governance
tables, the user digest and the batch helpers. The backends live beside it, in
`event_store_parquet.py` (`ParquetEventStore`) and `event_store_postgres.py`
(`PostgresEventStore`); both names import from here too, loaded on first use.

`open_event_store(url)` picks the backend by URL: `postgresql://...` for PostgreSQL, otherwise a
folder of Parquet parts (the embedded default under RECSYS_HOME).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from training.events import IMPRESSION_SCHEMA, RECORD_SCHEMA, with_event_ids

if TYPE_CHECKING:
    from feature_repo.event_store_parquet import ParquetEventStore
    from feature_repo.event_store_postgres import PostgresEventStore

__all__ = [
    "AUDIT_SCHEMA",
    "RECOMMENDATION_SCHEMA",
    "SUPPRESSION_SCHEMA",
    "EventStore",
    "ParquetEventStore",
    "PostgresEventStore",
    "UserDeletion",
    "open_event_store",
    "user_hash",
    "user_hashes",
    "without_users",
]

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
    recommendation_logs: int = 0

    def counts(self) -> dict[str, int]:
        return {
            "events": self.events,
            "user_recommendations": self.user_recommendations,
            "recommendation_logs": self.recommendation_logs,
        }


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

    # -- impressions (`recommendation_logs`) -----------------------------------------------------

    @abstractmethod
    def append_impressions(self, impressions: pl.DataFrame) -> int:
        """Store the impressions (IMPRESSION_SCHEMA; absent columns are null) whose request_id
        is new, leaving out those of forgotten users; return how many were inserted."""

    @abstractmethod
    def read_impressions(
        self, since: float | None = None, until: float | None = None
    ) -> pl.DataFrame:
        """Stored impressions with since <= timestamp < until (either bound optional), oldest
        first, in IMPRESSION_SCHEMA."""

    @abstractmethod
    def delete_impressions_before(self, timestamp: float) -> int:
        """Delete impressions with timestamp < `timestamp` (retention); return how many."""

    # -- forgetting users and retention ---------------------------------------------------------

    @abstractmethod
    def delete_users(self, user_ids: Iterable[str]) -> UserDeletion:
        """Suppress the users (first, so nothing of theirs is stored again), then delete their
        events, impressions and batch recommendations; idempotent."""

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
        """Delete events and impressions with timestamp < `timestamp` (retention); return how
        many events (`delete_impressions_before` counts the impressions)."""

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


def _prepare_impressions(impressions: pl.DataFrame) -> pl.DataFrame:
    """IMPRESSION_SCHEMA columns and types, rows without a request_id dropped, one row per
    request_id (the first)."""
    frame = impressions
    absent = [
        pl.lit(None, dtype=dtype).alias(name)
        for name, dtype in IMPRESSION_SCHEMA.items()
        if name not in frame.columns
    ]
    if absent:
        frame = frame.with_columns(absent)
    frame = frame.select([pl.col(n).cast(t) for n, t in IMPRESSION_SCHEMA.items()])
    return frame.filter(pl.col("request_id").is_not_null()).unique(
        "request_id", keep="first", maintain_order=True
    )


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


_POSTGRES_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")


def event_store_kind(url: str | None) -> str:
    """The backend a URL selects (see `open_event_store`): `postgresql` or `parquet`."""
    return "postgresql" if url and url.startswith(_POSTGRES_SCHEMES) else "parquet"


def open_event_store(url: str | None, home: str | Path) -> EventStore:
    """The store for a URL: PostgreSQL for `postgresql://`, else Parquet under `home/events`."""
    from feature_repo.event_store_parquet import ParquetEventStore
    from feature_repo.event_store_postgres import PostgresEventStore

    if event_store_kind(url) == "postgresql":
        return PostgresEventStore(url)
    if url:
        return ParquetEventStore(Path(url.removeprefix("file://")))
    return ParquetEventStore(Path(home) / "events")


# The backends import this module, so it names them lazily (PEP 562): importing either backend
# module first, or this one, never meets a half-initialised module.
_BACKENDS = {
    "ParquetEventStore": "feature_repo.event_store_parquet",
    "PostgresEventStore": "feature_repo.event_store_postgres",
}


def __getattr__(name: str) -> object:
    if name in _BACKENDS:
        import importlib

        return getattr(importlib.import_module(_BACKENDS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
