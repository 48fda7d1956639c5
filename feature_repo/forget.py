"""Forgetting one user (GDPR art. 17): the one function `DELETE /users/{id}` and
`recsys forget-user` both call, over the event store and the Redis features."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
import redis
from redis.cluster import RedisCluster

from feature_repo.definitions import Keys
from feature_repo.event_store import EventStore, user_hash, user_hashes

log = logging.getLogger("recsys.forget")

# Dedupe markers are deleted this many keys per command.
_DELETE_CHUNK = 1000


def forget_redis_user(
    client: redis.Redis | RedisCluster, keys: Keys, user_id: str, event_ids: list[str]
) -> int:
    """Delete every Redis key of the user and the dedupe markers of their deleted events;
    returns the keys deleted. The user's keys share one hash slot, so one DEL takes them all."""
    deleted = int(client.delete(*keys.user_keys(user_id)))
    # Each marker is its own slot: single-key DELs, pipelined.
    pipe = client.pipeline(transaction=False)
    for start in range(0, len(event_ids), _DELETE_CHUNK):
        for event_id in event_ids[start : start + _DELETE_CHUNK]:
            pipe.delete(keys.seen_event(event_id))
        deleted += sum(int(n) for n in pipe.execute())
    return deleted


@dataclass(frozen=True)
class Forgotten:
    """The outcome of forgetting one user, as the audit recorded it."""

    user_id: str
    deletion_id: str
    user_hash: str
    actor: str
    deleted_at: float
    removed: dict[str, int]

    def as_dict(self) -> dict:
        return {
            "user_id": self.user_id,
            "deletion_id": self.deletion_id,
            "user_hash": self.user_hash,
            "actor": self.actor,
            "deleted_at": self.deleted_at,
            "removed": self.removed,
            "suppressed": True,
        }


def forget_user(
    user_id: str,
    actor: str,
    store: EventStore,
    client: redis.Redis | RedisCluster,
    namespace: str,
) -> Forgotten:
    """Suppress the user, delete their events and batch lists, then their Redis keys, then
    write the audit record; idempotent, so a run stopped half-way (Redis down) is simply run
    again. Models trained before keep the user until the next training, which drops them."""
    if not user_id:
        raise ValueError("user_id must not be empty")
    if not actor or not actor.strip():
        raise ValueError("a deletion needs an actor (who asked for it)")
    deletion = store.delete_users([user_id])
    redis_keys = forget_redis_user(client, Keys(namespace), user_id, deletion.event_ids)
    removed = {**deletion.counts(), "redis_keys": redis_keys}
    record = store.record_deletion(user_id, actor, removed)
    return Forgotten(
        user_id=user_id,
        deletion_id=record["deletion_id"],
        user_hash=record["user_hash"],
        actor=record["actor"],
        deleted_at=record["deleted_at"],
        removed=removed,
    )


class SuppressionCache:
    """The suppression list as a process reads it on a hot path: reloaded every
    `refresh_seconds` by a background thread, so a request never waits on the event store. A
    failed reload keeps the last list; the store's append drops suppressed users anyway, so a
    stale list only delays dropping their live features."""

    def __init__(self, load: Callable[[], pl.Series], refresh_seconds: float = 10.0) -> None:
        self._load = load
        self.refresh_seconds = refresh_seconds
        self._hashes = pl.Series("user_hash", [], pl.String)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reload(self) -> None:
        """Read the list from the store now."""
        try:
            loaded = self._load()
        except Exception as exc:  # noqa: BLE001 - any store failure: keep the last list
            log.warning("cannot reload the suppression list (kept the last one): %s", exc)
            return
        with self._lock:
            self._hashes = loaded

    def start(self) -> None:
        """Load now and every `refresh_seconds`, in a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="suppression", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.reload()
            self._stop.wait(self.refresh_seconds)

    def hashes(self) -> pl.Series:
        return self._hashes

    def add(self, user_id: str) -> None:
        """A user this process just forgot is suppressed here at once."""
        with self._lock:
            self._hashes = pl.concat([self._hashes, pl.Series("user_hash", [user_hash(user_id)])])

    def keep_mask(self, events: pl.DataFrame) -> np.ndarray:
        """True for each event whose user is not suppressed."""
        hashes = self.hashes()
        if hashes.is_empty() or events.is_empty():
            return np.ones(events.height, dtype=bool)
        return (~user_hashes(events["user_id"]).is_in(hashes.implode())).to_numpy()
