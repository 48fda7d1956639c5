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
    bounds = settings.event_limits()
    limits = {
        "max_future_seconds": bounds.max_future_seconds,
        "rating_min": bounds.rating_min,
        "rating_max": bounds.rating_max,
        "max_quantity": bounds.max_quantity,
    }
    if env == "local":
        return {
            "state": LocalStateResource(home=home),
            "event_store": EventStoreResource(
                url=settings.postgres_url() or "", home=home, **limits
            ),
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
        "event_store": EventStoreResource(
            url=dg.EnvVar("RECSYS_POSTGRES_URL"), home=home, **limits
        ),
        "tracking": MLflowResource(
            tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI"),
            model_name=settings.model_name(),
            cache_dir=str(settings.recsys_home_path() / "model-cache"),
        ),
        "redis": RedisFeaturesResource(
            url=dg.EnvVar("REDIS_URL"), home=home, namespace=settings.redis_namespace()
        ),
    }
