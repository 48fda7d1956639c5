"""Analytics assets: trend analyses of items and categories, and behavioural user segments.

Each is logged to MLflow (experiment `recsys-analytics`) and guarded by asset checks.
"""

import base64
import dataclasses
import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import dagster as dg
import mlflow
import mlflow.sklearn
import numpy as np
import polars as pl
import sklearn
from pydantic import Field

from assets.resources import MLflowResource
from training.evaluation import to_markdown
from training.registry import flatten_params
from training.segments import (
    FEATURE_DOC,
    SEGMENTS,
    SIGNATURES,
    SegmentConfig,
    SegmentResult,
    segment_users,
)
from training.trends import DIRECTIONS, TREND_TYPES, TrendConfig, TrendResult, analyze_trends

GROUP = "analytics"
EXPERIMENT = "recsys-analytics"
_TREND_COLORS = {
    "stable": "#9e9e9e",
    "rising": "#2e7d32",
    "falling": "#c62828",
    "volatile": "#ef6c00",
}


class TrendAssetConfig(dg.Config):
    """TrendConfig as Dagster config (defaults come from training/trends.py)."""

    lookback_days: int = Field(
        default=TrendConfig.lookback_days,
        description="History used for the trend type, the forecast and weekly seasonality.",
    )
    recent_days: int = Field(
        default=TrendConfig.recent_days, description="Recent window of velocity and bursts."
    )
    prior_days: int = Field(
        default=TrendConfig.prior_days,
        description="Window before the recent one that velocity compares against.",
    )
    event_weights: dict[str, float] = Field(
        default_factory=lambda: TrendConfig().event_weights,
        description="Weight of each event type in velocity, forecast and trend score.",
    )
    trend_threshold: float = Field(
        default=TrendConfig.trend_threshold,
        description="Fitted log-change across the lookback beyond which an item rises or falls.",
    )
    min_z: float = Field(
        default=TrendConfig.min_z,
        description="Standard errors a slope or an excess variance must clear to count.",
    )
    slope_ridge: float = Field(
        default=TrendConfig.slope_ridge,
        description="Ridge penalty shrinking the slopes of items with few events towards 0.",
    )
    volatility_threshold: float = Field(
        default=TrendConfig.volatility_threshold,
        description="Excess squared coefficient of variation above which an item is volatile.",
    )
    burst_z: float = Field(
        default=TrendConfig.burst_z,
        description="Robust (median/MAD) z-score of a recent day that flags a burst.",
    )
    burst_min_events: int = Field(
        default=TrendConfig.burst_min_events,
        description="Distinct users a burst day needs at least.",
    )
    forecast_days: int = Field(
        default=TrendConfig.forecast_days,
        description="Horizon of the forecast and of the trend score.",
    )
    falling_level_days: int = Field(
        default=TrendConfig.falling_level_days,
        description="Last days of the window on which a falling item's forecast level is refit.",
    )
    daily_season_days: int = Field(
        default=TrendConfig.daily_season_days,
        description="Hourly history used for hour-of-day seasonality.",
    )
    season_min_events: int = Field(
        default=TrendConfig.season_min_events,
        description="Series with fewer events get no seasonality estimate.",
    )
    future_tolerance_s: int = Field(
        default=TrendConfig.future_tolerance_s,
        description="Events later than now plus this are dropped (and counted) as clock errors.",
    )
    chunk_items: int = Field(
        default=TrendConfig.chunk_items,
        description="Items per block of the hourly Fourier analysis (bounds memory).",
    )
    now: int = Field(
        default=0,
        description=(
            "End of the analysis window in epoch seconds; 0: the newest event, but never later "
            "than the wall clock."
        ),
    )
    top_movers: int = Field(default=15, description="Items in the top-movers table and plot.")

    def to_trend_config(self) -> TrendConfig:
        names = {f.name for f in dataclasses.fields(TrendConfig)}
        return TrendConfig(**{k: v for k, v in self.model_dump().items() if k in names})


