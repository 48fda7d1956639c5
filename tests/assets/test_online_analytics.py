"""The online analytics assets: trend lists and user profiles pushed to Redis by a real
materialisation (embedded defaults, the test's Redis namespace), and their place in the jobs."""

from datetime import UTC, datetime

import dagster as dg
import polars as pl
import pytest

from assets import online_analytics
from assets.online_analytics import online_profiles, online_trends, profile_frame
from orchestration.definitions import build_definitions
from orchestration.environment import resources_for
from training.generate import GeneratedData, generate
from training.segments import SegmentResult, segment_users
from training.trends import TrendResult, analyze_trends


@pytest.fixture(scope="module")
def shop() -> GeneratedData:
    """200 users, 80 items, 6k events ending an hour ago."""
    end = datetime.fromtimestamp(int(datetime.now(UTC).timestamp()) - 3600, UTC)
    return generate(200, 80, 6_000, seed=5, end=end)


def test_materialised_analyses_are_pushed_and_read_back(
    shop: GeneratedData, redis_env: str
) -> None:
    trends = analyze_trends(shop.events, shop.catalog)
    segments = segment_users(shop.events, shop.catalog)

    # The analyses as upstream assets of the same keys (their own materialisation, with MLflow
    # runs, is tested in test_analytics_assets.py).
    @dg.asset(name="trend_analysis")
    def trends_upstream() -> TrendResult:
        return trends

    @dg.asset(name="user_segments")
    def segments_upstream() -> SegmentResult:
        return segments

    resources = resources_for("local")
    result = dg.materialize(
        [trends_upstream, segments_upstream, online_trends, online_profiles],
        resources=resources,
    )
    assert result.success
    store = resources["redis"].store()
    assert store.namespace == redis_env

    meta = {
        e.asset_key.to_user_string(): e.materialization.metadata
        for e in result.get_asset_materialization_events()
    }
    positive = trends.items.filter(pl.col("trend_score") > 0)
    assert meta["online_trends"]["trend_items"].value == positive.height
    assert meta["online_trends"]["categories"].value == trends.categories.height
    assert meta["online_profiles"]["profiles"].value == segments.users.height
    shares = segments.users["segment"].value_counts()
    for name, count in zip(shares["segment"], shares["count"], strict=True):
        assert meta["online_profiles"][f"users_{name}"].value == count

    # The global list is the analysis' items by trend_score, with their trend type.
    top = store.trending_items(5)
    expected = positive.sort(["trend_score", "item_id"], descending=[True, False]).head(5)
    assert list(top.items.ids) == expected["item_id"].to_list()
    assert [i["trend_type"] for i in top.info] == expected["trend_type"].to_list()
    assert top.analysed_at == float(trends.now)
    category = expected["category"][0]
    in_category = store.trending_items(100, category=category)
    assert set(in_category.items.ids) == set(
        positive.filter(pl.col("category") == category)["item_id"]
    )

    # Every user has a profile matching the segmentation.
    row = segments.users.row(0, named=True)
    profile = store.user_profile(row["user_id"])
    assert profile.segment == row["segment"] and profile.rfm == row["rfm"]
    assert profile.preferences["top_categories"] == row["top_categories"]
    assert profile.churn_risk == pytest.approx(row["churn_risk"])


def test_profile_frame_gathers_preferences() -> None:
    users = pl.DataFrame(
        {
            "user_id": ["u"],
            "segment": ["buyer"],
            "rfm": ["555"],
            "top_brands": [["b"]],
            "price_low": [1.0],
            "n_events": [3],
        }
    )
    frame = profile_frame(users)
    assert frame.columns == ["user_id", "segment", "rfm", "preferences"]
    assert frame["preferences"][0] == {"top_brands": ["b"], "price_low": 1.0}
    bare = profile_frame(users.select("user_id", "segment"))
    assert bare["preferences"].null_count() == 1


def test_each_push_runs_with_its_analysis_and_never_with_training() -> None:
    defs = build_definitions()

    def keys(job: str) -> set[str]:
        graph = defs.resolve_job_def(job).asset_layer.asset_graph
        return {k.to_user_string() for k in graph.executable_asset_keys}

    assert {"trend_analysis", "online_trends"} <= keys("trends_job")
    assert "online_profiles" not in keys("trends_job")
    assert {"user_segments", "online_profiles"} <= keys("segments_job")
    assert "online_trends" not in keys("segments_job")
    for job in ("training_job", "offline_job"):
        assert not {"online_trends", "online_profiles"} & keys(job), job
    assets = dg.load_assets_from_modules([online_analytics])
    assert {a.group_names_by_key[k] for a in assets for k in a.keys} == {"analytics"}
