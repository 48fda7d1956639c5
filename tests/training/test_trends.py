"""Trend analysis tests: known-answer series, robustness, agreement with generated truth."""

from __future__ import annotations

import time

import numpy as np
import polars as pl
import pytest

from tests.conftest import make_events
from training.data import EVENT_SCHEMA
from training.generate import generate
from training.trends import (
    TREND_TYPES,
    TrendConfig,
    analyze_trends,
    compute_trends,
    top_movers,
    trend_popularity_scores,
    trend_summary,
)

NOW = 1_800_000_000
DAY = 86_400


def _events(daily: dict[str, list[int] | np.ndarray], event_type: str = "view") -> pl.DataFrame:
    """Events from per-item daily counts (last entry = the day ending at NOW), one user each."""
    items, stamps, users = [], [], []
    for item, counts in daily.items():
        n_days = len(counts)
        for d, c in enumerate(counts):
            start = NOW - (n_days - d) * DAY
            for k in range(int(c)):
                items.append(item)
                stamps.append(start + 60 + (k * 997) % (DAY - 120))
                users.append(f"{item}-u{d}-{k}")
    n = len(items)
    return pl.DataFrame(
        {
            "user_id": users,
            "item_id": items,
            "event_type": [event_type] * n,
            "timestamp": stamps,
            "value": [None] * n,
            "session_id": [None] * n,
            "event_id": [f"e{i}" for i in range(n)],
        },
        schema=EVENT_SCHEMA,
    )


def _row(result_items: pl.DataFrame, item: str) -> dict:
    return result_items.filter(pl.col("item_id") == item).row(0, named=True)


@pytest.fixture(scope="module")
def known() -> pl.DataFrame:
    days = 60
    ramp = np.linspace(1, 30, days).round().astype(int)
    spikes = np.full(days, 2)
    spikes[[5, 19, 33, 47]] = 60
    return _events(
        {
            "rising": ramp,
            "falling": ramp[::-1],
            "stable": np.full(days, 15),
            "volatile": spikes,
            "single": [0] * (days - 10) + [1] + [0] * 9,
        }
    )


def test_known_trend_types(known: pl.DataFrame) -> None:
    catalog = pl.DataFrame({"item_id": ["zero"], "category": ["c"]})
    result = analyze_trends(known, catalog, now=NOW)
    items = result.items
    assert _row(items, "rising")["trend_type"] == "rising"
    assert _row(items, "rising")["predicted_direction"] == "up"
    assert _row(items, "rising")["strength"] > 0.6
    assert _row(items, "rising")["confidence"] > 0.9
    assert _row(items, "falling")["trend_type"] == "falling"
    assert _row(items, "falling")["predicted_direction"] == "down"
    assert _row(items, "stable")["trend_type"] == "stable"
    assert _row(items, "stable")["strength"] < 0.1
    assert _row(items, "volatile")["trend_type"] == "volatile"
    assert _row(items, "single")["trend_type"] == "stable"
    assert _row(items, "single")["confidence"] < 0.5
    # A catalog item without events: an all-zero series.
    zero = _row(items, "zero")
    assert zero["trend_type"] == "stable"
    assert zero["strength"] == 0.0
    assert zero["confidence"] == 0.0
    assert zero["n_events"] == 0
    assert zero["trend_score"] == 0.0
    assert items.select(pl.col("strength", "confidence").is_between(0, 1).all()).row(0) == (
        True,
        True,
    )


def test_velocity_compares_recent_with_prior(known: pl.DataFrame) -> None:
    items = analyze_trends(known, now=NOW).items
    assert _row(items, "rising")["velocity"] > 0.1
    assert _row(items, "falling")["velocity"] < -0.1
    assert abs(_row(items, "stable")["velocity"]) < 0.05
    # One event in the prior window and none in the recent one: finite and negative.
    assert _row(items, "single")["velocity"] == pytest.approx(np.log(1.0 / (1 / 7 + 1)))
    # No events in either window: 0, not NaN.
    catalog = pl.DataFrame({"item_id": ["zero"]})
    assert _row(analyze_trends(known, catalog, now=NOW).items, "zero")["velocity"] == 0.0


def test_event_type_weights_drive_velocity() -> None:
    base = _events({"a": [4] * 30})
    recent_buys = _events({"a": [0] * 23 + [2] * 7}, event_type="purchase")
    frame = pl.concat([base, recent_buys.with_columns(pl.col("user_id") + "-p")])
    plain = analyze_trends(frame, now=NOW).items
    unweighted = TrendConfig(event_weights={"view": 1.0, "purchase": 0.0})
    light = analyze_trends(frame, now=NOW, config=unweighted).items
    assert _row(plain, "a")["velocity"] > _row(light, "a")["velocity"]
    assert _row(plain, "a")["recent_score"] == pytest.approx(7 * 4 + 7 * 2 * 10)