class SegmentAssetConfig(dg.Config):
    """SegmentConfig as Dagster config (defaults come from training/segments.py)."""

    n_clusters: int = Field(
        default=SegmentConfig.n_clusters,
        description="k-means clusters; each is named after the segment it fits best.",
    )
    features: list[str] = Field(
        default_factory=lambda: list(FEATURE_DOC),
        description=f"Behavioural features clustered on, from: {', '.join(FEATURE_DOC)}.",
    )
    seed: int = Field(default=SegmentConfig.seed, description="Seed of k-means and sampling.")
    min_users: int = Field(
        default=SegmentConfig.min_users,
        description="Below this many users nothing is learned (buyer/browser rule).",
    )
    max_fit_users: int = Field(
        default=SegmentConfig.max_fit_users,
        description="k-means is fit on a sample of at most this many users, applied to all.",
    )
    session_gap_s: int = Field(
        default=SegmentConfig.session_gap_s,
        description="Inactivity gap starting a new session when events carry no session_id.",
    )
    price_weights: dict[str, float] = Field(
        default_factory=lambda: SegmentConfig().price_weights,
        description="Event-type weights of the price-percentile feature.",
    )
    interest_weights: dict[str, float] = Field(
        default_factory=lambda: SegmentConfig().interest_weights,
        description="Event-type weights of the preference vector and the engagement score.",
    )
    ltv_horizon_days: float = Field(
        default=SegmentConfig.ltv_horizon_days,
        description="Future horizon of the lifetime-value estimate.",
    )
    recent_days: int = Field(
        default=SegmentConfig.recent_days,
        description="Window of the engagement score's recent-activity component.",
    )
    top_n: int = Field(
        default=SegmentConfig.top_n,
        description="Categories and brands listed in the preference vector.",
    )
    now: int = Field(
        default=0,
        description=(
            "Reference time of recency and churn in epoch seconds; 0: the newest event, but "
            "never later than the wall clock."
        ),
    )

    def to_segment_config(self) -> SegmentConfig:
        unknown = sorted(set(self.features) - set(FEATURE_DOC))
        if unknown or not self.features:
            raise ValueError(
                f"features must be a non-empty subset of {', '.join(FEATURE_DOC)}; "
                f"unknown: {', '.join(unknown) or 'none given'}"
            )
        names = {f.name for f in dataclasses.fields(SegmentConfig)}
        values = {k: v for k, v in self.model_dump().items() if k in names}
        values["features"] = tuple(self.features)
        return SegmentConfig(**values)


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


# Shared by the assets and the `recsys trends` / `recsys segments` commands.


def reference_time(events: pl.DataFrame, now: int = 0) -> int:
    """End of an analysis: `now` when given, else the newest event but never past the wall clock,
    so events stamped in the future by a wrong clock cannot drag the window along."""
    if now:
        return int(now)
    wall = int(time.time())
    if events.is_empty():
        return wall
    return min(int(events["timestamp"].max()), wall)  # type: ignore[arg-type]


def compute_trends(
    events: pl.DataFrame, catalog: pl.DataFrame | None, config: TrendAssetConfig
) -> TrendResult:
    """The trend analysis exactly as the `trend_analysis` asset runs it."""
    return analyze_trends(
        events, catalog, reference_time(events, config.now), config.to_trend_config()
    )


def compute_segments(
    events: pl.DataFrame, catalog: pl.DataFrame | None, config: SegmentAssetConfig
) -> SegmentResult:
    """The segmentation exactly as the `user_segments` asset runs it."""
    return segment_users(
        events, catalog, reference_time(events, config.now), config.to_segment_config()
    )


def top_movers(items: pl.DataFrame, n: int) -> pl.DataFrame:
    """Rising, falling, volatile or bursting items, by strength x confidence (highest first)."""
    return (
        items.filter((pl.col("trend_type") != "stable") | pl.col("burst"))
        .with_columns((pl.col("strength") * pl.col("confidence")).alias("score"))
        .sort(["score", "item_id"], descending=[True, False])
        .head(n)
        .select(
            "item_id",
            "category",
            "trend_type",
            "strength",
            "confidence",
            "log_change",
            "velocity",
            "burst",
            "forecast",
            "n_events",
        )
    )


