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
from orchestration.environment import executor_for, resources_for
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
from orchestration.progress import progress_logger

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


def build_definitions(
    resources: dict | None = None, executor: dg.ExecutorDefinition | None = None
) -> dg.Definitions:
    """Definitions with the given resources and executor (the environment's when None)."""
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
        executor=executor or executor_for(),
        # The console logger stays the default; `recsys` selects `progress` in its run config.
        loggers={**dg.default_loggers(), "progress": progress_logger},
    )


defs = build_definitions()


def job_named(name: str) -> dg.JobDefinition:
    """A job of the Definitions of this process's environment now: what the process that starts
    an out-of-process run and each of its step processes build the job from
    (`dg.build_reconstructable_job("orchestration.definitions", "job_named", (name,))`). Built
    afresh rather than taken from `defs`, which keeps the environment of its import."""
    return build_definitions().resolve_job_def(name)
