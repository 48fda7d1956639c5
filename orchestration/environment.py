"""The one place that picks resources for an environment: `local` (embedded), `docker`, `prod`."""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from assets.resources import (
    EventStoreResource,
    LocalStateResource,
    MLflowResource,
    RedisFeaturesResource,
)
from training import settings


def environment_name() -> str:
    """`RECSYS_ENV` (local, docker or prod); local when unset."""
    name = os.environ.get("RECSYS_ENV", "local")
    if name not in ("local", "docker", "prod"):
        raise ValueError(f"RECSYS_ENV must be local, docker or prod, not {name!r}")
    return name


def resources_for(env: str | None = None) -> dict[str, Any]:
    """The resource map of an environment.

    `local` resolves the embedded defaults (RECSYS_HOME, sqlite MLflow, Parquet events) now;
    `docker` and `prod` read URLs from the environment at run time through `EnvVar`, so secrets
    never land in run configs.
    """
    env = env or environment_name()
    home = str(settings.recsys_home_path())
    if env == "local":
        return {
            "state": LocalStateResource(home=home),
            "event_store": event_store_resource(settings.postgres_url() or "", home),
            "tracking": MLflowResource(
                tracking_uri=settings.mlflow_tracking_uri(),
                model_name=settings.model_name(),
                artifact_location=settings.mlflow_artifact_root(),
                cache_dir=str(settings.recsys_home_path() / "model-cache"),
            ),
            "redis": RedisFeaturesResource(
                url=settings.redis_url() or "", home=home, namespace=settings.redis_namespace()
            ),
        }
    return {
        "state": LocalStateResource(home=home),
        "event_store": event_store_resource(dg.EnvVar("RECSYS_POSTGRES_URL"), home),
        "tracking": MLflowResource(
            tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI"),
            model_name=settings.model_name(),
            cache_dir=str(settings.recsys_home_path() / "model-cache"),
        ),
        "redis": RedisFeaturesResource(
            url=dg.EnvVar("REDIS_URL"), home=home, namespace=settings.redis_namespace()
        ),
    }


def event_store_resource(url: str | dg.EnvVar, home: str) -> EventStoreResource:
    """The event store at `url` (empty: embedded under `home`) with the event contract's bounds
    of this environment (RECSYS_RATING_RANGE, ...)."""
    limits = settings.event_limits()
    return EventStoreResource(
        url=url,
        home=home,
        max_future_seconds=limits.max_future_seconds,
        rating_min=limits.rating_min,
        rating_max=limits.rating_max,
        max_quantity=limits.max_quantity,
        retention_days=settings.retention_days(),
    )
