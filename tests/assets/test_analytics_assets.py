"""Analytics assets: config mirrors, MLflow runs, metadata, materialisation and asset checks."""

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from assets import analytics, analytics_checks
from assets.analytics import (
    EXPERIMENT,
    SegmentAssetConfig,
    TrendAssetConfig,
    trend_analysis,
    user_segments,
)
from assets.analytics_checks import (
    EventFreshnessConfig,
    SegmentSharesConfig,
    trend_analysis_fresh,
    trend_analysis_no_nulls,
    trend_analysis_scores_in_range,
    user_segments_fresh,
    user_segments_no_nulls,
    user_segments_scores_in_range,
    user_segments_shares_sane,
)
from assets.ingestion import item_catalog, raw_events
from orchestration.environment import resources_for
from tests.conftest import make_events
from training.analytics_common import reference_time
from training.data import EVENT_SCHEMA
from training.generate import GeneratedData, generate, write_generated
from training.registry import ModelRegistry
from training.segments import SEGMENTS, SegmentConfig, compute_segments
from training.trends import TREND_TYPES, TrendConfig, compute_trends

ALL_CHECKS = (
    trend_analysis_no_nulls,
    trend_analysis_scores_in_range,
    trend_analysis_fresh,
    user_segments_no_nulls,
    user_segments_scores_in_range,
    user_segments_shares_sane,
    user_segments_fresh,
)


@pytest.fixture(scope="module")
def shop() -> GeneratedData:
    """300 users, 120 items, 12k events ending an hour ago: fresh data."""
    end = datetime.fromtimestamp(int(datetime.now(UTC).timestamp()) - 3600, UTC)
    return generate(300, 120, 12_000, seed=3, end=end)


def _check(check: dg.AssetChecksDefinition, **kwargs: object) -> dg.AssetCheckResult:
    result = check(**kwargs)
    assert isinstance(result, dg.AssetCheckResult)
    return result


def _registry() -> ModelRegistry:
    tracking = resources_for("local")["tracking"]
    return tracking.registry()


def test_asset_configs_mirror_the_training_configs() -> None:
    trend_fields = {f.name for f in dataclasses.fields(TrendConfig)}
    segment_fields = {f.name for f in dataclasses.fields(SegmentConfig)}
    assert trend_fields <= set(TrendAssetConfig.model_fields)
    assert segment_fields <= set(SegmentAssetConfig.model_fields)
    assert TrendAssetConfig().to_trend_config() == TrendConfig()
    assert SegmentAssetConfig().to_segment_config() == SegmentConfig()
    custom = TrendAssetConfig(recent_days=3, event_weights={"view": 2.0}).to_trend_config()
    assert custom.recent_days == 3 and custom.event_weights == {"view": 2.0}
    with pytest.raises(ValueError, match="unknown: bogus"):
        SegmentAssetConfig(features=["conversion", "bogus"]).to_segment_config()


def test_reference_time_is_the_newest_event_but_never_past_the_wall_clock() -> None:
    events = make_events()
    newest = int(events["timestamp"].max())
    assert reference_time(events) == newest
    assert reference_time(events, now=newest - 10) == newest - 10
    wall = int(datetime.now(UTC).timestamp())
    future = pl.concat(
        [
            events,
            events.head(1).with_columns(
                pl.lit(wall + 30 * 86_400, dtype=pl.Int64).alias("timestamp")
            ),
        ]
    )
    assert wall <= reference_time(future) <= wall + 60
    # A clock error far in the future is dropped and counted, not taken as "now".
    assert compute_trends(future, None, TrendConfig()).dropped_future == 1
    assert compute_segments(future, None, SegmentConfig()).dropped_future == 1