@contextmanager
def _analytics_run(
    tracking: MLflowResource, run_name: str, tags: dict[str, str]
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run in the analytics experiment, kept apart from the model runs."""
    registry = tracking.registry()
    experiment_id = registry.experiment_id(EXPERIMENT)
    mlflow.set_tracking_uri(registry.tracking_uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        yield run


def _run_tags(context: dg.AssetExecutionContext, analysis: str) -> dict[str, str]:
    return {
        "dagster_run_id": context.run_id,
        "orchestrator": "dagster",
        "analysis": analysis,
        "asset": context.asset_key.to_user_string(),
    }


def _pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend, imported on first use rather than at import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _movers_plot(items: pl.DataFrame, movers: pl.DataFrame, path: Path) -> Path:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    counts = [int((items["trend_type"] == t).sum()) for t in TREND_TYPES]
    left.bar(TREND_TYPES, counts, color=[_TREND_COLORS[t] for t in TREND_TYPES])
    left.set_title("Items per trend type")
    if movers.height:
        shown = movers.reverse()
        labels = [f"{i} ({c})" for i, c in zip(shown["item_id"], shown["category"], strict=True)]
        colors = [_TREND_COLORS[t] for t in shown["trend_type"]]
        right.barh(labels, shown["log_change"].to_numpy(), color=colors)
        right.axvline(0.0, color="black", linewidth=0.8)
        right.set_xlabel("fitted log change across the window (0.7 = about 2x)")
        right.tick_params(axis="y", labelsize=8)
    else:
        right.text(0.5, 0.5, "no rising, falling, volatile or bursting item", ha="center")
        right.set_axis_off()
    right.set_title(f"Top {movers.height} movers (strength x confidence)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _shares_plot(profile: pl.DataFrame, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    shown = profile.sort("share")
    ax.barh(shown["segment"].to_list(), shown["share"].to_numpy(), color="#1565c0")
    ax.set_xlabel("share of users")
    ax.set_title("User segments")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _inline_png(path: Path, alt: str) -> dg.MetadataValue:
    """A PNG embedded in Markdown metadata, so the Dagster UI shows the plot itself."""
    encoded = base64.b64encode(path.read_bytes()).decode()
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{encoded})")


def trend_summary(result: TrendResult) -> dict[str, float]:
    """Counts per trend type (items and categories), bursts and mean strength and confidence
    over the items that had events."""
    items, categories = result.items, result.categories
    active = items.filter(pl.col("n_events") > 0)
    summary: dict[str, float] = {"items": items.height, "categories": categories.height}
    for kind in TREND_TYPES:
        summary[f"items_{kind}"] = int((items["trend_type"] == kind).sum())
        summary[f"categories_{kind}"] = int((categories["trend_type"] == kind).sum())
    summary["bursts"] = int(items["burst"].sum())
    summary["items_with_events"] = active.height
    summary["mean_strength"] = float(active["strength"].mean() or 0.0)
    summary["mean_confidence"] = float(active["confidence"].mean() or 0.0)
    summary["window_days"] = result.window_days
    summary["dropped_future"] = result.dropped_future
    summary["dropped_old"] = result.dropped_old
    return summary


@dg.asset(
    group_name=GROUP,
    compute_kind="numpy",
    freshness_policy=dg.FreshnessPolicy.time_window(
        fail_window=timedelta(hours=3), warn_window=timedelta(hours=2)
    ),
)
def trend_analysis(
    context: dg.AssetExecutionContext,
    config: TrendAssetConfig,
    tracking: MLflowResource,
    raw_events: pl.DataFrame,
    item_catalog: pl.DataFrame,
) -> dg.Output[TrendResult]:
    """Per item and category: trend type, strength, confidence, velocity, forecast, seasonality
    and bursts (tables `items` and `categories`), refreshed hourly."""
    started = time.perf_counter()
    result = compute_trends(raw_events, item_catalog, config)
    seconds = time.perf_counter() - started
    summary = trend_summary(result)
    movers = top_movers(result.items, config.top_movers)
    counts = pl.DataFrame(
        {
            "trend_type": list(TREND_TYPES),
            "items": [summary[f"items_{t}"] for t in TREND_TYPES],
            "categories": [summary[f"categories_{t}"] for t in TREND_TYPES],
        }
    )
    run_name = f"trend-analysis-{context.run_id[:8]}"
    with _analytics_run(tracking, run_name, _run_tags(context, "trends")) as run:
        mlflow.log_params(flatten_params("", config.model_dump()))
        mlflow.log_metrics({**summary, "seconds": seconds, "now": result.now})
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            result.items.write_csv(folder / "items.csv")
            result.categories.write_csv(folder / "categories.csv")
            (folder / "top_movers.md").write_text(to_markdown(movers, 3) + "\n")
            plot = _movers_plot(result.items, movers, folder / "top_movers.png")
            plot_md = _inline_png(plot, "top movers")
            mlflow.log_artifacts(str(folder), artifact_path="trends")
        run_id = run.info.run_id
        plot_uri = f"{run.info.artifact_uri}/trends/top_movers.png"
    context.log.info(
        f"trends of {result.items.height} items and {result.categories.height} categories "
        f"({summary['bursts']} bursts) in {seconds:.1f}s; MLflow run {run_id}"
    )
    return dg.Output(
        result,
        metadata={
            "items": result.items.height,
            "categories": result.categories.height,
            "now": dg.MetadataValue.timestamp(float(result.now)),
            "window_days": result.window_days,
            "bursts": summary["bursts"],
            "dropped_future": result.dropped_future,
            "dropped_old": result.dropped_old,
            "trend_types": dg.MetadataValue.md(to_markdown(counts)),
            "top_movers": dg.MetadataValue.md(to_markdown(movers, 3)),
            "plot": plot_md,
            "plot_artifact": dg.MetadataValue.path(plot_uri),
            "mlflow_run_id": run_id,
            "seconds": round(seconds, 2),
        },
    )


def segment_profile(users: pl.DataFrame) -> pl.DataFrame:
    """One row per segment: users, share and the mean scores, largest segment first."""
    return (
        users.group_by("segment")
        .agg(
            pl.len().alias("users"),
            pl.col("engagement").mean(),
            pl.col("churn_risk").mean(),
            pl.col("lifetime_value").mean(),
            pl.col("n_events").mean().alias("events"),
            (pl.col("n_purchases") > 0).mean().alias("buyers"),
        )
        .with_columns((pl.col("users") / pl.col("users").sum()).alias("share"))
        .select("segment", "users", "share", pl.exclude("segment", "users", "share"))
        .sort(["users", "segment"], descending=[True, False])
    )


def feature_documentation(result: SegmentResult) -> str:
    """Markdown: what each feature is, which were used, and how a segment is decided."""
    model = result.model
    lines = [
        "# User segmentation",
        "",
        "## Features",
        "",
        "| feature | used | definition |",
        "| --- | --- | --- |",
    ]
    for name, text in result.feature_doc.items():
        lines.append(f"| {name} | {'yes' if name in model.features else 'no'} | {text} |")
    lines += ["", "## How a segment is decided", ""]
    if model.kmeans is None:
        lines.append(
            "Too few users (or no feature that varies) to learn from: users who bought are "
            "`buyer`, the rest `browser`."
        )
    else:
        lines += [
            f"The used features are standardised and clustered by k-means (k = "
            f"{model.kmeans.n_clusters}); each cluster is named by the segment whose signature "
            "(weights per standardised feature, below) has the largest dot product with its "
            "centre, one cluster per segment (Hungarian assignment).",
            "",
            "| segment | signature |",
            "| --- | --- |",
        ]
        for segment, weights in SIGNATURES.items():
            sig = ", ".join(f"{f} {w:+g}" for f, w in weights.items())
            lines.append(f"| {segment} | {sig} |")
        lines += ["", "## Cluster centres (standardised units)", "", to_markdown(model.centroids)]
    return "\n".join(lines) + "\n"


def _segment_model_json(result: SegmentResult) -> str:
    model = result.model
    return json.dumps(
        {
            "features": list(model.features),
            "center": np.asarray(model.center).tolist(),
            "scale": np.asarray(model.scale).tolist(),
            "cluster_segment": model.cluster_segment,
            "note": "segment = cluster_segment[kmeans.predict((x - center) / scale)]",
        },
        indent=2,
    )


@dg.asset(
    group_name=GROUP,
    compute_kind="sklearn",
    freshness_policy=dg.FreshnessPolicy.time_window(
        fail_window=timedelta(hours=30), warn_window=timedelta(hours=26)
    ),
)
def user_segments(
    context: dg.AssetExecutionContext,
    config: SegmentAssetConfig,
    tracking: MLflowResource,
    raw_events: pl.DataFrame,
    item_catalog: pl.DataFrame,
) -> dg.Output[SegmentResult]:
    """Per user: behavioural segment, RFM, engagement, churn risk, lifetime value and
    preferences (table `users`), with the learned segmentation (`model`), refreshed daily."""
    started = time.perf_counter()
    result = compute_segments(raw_events, item_catalog, config)
    seconds = time.perf_counter() - started
    users, model = result.users, result.model
    profile = segment_profile(users)
    shares = dict(zip(profile["segment"], profile["share"], strict=True))
    metrics: dict[str, float] = {f"share_{s}": float(shares.get(s, 0.0)) for s in SEGMENTS}
    metrics.update(
        users=users.height,
        segments=profile.height,
        mean_engagement=float(users["engagement"].mean() or 0.0),
        mean_churn_risk=float(users["churn_risk"].mean() or 0.0),
        mean_lifetime_value=float(users["lifetime_value"].mean() or 0.0),
        dropped_future=result.dropped_future,
        seconds=seconds,
    )
    if model.kmeans is not None:
        metrics["kmeans_inertia"] = float(model.kmeans.inertia_)
    run_name = f"user-segments-{context.run_id[:8]}"
    with _analytics_run(tracking, run_name, _run_tags(context, "segments")) as run:
        params = flatten_params("", config.model_dump())
        params["features_used"] = ",".join(model.features)
        params["clusters"] = str(model.kmeans.n_clusters if model.kmeans is not None else 0)
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            # Parquet keeps the list columns (top categories, brands) and stays compact.
            users.write_parquet(folder / "users.parquet")
            profile.write_csv(folder / "segments.csv")
            (folder / "features.md").write_text(feature_documentation(result))
            (folder / "segment_model.json").write_text(_segment_model_json(result))
            plot = _shares_plot(profile, folder / "segments.png")
            plot_md = _inline_png(plot, "segment shares")
            mlflow.log_artifacts(str(folder), artifact_path="segments")
        if model.kmeans is not None:
            mlflow.sklearn.log_model(
                model.kmeans,
                name="segment_kmeans",
                pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
            )
        run_id = run.info.run_id
        plot_uri = f"{run.info.artifact_uri}/segments/segments.png"
    context.log.info(
        f"{users.height} users in {profile.height} segments in {seconds:.1f}s; MLflow run {run_id}"
    )
    newest = users["last_ts"].max()
    return dg.Output(
        result,
        metadata={
            "users": users.height,
            "segments": dg.MetadataValue.md(to_markdown(profile, 3)),
            "features_used": dg.MetadataValue.json(list(model.features)),
            "clusters": model.kmeans.n_clusters if model.kmeans is not None else 0,
            "newest_event": dg.MetadataValue.timestamp(float(newest or 0)),
            "dropped_future": result.dropped_future,
            "plot": plot_md,
            "plot_artifact": dg.MetadataValue.path(plot_uri),
            "mlflow_run_id": run_id,
            "seconds": round(seconds, 2),
        },
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
    bad = {k: v for k, v in problems.items() if v}
    return dg.AssetCheckResult(
        passed=not bad,
        description="rows out of range: "
        + (", ".join(f"{k} {v}" for k, v in bad.items()) or "none"),
        metadata={"out_of_range": dg.MetadataValue.json(problems)},
    )


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
    bad = {k: v for k, v in problems.items() if v}
    return dg.AssetCheckResult(
        passed=not bad,
        description="rows out of range: "
        + (", ".join(f"{k} {v}" for k, v in bad.items()) or "none"),
        metadata={"out_of_range": dg.MetadataValue.json(problems)},
    )


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
