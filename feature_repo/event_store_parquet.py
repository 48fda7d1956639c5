"""The embedded event store backend: Parquet parts in a folder (the default under RECSYS_HOME).

The contract (`EventStore`, the governance schemas, `user_hash`) is `feature_repo/event_store.py`;
import `ParquetEventStore` from there or from here.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import polars as pl

from feature_repo.event_store import (
    AUDIT_SCHEMA,
    RECOMMENDATION_SCHEMA,
    SUPPRESSION_SCHEMA,
    EventStore,
    UserDeletion,
    _audit_record,
    _now_utc,
    _prepare,
    _prepare_impressions,
    _recommendation_rows,
    user_hash,
    without_users,
)
from training.data import EVENT_SCHEMA, empty_events
from training.events import IMPRESSION_SCHEMA, RECORD_SCHEMA, empty_impressions, empty_records

_INGESTED = "ingested_at"
# What a part holds; older parts lack `context`, `request_id` or `position` and read with nulls.
_PART_SCHEMA = {**RECORD_SCHEMA, _INGESTED: pl.Float64()}
_IMPRESSION_PART_SCHEMA = {**IMPRESSION_SCHEMA, _INGESTED: pl.Float64()}


class ParquetEventStore(EventStore):
    """Embedded store: immutable Parquet parts in a folder, compacted when they pile up.

    Writers (append, compact, deletion, retention) take turns under an exclusive file lock, so
    a deletion never races a compaction that would write the deleted events back. A part is
    never edited: its replacement is written aside and renamed in, then the old part removed,
    so a crash at any point leaves every accepted event in some part (readers dedupe by
    event_id). Impressions are parts of their own, alike, in `recommendation_logs/` (deduped by
    request_id). The governance tables are single Parquet files beside the parts, each replaced by
    a rename.
    """

    def __init__(self, root: str | Path, compact_after: int = 64) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.compact_after = compact_after
        self._suppression = self.root / "suppressed_users.parquet"
        self._audit = self.root / "deletion_audit.parquet"
        self._recommendations = self.root / "user_recommendations.parquet"
        self._impressions = self.root / "recommendation_logs"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.root / ".write.lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _parts(self, folder: Path | None = None) -> list[Path]:
        return sorted((folder or self.root).glob("part-*.parquet"))

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

    def _write_part(self, frame: pl.DataFrame, folder: Path | None = None) -> Path:
        folder = folder or self.root
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = folder / f".{name}.tmp"
        frame.write_parquet(tmp)
        final = folder / name
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

    def _rewrite_parts(
        self,
        drop: pl.Expr,
        folder: Path | None = None,
        schema: dict[str, pl.DataType] = _PART_SCHEMA,
        key: str = "event_id",
    ) -> pl.DataFrame:
        """Rewrite each part (of events, or of `folder`) holding rows matching `drop` without
        them (new part renamed in, then the old removed); returns the keys removed."""
        removed = []
        # A null (an impression without a user) is not a match: kept, not lost from both sides.
        drop = drop.fill_null(False)
        for part in self._parts(folder):
            frame = pl.read_parquet(part)
            for name, dtype in schema.items():
                if name not in frame.columns:
                    frame = frame.with_columns(pl.lit(None, dtype=dtype).alias(name))
            gone = frame.filter(drop)
            if gone.is_empty():
                continue
            kept = frame.filter(~drop)
            if not kept.is_empty():
                self._write_part(kept.select(list(schema)), folder)
            part.unlink()
            removed.append(gone.select(key))
        if not removed:
            return pl.DataFrame(schema={key: pl.String()})
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

    # -- impressions ----------------------------------------------------------------------------

    def _scan_impressions(self) -> pl.LazyFrame | None:
        parts = self._parts(self._impressions) if self._impressions.exists() else []
        if not parts:
            return None
        return pl.scan_parquet(parts, schema=_IMPRESSION_PART_SCHEMA).unique(
            "request_id", keep="first", maintain_order=True
        )

    def append_impressions(self, impressions: pl.DataFrame) -> int:
        batch = _prepare_impressions(impressions)
        if batch.is_empty():
            return 0
        with self._locked():
            suppressed = self.suppressed()
            if not suppressed.is_empty():
                known_user = batch["user_id"].is_not_null()
                kept = without_users(batch.filter(known_user), suppressed)
                batch = pl.concat([kept, batch.filter(~known_user)])
            scan = self._scan_impressions()
            if scan is not None and not batch.is_empty():
                known = scan.select("request_id").collect()
                batch = batch.join(known, on="request_id", how="anti", maintain_order="left")
            if batch.is_empty():
                return 0
            self._impressions.mkdir(exist_ok=True)
            self._write_part(
                batch.with_columns(pl.lit(time.time()).alias(_INGESTED)), self._impressions
            )
            parts = self._parts(self._impressions)
            if len(parts) > self.compact_after:
                merged = self._scan_impressions().collect().sort("timestamp")
                self._write_part(merged, self._impressions)
                for part in parts:
                    part.unlink(missing_ok=True)
        return batch.height

    def read_impressions(
        self, since: float | None = None, until: float | None = None
    ) -> pl.DataFrame:
        scan = self._scan_impressions()
        if scan is None:
            return empty_impressions()
        if since is not None:
            scan = scan.filter(pl.col("timestamp") >= since)
        if until is not None:
            scan = scan.filter(pl.col("timestamp") < until)
        return scan.select(list(IMPRESSION_SCHEMA)).sort("timestamp", "request_id").collect()

    def delete_impressions_before(self, timestamp: float) -> int:
        with self._locked():
            return self._delete_impressions(pl.col("timestamp") < float(timestamp))

    def _delete_impressions(self, drop: pl.Expr) -> int:
        if not self._impressions.exists():
            return 0
        return self._rewrite_parts(
            drop, self._impressions, _IMPRESSION_PART_SCHEMA, "request_id"
        ).height

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
            logs = self._delete_impressions(pl.col("user_id").is_in(ids))
            recs = self._read_or_empty(self._recommendations, RECOMMENDATION_SCHEMA)
            mine = recs["user_id"].is_in(ids)
            removed_recs = int(mine.sum())
            if removed_recs:
                self._replace_file(self._recommendations, recs.filter(~mine))
        return UserDeletion(
            gone.height, removed_recs, gone["event_id"].to_list(), recommendation_logs=logs
        )

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
            self._delete_impressions(pl.col("timestamp") < float(timestamp))
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
