"""Readers and validation for the event and catalog contracts (CSV, Parquet, MovieLens 100k).

Every reader returns a polars frame in the canonical schema below. Malformed rows raise a
`DataValidationError` naming the first bad rows (line, column, reason) unless `skip_invalid`
is set, in which case they are dropped and counted in the returned `LoadResult`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from training.events import (
    CONTROL_CHARACTERS,
    EVENT_SCHEMA,
    EVENT_TYPE_DTYPE,
    EVENT_TYPES,
    MAX_ID_LENGTH,
    OPTIONAL_EVENT_COLUMNS,
    RECORD_SCHEMA,
    REQUIRED_EVENT_COLUMNS,
    EventLimits,
    check_events,
    with_event_ids,
)

CATALOG_SCHEMA: dict[str, pl.DataType] = {
    "item_id": pl.String(),
    "title": pl.String(),
    "category": pl.String(),
    "brand": pl.String(),
    "price": pl.Float64(),
    "in_stock": pl.Boolean(),
}

_TRUE = ("true", "1", "yes", "y", "t")
_FALSE = ("false", "0", "no", "n", "f")
_SHOWN_PROBLEMS = 5


class DataValidationError(ValueError):
    """Raised when an input file breaks the contract; the message names the first bad rows."""

    def __init__(self, message: str, problems: list[RowProblem] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


@dataclass(frozen=True)
class RowProblem:
    """One bad row: its 1-based line in the file (header is line 1), the column and why."""

    line: int
    column: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}, column {self.column}: {self.reason}"


@dataclass
class LoadResult:
    """A validated frame plus how many rows were dropped (only with `skip_invalid`)."""

    frame: pl.DataFrame
    skipped: int = 0
    problems: list[RowProblem] = field(default_factory=list)


def _read_raw(path: Path) -> pl.DataFrame:
    """Read a CSV or Parquet file with every column as a string, so validation sees raw text."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            frame = pl.read_parquet(path)
            return frame.with_columns(pl.all().cast(pl.String))
        return pl.read_csv(path, infer_schema=False)
    except pl.exceptions.PolarsError as exc:
        raise DataValidationError(f"{path}: cannot be parsed as {suffix or 'CSV'}: {exc}") from exc


def _bad_id(col: pl.Expr) -> pl.Expr:
    return col.is_null() | (col.str.strip_chars() == "")


def _id_reason(name: str) -> list[tuple[str, pl.Expr, str]]:
    col = pl.col(name)
    return [
        (name, _bad_id(col), "missing"),
        (name, col.str.len_chars() > MAX_ID_LENGTH, f"longer than {MAX_ID_LENGTH} characters"),
        (name, col.str.contains(CONTROL_CHARACTERS), "contains control characters"),
    ]


def _collect_problems(
    frame: pl.DataFrame, checks: list[tuple[str, pl.Expr, str]]
) -> tuple[pl.Series, list[RowProblem]]:
    """Evaluate every check at once; return the per-row 'bad' mask and the first problems."""
    masks = frame.select(
        [expr.fill_null(False).alias(f"_c{i}") for i, (_, expr, _) in enumerate(checks)]
    )
    bad = masks.select(pl.any_horizontal(pl.all()).alias("bad"))["bad"]
    problems: list[RowProblem] = []
    if bad.any():
        first_rows = bad.arg_true().head(_SHOWN_PROBLEMS).to_list()
        for row in first_rows:
            for i, (column, _, reason) in enumerate(checks):
                if masks[f"_c{i}"][row]:
                    value = frame[column][row] if column in frame.columns else None
                    shown = "" if value is None else f" ({str(value)[:40]!r})"
                    problems.append(RowProblem(row + 2, column, reason + shown))
    return bad, problems


def _raise_or_drop(
    source: str, frame: pl.DataFrame, bad: pl.Series, problems: list[RowProblem], skip: bool
) -> tuple[pl.DataFrame, int]:
    n_bad = int(bad.sum())
    if n_bad == 0:
        return frame, 0
    if not skip:
        listed = "\n  ".join(str(p) for p in problems)
        raise DataValidationError(
            f"{source}: {n_bad} invalid row(s) out of {frame.height}; the first:\n  {listed}\n"
            "Fix the file or pass --skip-invalid to drop these rows.",
            problems,
        )
    return frame.filter(~bad), n_bad


