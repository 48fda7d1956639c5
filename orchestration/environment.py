"""The one place that picks resources for an environment: `local` (embedded), `docker`, `prod`."""

from __future__ import annotations

from typing import Any

import dagster as dg

from assets.resources import (
    EventStoreResource,
    LocalStateResource,
    MLflowResource,
    RedisFeaturesResource,
)
from config import get_settings


def environment_name() -> str:
    """`RECSYS_ENV` (local, docker or prod); local when unset."""
    return get_settings().orchestration.env


def resources_for(env: str | None = None) -> dict[str, Any]:
    """The resource map of an environment.

    `local` resolves the embedded defaults (RECSYS_HOME, sqlite MLflow, Parquet events) now;
    `docker` and `prod` read URLs from the environment at run time through `EnvVar`, so secrets
    never land in run configs.
    """
    config = get_settings()
    env = env or config.orchestration.env
    home = str(config.home)
    if env == "local":
        return {
            "state": LocalStateResource(home=home),
            "event_store": event_store_resource(config.store.postgres_url or "", home),
            "tracking": MLflowResource(
                tracking_uri=config.mlflow_tracking_uri(),
                model_name=config.mlflow.model_name,
                artifact_location=config.mlflow_artifact_root(),
                cache_dir=str(config.model_cache()),
            ),
            "redis": RedisFeaturesResource(
                url=config.redis.url or "", home=home, namespace=config.redis.namespace
            ),
        }
    return {
        "state": LocalStateResource(home=home),
        "event_store": event_store_resource(dg.EnvVar("RECSYS_POSTGRES_URL"), home),
        "tracking": MLflowResource(
            tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI"),
            model_name=config.mlflow.model_name,
            cache_dir=str(config.model_cache()),
        ),
        "redis": RedisFeaturesResource(
            url=dg.EnvVar("REDIS_URL"), home=home, namespace=config.redis.namespace
        ),
    }


def event_store_resource(url: str | dg.EnvVar, home: str) -> EventStoreResource:
    """The event store at `url` (empty: embedded under `home`) with the event contract's bounds
    of this environment (RECSYS_RATING_RANGE, ...)."""
    store = get_settings().store
    limits = store.event_limits()
    return EventStoreResource(
        url=url,
        home=home,
        max_future_seconds=limits.max_future_seconds,
        rating_min=limits.rating_min,
        rating_max=limits.rating_max,
        max_quantity=limits.max_quantity,
        retention_days=store.retention_days,
    )
