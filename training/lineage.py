"""Where a model version came from: the orchestrator run that trained it and the events it saw.

Written once at registration as tags of the MLflow run and of the registered version (and the
data summary also as run params); the service reads the version's tags when it loads a version,
so an answer names its lineage without asking the registry per request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import polars as pl

# Tag names: the one spelling of each, shared by the registry, the service and `recsys lineage`.
TRAINED_BY = "trained_by"
DAGSTER_RUN_ID = "dagster_run_id"
DATA_EVENT_COUNT = "data.event_count"
DATA_MIN_TIMESTAMP = "data.min_timestamp"
DATA_MAX_TIMESTAMP = "data.max_timestamp"
DATA_STORE = "data.store"
# `trained_by` of a version registered outside Dagster: ModelRegistry.log_bundle called directly
# (a script, a test fixture, a benchmark), with no orchestrator run to point to.
DIRECT = "python"
DAGSTER = "dagster"


@dataclass(frozen=True)
class DataSummary:
    """The training events: how many, their time range (epoch seconds) and the store's kind."""

    event_count: int
    min_timestamp: int | None
    max_timestamp: int | None
    store: str

    @classmethod
    def of(cls, events: pl.DataFrame, store: str) -> DataSummary:
        """The summary of an events frame in the canonical schema (`timestamp` epoch seconds)."""
        if events.is_empty():
            return cls(0, None, None, store)
        ts = pl.col("timestamp")
        lo, hi = events.select(ts.min().alias("lo"), ts.max().alias("hi")).row(0)
        return cls(events.height, int(lo), int(hi), store)

    def tags(self) -> dict[str, str]:
        out = {DATA_EVENT_COUNT: str(self.event_count), DATA_STORE: self.store}
        if self.min_timestamp is not None:
            out[DATA_MIN_TIMESTAMP] = str(self.min_timestamp)
        if self.max_timestamp is not None:
            out[DATA_MAX_TIMESTAMP] = str(self.max_timestamp)
        return out

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> DataSummary | None:
        if DATA_EVENT_COUNT not in tags:
            return None
        return cls(
            int(tags[DATA_EVENT_COUNT]),
            _int_or_none(tags.get(DATA_MIN_TIMESTAMP)),
            _int_or_none(tags.get(DATA_MAX_TIMESTAMP)),
            tags.get(DATA_STORE, "unknown"),
        )


@dataclass(frozen=True)
class TrainingLineage:
    """Who trained a version (`dagster` or `python`), the Dagster run id if any, and the data."""

    trained_by: str = DIRECT
    dagster_run_id: str | None = None
    data: DataSummary | None = None

    def tags(self) -> dict[str, str]:
        out = {TRAINED_BY: self.trained_by}
        if self.dagster_run_id:
            out[DAGSTER_RUN_ID] = self.dagster_run_id
        if self.data is not None:
            out.update(self.data.tags())
        return out

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> TrainingLineage:
        """The lineage recorded in a version's tags; a version registered before lineage was
        recorded reads as `trained_by: unknown`."""
        return cls(
            tags.get(TRAINED_BY, "unknown"),
            tags.get(DAGSTER_RUN_ID) or None,
            DataSummary.from_tags(tags),
        )


@dataclass(frozen=True)
class ModelLineage:
    """What an answer says of the model behind it (the `lineage` field of the responses)."""

    model_version: str
    mlflow_run_id: str | None
    dagster_run_id: str | None
    trained_by: str
    # Creation time of the registered version (epoch seconds): the model's age counts from it.
    created_at: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "model_version": self.model_version,
            "mlflow_run_id": self.mlflow_run_id,
            "dagster_run_id": self.dagster_run_id,
            "trained_by": self.trained_by,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], created_at: float | None = None) -> ModelLineage:
        return cls(
            str(data["model_version"]),
            data.get("mlflow_run_id"),
            data.get("dagster_run_id"),
            str(data.get("trained_by", "unknown")),
            created_at,
        )


def _int_or_none(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    number = float(value)
    return int(number) if math.isfinite(number) else None
