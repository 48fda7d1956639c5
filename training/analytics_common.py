"""What the trend analysis and the segmentation share: the reference time ("now") an analysis
ends at."""

from __future__ import annotations

import time
from datetime import datetime

import polars as pl


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
