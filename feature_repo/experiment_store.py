"""Where experiment definitions and their decisions live: the `experiments` table beside the
events in PostgreSQL, or a JSON file under RECSYS_HOME in the embedded default. The CLI, the
admin routes, the report asset and the service all read and write them here."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from feature_repo.event_store import EventStore
from training.experiment_stats import DEFAULT_PRE_PERIOD_SECONDS
from training.experiments import Experiment, ExperimentError


class UnknownExperiment(ExperimentError):
    """No experiment of that name."""


class ExperimentStore(ABC):
    """Experiments by name; a name once used keeps its record (stopped or decided)."""

    @abstractmethod
    def _records(self) -> dict[str, dict]: ...

    @abstractmethod
    def _write(self, experiment: Experiment) -> None: ...

    def all(self) -> list[Experiment]:
        """Every experiment, oldest first."""
        found = [Experiment.from_dict(r) for r in self._records().values()]
        return sorted(found, key=lambda e: (e.started_at, e.name))

    def running(self) -> list[Experiment]:
        return [e for e in self.all() if e.running]

    def get(self, name: str) -> Experiment:
        record = self._records().get(name)
        if record is None:
            raise UnknownExperiment(
                f"no experiment named {name!r} (recsys experiment list shows them)"
            )
        return Experiment.from_dict(record)

    def start(self, experiment: Experiment) -> Experiment:
        """Store a new running experiment; a running one of the same name is an error."""
        existing = self._records().get(experiment.name)
        if existing is not None and existing.get("status") == "running":
            raise ExperimentError(
                f"experiment {experiment.name!r} is already running: stop it first"
            )
        self._write(experiment)
        return experiment

    def update(self, experiment: Experiment) -> Experiment:
        """Replace the stored record of an experiment (stopped, decided)."""
        if experiment.name not in self._records():
            raise UnknownExperiment(f"no experiment named {experiment.name!r}")
        self._write(experiment)
        return experiment

    def stop(self, name: str, now: float | None = None) -> Experiment:
        experiment = self.get(name)
        if not experiment.running:
            return experiment
        return self.update(experiment.stopped("stopped", time.time() if now is None else now))

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __enter__(self) -> ExperimentStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FileExperimentStore(ExperimentStore):
    """The embedded default: one JSON file, replaced atomically under a lock."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _records(self) -> dict[str, dict]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ExperimentError(
                f"{self.path} is not valid JSON ({exc}): fix or remove it"
            ) from exc

    def _write(self, experiment: Experiment) -> None:
        with self._locked():
            records = self._records()
            records[experiment.name] = experiment.to_dict()
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(records, indent=1, sort_keys=True))
            tmp.replace(self.path)


_DDL = """
CREATE TABLE IF NOT EXISTS experiments (
    name TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    definition JSONB NOT NULL
);
"""


class PostgresExperimentStore(ExperimentStore):
    """The `experiments` table in the event store's PostgreSQL database."""

    def __init__(self, url: str) -> None:
        from feature_repo.event_store_postgres import connect_with_schema

        self._conn = connect_with_schema(
            url, "the PostgreSQL experiments table", "recsys-experiments-schema", _DDL
        )

    def _records(self) -> dict[str, dict]:
        with self._conn.cursor() as cur:
            cur.execute("SELECT name, definition FROM experiments")
            return {name: definition for name, definition in cur.fetchall()}

    def _write(self, experiment: Experiment) -> None:
        from psycopg.types.json import Jsonb

        with self._conn.cursor() as cur:
            cur.execute(
                "INSERT INTO experiments (name, status, started_at, updated_at, definition) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET "
                "status = EXCLUDED.status, started_at = EXCLUDED.started_at, "
                "updated_at = EXCLUDED.updated_at, definition = EXCLUDED.definition",
                (
                    experiment.name,
                    experiment.status,
                    experiment.started_at,
                    time.time(),
                    Jsonb(experiment.to_dict()),
                ),
            )

    def close(self) -> None:
        self._conn.close()


def open_experiment_store(url: str | None, home: str | Path) -> ExperimentStore:
    """The experiments beside the event store the same URL names (RECSYS_POSTGRES_URL)."""
    if url and url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        return PostgresExperimentStore(url)
    return FileExperimentStore(Path(home) / "experiments.json")


def read_inputs(events: EventStore, experiment: Experiment) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The experiment's impressions and the events from a pre-period before its start on (each
    user's engagement then is the CUPED covariate; attribution needs an impression first, so
    an event before the start is never attributed)."""
    logs = events.read_impressions(since=experiment.started_at)
    logs = logs.filter(pl.col("experiment") == experiment.name)
    since = int(experiment.started_at - DEFAULT_PRE_PERIOD_SECONDS)
    return logs, events.read(since_timestamp=since, with_context=True)
