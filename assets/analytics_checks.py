"""Asset checks of the analytics assets: no nulls, scores in range, sane segment shares, fresh
events (the last two warn rather than block)."""

import time

import dagster as dg
import polars as pl
from pydantic import Field

from assets.analytics import trend_analysis, user_segments
from training.segments import SEGMENTS, SegmentResult
from training.trends import DIRECTIONS, TREND_TYPES, TrendResult


class EventFreshnessConfig(dg.Config):
    """How old the newest analysed event may be before the freshness check warns."""

    max_age_hours: float = Field(
        default=24.0,
        description="The newest event analysed may be at most this old (against the wall clock).",
    )


class SegmentSharesConfig(dg.Config):
    """Bounds on the segment shares; a degenerate segmentation breaks them."""

    max_share: float = Field(default=0.9, description="No segment may hold more of the users.")
    min_segments: int = Field(default=2, description="Segments that must be present.")
    min_users: int = Field(
        default=200, description="Below this many users the shares are not judged."
    )


def _missing(frame: pl.DataFrame, columns: tuple[str, ...]) -> dict[str, int]:
    """Per column, the rows that are null (or NaN); a column that is absent counts every row."""
    counts: dict[str, int] = {}
    for name in columns:
        if name not in frame.columns:
            counts[name] = max(frame.height, 1)
            continue
        col = pl.col(name)
        bad = col.is_null() | col.is_nan() if frame.schema[name].is_float() else col.is_null()
        counts[name] = int(frame.select(bad.sum()).item())
    return counts


def _outside(frame: pl.DataFrame, name: str, lo: float, hi: float) -> int:
    """Rows whose value is not a finite number in [lo, hi] (nulls count as outside)."""
    col = pl.col(name).cast(pl.Float64)
    ok = col.is_not_null() & col.is_finite() & (col >= lo) & (col <= hi)
    return int(frame.select((~ok.fill_null(False)).sum()).item())


def _range_result(problems: dict[str, int]) -> dg.AssetCheckResult:
    """Passed when no column has a row out of range; the description names those that do."""
    bad = {k: v for k, v in problems.items() if v}
    return dg.AssetCheckResult(
        passed=not bad,
        description="rows out of range: "
        + (", ".join(f"{k} {v}" for k, v in bad.items()) or "none"),
        metadata={"out_of_range": dg.MetadataValue.json(problems)},
    )


def _freshness(newest: int | None, max_age_hours: float) -> dg.AssetCheckResult:
    """A warning when the newest analysed event is older than the limit (wall clock)."""
    warn = dg.AssetCheckSeverity.WARN
    if newest is None:
        return dg.AssetCheckResult(passed=False, severity=warn, description="no events analysed")
    age_hours = (time.time() - newest) / 3600
    return dg.AssetCheckResult(
        passed=bool(age_hours <= max_age_hours),
        severity=warn,
        description=(
            f"the newest event analysed is {age_hours:.1f} h old (limit {max_age_hours:g} h); "
            "older means events stopped arriving or `now` pinned the window in the past"
        ),
        metadata={
            "newest_event": dg.MetadataValue.timestamp(float(newest)),
            "age_hours": round(age_hours, 2),
            "max_age_hours": max_age_hours,
        },
    )


TREND_REQUIRED = ("item_id", "category", "trend_type", "strength", "confidence")
SEGMENT_REQUIRED = (
    "user_id",
    "segment",
    "rfm",
    "r_score",
    "f_score",
    "m_score",
    "engagement",
    "churn_risk",
    "lifetime_value",
)


@dg.asset_check(asset=trend_analysis, blocking=True)
def trend_analysis_no_nulls(trend_analysis: TrendResult) -> dg.AssetCheckResult:
    """No missing item id, category, trend type, strength or confidence; one row per item."""
    items, categories = trend_analysis.items, trend_analysis.categories
    missing = _missing(items, TREND_REQUIRED)
    missing_categories = _missing(categories, TREND_REQUIRED[1:])
    duplicates = items.height - items["item_id"].n_unique() if "item_id" in items.columns else 0
    passed = not any(missing.values()) and not any(missing_categories.values()) and not duplicates
    return dg.AssetCheckResult(
        passed=passed,
        metadata={
            "missing_in_items": dg.MetadataValue.json(missing),
            "missing_in_categories": dg.MetadataValue.json(missing_categories),
            "duplicate_items": duplicates,
        },
    )