def validate_events(
    raw: pl.DataFrame,
    source: str = "events",
    skip_invalid: bool = False,
    now: float | None = None,
    limits: EventLimits | None = None,
    keep_context: bool = False,
) -> LoadResult:
    """Validate raw string columns against the event contract (training.events) and cast them
    to EVENT_SCHEMA (RECORD_SCHEMA, with `context` and the attribution fields `request_id` and
    `position`, when `keep_context`: what a store keeps).

    `now` (default: the clock) and `limits` bound timestamps and values as on POST /events.
    """
    missing = [c for c in REQUIRED_EVENT_COLUMNS if c not in raw.columns]
    if missing:
        raise DataValidationError(
            f"{source}: missing column(s) {', '.join(missing)}; expected at least "
            f"{', '.join(REQUIRED_EVENT_COLUMNS)} (optional: {', '.join(OPTIONAL_EVENT_COLUMNS)}); "
            f"found {', '.join(raw.columns) or 'none'}"
        )
    known = [c for c in (*REQUIRED_EVENT_COLUMNS, *OPTIONAL_EVENT_COLUMNS) if c in raw.columns]
    frame = raw.select(pl.col(c).cast(pl.String) for c in known)
    checked = check_events(frame, time.time() if now is None else now, limits)
    bad = checked.bad
    problems: list[RowProblem] = []
    for row in bad.arg_true().head(_SHOWN_PROBLEMS).to_list():
        for check in checked.failed(row):
            value = checked.frame[check.column][row]
            shown = "" if value is None else f" ({str(value)[:40]!r})"
            reason = check.explained(checked.frame, row)
            problems.append(RowProblem(row + 2, check.column, reason + shown))
    _, skipped = _raise_or_drop(source, frame, bad, problems, skip_invalid)
    valid = checked.valid()
    return LoadResult(
        valid if keep_context else valid.select(list(EVENT_SCHEMA)),
        skipped,
        problems if skipped else [],
    )


def load_events(
    path: str | Path,
    skip_invalid: bool = False,
    keep_context: bool = False,
    limits: EventLimits | None = None,
) -> LoadResult:
    """Read and validate an events CSV or Parquet file (with `context` when `keep_context`)."""
    path = Path(path)
    return validate_events(
        _read_raw(path), str(path), skip_invalid, limits=limits, keep_context=keep_context
    )


def read_events(path: str | Path, skip_invalid: bool = False) -> pl.DataFrame:
    """Read and validate an events file, or a MovieLens 100k folder; return the canonical frame."""
    path = Path(path)
    if path.is_dir():
        return read_movielens(path)[0]
    return load_events(path, skip_invalid).frame


def empty_events() -> pl.DataFrame:
    """An empty frame with the canonical event schema."""
    return pl.DataFrame(schema=EVENT_SCHEMA)


# Re-exported: callers import the contract from here as well as from training.events.
__all__ = [
    "EVENT_SCHEMA",
    "EVENT_TYPES",
    "EVENT_TYPE_DTYPE",
    "MAX_ID_LENGTH",
    "RECORD_SCHEMA",
    "with_event_ids",
]


