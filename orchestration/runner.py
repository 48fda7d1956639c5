"""Runs the asset graph in-process for the CLI, with the Dagster instance under RECSYS_HOME."""

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg

from config import get_settings
from orchestration.alerts import alert_run, error_text, innermost_error
from orchestration.definitions import build_definitions

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


class _ProgressHandler(logging.Handler):
    """Prints one line per finished step, so a person sees the graph advance."""

    def __init__(self, stream: Any) -> None:
        super().__init__(logging.DEBUG)
        self.stream = stream
        self.started: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "dagster_event", None)
        if event is None:
            # The assets' own progress and decisions (context.log.info and above).
            if record.levelno >= logging.INFO:
                meta = getattr(record, "dagster_meta", None) or {}
                message = meta.get("orig_message") or record.getMessage()
                print(f"      {message}", file=self.stream, flush=True)
            return
        step = event.step_key or ""
        kind = event.event_type_value
        if kind == "STEP_START":
            self.started[step] = time.perf_counter()
            print(f"  ... {step}", file=self.stream, flush=True)
        elif kind == "STEP_SUCCESS":
            took = time.perf_counter() - self.started.get(step, time.perf_counter())
            print(f"  ok  {step} ({took:.1f}s)", file=self.stream, flush=True)
        elif kind == "STEP_FAILURE":
            print(f"  FAILED {step}", file=self.stream, flush=True)


@dg.logger(description="One line per step for the CLI.")
def progress_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    logger = logging.getLogger("recsys.progress")
    logger.handlers = [_ProgressHandler(sys.stderr)]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger


def run_job(
    job_name: str,
    run_config: dict[str, Any] | None = None,
    resources: dict[str, Any] | None = None,
    persistent: bool = True,
    show_progress: bool = True,
) -> dg.ExecuteInProcessResult:
    """Execute a job of the platform's Definitions in this process and return its result.

    `persistent` records the run in the Dagster instance under RECSYS_HOME (visible in the UI);
    otherwise an ephemeral instance is used and nothing is kept.
    """
    defs = build_definitions(resources)
    job = defs.resolve_job_def(job_name)
    config = dict(run_config or {})
    if show_progress:
        job = job.with_logger_defs({**job.loggers, "progress": progress_logger})
        config.setdefault("loggers", {"progress": {}})
    else:
        config.setdefault("loggers", {"console": {"config": {"log_level": "WARNING"}}})
    if persistent:
        ensure_dagster_home()
        instance = dg.DagsterInstance.get()
    else:
        instance = dg.DagsterInstance.ephemeral()
    result = job.execute_in_process(run_config=config, instance=instance, raise_on_error=False)
    # No daemon sees an in-process run (its sensors watch the runs their code location launched),
    # so the runner alerts on it itself, through the same function.
    try:
        settings = get_settings()
        alert_run(instance, result.run_id, settings.home_dir(), settings.orchestration)
    except (OSError, ValueError) as exc:
        # An unwritable failure log or a malformed alert setting (SettingsError) is reported
        # beside the run's outcome, not instead of it.
        logging.getLogger(__name__).warning(f"could not alert on run {result.run_id}: {exc}")
    return result


def failure_message(result: dg.ExecuteInProcessResult) -> str:
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


def first_failure(result: dg.ExecuteInProcessResult) -> tuple[str, Any] | None:
    """(step key, innermost error) of the first failed step, if any."""
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            data = event.step_failure_data
            return event.step_key or "", innermost_error(data.error if data else None)
    return None