@dg.asset_check(asset=trend_analysis, blocking=True)
def trend_analysis_scores_in_range(trend_analysis: TrendResult) -> dg.AssetCheckResult:
    """Strength and confidence in [0, 1], forecast finite and >= 0, known trend types and
    directions, in the item and the category tables."""
    problems: dict[str, int] = {}
    for table, frame in (
        ("items", trend_analysis.items),
        ("categories", trend_analysis.categories),
    ):
        for name in ("strength", "confidence"):
            problems[f"{table}.{name}"] = _outside(frame, name, 0.0, 1.0)
        problems[f"{table}.forecast"] = _outside(frame, "forecast", 0.0, float("inf"))
        problems[f"{table}.trend_type"] = int((~frame["trend_type"].is_in(TREND_TYPES)).sum())
        problems[f"{table}.predicted_direction"] = int(
            (~frame["predicted_direction"].is_in(DIRECTIONS)).sum()
        )
    return _range_result(problems)


@dg.asset_check(asset=trend_analysis)
def trend_analysis_fresh(
    config: EventFreshnessConfig, trend_analysis: TrendResult
) -> dg.AssetCheckResult:
    """The analysis window ends at an event no older than `max_age_hours` (a warning)."""
    newest = trend_analysis.now if trend_analysis.items.height else None
    return _freshness(newest, config.max_age_hours)


@dg.asset_check(asset=user_segments, blocking=True)
def user_segments_no_nulls(user_segments: SegmentResult) -> dg.AssetCheckResult:
    """No missing user id, segment, RFM, engagement, churn risk or lifetime value; one row per
    user."""
    users = user_segments.users
    missing = _missing(users, SEGMENT_REQUIRED)
    duplicates = users.height - users["user_id"].n_unique() if "user_id" in users.columns else 0
    return dg.AssetCheckResult(
        passed=not any(missing.values()) and not duplicates,
        metadata={"missing": dg.MetadataValue.json(missing), "duplicate_users": duplicates},
    )


@dg.asset_check(asset=user_segments, blocking=True)
def user_segments_scores_in_range(user_segments: SegmentResult) -> dg.AssetCheckResult:
    """Known segment names; R, F and M in 1..5; engagement and churn risk in [0, 1]; lifetime
    value finite and >= 0."""
    users = user_segments.users
    problems = {
        "segment": int((~users["segment"].is_in(SEGMENTS)).sum()),
        **{name: _outside(users, name, 1, 5) for name in ("r_score", "f_score", "m_score")},
        "engagement": _outside(users, "engagement", 0.0, 1.0),
        "churn_risk": _outside(users, "churn_risk", 0.0, 1.0),
        "lifetime_value": _outside(users, "lifetime_value", 0.0, float("inf")),
    }
    return _range_result(problems)


@dg.asset_check(asset=user_segments)
def user_segments_shares_sane(
    config: SegmentSharesConfig, user_segments: SegmentResult
) -> dg.AssetCheckResult:
    """With at least `min_users` users, no segment holds more than `max_share` of them and at
    least `min_segments` segments are present: otherwise the features failed to separate users."""
    users = user_segments.users
    shares = users["segment"].value_counts(normalize=True, name="share").sort("share")
    largest = float(shares["share"].max() or 0.0) if shares.height else 0.0
    present = shares.height
    judged = users.height >= config.min_users
    reasons = []
    if judged and largest > config.max_share:
        reasons.append(f"the largest segment holds {largest:.0%} (> {config.max_share:.0%})")
    if judged and present < config.min_segments:
        reasons.append(f"only {present} segment(s) present (< {config.min_segments})")
    if not judged:
        description = f"{users.height} users: fewer than {config.min_users}, shares not judged"
    else:
        description = "; ".join(reasons) or f"{present} segments, largest {largest:.0%}"
    return dg.AssetCheckResult(
        passed=not reasons,
        description=description,
        metadata={
            "shares": dg.MetadataValue.json(
                dict(zip(shares["segment"], shares["share"], strict=True))
            ),
            "largest_share": largest,
            "segments_present": present,
            "users": users.height,
        },
    )


@dg.asset_check(asset=user_segments)
def user_segments_fresh(
    config: EventFreshnessConfig, user_segments: SegmentResult
) -> dg.AssetCheckResult:
    """The newest event behind the segments is no older than `max_age_hours` (a warning)."""
    last = user_segments.users["last_ts"].max()
    return _freshness(None if last is None else int(last), config.max_age_hours)  # type: ignore[arg-type]
