"""The event contract in one place: schema, limits, the vectorised parse-and-check shared by file
import (training.data) and POST /events (serving), and event identity (event_id)."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

EVENT_TYPES: tuple[str, ...] = (
    "view",
    "click",
    "add_to_cart",
    "purchase",
    "like",
    "share",
    "rating",
)
EVENT_TYPE_DTYPE = pl.Enum(list(EVENT_TYPES))
MAX_ID_LENGTH = 256

# What training reads. The stored record (stream, event store) adds `context` and the
# attribution fields `request_id` (the answer the event follows) and `position` (the item's 0-based
# rank in that answer): RECORD_SCHEMA.
EVENT_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.String(),
    "item_id": pl.String(),
    "event_type": EVENT_TYPE_DTYPE,
    "timestamp": pl.Int64(),
    "value": pl.Float64(),
    "session_id": pl.String(),
    "event_id": pl.String(),
}
RECORD_SCHEMA: dict[str, pl.DataType] = {
    **EVENT_SCHEMA,
    "context": pl.String(),
    "request_id": pl.String(),
    "position": pl.Int32(),
}
# An impression: one answer of /recommend, /similar_items, /popular or /trending as served (the
# `recommendation_logs` table). `items`, `scores` and `sources` are parallel lists in answer
# order (an item's position is its index); `sources` names the generators behind each item
# (`als+coview`) or, outside /recommend, the list it came from. `timestamp` is epoch seconds
# with fractions; `context` is the request's context as JSON text.
IMPRESSION_SCHEMA: dict[str, pl.DataType] = {
    "request_id": pl.String(),
    "user_id": pl.String(),
    "timestamp": pl.Float64(),
    "route": pl.String(),
    "items": pl.List(pl.String()),
    "scores": pl.List(pl.Float64()),
    "sources": pl.List(pl.String()),
    "variant": pl.String(),
    "experiment": pl.String(),
    "model_version": pl.String(),
    "latency_ms": pl.Float64(),
    "status": pl.String(),
    "cached": pl.Boolean(),
    "context": pl.String(),
}
IMPRESSION_ROUTES = ("/recommend", "/similar_items", "/popular", "/trending")
REQUIRED_EVENT_COLUMNS = ("user_id", "item_id", "event_type", "timestamp")
OPTIONAL_EVENT_COLUMNS = ("value", "session_id", "event_id", "context", "request_id", "position")

# Confidence of each event type (a rating counts as its value), shared by the trained models and
# the live features so that both weigh behaviour alike.
DEFAULT_EVENT_WEIGHTS: dict[str, float] = {
    "view": 1.0,
    "click": 3.0,
    "add_to_cart": 5.0,
    "purchase": 10.0,
    "like": 4.0,
    "share": 6.0,
}
# C0 controls, DEL and C1 controls: never part of an id (they break logs, CSV and key parsing).
CONTROL_CHARACTERS = r"[\x00-\x1f\x7f-\x9f]"
# Earliest accepted event time (2000-01-01 UTC): older values are almost always unit mistakes.
EARLIEST_TIMESTAMP = 946_684_800
DEFAULT_MAX_FUTURE_SECONDS = 300.0
# Ratings: 0..10 covers 1-5 stars, 0-5 and 0-10 scales; anything else is a client bug.
DEFAULT_RATING_RANGE = (0.0, 10.0)
# Quantities (the value of any other event type): positive, at most this many units.
DEFAULT_MAX_QUANTITY = 1_000_000.0
# The optional `context` object (device, page, free keys): small, flat and JSON.
MAX_CONTEXT_KEYS = 20
MAX_CONTEXT_KEY_LENGTH = 64
MAX_CONTEXT_VALUE_LENGTH = 256
MAX_CONTEXT_BYTES = 1024
# The largest `position` accepted: far beyond any answer (at most 100 items) or page a client
# shows, and within Int32.
MAX_POSITION = 1_000_000

# Numbers at or above this are epoch milliseconds rather than seconds (year 5138 in seconds).
_MILLIS_THRESHOLD = 100_000_000_000
_ISO_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%z",
    "%Y-%m-%dT%H:%M:%S%z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d",
)
_STRING_FIELDS = (
    "user_id",
    "item_id",
    "event_type",
    "session_id",
    "event_id",
    "context",
    "request_id",
)
# Derived ids hash the canonical fields joined by a character no id may contain.
_SEPARATOR = "\x1f"
DERIVED_ID_PREFIX = "h2:"


@dataclass(frozen=True)
class EventLimits:
    """The configurable bounds of the contract; the defaults are the documented contract."""

    max_future_seconds: float = DEFAULT_MAX_FUTURE_SECONDS
    # Lowered only for a historical dataset known to be right (MovieLens 100k is 1997-98).
    earliest_timestamp: int = EARLIEST_TIMESTAMP
    rating_min: float = DEFAULT_RATING_RANGE[0]
    rating_max: float = DEFAULT_RATING_RANGE[1]
    max_quantity: float = DEFAULT_MAX_QUANTITY


# No configuration of the contract admits a value this large; a larger one (1e308) overflows the
# sums of every confidence it enters, so training leaves it out whatever the configured bounds.
MAX_SAFE_VALUE = 1e9


def value_is_safe(value: pl.Expr) -> pl.Expr:
    """True where the value is null, or finite and small enough to sum without overflow."""
    return value.is_null() | (value.is_finite() & (value.abs() <= MAX_SAFE_VALUE))


def value_is_valid(
    event_type: pl.Expr, value: pl.Expr, limits: EventLimits | None = None
) -> pl.Expr:
    """The value rule on typed columns: true where the value is null, or finite and within the
    rating range (ratings) or a positive quantity up to max_quantity (other types)."""
    limits = limits or EventLimits()
    rating = event_type.cast(pl.String) == "rating"
    in_range = (
        pl.when(rating)
        .then(value.is_between(limits.rating_min, limits.rating_max))
        .otherwise((value > 0) & (value <= limits.max_quantity))
    )
    return value.is_null() | (value.is_finite() & in_range)


@dataclass(frozen=True)
class Check:
    """One rule: the column it is about, a boolean expression true for bad rows, and why."""

    column: str
    bad: pl.Expr
    reason: str
    # When the column a row fails on is data (the first field that is not valid Unicode).
    column_expr: pl.Expr | None = None
    # A helper column whose text details the reason (why a context is invalid).
    detail: str | None = None

    def explained(self, frame: pl.DataFrame, row: int) -> str:
        """The reason for one failing row of `frame`, with its detail."""
        if self.detail is None:
            return self.reason
        return f"{self.reason}: {frame[self.detail][row]}"


@dataclass(frozen=True)
class CheckedEvents:
    """Raw events with their parsed helper columns and the contract's checks over them: `bad`
    per row, the first reason of each bad row, and the valid rows in RECORD_SCHEMA."""

    frame: pl.DataFrame  # the raw columns plus parsed helper columns (`_type`, `_ts_us`, ...)
    checks: list[Check]
    bad_expr: pl.Expr
    reason_expr: pl.Expr

    @property
    def bad(self) -> pl.Series:
        return self.frame.select(self.bad_expr.alias("bad"))["bad"]

    def reasons(self, rows: pl.Series | None = None) -> pl.Series:
        """`column: reason` of the first failed check of each row (of the rows `rows` selects),
        null for valid rows."""
        frame = self.frame if rows is None else self.frame.filter(rows)
        return frame.select(self.reason_expr.alias("reason"))["reason"]

    def failed(self, row: int) -> list[Check]:
        """The checks row `row` fails, in order."""
        masks = self.frame.slice(row, 1).select(
            c.bad.fill_null(False).alias(f"_c{i}") for i, c in enumerate(self.checks)
        )
        return [c for i, c in enumerate(self.checks) if masks[f"_c{i}"][0]]

    def valid(self, keep: pl.Series | None = None) -> pl.DataFrame:
        """The rows passing every check (or the rows `keep` selects) in RECORD_SCHEMA."""
        frame = self.frame.filter(~self.bad if keep is None else keep)
        return with_event_ids(
            frame.select(
                pl.col("user_id").str.strip_chars(),
                pl.col("item_id").str.strip_chars(),
                pl.col("_type").cast(EVENT_TYPE_DTYPE).alias("event_type"),
                # Whole seconds are stored; the derived id keeps the microseconds given.
                (pl.col("_ts_us").cast(pl.Int64) // 1_000_000).alias("timestamp"),
                pl.col("_value").alias("value"),
                _blank_to_null(pl.col("session_id")).alias("session_id"),
                _blank_to_null(pl.col("event_id")).alias("event_id"),
                pl.col("_context").alias("context"),
                _blank_to_null(pl.col("request_id").str.strip_chars()).alias("request_id"),
                pl.col("_position").cast(pl.Int32).alias("position"),
                pl.col("_ts_us").cast(pl.Int64).alias("_ts_us"),
            )
        )


def _first_reason(checks: list[Check]) -> pl.Expr:
    if not checks:
        return pl.lit(None, dtype=pl.String)

    def message(check: Check) -> pl.Expr:
        column = pl.lit(check.column) if check.column_expr is None else check.column_expr
        text = column + pl.lit(f": {check.reason}")
        return text if check.detail is None else text + pl.lit(": ") + pl.col(check.detail)

    first, *rest = checks
    expr = pl.when(first.bad.fill_null(False)).then(message(first))
    for check in rest:
        expr = expr.when(check.bad.fill_null(False)).then(message(check))
    return expr.otherwise(pl.lit(None, dtype=pl.String))


def _blank_to_null(col: pl.Expr) -> pl.Expr:
    return pl.when(col.str.strip_chars() == "").then(None).otherwise(col)


def _id_checks(name: str, required: bool) -> list[Check]:
    col = pl.col(name)
    checks = (
        [Check(name, col.is_null() | (col.str.strip_chars() == ""), "missing")] if required else []
    )
    return [
        *checks,
        Check(name, col.str.len_chars() > MAX_ID_LENGTH, f"longer than {MAX_ID_LENGTH} characters"),
        Check(name, col.str.contains(CONTROL_CHARACTERS), "contains control characters"),
    ]


def _iso_microseconds(text: pl.Expr) -> pl.Expr:
    """ISO-8601 text (with an offset, else UTC) to epoch microseconds; null if not ISO-8601."""
    cleaned = text.str.strip_chars().str.replace(r"Z$", "+00:00")
    parsed = [
        cleaned.str.strptime(pl.Datetime("us", "UTC"), fmt, strict=False)
        if "%z" in fmt
        else cleaned.str.strptime(pl.Datetime("us"), fmt, strict=False).dt.replace_time_zone("UTC")
        for fmt in _ISO_FORMATS
    ]
    return pl.coalesce(parsed).dt.epoch("us").cast(pl.Float64)


def _timestamp_exprs(default_us: float | None) -> list[pl.Expr]:
    """`_ts_given` and `_ts_us` (Float64 epoch microseconds) from a numeric timestamp, or the
    default when none is given; null for text that is not a number (see `_with_iso`)."""
    text = pl.col("timestamp").str.strip_chars()
    given = text.is_not_null() & (text != "")
    number = text.cast(pl.Float64, strict=False)
    from_number = (
        pl.when(number.abs() >= _MILLIS_THRESHOLD).then(number * 1e3).otherwise(number * 1e6)
    )
    parsed = pl.when(number.is_finite()).then(from_number.round())
    ts_us = parsed if default_us is None else pl.when(given).then(parsed).otherwise(default_us)
    return [given.alias("_ts_given"), ts_us.alias("_ts_us")]


def _with_iso(frame: pl.DataFrame) -> pl.DataFrame:
    """Fill `_ts_us` of the given timestamps that are not numbers from ISO-8601.

    ISO parsing is costly (eight formats): only for those rows, usually none.
    """
    text_rows = frame["_ts_given"] & frame["_ts_us"].is_null()
    n_text = int(text_rows.sum())
    if n_text == 0:
        return frame
    if n_text == frame.height:
        return frame.with_columns(_iso_microseconds(pl.col("timestamp")).alias("_ts_us"))
    indexed = frame.select(pl.int_range(pl.len(), dtype=pl.UInt32).alias("_row"), "timestamp")
    parsed = indexed.filter(text_rows).select(
        "_row", _iso_microseconds(pl.col("timestamp")).alias("_iso")
    )
    iso = indexed.join(parsed, on="_row", how="left", maintain_order="left")["_iso"]
    return frame.with_columns(pl.coalesce(pl.col("_ts_us"), pl.lit(iso)).alias("_ts_us"))


def _utc_date(epoch_seconds: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(epoch_seconds))


def context_problem(context: object) -> str | None:
    """Why a decoded `context` breaks the contract (a flat JSON object, bounded), or None."""
    if not isinstance(context, dict):
        return "not a JSON object"
    if len(context) > MAX_CONTEXT_KEYS:
        return f"more than {MAX_CONTEXT_KEYS} keys"
    for key, value in context.items():
        if not key or len(key) > MAX_CONTEXT_KEY_LENGTH:
            return f"keys must be 1 to {MAX_CONTEXT_KEY_LENGTH} characters"
        if value is not None and not isinstance(value, str | int | float | bool):
            return f"value of {key[:40]!r} is not a string, number, boolean or null"
        if isinstance(value, float) and not math.isfinite(value):
            return f"value of {key[:40]!r} is not a finite number"
        if isinstance(value, str) and len(value) > MAX_CONTEXT_VALUE_LENGTH:
            return f"value of {key[:40]!r} is longer than {MAX_CONTEXT_VALUE_LENGTH} characters"
    return None


def canonical_context(context: Mapping[str, object]) -> str:
    """The stored (and hashed) text of a context: compact JSON, keys sorted."""
    return json.dumps(context, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def _with_context(frame: pl.DataFrame) -> pl.DataFrame:
    """Add `_context` (canonical JSON text) and `_context_problem` (a reason or null) to file
    input: parsed once per distinct value, a Python call each, never on the /events path (where
    the request schema checked the shape and the text is canonical already).
    """
    distinct = frame["context"].drop_nulls().unique().to_list()
    texts, problems = [], []
    for raw in distinct:
        text, problem = None, None
        try:
            decoded = json.loads(raw) if raw.strip() else None
        except ValueError:
            decoded, problem = None, "not valid JSON"
        if decoded is not None and problem is None:
            problem = context_problem(decoded)
            text = None if problem else canonical_context(decoded)
        texts.append(text)
        problems.append(problem)
    return frame.with_columns(
        pl.col("context")
        .replace_strict(distinct, texts, default=None, return_dtype=pl.String)
        .alias("_context"),
        pl.col("context")
        .replace_strict(distinct, problems, default=None, return_dtype=pl.String)
        .alias("_context_problem"),
    )


def check_events(
    raw: pl.DataFrame,
    now: float,
    limits: EventLimits | None = None,
    missing_timestamp_is_now: bool = False,
    context_is_canonical: bool = False,
) -> CheckedEvents:
    """Evaluate every rule of the contract on raw events, all at once.

    `raw` has the contract's columns as text (`value` may be Float64; optional columns may be
    absent). Ids: present, at most MAX_ID_LENGTH characters, no control characters. Event type
    one of EVENT_TYPES. Timestamp: epoch seconds, epoch milliseconds or ISO-8601, not before
    `limits.earliest_timestamp` (2000-01-01) and at most `limits.max_future_seconds` after
    `now`. Value: finite; a rating's within the rating range, any other a positive quantity up
    to `limits.max_quantity`.
    Context: a flat JSON object of at most MAX_CONTEXT_BYTES bytes. request_id: an id like the
    others, optional. Position: an integer 0..MAX_POSITION, optional.
    """
    limits = limits or EventLimits()
    absent = [
        pl.lit(None, dtype=pl.String).alias(name)
        for name in (*REQUIRED_EVENT_COLUMNS, *OPTIONAL_EVENT_COLUMNS, "_unicode")
        if name not in raw.columns
    ]
    frame = raw.with_columns(absent) if absent else raw
    not_text = [
        pl.col(c).cast(pl.String)
        for c, dtype in frame.schema.items()
        if c not in ("value", "position") and dtype != pl.String
    ]
    if not_text:
        frame = frame.with_columns(not_text)
    value_given = pl.col("value").is_not_null()
    if frame.schema["value"] == pl.String:
        value_text = pl.col("value").str.strip_chars()
        value_given = value_given & (value_text != "")
        value = pl.when(value_given).then(value_text.cast(pl.Float64, strict=False))
        not_number = value_given & value.is_null()
    else:
        value = pl.col("value").cast(pl.Float64)
        not_number = pl.lit(False)
    position, position_not_integer = _position_exprs(frame.schema["position"])
    # A missing timestamp is now to the second (as the service always did): a retry of the same
    # id-less batch within that second derives the same ids.
    default_us = math.floor(now) * 1e6 if missing_timestamp_is_now else None
    canonical = context_is_canonical or frame["context"].null_count() == frame.height
    frame = frame.with_columns(
        pl.col("event_type").str.strip_chars().str.to_lowercase().alias("_type"),
        value.alias("_value"),
        not_number.alias("_value_not_number"),
        position.alias("_position"),
        position_not_integer.alias("_position_not_integer"),
        *_timestamp_exprs(default_us),
        *(
            [pl.col("context").alias("_context"), pl.lit(None, pl.String).alias("_context_problem")]
            if canonical
            else []
        ),
    )
    frame = _with_iso(frame)
    if not canonical:
        frame = _with_context(frame)
    frame = frame.with_columns(pl.lit((now + limits.max_future_seconds) * 1e6).alias("_latest_us"))
    return CheckedEvents(frame, *_contract(limits))


def _position_exprs(dtype: pl.DataType) -> tuple[pl.Expr, pl.Expr]:
    """`_position` (Int64, null when not given) and whether a given position is not an integer,
    from text (a file) or numbers (JSON: an integer beyond 64 bits arrives as text)."""
    col = pl.col("position")
    if dtype == pl.String:
        text = col.str.strip_chars()
        given = text.is_not_null() & (text != "")
        number = text.cast(pl.Int64, strict=False)
        # Digits beyond 64 bits are an integer out of range, not "not an integer".
        huge = number.is_null() & text.str.contains(r"^[+-]?\d+$")
        parsed = pl.when(given).then(
            pl.when(huge).then(pl.lit(MAX_POSITION + 1, pl.Int64)).otherwise(number)
        )
        return parsed, given & parsed.is_null()
    if dtype.is_float():
        integral = col.is_finite() & (col == col.round()) & (col.abs() < 2**53)
        parsed = pl.when(integral).then(col.cast(pl.Int64, strict=False))
        return parsed, col.is_not_null() & parsed.is_null()
    return col.cast(pl.Int64, strict=False), pl.lit(False)


@functools.lru_cache(maxsize=8)
def _contract(limits: EventLimits) -> tuple[list[Check], pl.Expr, pl.Expr]:
    """The checks over check_events' helper columns, whether a row fails any, and the first
    reason: built once per limits (building polars expressions costs more than running them on
    a 500-event batch)."""
    ts, val, etype = pl.col("_ts_us"), pl.col("_value"), pl.col("_type")
    rating = etype == "rating"
    checks = [
        # A string no encoder accepts (a lone surrogate from JSON "\ud800") was blanked out before
        # polars saw it; its reason names the field.
        Check(
            "_unicode",
            pl.col("_unicode").is_not_null(),
            "not valid Unicode (a lone surrogate)",
            column_expr=pl.col("_unicode"),
        ),
        *_id_checks("user_id", required=True),
        *_id_checks("item_id", required=True),
        Check("event_type", etype.is_null() | (etype == ""), "missing"),
        Check(
            "event_type",
            etype.is_not_null() & (etype != "") & ~etype.is_in(list(EVENT_TYPES)),
            f"unknown event_type; expected one of {', '.join(EVENT_TYPES)}",
        ),
        Check("timestamp", ts.is_null(), "not epoch seconds, epoch milliseconds or ISO-8601"),
        Check(
            "timestamp",
            ts < limits.earliest_timestamp * 1e6,
            f"before {_utc_date(limits.earliest_timestamp)}",
        ),
        Check(
            "timestamp",
            ts > pl.col("_latest_us"),
            f"more than {limits.max_future_seconds:g} s in the future",
        ),
        Check("value", pl.col("_value_not_number"), "not a number"),
        Check("value", val.is_not_null() & ~val.is_finite(), "not a finite number"),
        Check("value", rating & val.is_null(), "a rating event needs a numeric value"),
        Check(
            "value",
            rating & ((val < limits.rating_min) | (val > limits.rating_max)),
            f"a rating must be within {limits.rating_min:g}..{limits.rating_max:g}",
        ),
        Check(
            "value",
            ~rating & ((val <= 0) | (val > limits.max_quantity)),
            f"a quantity must be above 0 and at most {limits.max_quantity:g}",
        ),
        *_id_checks("session_id", required=False),
        *_id_checks("event_id", required=False),
        *_id_checks("request_id", required=False),
        Check("position", pl.col("_position_not_integer"), "not an integer"),
        Check(
            "position",
            (pl.col("_position") < 0) | (pl.col("_position") > MAX_POSITION),
            f"must be within 0..{MAX_POSITION}",
        ),
        Check(
            "context",
            pl.col("_context_problem").is_not_null(),
            "invalid",
            detail="_context_problem",
        ),
        Check(
            "context",
            pl.col("_context").str.len_bytes() > MAX_CONTEXT_BYTES,
            f"larger than {MAX_CONTEXT_BYTES} bytes as JSON",
        ),
    ]
    bad = pl.any_horizontal([c.bad.fill_null(False) for c in checks])
    return checks, bad, _first_reason(checks)


_RECORD_RAW_SCHEMA = {
    "user_id": pl.String,
    "item_id": pl.String,
    "event_type": pl.String,
    "timestamp": pl.String,
    "value": pl.Float64,
    "session_id": pl.String,
    "event_id": pl.String,
    "request_id": pl.String,
    "position": pl.Int64,
}


def frame_from_records(records: Sequence[Mapping[str, object]]) -> pl.DataFrame:
    """Raw events (JSON-decoded dicts) as a frame of the contract's raw columns.

    A string no encoder accepts (JSON `"\\ud800"` decodes to a lone surrogate) cannot enter
    polars or Redis: that field becomes null and `_unicode` names it, so the event is rejected
    with a reason and the rest of the batch goes on.
    """
    contexts = [r.get("context") for r in records]
    has_context = any(c is not None for c in contexts)
    context = (
        [None if c is None else canonical_context(c) for c in contexts] if has_context else None
    )
    try:
        # The common case, in one call: polars reads the dicts (numbers become timestamp text).
        frame = pl.from_dicts(records, schema=_RECORD_RAW_SCHEMA, strict=False)
        if context is not None:
            frame = frame.with_columns(pl.Series("context", context, dtype=pl.String))
        return frame
    except (UnicodeEncodeError, OverflowError, TypeError, pl.exceptions.PolarsError):
        pass  # a lone surrogate or an integer beyond 64 bits: field by field below
    columns: dict[str, list] = {
        name: [r.get(name) for r in records] for name in _STRING_FIELDS if name != "context"
    }
    columns["timestamp"] = [
        t if t is None or isinstance(t, str) else repr(t)
        for t in (r.get("timestamp") for r in records)
    ]
    columns["context"] = context or [None] * len(records)
    # Text, so an integer beyond 64 bits is refused by the contract with a reason (not nulled).
    columns["position"] = [
        p if p is None or isinstance(p, str) else repr(p)
        for p in (r.get("position") for r in records)
    ]
    unicode: list[str | None] = [None] * len(records)
    series = []
    for name, values in columns.items():
        try:
            series.append(pl.Series(name, values, dtype=pl.String))
        except UnicodeEncodeError:
            for row, text in enumerate(values):
                if text is not None and not _encodable(text):
                    values[row] = None
                    unicode[row] = unicode[row] or name
            series.append(pl.Series(name, values, dtype=pl.String))
    values = [r.get("value") for r in records]
    series.append(pl.Series("value", values, dtype=pl.Float64, strict=False))
    series.append(pl.Series("_unicode", unicode, dtype=pl.String))
    return pl.DataFrame(series)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _stable_digest(texts: pl.Series) -> pl.Series:
    """blake2b-128 hex of each text: stable across versions and machines, unlike polars `hash`.

    hashlib runs per value (about 0.6 us each: 3 s for 5M imported rows, 0.3 ms per 500-event
    batch); polars has no documented-stable hash to do it natively.
    """
    digest = [hashlib.blake2b(t.encode(), digest_size=16).hexdigest() for t in texts.to_list()]
    return pl.Series(texts.name, digest, dtype=pl.String)


def with_event_ids(frame: pl.DataFrame) -> pl.DataFrame:
    """Fill missing event_id with a stable hash of the whole event.

    The hash covers user, item, type, timestamp (to the microsecond given, from `_ts_us` when
    present, else whole seconds), value, session and context: two different events never share
    an id, and re-importing the same file gives the same ids (so the stores dedupe it).
    """
    missing = frame["event_id"].is_null() if "event_id" in frame.columns else None
    if missing is None:
        frame = frame.with_columns(pl.lit(None, dtype=pl.String).alias("event_id"))
        missing = frame["event_id"].is_null()
    if not missing.any():
        return frame.drop("_ts_us", strict=False)
    ts_us = pl.col("_ts_us") if "_ts_us" in frame.columns else pl.col("timestamp") * 1_000_000
    context = pl.col("context") if "context" in frame.columns else pl.lit(None, dtype=pl.String)
    canonical = frame.filter(missing).select(
        pl.concat_str(
            [
                pl.col("user_id"),
                pl.col("item_id"),
                pl.col("event_type").cast(pl.String),
                ts_us.cast(pl.Int64).cast(pl.String),
                pl.col("value").cast(pl.String).fill_null(""),
                pl.col("session_id").fill_null(""),
                context.fill_null(""),
            ],
            separator=_SEPARATOR,
        ).alias("key")
    )["key"]
    derived = DERIVED_ID_PREFIX + _stable_digest(canonical)
    ids = frame["event_id"].to_numpy().astype(object)
    ids[missing.to_numpy()] = derived.to_numpy()
    return frame.with_columns(pl.Series("event_id", ids, dtype=pl.String)).drop(
        "_ts_us", strict=False
    )


def empty_impressions() -> pl.DataFrame:
    """An empty frame of impressions (IMPRESSION_SCHEMA)."""
    return pl.DataFrame(schema=IMPRESSION_SCHEMA)


def empty_records() -> pl.DataFrame:
    """An empty frame of the stored record (RECORD_SCHEMA)."""
    return pl.DataFrame(schema=RECORD_SCHEMA)


@dataclass(frozen=True)
class CheckedBatch:
    """An /events batch checked: the valid events (RECORD_SCHEMA, event_id filled), the request
    index of each, and (index, reason) of every rejected one."""

    events: pl.DataFrame
    indices: np.ndarray
    rejected: list[dict[str, object]]


def check_batch(
    records: Sequence[Mapping[str, object]], now: float, limits: EventLimits | None = None
) -> CheckedBatch:
    """Check JSON-decoded events as POST /events receives them (a missing timestamp is now)."""
    checked = check_events(
        frame_from_records(records),
        now,
        limits,
        missing_timestamp_is_now=True,
        context_is_canonical=True,
    )
    bad = checked.bad
    rejected: list[dict[str, object]] = []
    if bad.any():
        # The reasons (a long when/then chain) only for the rejected rows.
        rejected = (
            pl.DataFrame({"index": bad.arg_true(), "reason": checked.reasons(bad)})
            .cast({"index": pl.Int64})
            .to_dicts()
        )
    return CheckedBatch(checked.valid(~bad), (~bad).arg_true().to_numpy(), rejected)
