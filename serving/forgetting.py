"""The service's side of forgetting a user (feature_repo/forget.py): the suppression list its
/events reads, and DELETE /users/{id}."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from starlette.responses import Response

from feature_repo.event_store import EventStore, open_event_store
from feature_repo.forget import SuppressionCache, forget_user
from serving.api import json_response
from serving.errors import DependencyUnavailable
from serving.features import FeatureReader
from serving.outage import REDIS_DOWN


class SuppressedLoader:
    """Loads the suppression list for a SuppressionCache over one event-store connection, kept
    for the reloads (only the reload thread uses it) and dropped on a failure, so the next
    reload connects again."""

    def __init__(self, postgres_url: str | None, home: Path) -> None:
        self.postgres_url = postgres_url
        self.home = home
        self._store: EventStore | None = None

    def __call__(self) -> pl.Series:
        if self._store is None:
            self._store = open_event_store(self.postgres_url, self.home)
        try:
            return self._store.suppressed()
        except Exception:
            self._store.close()
            self._store = None
            raise


def forget(
    user_id: str,
    actor: str,
    *,
    features: FeatureReader,
    suppressed: SuppressionCache,
    postgres_url: str | None,
    home: Path,
) -> Response:
    """Delete everything of the user in the event store and Redis, suppress them, audit it.

    Unlike a read, a deletion has no fallback: with Redis or the event store down it is a
    503 and the client retries (forgetting is idempotent, the suppression comes first)."""
    try:
        events = open_event_store(postgres_url, home)
    except ConnectionError as exc:
        raise DependencyUnavailable(f"{exc}; retry the deletion", 5) from exc
    try:
        # Suppressed here first: this worker's /events drops the user from now on.
        suppressed.add(user_id)
        store = features.store()
        done = forget_user(user_id, actor, events, store.redis, store.namespace)
    except REDIS_DOWN as exc:
        features.outage.failed(exc)
        raise DependencyUnavailable(
            "Redis is unavailable: the user is suppressed but their live features are not "
            "deleted yet; retry the deletion",
            features.outage.retry_after,
        ) from exc
    finally:
        events.close()
    return json_response(done.as_dict())
