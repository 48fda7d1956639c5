"""The service and the stream consumer on a real three-master Redis Cluster (REDIS_URL a
`redis+cluster://` URL): events in, the response cache, the consumer group, the event store."""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl
import pytest
from redis.cluster import RedisCluster
from starlette.testclient import TestClient

from feature_repo.connection import connect
from feature_repo.event_store import open_event_store
from feature_repo.store import FeatureStore
from feature_repo.stream import EVENT_FIELD, EventStream
from serving.consumer import run_consumer
from tests.serving.test_service_api import SHOP, post_events


# This module's tests run the service on the session's cluster instead of the one server.
@pytest.fixture(scope="session")
def redis_url(redis_cluster_url: str) -> str:
    return redis_cluster_url


@pytest.fixture(scope="session")
def redis_client(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> RedisCluster:
    return connect(redis_url, tmp_path_factory.mktemp("unused"))


def test_events_cache_and_consumer_on_a_redis_cluster(
    client: TestClient, store: FeatureStore, recsys_home: Path
) -> None:
    assert isinstance(store.redis, RedisCluster)
    body = post_events(client, [*SHOP, ("u5", "hat", "view", "e1")])
    # The last event reuses e1 (another user's): a duplicate, as on one server.
    assert (body["accepted"], body["duplicates"], body["duplicate_indices"]) == (7, 1, [7])

    first = client.post("/recommend", json={"user_id": "u1", "k": 3}).json()
    second = client.post("/recommend", json={"user_id": "u1", "k": 3}).json()
    assert first["cached"] is False and second["cached"] is True
    assert second["items"] == first["items"] and first["items"]
    post_events(client, [("u1", "laces", "view", "e100")])
    assert client.post("/recommend", json={"user_id": "u1", "k": 3}).json()["cached"] is False
    popular = client.post("/popular", json={"k": 2}).json()
    assert [i["item_id"] for i in popular["items"]] == ["laces", "shoes"]
    similar = client.post("/similar_items", json={"item_id": "shoes", "k": 5}).json()
    assert [i["item_id"] for i in similar["items"]][0] == "laces"
    activity = client.get("/users/u1/activity").json()
    assert [r["item_id"] for r in activity["recent"]] == ["laces", "socks", "shoes"]
    assert activity["counters"]["events"] == 3

    # The stream holds the accepted events only (no duplicate); the consumer group moves them.
    stream = EventStream(store.redis, store.namespace)
    # The answers' impressions reach the stream from a thread that flushes every 50 ms: let the
    # last flush land before the consumer runs, or it is left behind as lag.
    time.sleep(0.5)
    entries = store.redis.xrange(stream.key)
    assert sum(EVENT_FIELD in fields for _, fields in entries) == 8
    stats = run_consumer(idle_exit=True, batch_size=5)
    assert stats.stored == 8
    stored = open_event_store(None, recsys_home).read()
    assert sorted(stored["event_id"].to_list()) == sorted([f"e{n}" for n in range(1, 8)] + ["e100"])
    assert stored.filter(pl.col("event_id") == "e1")["user_id"].to_list() == ["u1"]
    assert stream.pending() == 0 and stream.lag() == 0


def test_a_cluster_that_lost_a_master_is_redis_down_to_the_service(tmp_path: Path) -> None:
    """A dead master refuses connections; once the others fail it, they answer CLUSTERDOWN for
    every slot. Both are an outage (a degraded answer, a 503), not a bug (a 500)."""
    from feature_repo.definitions import Keys
    from feature_repo.types import FeatureRequest
    from serving.outage import REDIS_DOWN
    from tests.redis_cluster import ask, binaries, local_cluster, ports, wait_for

    found = binaries()
    assert found is not None  # the session's cluster started
    cli = found[1]
    nodes = ports(1)
    with local_cluster(tmp_path / "cluster", nodes, node_timeout_ms=500) as url:
        client = connect(url, tmp_path)
        store = FeatureStore(client, "outage")
        keys = Keys("outage")
        # A user whose keys live on each master.
        users = {client.get_node_from_key(keys.recent(f"u{n}")).port: f"u{n}" for n in range(60)}
        assert set(users) == set(nodes)
        for user in users.values():
            store.read_request(FeatureRequest(user, "sig", 5, 5))
        victim, survivor = nodes[0], nodes[1]
        ask(cli, victim, "SHUTDOWN", "NOSAVE")
        wait_for(
            lambda: "cluster_state:fail" in ask(cli, survivor, "CLUSTER", "INFO"),
            30,
            "the cluster to fail its lost master",
        )
        # The lost master's user (refused connections), a surviving master's (CLUSTERDOWN).
        for user in (users[victim], users[survivor]):
            with pytest.raises(REDIS_DOWN):
                store.read_request(FeatureRequest(user, "sig", 5, 5))
