"""Jobs, schedules and sensors: hourly ingest, daily retraining, retrain on new events, alerts."""

import time

import dagster as dg

from assets.resources import EventStoreResource, LocalStateResource, MLflowResource
from config import get_settings
from orchestration.alerts import alert_run, redact

# A job is its groups: the analyses' pushes to Redis sit in `analytics` with the analyses, so
# training runs the `online` group whole.
TRAINING_GROUPS = ("ingestion", "training", "publishing", "online")

training_job = dg.define_asset_job(
    "training_job",
    selection=dg.AssetSelection.groups(*TRAINING_GROUPS),
    description="Ingest, build the matrix, train and tune every model, evaluate, register, gate.",
)
# The same graph without the registry and the Redis pushes: `recsys evaluate` and
# `recsys batch-recommend`.
offline_job = dg.define_asset_job(
    "offline_job",
    selection=dg.AssetSelection.groups("ingestion", "training", "publishing")
    - dg.AssetSelection.assets("champion_gate").downstream(),
    description="Train and evaluate on the given events and write batch lists; registers nothing.",
)
ingest_job = dg.define_asset_job(
    "ingest_job",
    selection=dg.AssetSelection.groups("ingestion")
    | dg.AssetSelection.assets("online_popularity", "online_catalog"),
    description="Read new events from the store, refresh decayed popularity and the live catalog.",
)

# Each analysis job is its push to Redis and everything that push needs.
trends_job = dg.define_asset_job(
    "trends_job",
    selection=dg.AssetSelection.assets("online_trends").upstream(),
    description=(
        "Trend type, strength, seasonality and bursts per item and category, pushed to Redis."
    ),
)
segments_job = dg.define_asset_job(
    "segments_job",
    selection=dg.AssetSelection.assets("online_profiles").upstream(),
    description=(
        "Behavioural segments, RFM, engagement, churn risk and value per user, pushed to Redis."
    ),
)

retention_job = dg.define_asset_job(
    "retention_job",
    selection=dg.AssetSelection.groups("governance"),
    description="Delete events past the retention age and expired batch recommendations.",
)

hourly_trends = dg.ScheduleDefinition(
    name="hourly_trends", job=trends_job, cron_schedule="15 * * * *"
)
daily_segments = dg.ScheduleDefinition(
    name="daily_segments", job=segments_job, cron_schedule="30 4 * * *"
)
hourly_ingest = dg.ScheduleDefinition(
    name="hourly_ingest", job=ingest_job, cron_schedule="0 * * * *"
)
daily_training = dg.ScheduleDefinition(
    name="daily_training", job=training_job, cron_schedule="0 3 * * *"
)
# Before the daily training, so it never trains on events past the retention age.
daily_retention = dg.ScheduleDefinition(
    name="daily_retention", job=retention_job, cron_schedule="30 2 * * *"
)


def retrain_threshold() -> int:
    """`RECSYS_RETRAIN_MIN_EVENTS`: new events that trigger retraining (default 10,000)."""
    return get_settings().orchestration.retrain_min_events


def _last_training_start(context: dg.SensorEvaluationContext) -> float | None:
    """When the newest successful training run started (from the CLI, a schedule or this
    sensor): events stored after that are the ones no model has seen."""
    try:
        instance = context.instance
    except dg.DagsterInvariantViolationError:
        return None
    records = instance.get_run_records(
        dg.RunsFilter(job_name=training_job.name, statuses=[dg.DagsterRunStatus.SUCCESS]),
        limit=1,
    )
    return records[0].start_time if records and records[0].start_time else None


@dg.sensor(
    job=training_job,
    # Read when the code location loads: the daemon evaluates the sensor at this interval.
    minimum_interval_seconds=get_settings().orchestration.retrain_sensor_seconds,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def new_events_sensor(
    context: dg.SensorEvaluationContext, event_store: EventStoreResource
) -> dg.SensorResult | dg.SkipReason:
    """Retrain when at least N events reached the event store since the last training.

    The first evaluation only starts the count: the events already in the store when the
    sensor is first switched on (say, the demo's) were trained on by whoever stored them.
    """
    now = time.time()
    if not context.cursor:
        return dg.SensorResult(
            skip_reason="first evaluation: counting new events from now on", cursor=str(now)
        )
    since = max(float(context.cursor), _last_training_start(context) or 0.0)
    with event_store.open() as store:
        new_events = store.count_ingested_since(since)
    threshold = retrain_threshold()
    if new_events < threshold:
        return dg.SkipReason(f"{new_events} new events since the last training (< {threshold})")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(run_key=f"new-events-{int(now)}", tags={"new_events": str(new_events)})
        ],
        cursor=str(now),
    )


