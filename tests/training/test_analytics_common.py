"""The reference time of an analysis: given, the newest event, or the wall clock."""

import time
from datetime import UTC, datetime

import polars as pl

from tests.conftest import make_events
from training.analytics_common import reference_time


def _with_future_event(events: pl.DataFrame, ts: int) -> pl.DataFrame:
    late = events.head(1).with_columns(pl.lit(ts, dtype=pl.Int64).alias("timestamp"))
    return pl.concat([events, late])


def test_a_given_now_wins_as_epoch_seconds_or_datetime() -> None:
    events = make_events()
    assert reference_time(events, 1_700_000_123) == 1_700_000_123
    assert reference_time(events, 1_700_000_123.9) == 1_700_000_123
    moment = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert reference_time(events, moment) == int(moment.timestamp())


def test_newest_event_capped_at_the_wall_clock_only_when_asked() -> None:
    events = make_events()
    newest = int(events["timestamp"].max())
    assert reference_time(events) == reference_time(events, not_after_wall_clock=False) == newest
    wall = int(time.time())
    future = _with_future_event(make_events(), wall + 30 * 86_400)
    assert wall <= reference_time(future) <= wall + 60
    # The pure analyses called without `now` keep their own behaviour: the newest event as is.
    assert reference_time(future, not_after_wall_clock=False) == wall + 30 * 86_400


def test_no_events_means_the_wall_clock() -> None:
    empty = make_events().head(0)
    before = int(time.time())
    for cap in (True, False):
        assert before <= reference_time(empty, not_after_wall_clock=cap) <= int(time.time())
