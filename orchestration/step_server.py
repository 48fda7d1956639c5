"""Imported once by the multiprocess executor's forkserver, so that every step process forked
from it starts with the definitions and with what opening the run's instance imports (its SQLite
or PostgreSQL storage, alembic, the snapshots): some 3 s of CPU per step otherwise."""

import alembic.command  # noqa: F401
import dagster._core.execution.backfill  # noqa: F401
import dagster._core.instance.factory  # noqa: F401
import dagster._core.remote_representation  # noqa: F401
import dagster._core.scheduler  # noqa: F401
import dagster._core.snap  # noqa: F401
import dagster._core.storage.event_log.sqlite  # noqa: F401
import dagster._core.storage.local_compute_log_manager  # noqa: F401
import dagster._core.storage.root  # noqa: F401
import dagster._core.storage.runs.sqlite  # noqa: F401
import dagster._core.storage.schedules.sqlite  # noqa: F401
import dagster_postgres  # noqa: F401

import orchestration.definitions  # noqa: F401
