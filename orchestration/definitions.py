"""The one `Definitions` object of the platform (named in pyproject.toml under [tool.dagster])."""

from __future__ import annotations

import dagster as dg

from assets import (
    analytics,
    analytics_checks,
    experiments,
    governance,
    ingestion,
    models,
    online,
    online_analytics,
    publishing,
)
from orchestration.environment import resources_for
from orchestration.jobs import (
    alert_on_findings,
    daily_retention,
    daily_segments,
    daily_training,
    experiment_decisions,
    experiment_report_job,
    hourly_experiment_report,
    hourly_ingest,
    hourly_trends,
    ingest_job,
    new_events_sensor,
    offline_job,
    record_run_failure,
    retention_job,
    segments_job,
    training_job,
    trends_job,
)

ASSET_MODULES = (
    ingestion,
    models,
    publishing,
    online,
    analytics,
    analytics_checks,
    online_analytics,
    governance,
    experiments,
)


def build_definitions(resources: dict | None = None) -> dg.Definitions:
    """Definitions with the given resources (the environment's when None)."""
    return dg.Definitions(
        assets=dg.load_assets_from_modules(list(ASSET_MODULES)),
        asset_checks=dg.load_asset_checks_from_modules(list(ASSET_MODULES)),
        jobs=[
            training_job,
            offline_job,
            ingest_job,
            trends_job,
            segments_job,
            retention_job,
            experiment_report_job,
        ],
        schedules=[
            hourly_ingest,
            daily_training,
            hourly_trends,
            daily_segments,
            daily_retention,
            hourly_experiment_report,
        ],
        sensors=[new_events_sensor, record_run_failure, alert_on_findings, experiment_decisions],
        resources=resources if resources is not None else resources_for(),
    )


defs = build_definitions()
