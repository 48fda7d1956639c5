"""`recsys trends` and `recsys segments`: the analytics assets' computation (training/trends.py,
training/segments.py) on files, as CSV."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import polars as pl

from training.data import DataValidationError


def _print(text: str) -> None:
    print(text, flush=True)


def read_inputs(args: argparse.Namespace) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """The events (a CSV/Parquet file or a MovieLens 100k folder) and the optional catalog.

    Malformed rows raise DataValidationError unless --skip-invalid; so does a file without events.
    """
    from training.data import load_catalog, load_events, read_movielens

    path = Path(args.events)
    catalog: pl.DataFrame | None = None
    if path.is_dir():
        events, movielens_catalog = read_movielens(path)
        catalog = movielens_catalog if movielens_catalog.height else None
        skipped = 0
    else:
        loaded = load_events(path, skip_invalid=args.skip_invalid)
        events, skipped = loaded.frame, loaded.skipped
    if events.is_empty():
        raise DataValidationError(f"{path}: no valid events to analyse")
    _print(
        f"read {events.height} events of {events['user_id'].n_unique()} users and "
        f"{events['item_id'].n_unique()} items from {path}"
        + (f" ({skipped} invalid rows skipped)" if skipped else "")
    )
    if args.catalog:
        loaded_catalog = load_catalog(args.catalog, skip_invalid=args.skip_invalid)
        catalog = loaded_catalog.frame
        _print(
            f"read {catalog.height} catalog items from {args.catalog}"
            + (
                f" ({loaded_catalog.skipped} invalid rows skipped)"
                if loaded_catalog.skipped
                else ""
            )
        )
    return events, catalog


def csv_ready(frame: pl.DataFrame) -> pl.DataFrame:
    """List and struct columns JSON-encoded (nulls stay empty), so the frame fits a CSV."""
    nested = [name for name, dtype in frame.schema.items() if dtype.is_nested()]
    return frame.with_columns(
        pl.Series(
            name,
            [None if v is None else json.dumps(v) for v in frame[name].to_list()],
            dtype=pl.String,
        )
        for name in nested
    )


def _write(frame: pl.DataFrame, out: str | Path) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    csv_ready(frame).write_csv(path)
    return path


def _spinner(text: str) -> Any:
    from rich.console import Console

    return Console(stderr=True).status(text)


def cmd_trends(args: argparse.Namespace) -> int:
    """Write one row per item (and optionally per category) of the `trend_analysis` asset."""
    from training.trends import TREND_TYPES, TrendConfig, compute_trends, trend_summary

    events, catalog = read_inputs(args)
    started = time.perf_counter()
    with _spinner(f"analysing trends of {events.height} events"):
        result = compute_trends(events, catalog, TrendConfig())
    summary = trend_summary(result)
    counts = ", ".join(f"{t} {int(summary[f'items_{t}'])}" for t in TREND_TYPES)
    _print(
        f"analysed {result.items.height} items and {result.categories.height} categories over "
        f"{result.window_days} days in {time.perf_counter() - started:.1f}s: {counts}; "
        f"{int(summary['bursts'])} bursts"
    )
    if result.dropped_future or result.dropped_old:
        _print(
            f"left out {result.dropped_future} events stamped in the future and "
            f"{result.dropped_old} older than the window"
        )
    _print(f"wrote {result.items.height} items to {_write(result.items, args.out)}")
    if args.categories_out:
        path = _write(result.categories, args.categories_out)
        _print(f"wrote {result.categories.height} categories to {path}")
    return 0


def cmd_segments(args: argparse.Namespace) -> int:
    """Write one row per user of the `user_segments` asset (lists as JSON)."""
    from training.segments import SegmentConfig, compute_segments, segment_profile

    events, catalog = read_inputs(args)
    started = time.perf_counter()
    with _spinner(f"segmenting the users of {events.height} events"):
        result = compute_segments(events, catalog, SegmentConfig())
    profile = segment_profile(result.users)
    shares = ", ".join(
        f"{s} {v:.0%}" for s, v in zip(profile["segment"], profile["share"], strict=True)
    )
    _print(
        f"segmented {result.users.height} users in {time.perf_counter() - started:.1f}s: {shares}"
    )
    if result.dropped_future:
        _print(f"left out {result.dropped_future} events stamped in the future")
    _print(f"wrote {result.users.height} users to {_write(result.users, args.out)}")
    return 0


def _add_inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--events", required=True, help="events CSV/Parquet, or a MovieLens 100k folder"
    )
    parser.add_argument("--catalog", help="item catalog CSV/Parquet (categories, brands, prices)")
    parser.add_argument("--skip-invalid", action="store_true", help="drop malformed rows (counted)")


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add `trends` and `segments` to the `recsys` command line."""
    p = subparsers.add_parser(
        "trends", help="trend type, strength, confidence, forecast per item, as CSV"
    )
    _add_inputs(p)
    p.add_argument("--out", required=True, help="output CSV, one row per item")
    p.add_argument("--categories-out", help="also write one row per category to this CSV")
    p.set_defaults(func=cmd_trends)

    p = subparsers.add_parser(
        "segments", help="segment, RFM, engagement, churn risk, LTV per user, as CSV"
    )
    _add_inputs(p)
    p.add_argument("--out", required=True, help="output CSV, one row per user")
    p.set_defaults(func=cmd_segments)
