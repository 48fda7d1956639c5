"""Online analytics assets: after each analysis, its trend lists or user profiles go to Redis,
where the service serves them (/trending, /user_profile) and ranks with them."""

import dagster as dg
import polars as pl

from assets.resources import EXTERNAL_RETRY, RedisFeaturesResource
from feature_repo.definitions import PREFERENCE_KEYS, PROFILE_SCORES
from training.segments import SegmentResult
from training.trends import TrendResult

# In the analyses' group, not `online`: they run with their analysis, never with training.
GROUP = "analytics"


def profile_frame(users: pl.DataFrame) -> pl.DataFrame:
    """`user_id`, the profile columns and `preferences` (a struct) of a segment users table."""
    present = [c for c in PREFERENCE_KEYS if c in users.columns]
    preferences = (
        pl.struct(present).alias("preferences")
        if present
        else pl.lit(None, pl.String).alias("preferences")
    )
    return users.select("user_id", *[c for c in PROFILE_SCORES if c in users.columns], preferences)


@dg.asset(group_name=GROUP, compute_kind="redis", retry_policy=EXTERNAL_RETRY)
def online_trends(
    context: dg.AssetExecutionContext, redis: RedisFeaturesResource, trend_analysis: TrendResult
) -> dg.MaterializeResult:
    """The hourly trend analysis as Redis trend lists: the top items by trend_score, globally and
    per category, with each item's and category's trend type, strength, confidence and burst."""
    counts = redis.store().push_trends(
        trend_analysis.items, trend_analysis.categories, analysed_at=float(trend_analysis.now)
    )
    items = trend_analysis.items
    context.log.info(
        f"pushed {counts['trend_items']} trending items and {counts['category_lists']} "
        "category lists"
    )
    return dg.MaterializeResult(
        metadata={
            **counts,
            **_counts_of(items, "trend_type", "items"),
            "bursts": int(items["burst"].sum()) if items.height else 0,
            "analysed_at": dg.MetadataValue.timestamp(float(trend_analysis.now)),
        }
    )


@dg.asset(group_name=GROUP, compute_kind="redis", retry_policy=EXTERNAL_RETRY)
def online_profiles(
    context: dg.AssetExecutionContext, redis: RedisFeaturesResource, user_segments: SegmentResult
) -> dg.MaterializeResult:
    """The daily segmentation as one Redis profile per user: segment, RFM scores, engagement,
    churn risk, lifetime value, price percentile and preferences."""
    users = user_segments.users
    written = redis.store().push_user_profiles(profile_frame(users))
    context.log.info(f"pushed {written} user profiles")
    return dg.MaterializeResult(
        metadata={"profiles": written, **_counts_of(users, "segment", "users")}
    )


def _counts_of(frame: pl.DataFrame, column: str, prefix: str) -> dict[str, int]:
    """Rows per value of `column`, as metadata entries `<prefix>_<value>`."""
    counts = frame[column].value_counts().sort(column)
    return {
        f"{prefix}_{value}": int(n)
        for value, n in zip(counts[column].to_list(), counts["count"].to_list(), strict=True)
    }