def validate_catalog(
    raw: pl.DataFrame, source: str = "catalog", skip_invalid: bool = False
) -> LoadResult:
    """Validate raw string columns against the catalog contract and cast to CATALOG_SCHEMA."""
    if "item_id" not in raw.columns:
        raise DataValidationError(
            f"{source}: missing column item_id; found {', '.join(raw.columns) or 'none'}"
        )
    frame = raw.with_columns(pl.col(c).cast(pl.String) for c in raw.columns)
    for optional in CATALOG_SCHEMA:
        if optional not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=pl.String).alias(optional))
    frame = frame.select(list(CATALOG_SCHEMA))
    price_text = pl.col("price").str.strip_chars()
    price = price_text.cast(pl.Float64, strict=False)
    stock = pl.col("in_stock").str.strip_chars().str.to_lowercase()
    checks = [
        *_id_reason("item_id"),
        ("price", price_text.is_not_null() & (price_text != "") & price.is_null(), "not a number"),
        ("price", price < 0, "negative"),
        (
            "in_stock",
            stock.is_not_null() & (stock != "") & ~stock.is_in([*_TRUE, *_FALSE]),
            "not a boolean (true/false, 1/0, yes/no)",
        ),
    ]
    bad, problems = _collect_problems(frame, checks)
    frame, skipped = _raise_or_drop(source, frame, bad, problems, skip_invalid)
    frame = frame.with_columns(
        pl.col("item_id").str.strip_chars(),
        price.alias("price"),
        pl.when(stock.is_in(list(_FALSE))).then(False).otherwise(True).alias("in_stock"),
    ).unique("item_id", keep="last", maintain_order=True)
    return LoadResult(frame, skipped, problems if skipped else [])


def load_catalog(path: str | Path, skip_invalid: bool = False) -> LoadResult:
    """Read and validate an item catalog CSV or Parquet file."""
    path = Path(path)
    return validate_catalog(_read_raw(path), str(path), skip_invalid)


def read_catalog(path: str | Path, skip_invalid: bool = False) -> pl.DataFrame:
    """Read and validate a catalog file, or the u.item of a MovieLens 100k folder."""
    path = Path(path)
    if path.is_dir():
        return read_movielens(path)[1]
    return load_catalog(path, skip_invalid).frame


def empty_catalog() -> pl.DataFrame:
    """An empty frame with the canonical catalog schema."""
    return pl.DataFrame(schema=CATALOG_SCHEMA)


MOVIELENS_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)


def read_movielens(folder: str | Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Read a MovieLens 100k folder (`u.data`, `u.item`) as (events, catalog).

    Each rating becomes a `rating` event whose value is the star rating; the catalog's category
    is the film's first listed genre.
    """
    folder = Path(folder)
    data = folder / "u.data"
    if not data.exists():
        raise FileNotFoundError(f"{folder}: not a MovieLens 100k folder (no u.data)")
    ratings = pl.read_csv(
        data,
        separator="\t",
        has_header=False,
        new_columns=["user_id", "item_id", "value", "timestamp"],
        schema_overrides={"user_id": pl.String, "item_id": pl.String},
    )
    events = ratings.select(
        pl.col("user_id"),
        pl.col("item_id"),
        pl.lit("rating").cast(EVENT_TYPE_DTYPE).alias("event_type"),
        pl.col("timestamp").cast(pl.Int64),
        pl.col("value").cast(pl.Float64),
        pl.lit(None, dtype=pl.String).alias("session_id"),
        ("ml-" + pl.col("user_id") + "-" + pl.col("item_id")).alias("event_id"),
    )
    item_path = folder / "u.item"
    if not item_path.exists():
        return events, empty_catalog()
    lines = item_path.read_bytes().decode("latin-1")
    raw = pl.DataFrame({"line": lines.splitlines()}).filter(pl.col("line") != "")
    parts = raw.select(pl.col("line").str.split("|").alias("p"))
    genre_flags = pl.concat_list(
        [pl.col("p").list.get(5 + i) == "1" for i in range(len(MOVIELENS_GENRES))]
    )
    catalog = parts.select(
        pl.col("p").list.get(0).alias("item_id"),
        pl.col("p").list.get(1).alias("title"),
        genre_flags.list.arg_max().alias("_g"),
        genre_flags.list.any().alias("_any"),
    ).select(
        "item_id",
        "title",
        pl.when(pl.col("_any"))
        .then(
            pl.col("_g").replace_strict(list(range(len(MOVIELENS_GENRES))), list(MOVIELENS_GENRES))
        )
        .otherwise(pl.lit("unknown"))
        .alias("category"),
        pl.lit(None, dtype=pl.String).alias("brand"),
        pl.lit(None, dtype=pl.Float64).alias("price"),
        pl.lit(True).alias("in_stock"),
    )
    return events, catalog