def test_burst_flag_on_a_recent_spike() -> None:
    counts = [6] * 59 + [70]
    items = analyze_trends(_events({"viral": counts, "calm": [6] * 60}), now=NOW).items
    assert _row(items, "viral")["burst"] is True
    assert _row(items, "viral")["burst_z"] > 10
    assert _row(items, "calm")["burst"] is False


def test_weekly_seasonality_found_by_fourier() -> None:
    # Busy on one weekday: every 7th day carries most of the traffic.
    counts = np.full(63, 5)
    counts[np.arange(63) % 7 == 3] = 60
    items = analyze_trends(_events({"weekly": counts, "flat": np.full(63, 20)}), now=NOW).items
    weekly = _row(items, "weekly")
    assert weekly["weekly_seasonality"] > 0.8
    assert _row(items, "flat")["weekly_seasonality"] < 0.3
    bin_start = NOW - (63 - 3) * DAY
    assert weekly["weekly_peak_day"] == (((bin_start + DAY // 2) // DAY) + 3) % 7


def test_daily_seasonality_found_by_fourier() -> None:
    rows = []
    for d in range(20):
        for h in (19, 20, 21):
            ts = NOW - (d + 1) * DAY + h * 3600 - (NOW % DAY)
            rows += [("u", "evening", ts + k) for k in range(5)]
        rows.append(("u", "evening", NOW - (d + 1) * DAY + 3 * 3600 - (NOW % DAY)))
    frame = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")
    frame = frame.with_columns(
        pl.lit("view").cast(EVENT_SCHEMA["event_type"]).alias("event_type"),
        pl.lit(None, dtype=pl.Float64).alias("value"),
        pl.lit(None, dtype=pl.String).alias("session_id"),
        pl.lit(None, dtype=pl.String).alias("event_id"),
    ).select(list(EVENT_SCHEMA))
    row = _row(analyze_trends(frame, now=NOW).items, "evening")
    assert row["daily_seasonality"] > 0.5
    assert row["daily_peak_hour"] in (19.0, 20.0, 21.0)


def test_future_and_out_of_order_timestamps(known: pl.DataFrame) -> None:
    future = known.head(3).with_columns(
        pl.lit(NOW + 10 * DAY, dtype=pl.Int64).alias("timestamp"), pl.col("event_id") + "f"
    )
    slightly_late = known.head(2).with_columns(pl.col("timestamp").clip(NOW + 60, NOW + 60))
    shuffled = pl.concat([known, future]).sample(fraction=1.0, shuffle=True, seed=1)
    ordered = analyze_trends(known, now=NOW)
    messy = analyze_trends(shuffled, now=NOW)
    assert messy.dropped_future == 3
    assert messy.items.equals(ordered.items)
    # Just past now (within the tolerance) counts as now rather than being dropped.
    late = analyze_trends(pl.concat([known, slightly_late]), now=NOW)
    assert late.dropped_future == 0
    assert _row(late.items, "rising")["n_events"] >= _row(ordered.items, "rising")["n_events"]


def test_empty_and_tiny_inputs() -> None:
    empty = analyze_trends(pl.DataFrame(schema=EVENT_SCHEMA), now=NOW)
    assert empty.items.height == 0
    one = analyze_trends(_events({"a": [1]}))
    row = _row(one.items, "a")
    assert row["trend_type"] == "stable"
    assert one.categories["category"].to_list() == ["unknown"]


def test_categories_aggregate_items(known: pl.DataFrame) -> None:
    catalog = pl.DataFrame(
        {
            "item_id": ["rising", "falling", "stable", "volatile", "single"],
            "category": ["up", "down", "flat", "flat", None],
        }
    )
    result = analyze_trends(known, catalog, now=NOW)
    cats = {r["category"]: r for r in result.categories.iter_rows(named=True)}
    assert set(cats) == {"up", "down", "flat", "unknown"}
    assert cats["up"]["trend_type"] == "rising"
    assert cats["down"]["trend_type"] == "falling"
    assert (
        cats["flat"]["n_events"]
        == _row(result.items, "stable")["n_events"] + _row(result.items, "volatile")["n_events"]
    )


def test_direction_is_the_forecasts_direction() -> None:
    # A stable item whose decline of about 15% over 60 days is significant on 3,300 events, and
    # whose last week ticked up: it used to be called "down" while its forecast was flat and its
    # velocity positive.
    days = 60
    gentle = np.linspace(60, 50, days).round().astype(int)
    gentle[-7:] += 3
    row = _row(analyze_trends(_events({"gentle": gentle}), now=NOW).items, "gentle")
    assert row["trend_type"] == "stable"
    assert row["log_change"] / row["log_change_se"] < -TrendConfig.min_z
    assert row["velocity"] > 0
    assert row["predicted_direction"] == "flat"
    assert row["forecast"] == pytest.approx(gentle.sum() * 7 / days)


def test_falling_forecast_starts_from_the_recent_level(known: pl.DataFrame) -> None:
    # A linear decline from 30 a day to 1: fitted to the whole window, a log-linear curve ends
    # near 4 a day and forecast more for next week than the last week had.
    row = _row(analyze_trends(known, now=NOW).items, "falling")
    assert row["predicted_direction"] == "down"
    last_two_weeks = row["recent_score"] + row["prior_score"]
    assert row["forecast"] < last_two_weeks / 2
    assert row["forecast"] < 1.25 * row["recent_score"]


def test_trend_popularity_prefers_rising_items(known: pl.DataFrame) -> None:
    scores = trend_popularity_scores(known, now=NOW)
    assert scores.columns == ["item_id", "score"]
    order = scores["item_id"].to_list()
    # Rising and falling have the same total; the rising one is the better bet for next week.
    assert order.index("rising") < order.index("falling")
    assert order[0] == "rising"


def test_trend_types_match_generated_truth() -> None:
    data = generate(5000, 2000, 300_000, seed=11)
    result = analyze_trends(data.events, data.catalog)
    joined = result.items.join(data.truth_items, on="item_id")
    assert joined.height == 2000
    agreement = (joined["trend_type"] == joined["trend"]).mean()
    assert agreement >= 0.8
    # The predicted direction is the forecast's: up exactly for rising, down exactly for falling.
    expected = {"rising": "up", "falling": "down", "stable": "flat", "volatile": "flat"}
    for table in (result.items, result.categories):
        want = table["trend_type"].replace_strict(expected)
        assert (table["predicted_direction"] == want).all()
    # A falling item's forecast for the next week is at most its rate of the last two weeks
    # (0 when it had no events in them).
    falling = result.items.filter(pl.col("trend_type") == "falling")
    assert falling.height > 100
    assert (falling["forecast"] <= (falling["recent_score"] + falling["prior_score"]) / 2).all()


def _mover_rows(rows: list[tuple[str, str, float, float, bool]]) -> pl.DataFrame:
    """(item_id, trend_type, strength, confidence, burst); the other columns are filler."""
    n = len(rows)
    item, kind, strength, confidence, burst = (list(c) for c in zip(*rows, strict=True))
    return pl.DataFrame(
        {
            "item_id": item,
            "category": ["c"] * n,
            "trend_type": kind,
            "strength": strength,
            "confidence": confidence,
            "log_change": [0.0] * n,
            "velocity": [0.0] * n,
            "burst": burst,
            "forecast": [1.0] * n,
            "n_events": [10] * n,
        }
    )


def test_top_movers_rank_non_stable_or_bursting_items_by_strength_times_confidence() -> None:
    items = _mover_rows(
        [
            ("calm", "stable", 0.9, 0.9, False),
            ("calm_burst", "stable", 0.5, 0.5, True),
            ("up", "rising", 0.9, 0.5, False),
            ("down", "falling", 0.8, 0.8, False),
            ("tie_b", "volatile", 0.5, 0.9, False),
            ("tie_a", "volatile", 0.9, 0.5, False),
        ]
    )
    movers = top_movers(items, 10)
    # 0.64, then the three at 0.45 by item id, then the burst at 0.25; "calm" is no mover.
    assert movers["item_id"].to_list() == ["down", "tie_a", "tie_b", "up", "calm_burst"]
    assert "score" not in movers.columns
    assert top_movers(items, 2)["item_id"].to_list() == ["down", "tie_a"]


def test_trend_summary_counts_items_categories_and_bursts(known: pl.DataFrame) -> None:
    catalog = pl.DataFrame({"item_id": ["zero"], "category": ["c"]})
    result = analyze_trends(known, catalog, NOW)
    summary = trend_summary(result)
    assert summary["items"] == result.items.height == 6
    assert sum(summary[f"items_{t}"] for t in TREND_TYPES) == 6
    assert sum(summary[f"categories_{t}"] for t in TREND_TYPES) == result.categories.height
    assert summary["items_rising"] == summary["items_falling"] == 1
    # "zero" is in the catalog only: it counts as an item but not in the means.
    assert summary["items_with_events"] == 5
    active = result.items.filter(pl.col("item_id") != "zero")
    assert summary["mean_strength"] == pytest.approx(active["strength"].mean())
    assert summary["bursts"] == int(result.items["burst"].sum())
    assert summary["window_days"] == result.window_days


def test_compute_trends_never_ends_past_the_wall_clock() -> None:
    events = make_events()  # November 2023
    newest = int(events["timestamp"].max())
    before = int(time.time())
    stray = before + 10 * 365 * DAY
    late = events.head(1).with_columns(pl.lit(stray, dtype=pl.Int64).alias("timestamp"))
    with_clock_error = pl.concat([events, late])
    # The plain analysis takes the newest event as now; the pipeline's stops at the wall clock,
    # so the stray event is dropped instead of moving the window ten years on.
    assert analyze_trends(with_clock_error).now == stray
    result = compute_trends(with_clock_error, None)
    assert before <= result.now <= int(time.time()) and result.dropped_future == 1
    assert compute_trends(events, None).now == newest
    assert compute_trends(events, None, now=newest - DAY).now == newest - DAY