@dg.run_failure_sensor(default_status=dg.DefaultSensorStatus.RUNNING)
def record_run_failure(context: dg.RunFailureSensorContext, state: LocalStateResource) -> None:
    """Every failed run (and its failed checks) to `$RECSYS_HOME/run_failures.jsonl` and to the
    alert webhook (RECSYS_ALERT_WEBHOOK_URL)."""
    _alert(context, state)


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS, default_status=dg.DefaultSensorStatus.RUNNING
)
def alert_on_findings(context: dg.RunStatusSensorContext, state: LocalStateResource) -> None:
    """A run that succeeded with a failed non-blocking check or a gate that kept the champion:
    to the failure log and the alert webhook, as a failed run."""
    _alert(context, state)


def _alert(context: dg.RunStatusSensorContext, state: LocalStateResource) -> None:
    run = context.dagster_run
    alerts = alert_run(context.instance, run.run_id, state.path, get_settings().orchestration)
    for alert in alerts:
        context.log.error(
            f"{alert.title}: run {run.run_id} of {run.job_name}, {alert.subject}: "
            f"{redact(alert.summary)}"
        )


experiment_report_job = dg.define_asset_job(
    "experiment_report_job",
    selection=dg.AssetSelection.groups("experiments"),
    description="Analyse every running online experiment; the decisions sensor acts on it.",
)
hourly_experiment_report = dg.ScheduleDefinition(
    name="hourly_experiment_report", job=experiment_report_job, cron_schedule="45 * * * *"
)


@dg.sensor(minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING)
def experiment_decisions(
    context: dg.SensorEvaluationContext,
    event_store: EventStoreResource,
    tracking: MLflowResource,
    state: LocalStateResource,
) -> dg.SkipReason:
    """Act on the newest `experiment_report`: promote a winning treatment, roll back a losing
    one or one that broke a guardrail, end the experiments that are decided; each decision is
    recorded on the MLflow versions and the experiment, and a rollback or an invalid
    experiment is also an alert."""
    found = context.instance.fetch_materializations(dg.AssetKey("experiment_report"), limit=1)
    if not found.records:
        return dg.SkipReason("no experiment report yet")
    record = found.records[0]
    if context.cursor and int(context.cursor) >= record.storage_id:
        return dg.SkipReason("the newest experiment report was acted on")
    materialization = record.event_log_entry.asset_materialization
    decisions = materialization.metadata.get("decisions") if materialization else None
    done = act_on_report(
        decisions.value if decisions is not None else {},
        event_store,
        tracking,
        state,
        record.event_log_entry.run_id,
    )
    context.update_cursor(str(record.storage_id))
    return dg.SkipReason("; ".join(done) or "every experiment continues")


def act_on_report(
    decisions: dict,
    event_store: EventStoreResource,
    tracking: MLflowResource,
    state: LocalStateResource,
    run_id: str,
) -> list[str]:
    """Carry out each report decision that is not `continue` (of experiments still running with
    the salt the report analysed); returns a line per action."""
    from feature_repo.experiment_store import open_experiment_store
    from orchestration.alerts import EXPERIMENT_ACTION, Alert, notify
    from training.experiment_report import act

    registry = tracking.registry()
    done: list[str] = []
    alerts: list[Alert] = []
    with open_experiment_store(event_store.url or None, event_store.home) as experiments:
        for name, found in decisions.items():
            decision = found.get("decision", "continue")
            if decision == "continue":
                continue
            experiment = experiments.get(name)
            if not experiment.running:
                continue
            details = {"report_run_id": run_id, "mlflow_run_id": found.get("mlflow_run_id")}
            action, decided = act(experiment, decision, found.get("reason", ""), details, registry)
            experiments.update(decided)
            done.append(f"{name}: {decision} ({action.reason})")
            if decision.startswith(("rollback", "invalid")):
                alerts.append(
                    Alert(
                        EXPERIMENT_ACTION, experiment_report_job.name, run_id, name, action.reason
                    )
                )
    notify(alerts, state.path, get_settings().orchestration)
    return done
