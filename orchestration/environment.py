"""The one place that picks resources for an environment (`local` (embedded), `docker`, `prod`)
and the executor that runs a job's steps (`RECSYS_DAGSTER_EXECUTOR`)."""

from __future__ import annotations

import os
from typing import Any

import dagster as dg

from assets.resources import (
    ComputeResource,
    EventStoreResource,
    LocalStateResource,
    MLflowResource,
    RedisFeaturesResource,
)
from config import SettingsError, get_settings


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
    compute = ComputeResource(threads=step_threads())
    if env == "local":
        return {
            "compute": compute,
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
        "compute": compute,
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


# Where the Definitions live (pyproject's [tool.dagster] module_name); step processes rebuild
# their job from it.
DEFINITIONS_MODULE = "orchestration.definitions"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's share,
    not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity call
        return os.cpu_count() or 1


def concurrent_steps() -> int:
    """Steps of one run executing at once: RECSYS_DAGSTER_MAX_CONCURRENT, else the cores (one
    step at a time in process)."""
    orchestration = get_settings().orchestration
    if orchestration.dagster_executor == "in_process":
        return 1
    return orchestration.dagster_max_concurrent or available_cores()


def step_threads() -> int:
    """Threads one training step may use: RECSYS_STEP_THREADS, else the cores shared out among
    the steps executing at once, so ALS next to Item2Vec does not oversubscribe the CPU."""
    given = get_settings().orchestration.step_threads
    return given or max(1, available_cores() // concurrent_steps())


def executor_for(name: str | None = None) -> dg.ExecutorDefinition:
    """The executor of every job (RECSYS_DAGSTER_EXECUTOR when `name` is None).

    `multiprocess`, the default, runs each step in its own process, independent steps (ALS,
    Item2Vec, item-item, popularity) side by side; its outputs pass through the default
    filesystem IO manager under the instance's storage folder ($DAGSTER_HOME/storage).
    `celery` sends each step to a dagster-celery worker through RECSYS_CELERY_BROKER_URL; `k8s`
    runs each step as a Kubernetes job (inside a run that the K8sRunLauncher started). Both
    need their extra installed and storage every worker shares.
    """
    orchestration = get_settings().orchestration
    name = name or orchestration.dagster_executor
    if name == "in_process":
        return dg.in_process_executor
    if name == "multiprocess":
        return dg.multiprocess_executor.configured(
            {
                "max_concurrent": concurrent_steps(),
                # Each step process is forked from a server that imported the definitions once
                # (orchestration/step_server.py): a spawned process would import them (dagster,
                # mlflow, sklearn: over ten seconds of CPU) anew for every step.
                "start_method": {"forkserver": {"preload_modules": ["orchestration.step_server"]}},
            },
            name="multiprocess",
        )
    if name == "celery":
        return celery_executor()
    if name == "k8s":
        try:
            from dagster_k8s import k8s_job_executor
        except ImportError as exc:
            raise SettingsError(
                "RECSYS_DAGSTER_EXECUTOR=k8s needs dagster-k8s: pip install 'recsys-platform[k8s]'"
            ) from exc
        return k8s_job_executor.configured({"max_concurrent": concurrent_steps()}, name="k8s")
    raise SettingsError(f"RECSYS_DAGSTER_EXECUTOR={name!r}: not an executor")


def celery_config() -> dict[str, Any]:
    """The celery executor's config, URLs read from the environment where it runs (so no
    password lands in a definition). The workers start with the same block:
    `dagster-celery worker start -A dagster_celery.app -y worker.yaml -q $RECSYS_CELERY_QUEUE`,
    where worker.yaml is `{"execution": {"config": celery_config()}}`.

    The result backend is RECSYS_CELERY_BACKEND_URL, else the Redis broker itself, else rpc://
    (results as messages back over the AMQP broker).
    """
    orchestration = get_settings().orchestration
    broker = orchestration.celery_broker_url
    if not broker:
        raise SettingsError(
            "RECSYS_DAGSTER_EXECUTOR=celery needs RECSYS_CELERY_BROKER_URL, e.g. "
            "amqp://guest:guest@127.0.0.1:5672// (RabbitMQ) or redis://127.0.0.1:6379/1"
        )
    if orchestration.celery_backend_url:
        backend: Any = {"env": "RECSYS_CELERY_BACKEND_URL"}
    elif broker.startswith(("redis://", "rediss://")):
        backend = {"env": "RECSYS_CELERY_BROKER_URL"}
    else:
        backend = "rpc://"
    return {
        "broker": {"env": "RECSYS_CELERY_BROKER_URL"},
        "backend": backend,
        "config_source": {"task_default_queue": orchestration.celery_queue},
    }


def celery_executor() -> dg.ExecutorDefinition:
    """dagster-celery's executor with `celery_config()`."""
    try:
        from dagster_celery import celery_executor as executor
    except ImportError as exc:
        raise SettingsError(
            "RECSYS_DAGSTER_EXECUTOR=celery needs dagster-celery: "
            "pip install 'recsys-platform[celery]'"
        ) from exc
    return executor.configured(celery_config(), name="celery")
