"""Analytics assets: trend analyses of items and categories, and behavioural user segments.

Each is logged to MLflow (experiment `recsys-analytics`); its checks are in analytics_checks.py.
"""

import ast
import dataclasses
import inspect
import tempfile
import textwrap
import time
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import mlflow
import mlflow.sklearn
import polars as pl
import pydantic
import sklearn
from pydantic import Field

from assets.analytics_plots import inline_png, movers_plot, shares_plot
from assets.resources import EXTERNAL_RETRY, MLflowResource
from training.evaluation import to_markdown
from training.registry import flatten_params
from training.segments import (
    FEATURE_DOC,
    SEGMENTS,
    SegmentConfig,
    SegmentResult,
    compute_segments,
    feature_documentation,
    segment_model_json,
    segment_profile,
)
from training.trends import (
    TREND_TYPES,
    TrendConfig,
    TrendResult,
    compute_trends,
    top_movers,
    trend_summary,
)

GROUP = "analytics"
EXPERIMENT = "recsys-analytics"


def dagster_config(
    name: str, knobs: type, base: type[dg.Config], types: dict[str, object] | None = None
) -> type[dg.Config]:
    """A Dagster config class with one field per field of the dataclass `knobs`: its default
    and its attribute docstring (the one home of both) become the field's default and
    description in the launchpad. `types` replaces field types Dagster config cannot take."""
    docs = _attribute_docs(knobs)
    hints = typing.get_type_hints(knobs)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(knobs):
        kind = (types or {}).get(f.name, hints[f.name])
        if f.default_factory is not dataclasses.MISSING:
            value = Field(default_factory=f.default_factory, description=docs.get(f.name))
        else:
            default = list(f.default) if isinstance(f.default, tuple) else f.default
            value = Field(default=default, description=docs.get(f.name))
        fields[f.name] = (kind, value)
    config = pydantic.create_model(name, __base__=base, __module__=__name__, **fields)
    config.__doc__ = f"{knobs.__name__} as Dagster config (defaults and docs come from it)."
    return config


def _attribute_docs(knobs: type) -> dict[str, str]:
    """The docstring written under each annotated attribute of a class body."""
    body = ast.parse(textwrap.dedent(inspect.getsource(knobs))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


class _TrendRun(dg.Config):
    """What a trend analysis run adds to TrendConfig."""

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


class _SegmentRun(dg.Config):
    """What a segmentation run adds to SegmentConfig."""

    now: int = Field(
        default=0,
        description=(
            "Reference time of recency and churn in epoch seconds; 0: the newest event, but "
            "never later than the wall clock."
        ),
    )

    def to_segment_config(self) -> SegmentConfig:
        features = self.model_dump()["features"]
        unknown = sorted(set(features) - set(FEATURE_DOC))
        if unknown or not features:
            raise ValueError(
                f"features must be a non-empty subset of {', '.join(FEATURE_DOC)}; "
                f"unknown: {', '.join(unknown) or 'none given'}"
            )
        names = {f.name for f in dataclasses.fields(SegmentConfig)}
        values = {k: v for k, v in self.model_dump().items() if k in names}
        values["features"] = tuple(features)
        return SegmentConfig(**values)


TrendAssetConfig = dagster_config("TrendAssetConfig", TrendConfig, _TrendRun)
SegmentAssetConfig = dagster_config(
    "SegmentAssetConfig", SegmentConfig, _SegmentRun, types={"features": list[str]}
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


@dg.asset(
    group_name=GROUP,
    compute_kind="numpy",
    retry_policy=EXTERNAL_RETRY,
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
    result = compute_trends(raw_events, item_catalog, config.to_trend_config(), config.now or None)
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
            plot = movers_plot(result.items, movers, folder / "top_movers.png")
            plot_md = inline_png(plot, "top movers")
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


@dg.asset(
    group_name=GROUP,
    compute_kind="sklearn",
    retry_policy=EXTERNAL_RETRY,
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
    result = compute_segments(
        raw_events, item_catalog, config.to_segment_config(), config.now or None
    )
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
            (folder / "segment_model.json").write_text(segment_model_json(result))
            plot = shares_plot(profile, folder / "segments.png")
            plot_md = inline_png(plot, "segment shares")
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
