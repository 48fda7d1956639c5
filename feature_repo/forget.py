"""Forgetting one user (GDPR art. 17): the one function `DELETE /users/{id}` and
`recsys forget-user` both call, over the event store and the Redis features."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from redis.cluster import RedisCluster

from feature_repo.definitions import Keys
from feature_repo.event_store import EventStore

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
