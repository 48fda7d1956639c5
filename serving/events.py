"""Per-event checks of an /events batch, vectorised in polars: valid events in the contract's
schema with event ids filled, and the index and reason of every rejected one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from training.data import EVENT_SCHEMA, EVENT_TYPES, MAX_ID_LENGTH, with_event_ids

_RAW_SCHEMA = {
    "user_id": pl.String,
    "item_id": pl.String,
    "event_type": pl.String,
    "timestamp": pl.String,
    "value": pl.Float64,
    "session_id": pl.String,
    "event_id": pl.String,
}
# Epoch values at or above this are milliseconds (the same rule as training.data).
_MILLIS_THRESHOLD = 100_000_000_000
# Earliest accepted event time (2000-01-01): older values are almost always unit mistakes.
_EARLIEST = 946_684_800
_ISO_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%z",
    "%Y-%m-%dT%H:%M:%S%z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%d",
)
_CONTROL = r"[\x00-\x1f\x7f]"


@dataclass(frozen=True)
class CheckedBatch:
    """The valid events (canonical schema, event_id filled) and (index, reason) of the others."""

    events: pl.DataFrame
    rejected: list[dict[str, object]]


def _from_number(text: pl.Expr) -> pl.Expr:
    """Epoch seconds or milliseconds as text to Int64 epoch seconds; null if not a number."""
    number = text.str.strip_chars().cast(pl.Float64, strict=False)
    seconds = pl.when(number.abs() >= _MILLIS_THRESHOLD).then(number / 1000).otherwise(number)
    return pl.when(seconds.is_finite()).then(seconds.floor()).cast(pl.Int64, strict=False)


def _from_iso(text: pl.Expr) -> pl.Expr:
    """ISO-8601 text (offset or UTC assumed) to Int64 epoch seconds; null if not ISO-8601."""
    cleaned = text.str.strip_chars().str.replace(r"Z$", "+00:00")
    parsed = [
        cleaned.str.strptime(pl.Datetime("us", "UTC"), fmt, strict=False)
        if "%z" in fmt
        else cleaned.str.strptime(pl.Datetime("us"), fmt, strict=False).dt.replace_time_zone("UTC")
        for fmt in _ISO_FORMATS
    ]
    return pl.coalesce(parsed).dt.epoch("s")


def _id_problem(name: str, required: bool) -> pl.Expr:
    col = pl.col(name)
    blank = col.is_null() | (col.str.strip_chars() == "")
    checks = [
        (col.str.len_chars() > MAX_ID_LENGTH, f"{name}: longer than {MAX_ID_LENGTH} characters"),
        (col.str.contains(_CONTROL), f"{name}: contains control characters"),
    ]
    expr = pl.when(blank).then(pl.lit(f"{name}: missing")) if required else None
    for cond, reason in checks:
        guarded = cond.fill_null(False)
        expr = (
            pl.when(guarded).then(pl.lit(reason))
            if expr is None
            else expr.when(guarded).then(pl.lit(reason))
        )
    return expr.otherwise(pl.lit(None, dtype=pl.String))


def check_events(
    raw: Sequence[dict[str, object]], now: float, max_future_seconds: float
) -> CheckedBatch:
    """Validate raw events (dicts of str/float/None) against the contract, all at once.

    A missing timestamp means now; timestamps more than `max_future_seconds` ahead of `now` or
    before 2000 are rejected, as are unknown event types, missing or malformed ids and ratings
    without a value. Unknown item ids are fine: new items appear through events.
    """
    frame = pl.from_dicts(list(raw), schema=_RAW_SCHEMA).with_row_index("index")
    has_ts = pl.col("timestamp").is_not_null() & (pl.col("timestamp").str.strip_chars() != "")
    frame = frame.with_columns(
        pl.col("event_type").str.strip_chars().str.to_lowercase().alias("_type"),
        has_ts.alias("_has_ts"),
        _from_number(pl.col("timestamp")).alias("_ts"),
    )
    # ISO parsing is costly: only for the rows whose timestamp is not a number.
    text_rows = frame["_has_ts"] & frame["_ts"].is_null()
    if text_rows.any():
        iso = frame.filter(text_rows).select("index", _from_iso(pl.col("timestamp")).alias("_iso"))
        frame = frame.join(iso, on="index", how="left", maintain_order="left").with_columns(
            pl.coalesce("_ts", "_iso").alias("_ts")
        )
    frame = frame.with_columns(
        pl.when(pl.col("_has_ts")).then(pl.col("_ts")).otherwise(pl.lit(int(now))).alias("_ts")
    )
    limit = int(now + max_future_seconds)
    reason = pl.coalesce(
        _id_problem("user_id", required=True),
        _id_problem("item_id", required=True),
        pl.when(pl.col("_type").is_null() | (pl.col("_type") == ""))
        .then(pl.lit("event_type: missing"))
        .when(~pl.col("_type").is_in(list(EVENT_TYPES)))
        .then(pl.lit(f"event_type: unknown; expected one of {', '.join(EVENT_TYPES)}"))
        .when(pl.col("_ts").is_null())
        .then(pl.lit("timestamp: not epoch seconds, epoch milliseconds or ISO-8601"))
        .when(pl.col("_ts") > limit)
        .then(pl.lit(f"timestamp: more than {int(max_future_seconds)} s in the future"))
        .when(pl.col("_ts") < _EARLIEST)
        .then(pl.lit("timestamp: before 2000-01-01"))
        .when((pl.col("_type") == "rating") & pl.col("value").is_null())
        .then(pl.lit("value: a rating event needs a numeric value")),
        _id_problem("event_id", required=False),
        _id_problem("session_id", required=False),
    ).alias("reason")
    frame = frame.with_columns(reason)
    bad = frame.filter(pl.col("reason").is_not_null())
    good = frame.filter(pl.col("reason").is_null()).select(
        pl.col("user_id").str.strip_chars(),
        pl.col("item_id").str.strip_chars(),
        pl.col("_type").cast(EVENT_SCHEMA["event_type"]).alias("event_type"),
        pl.col("_ts").alias("timestamp"),
        pl.col("value"),
        pl.col("session_id"),
        pl.when(pl.col("event_id").str.strip_chars() == "")
        .then(None)
        .otherwise(pl.col("event_id"))
        .alias("event_id"),
    )
    return CheckedBatch(with_event_ids(good), bad.select("index", "reason").to_dicts())
