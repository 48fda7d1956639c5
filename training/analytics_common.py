"""What the trend analysis and the segmentation share: their vocabularies (segment names, trend
types) and the reference time ("now") an analysis ends at."""

from __future__ import annotations

import time
from datetime import datetime

import polars as pl

# Kept out of segments.py and trends.py (which import them from here) so that the data generator,
# whose ground truth uses these names, does not import sklearn and scipy with them.
SEGMENTS: tuple[str, ...] = (
    "browser",
    "buyer",
    "researcher",
    "impulse_buyer",
    "loyal_customer",
    "price_sensitive",
)
"""Behavioural segments, and the archetypes the generator draws users from."""
TREND_TYPES: tuple[str, ...] = ("stable", "rising", "falling", "volatile")
"""Trend types of items and categories, and the trends the generator gives items."""
SEGMENT_SCORES: tuple[str, ...] = (
    "segment",
    "r_score",
    "f_score",
    "m_score",
    "rfm",
    "engagement",
    "churn_risk",
    "lifetime_value",
)
"""A user's scores: the segmentation's leading columns, and fields of the pushed profile."""
PREFERENCES: tuple[str, ...] = (
    "top_categories",
    "top_brands",
    "price_low",
    "price_high",
    "preferred_hour",
    "daypart",
    "device",
)
"""A user's preferences the segmentation derives (those it can: device needs a context)."""


def reference_time(
    events: pl.DataFrame,
    now: datetime | float | None = None,
    *,
    not_after_wall_clock: bool = True,
) -> int:
    """End of an analysis in epoch seconds: `now` when given, else the newest event (the wall
    clock when there is none).

    With `not_after_wall_clock` (the assets and `recsys trends`/`segments`) the newest event
    counts only up to the wall clock, so events stamped in the future by a wrong clock cannot
    drag the window along; the pure analyses called without `now` take the newest event as is.
    """
    if isinstance(now, datetime):
        return int(now.timestamp())
    if now is not None:
        return int(now)
    wall = int(time.time())
    if events.is_empty():
        return wall
    newest = int(events["timestamp"].max())  # type: ignore[arg-type]
    return min(newest, wall) if not_after_wall_clock else newest