def test_assets_called_directly_log_runs_metadata_and_plots(shop: GeneratedData) -> None:
    tracking = resources_for("local")["tracking"]
    trends = trend_analysis(
        context=dg.build_asset_context(),
        config=TrendAssetConfig(top_movers=5),
        tracking=tracking,
        raw_events=shop.events,
        item_catalog=shop.catalog,
    )
    result = trends.value
    # The asset runs exactly the shared computation the CLI runs.
    assert result.items.equals(compute_trends(shop.events, shop.catalog, TrendConfig()).items)
    assert result.items.height == shop.catalog.height
    meta = trends.metadata
    assert meta["items"].value == shop.catalog.height
    top = meta["top_movers"].value
    assert top.count("\n") == 1 + 5 and "trend_type" in top
    assert meta["plot"].value.startswith("![top movers](data:image/png;base64,")
    for kind in TREND_TYPES:
        assert f"| {kind} |" in meta["trend_types"].value

    segments = user_segments(
        context=dg.build_asset_context(),
        config=SegmentAssetConfig(),
        tracking=tracking,
        raw_events=shop.events,
        item_catalog=shop.catalog,
    )
    users = segments.value.users
    assert users.height == shop.events["user_id"].n_unique()
    assert segments.value.model.kmeans is not None
    assert "| segment | users | share |" in segments.metadata["segments"].value

    registry = _registry()
    client = registry.client
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None and experiment.name != "recsys"
    runs = {r.data.tags["analysis"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"trends", "segments"}

    trend_run = runs["trends"]
    assert trend_run.info.run_id == meta["mlflow_run_id"].value
    assert trend_run.data.params["recent_days"] == "7"
    assert trend_run.data.params["event_weights.purchase"] == "10.0"
    metrics = trend_run.data.metrics
    assert sum(metrics[f"items_{t}"] for t in TREND_TYPES) == shop.catalog.height
    assert 0.0 < metrics["mean_confidence"] <= 1.0
    files = {a.path for a in client.list_artifacts(trend_run.info.run_id, "trends")}
    assert {
        "trends/items.csv",
        "trends/categories.csv",
        "trends/top_movers.png",
        "trends/top_movers.md",
    } <= files
    plot = Path(meta["plot_artifact"].value.removeprefix("file://"))
    assert plot.read_bytes()[:4] == b"\x89PNG"
    logged = pl.read_csv(client.download_artifacts(trend_run.info.run_id, "trends/items.csv"))
    assert logged["item_id"].to_list() == result.items["item_id"].to_list()

    segment_run = runs["segments"]
    shares = {s: segment_run.data.metrics[f"share_{s}"] for s in SEGMENTS}
    assert sum(shares.values()) == pytest.approx(1.0)
    expected = users["segment"].value_counts(normalize=True)
    for segment, share in expected.iter_rows():
        assert shares[segment] == pytest.approx(share)
    assert segment_run.data.params["n_clusters"] == "6"
    files = {a.path for a in client.list_artifacts(segment_run.info.run_id, "segments")}
    assert {"segments/users.parquet", "segments/features.md", "segments/segments.png"} <= files
    doc = Path(client.download_artifacts(segment_run.info.run_id, "segments/features.md"))
    assert "price_percentile" in doc.read_text() and "Hungarian" in doc.read_text()
    import mlflow.sklearn

    kmeans = mlflow.sklearn.load_model(f"runs:/{segment_run.info.run_id}/segment_kmeans")
    assert kmeans.n_clusters == segments.value.model.kmeans.n_clusters
    # Nothing went into the model experiment, where runs carry registered versions.
    assert client.get_experiment_by_name("recsys") is None


def test_materialize_with_ingestion_and_every_check_passing(
    shop: GeneratedData, tmp_path: Path
) -> None:
    paths = write_generated(shop, tmp_path / "shop")
    result = dg.materialize(
        [raw_events, item_catalog, trend_analysis, user_segments, *ALL_CHECKS],
        resources=resources_for("local"),
        run_config={
            "ops": {
                "raw_events": {"config": {"events_path": str(paths["events"])}},
                "item_catalog": {"config": {"catalog_path": str(paths["catalog"])}},
            }
        },
    )
    assert result.success
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(evaluations) == {c.check_key.name for c in ALL_CHECKS}
    failed = {name: e.description for name, e in evaluations.items() if not e.passed}
    assert not failed
    trends = result.output_for_node("trend_analysis")
    assert set(trends.items["item_id"]) == set(shop.catalog["item_id"])
    segments = result.output_for_node("user_segments")
    assert segments.users.height == shop.events["user_id"].n_unique()
    assert len(_registry().client.search_runs([_registry().experiment_id(EXPERIMENT)])) == 2


def test_definitions_loaders_find_both_assets_and_all_checks() -> None:
    assets = dg.load_assets_from_modules([analytics])
    keys = {k.to_user_string() for a in assets for k in a.keys}
    assert keys == {"trend_analysis", "user_segments"}
    assert all(a.group_names_by_key[k] == "analytics" for a in assets for k in a.keys)
    checks = dg.load_asset_checks_from_modules([analytics, analytics_checks])
    assert {c.check_key.name for c in checks} == {c.check_key.name for c in ALL_CHECKS}


def test_checks_pass_on_generated_data(shop: GeneratedData) -> None:
    trends = compute_trends(shop.events, shop.catalog, TrendConfig())
    segments = compute_segments(shop.events, shop.catalog, SegmentConfig())
    fresh = EventFreshnessConfig()
    assert _check(trend_analysis_no_nulls, trend_analysis=trends).passed
    assert _check(trend_analysis_scores_in_range, trend_analysis=trends).passed
    assert _check(trend_analysis_fresh, config=fresh, trend_analysis=trends).passed
    assert _check(user_segments_no_nulls, user_segments=segments).passed
    assert _check(user_segments_scores_in_range, user_segments=segments).passed
    shares = _check(user_segments_shares_sane, config=SegmentSharesConfig(), user_segments=segments)
    assert shares.passed and shares.metadata["segments_present"].value == len(SEGMENTS)
    assert _check(user_segments_fresh, config=fresh, user_segments=segments).passed


def test_freshness_checks_warn_on_old_events() -> None:
    events = make_events()  # November 2023
    trends = compute_trends(events, None, TrendConfig())
    segments = compute_segments(events, None, SegmentConfig())
    for check, kwargs in (
        (trend_analysis_fresh, {"trend_analysis": trends}),
        (user_segments_fresh, {"user_segments": segments}),
    ):
        stale = _check(check, config=EventFreshnessConfig(), **kwargs)
        assert not stale.passed
        assert stale.severity == dg.AssetCheckSeverity.WARN
        assert stale.metadata["age_hours"].value > 24 * 300
        assert _check(check, config=EventFreshnessConfig(max_age_hours=1e9), **kwargs).passed


def test_null_and_range_checks_fail_on_broken_tables(shop: GeneratedData) -> None:
    trends = compute_trends(shop.events, shop.catalog, TrendConfig())
    broken_items = trends.items.with_columns(
        pl.when(pl.col("item_id") == pl.col("item_id").first())
        .then(None)
        .otherwise(pl.col("trend_type"))
        .alias("trend_type"),
        pl.when(pl.col("item_id") == pl.col("item_id").last())
        .then(1.5)
        .otherwise(pl.col("strength"))
        .alias("strength"),
    )
    broken = dataclasses.replace(trends, items=broken_items)
    nulls = _check(trend_analysis_no_nulls, trend_analysis=broken)
    assert not nulls.passed
    assert nulls.metadata["missing_in_items"].value["trend_type"] == 1
    ranges = _check(trend_analysis_scores_in_range, trend_analysis=broken)
    assert not ranges.passed
    assert ranges.metadata["out_of_range"].value["items.strength"] == 1
    duplicated = dataclasses.replace(trends, items=pl.concat([trends.items, trends.items.head(2)]))
    assert not _check(trend_analysis_no_nulls, trend_analysis=duplicated).passed

    segments = compute_segments(shop.events, shop.catalog, SegmentConfig())
    broken_users = segments.users.with_columns(
        pl.when(pl.col("user_id") == pl.col("user_id").first())
        .then(None)
        .otherwise(pl.col("segment"))
        .alias("segment"),
        pl.when(pl.col("user_id") == pl.col("user_id").last())
        .then(2.0)
        .otherwise(pl.col("churn_risk"))
        .alias("churn_risk"),
    )
    broken_segments = dataclasses.replace(segments, users=broken_users)
    nulls = _check(user_segments_no_nulls, user_segments=broken_segments)
    assert not nulls.passed and nulls.metadata["missing"].value["segment"] == 1
    ranges = _check(user_segments_scores_in_range, user_segments=broken_segments)
    assert not ranges.passed
    assert ranges.metadata["out_of_range"].value["churn_risk"] == 1


def _one_view_each(n_users: int) -> pl.DataFrame:
    """Every user viewed one item once: no feature varies, so nothing separates the users."""
    return pl.DataFrame(
        {
            "user_id": [f"u{i}" for i in range(n_users)],
            "item_id": [f"i{i % 7}" for i in range(n_users)],
            "event_type": ["view"] * n_users,
            "timestamp": [1_700_000_000 + i for i in range(n_users)],
            "value": [None] * n_users,
            "session_id": [f"s{i}" for i in range(n_users)],
            "event_id": [f"e{i}" for i in range(n_users)],
        },
        schema=EVENT_SCHEMA,
    )


def test_shares_check_fails_when_one_segment_takes_everyone() -> None:
    degenerate = compute_segments(_one_view_each(250), None, SegmentConfig())
    assert degenerate.users["segment"].n_unique() == 1
    result = _check(
        user_segments_shares_sane, config=SegmentSharesConfig(), user_segments=degenerate
    )
    assert not result.passed
    assert "100%" in result.description and "only 1 segment" in result.description
    # Too few users to judge: the same picture passes.
    few = compute_segments(_one_view_each(50), None, SegmentConfig())
    assert _check(user_segments_shares_sane, config=SegmentSharesConfig(), user_segments=few).passed
