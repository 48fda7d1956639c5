"""FeatureStore against a real Redis: ingest, dedupe, decay, co-view, cache, offline pushes."""

from __future__ import annotations

import math
import uuid

import numpy as np
import polars as pl
import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from feature_repo.connection import Client
from feature_repo.definitions import FEATURES, FeatureConfig, Keys
from feature_repo.ingest import ClusterIngest, SingleNodeIngest
from feature_repo.reads import ClusterReads, Reads
from feature_repo.store import FeatureStore
from feature_repo.stream import EventStream
from feature_repo.types import FeatureRequest, RequestFeatures, ScoredItems

NOW = 1_800_000_000.0


def events(rows: list[tuple], start_id: int = 0) -> pl.DataFrame:
    """Events from (user, item, type, seconds before NOW[, value]) tuples."""
    return pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "event_type": [r[2] for r in rows],
            "timestamp": [int(NOW - r[3]) for r in rows],
            "value": [r[4] if len(r) > 4 else None for r in rows],
            "session_id": [None] * len(rows),
            "event_id": [f"e{start_id + i}" for i in range(len(rows))],
        },
        schema_overrides={"value": pl.Float64, "session_id": pl.String},
    )


def coviewed(store: FeatureStore, item_ids: list[str], k: int) -> list[ScoredItems]:
    """Items co-viewed after each of `item_ids`, read as the service reads them."""
    return store.item_lists(item_ids, ["coview"], k)["coview"]


def read_user(
    store: FeatureStore, user_id: str, signature: str, n_recent: int, n_candidates: int, **kw
) -> RequestFeatures:
    """The request read without per-item lists: the cached response or the user's features."""
    return store.read_request(FeatureRequest(user_id, signature, n_recent, n_candidates), **kw)


def popular(store: FeatureStore, k: int, now: float) -> ScoredItems:
    """The live popularity the service reads (decayed to `now`)."""
    return store.global_lists(k, now).popularity


def stats(store: FeatureStore) -> dict[str, int]:
    """The deployment counters the ingest keeps (accepted, duplicates, new_items)."""
    return {name: int(value) for name, value in store.redis.hgetall(store.keys.stats).items()}


class CountingRedis(redis.Redis):
    """A client that counts the commands it sends (a pipeline counts once per command)."""

    sent = 0

    def execute_command(self, *args, **options):
        CountingRedis.sent += 1
        return super().execute_command(*args, **options)


def test_ingest_updates_every_feature(store: FeatureStore) -> None:
    batch = events(
        [
            ("u1", "a", "view", 50),
            ("u1", "b", "view", 40),
            ("u1", "c", "purchase", 30),
            ("u2", "a", "view", 20),
            ("u2", "c", "rating", 10, 4.0),
        ]
    )
    result = store.ingest(batch, now=NOW)
    assert (result.accepted, result.duplicates, result.new_items) == (5, 0, 3)

    recent = store.recent_items("u1")
    assert list(recent.ids) == ["c", "b", "a"]
    assert list(recent.scores) == [NOW - 30, NOW - 40, NOW - 50]
    counters = store.counters("u1")
    assert counters["view"] == 2 and counters["purchase"] == 1 and counters["events"] == 3
    assert counters["last_seen"] == pytest.approx(NOW)

    # Co-view is directional: items touched after `a` by the same users.
    after_a, after_b, after_c = coviewed(store, ["a", "b", "c"], 10)
    assert dict(zip(after_a.ids, after_a.scores, strict=True)) == {"c": 2.0, "b": 1.0}
    assert dict(zip(after_b.ids, after_b.scores, strict=True)) == {"c": 1.0}
    assert len(after_c) == 0

    # Popularity weighs purchase 10 and a rating its value, decayed from the event times.
    pop = popular(store, 10, now=NOW)
    rate = store.config.popularity_rate
    expected_c = 10 * math.exp(-rate * 30) + 4 * math.exp(-rate * 10)
    assert pop.ids[0] == "c"
    assert pop.scores[0] == pytest.approx(expected_c, rel=1e-9)
    assert stats(store) == {"accepted": 5, "new_items": 3}
    assert EventStream(store.redis, store.namespace).length() == 5


def test_duplicates_change_nothing(store: FeatureStore) -> None:
    batch = events([("u1", "a", "view", 5), ("u1", "b", "click", 4)])
    store.ingest(batch, now=NOW)
    before = (
        store.counters("u1"),
        popular(store, 5, now=NOW),
        coviewed(store, ["a"], 5),
    )
    again = store.ingest(batch, now=NOW)
    assert (again.accepted, again.duplicates) == (0, 2)
    assert list(again.duplicate_rows) == [0, 1]
    after = (
        store.counters("u1"),
        popular(store, 5, now=NOW),
        coviewed(store, ["a"], 5),
    )
    assert before[0] == after[0]
    np.testing.assert_array_equal(before[1].scores, after[1].scores)
    np.testing.assert_array_equal(before[2][0].scores, after[2][0].scores)
    assert EventStream(store.redis, store.namespace).length() == 2

    # A repeated event_id inside one batch is a duplicate too; the others go through.
    mixed = pl.concat([events([("u1", "c", "view", 1)], start_id=10)] * 2 + [batch.head(1)])
    result = store.ingest(mixed, now=NOW)
    assert (result.accepted, result.duplicates, list(result.duplicate_rows)) == (1, 2, [1, 2])


def test_an_event_id_is_global_across_users(store: FeatureStore) -> None:
    first = store.ingest(events([("alice", "a", "view", 5)]), now=NOW)
    # Another user's event with the same id, then the same id twice in one batch.
    second = store.ingest(events([("bob", "b", "view", 4)]), now=NOW)
    twice = events([("carol", "c", "view", 3), ("dave", "d", "view", 2)], start_id=7)
    third = store.ingest(twice.with_columns(pl.lit("e7").alias("event_id")), now=NOW)
    assert (first.accepted, first.duplicates) == (1, 0)
    assert (second.accepted, second.duplicates, list(second.duplicate_rows)) == (0, 1, [0])
    assert (third.accepted, third.duplicates, list(third.duplicate_rows)) == (1, 1, [1])
    # The duplicate changed no feature of its user.
    assert len(store.recent_items("bob")) == 0 and store.counters("bob").get("view", 0) == 0
    assert list(store.recent_items("alice").ids) == ["a"]
    assert len(store.recent_items("dave")) == 0


def test_context_rides_the_stream(store: FeatureStore) -> None:
    batch = events([("u1", "a", "view", 5), ("u1", "b", "view", 4)]).with_columns(
        pl.Series("context", ['{"device":"ios","page":"home"}', None])
    )
    store.ingest(batch, now=NOW)
    stream = EventStream(store.redis, store.namespace)
    stream.ensure_group()
    read = stream.read("c", 10, None).events
    assert read["context"].to_list() == ['{"device":"ios","page":"home"}', None]
    # A batch without the column (an older caller) carries a null context.
    store.ingest(events([("u2", "c", "view", 1)], start_id=5), now=NOW)
    assert stream.read("c", 10, None).events["context"].to_list() == [None]


@pytest.mark.single_node
def test_batch_is_one_round_trip(redis_client: redis.Redis, namespace: str) -> None:
    counting = CountingRedis(connection_pool=redis_client.connection_pool)
    store = FeatureStore(counting, namespace)
    store.ingest(events([("u0", "warm", "view", 1)], start_id=999), now=NOW)  # loads the script
    rows = [(f"u{i % 37}", f"i{i % 101}", "view", 500 - i) for i in range(500)]
    CountingRedis.sent = 0
    result = store.ingest(events(rows), now=NOW)
    assert result.accepted == 500
    assert CountingRedis.sent == 1


def test_recent_items_are_capped_and_newest_first(redis_client, namespace) -> None:
    store = FeatureStore(redis_client, namespace, FeatureConfig(recent_cap=3))
    store.ingest(events([("u", f"i{n}", "view", 100 - n) for n in range(6)]), now=NOW)
    assert list(store.recent_items("u").ids) == ["i5", "i4", "i3"]
    # An older event of a kept item does not move it back in time.
    store.ingest(events([("u", "i5", "view", 500)], start_id=50), now=NOW)
    assert list(store.recent_items("u").ids) == ["i5", "i4", "i3"]


def test_coview_window_and_cap(redis_client, namespace) -> None:
    config = FeatureConfig(coview_window_items=2, coview_window_seconds=100, coview_cap=2)
    store = FeatureStore(redis_client, namespace, config)
    # x is older than the 100 s window when z arrives, so only y and w precede z.
    store.ingest(
        events([("u", "x", "view", 500), ("u", "y", "view", 90), ("u", "w", "view", 80)]),
        now=NOW,
    )
    store.ingest(events([("u", "z", "view", 70)], start_id=10), now=NOW)
    after_x, after_y = coviewed(store, ["x", "y"], 10)
    assert set(after_x.ids) == set()
    assert set(after_y.ids) == {"w", "z"}
    # Re-touching an item already in the window adds no co-view.
    store.ingest(events([("u", "y", "click", 60)], start_id=20), now=NOW)
    assert dict(zip(*coviewed(store, ["w"], 10)[0], strict=True)) == {"z": 1.0}

    # The cap keeps the strongest pairs.
    for n, other in enumerate(["p", "p", "q", "r"]):
        pair = [(f"v{n}", "hub", "view", 50), (f"v{n}", other, "view", 49)]
        store.ingest(events(pair, start_id=100 + 10 * n), now=NOW)
    # r was the third member: the weakest (q: 1, ties broken by name) made room for it.
    hub = coviewed(store, ["hub"], 10)[0]
    assert list(hub.ids) == ["p", "r"] and list(hub.scores) == [2.0, 1.0]


def test_a_batch_sums_its_coview_pairs_and_caps_each_list(
    redis_client: redis.Redis, namespace: str
) -> None:
    # The Lua script on one server, the per-slot path on the cluster (the client's backend).
    config = FeatureConfig(coview_window_items=5, coview_window_seconds=1000, coview_cap=2)
    store = FeatureStore(redis_client, namespace, config)
    # One batch: three users view hub then p; two of them then q, the third r.
    rows = [
        row for n in range(3) for row in ((f"v{n}", "hub", "view", 50), (f"v{n}", "p", "view", 49))
    ]
    rows += [("v0", "q", "view", 48), ("v1", "q", "view", 48), ("v2", "r", "view", 48)]
    store.ingest(events(rows), now=NOW)
    hub, after_p = coviewed(store, ["hub", "p"], 10)
    # hub had p 3, q 2, r 1: the cap of 2 keeps the strongest.
    assert dict(zip(hub.ids, hub.scores, strict=True)) == {"p": 3.0, "q": 2.0}
    assert dict(zip(after_p.ids, after_p.scores, strict=True)) == {"q": 2.0, "r": 1.0}
    assert 0 < redis_client.ttl(store.keys.coview("hub")) <= config.coview_ttl
    # A later batch adds to the members it finds.
    store.ingest(events([("v3", "hub", "view", 40), ("v3", "q", "view", 39)], start_id=50), now=NOW)
    hub = coviewed(store, ["hub"], 10)[0]
    assert dict(zip(hub.ids, hub.scores, strict=True)) == {"p": 3.0, "q": 3.0}


def test_popularity_decays_with_half_life(redis_client, namespace) -> None:
    config = FeatureConfig(popularity_half_life=100.0, trending_half_life=10.0)
    store = FeatureStore(redis_client, namespace, config)
    store.ingest(events([("u1", "new", "view", 0), ("u2", "old", "view", 100)]), now=NOW)
    pop = popular(store, 2, now=NOW)
    scores = dict(zip(pop.ids, pop.scores, strict=True))
    assert scores["new"] == pytest.approx(1.0) and scores["old"] == pytest.approx(0.5)
    later = dict(zip(*popular(store, 2, now=NOW + 100), strict=True))
    assert later["new"] == pytest.approx(0.5) and later["old"] == pytest.approx(0.25)
    trend = dict(zip(*store.global_lists(2, now=NOW).trending, strict=True))
    assert trend["old"] == pytest.approx(2.0**-10)


def test_decay_reference_is_rebased_before_overflow(redis_client, namespace) -> None:
    config = FeatureConfig(popularity_half_life=1.0, trending_half_life=1.0)
    store = FeatureStore(redis_client, namespace, config)
    store.ingest(events([("u", "a", "purchase", 0)]), now=NOW)
    # 1,000 half-lives later exp(rate * dt) would be 2**1000: the script rescales first.
    later = NOW + 1000
    batch = events([("u", "b", "view", 0)], start_id=5).with_columns(
        pl.lit(int(later)).alias("timestamp")
    )
    store.ingest(batch, now=later)
    pop = popular(store, 5, now=later)
    assert pop.ids[0] == "b" and pop.scores[0] == pytest.approx(1.0)
    stored = store.redis.zrange(store.keys.popularity, 0, -1, withscores=True)
    assert all(math.isfinite(score) for _, score in stored)


def test_cache_is_invalidated_by_the_users_events(store: FeatureStore) -> None:
    store.cache_response("u1", "sig", '{"items": []}', now=NOW)
    store.cache_response("u2", "sig", '{"other": 1}', now=NOW)
    assert read_user(store, "u1", "sig", 10, 10, now=NOW + 1).cached == '{"items": []}'
    assert read_user(store, "u1", "other-sig", 10, 10, now=NOW + 1).cached is None
    # Expired by age even if the hash lives on.
    ttl = store.config.cache_ttl
    assert read_user(store, "u1", "sig", 10, 10, now=NOW + ttl + 1).cached is None

    store.ingest(events([("u1", "a", "view", 0)]), now=NOW)
    state = read_user(store, "u1", "sig", 10, 10, now=NOW + 1)
    assert state.cached is None and list(state.recent.ids) == ["a"]
    assert read_user(store, "u2", "sig", 10, 10, now=NOW + 1).cached == '{"other": 1}'


def test_keys_have_ttls_and_share_a_slot_per_entity(redis_client, namespace: str) -> None:
    store = FeatureStore(redis_client, namespace, FeatureConfig(count_new_item_users=True))
    store.ingest(events([("u1", "a", "view", 10), ("u1", "b", "view", 5)]), now=NOW)
    store.cache_response("u1", "sig", "{}", now=NOW)
    keys = Keys(store.namespace)
    user_keys = [keys.recent("u1"), keys.counters("u1"), keys.cache("u1"), keys.repeats("u1")]
    assert len({key_slot(k.encode()) for k in user_keys}) == 1
    seen = [keys.seen_event("e0"), keys.seen_event("e1")]
    # Items no catalog lists count their distinct users (in the {global} slot), where the
    # service allows new items.
    item_users = [keys.item_users("a"), keys.item_users("b")]
    assert {key_slot(k.encode()) for k in item_users} == {key_slot(keys.popularity.encode())}
    for key in [*user_keys, *seen, *item_users, keys.coview("a")]:
        assert store.redis.ttl(key) > 0, key
    # Every key the script wrote is one Keys spells.
    spelled = {*user_keys, *seen, *item_users, keys.coview("a")}
    spelled |= {
        keys.popularity,
        keys.trending,
        keys.decay,
        keys.first_seen,
        keys.stats,
        keys.stream,
    }
    assert set(store.redis.scan_iter(match=keys.pattern())) == spelled


def test_feature_definitions_cover_the_key_schema() -> None:
    names = {f.name for f in FEATURES}
    assert {"recent_items", "coview", "popularity", "response_cache", "events_stream"} <= names
    for feature in FEATURES:
        assert feature.key.startswith("{ns}:{"), feature.name
    with pytest.raises(ValueError, match="namespace"):
        Keys("bad{ns}")


def test_offline_pushes_replace_lists(store: FeatureStore) -> None:
    first = pl.DataFrame(
        {"item_id": ["a", "a", "b"], "neighbor_id": ["b", "c", "a"], "score": [0.9, 0.5, 0.7]}
    )
    assert store.push_item_neighbors(first) == 2
    lists = store.item_lists(["a", "b", "zzz"], ["neighbors"], 10)["neighbors"]
    assert list(lists[0].ids) == ["b", "c"] and list(lists[1].ids) == ["a"] and len(lists[2]) == 0
    second = pl.DataFrame({"item_id": ["a"], "neighbor_id": ["d"], "score": [0.3]})
    store.push_item_lists("neighbors", second)
    assert list(store.item_lists(["a"], ["neighbors"], 10)["neighbors"][0].ids) == ["d"]
    assert store.redis.ttl(store.keys.item_list("a", "neighbors")) > 0

    store.push_batch_candidates(
        pl.DataFrame({"user_id": ["u", "u"], "item_id": ["x", "y"], "score": [1.0, 2.0]})
    )
    assert list(read_user(store, "u", "s", 5, 5, now=NOW).candidates.ids) == ["y", "x"]

    # Before live events only the batch loop's popularity is there (the service falls back to
    # it); live events make the live list.
    store.push_popularity(pl.DataFrame({"item_id": ["p", "q"], "score": [3.0, 7.0]}))
    lists = store.global_lists(5, now=NOW)
    assert len(lists.popularity) == 0 and list(lists.batch_popularity.ids) == ["q", "p"]
    store.ingest(events([("u", "live", "view", 0)]), now=NOW)
    assert list(popular(store, 5, now=NOW).ids) == ["live"]
    with pytest.raises(ValueError, match="neighbor_id"):
        store.push_item_lists("x", pl.DataFrame({"item_id": ["a"], "score": [1.0]}))


def test_ingest_requires_event_ids(store: FeatureStore) -> None:
    batch = events([("u", "a", "view", 0)]).with_columns(pl.lit(None, pl.String).alias("event_id"))
    with pytest.raises(ValueError, match="event_id"):
        store.ingest(batch)
    assert store.ingest(batch.clear()).accepted == 0


def test_script_is_loaded_again_when_redis_lost_it(store: FeatureStore) -> None:
    store.ingest(events([("u", "a", "view", 0)]), now=NOW)
    # As after a Redis restart: the cached SHA is unknown to the server (no SCRIPT FLUSH here,
    # the server may be shared).
    assert store.scripts._shas
    store.scripts._shas = dict.fromkeys(store.scripts._shas, "0" * 40)
    assert store.ingest(events([("u", "b", "view", 0)], start_id=1), now=NOW).accepted == 1


def duplicated_events() -> pl.DataFrame:
    """3,000 generated events ending at NOW, some of them twice (in a batch and across)."""
    from training.generate import generate

    generated = generate(150, 80, 3000, seed=4).events
    shift = int(NOW) - int(generated["timestamp"].max())
    frame = generated.with_columns(pl.col("timestamp") + shift)
    return pl.concat([frame, frame.slice(100, 40), frame.slice(1000, 20)])


def assert_same_features(script: FeatureStore, sharded: FeatureStore, frame: pl.DataFrame) -> None:
    """Ingest `frame` into both stores in batches of 500 and compare every feature, the request
    read, the counters and the stream."""
    for start in range(0, frame.height, 500):
        part = frame.slice(start, 500)
        a, b = script.ingest(part, now=NOW), sharded.ingest(part, now=NOW)
        assert (a.accepted, a.duplicates, a.new_items) == (b.accepted, b.duplicates, b.new_items)
        np.testing.assert_array_equal(a.duplicate_rows, b.duplicate_rows)
    for user in frame["user_id"].unique().to_list():
        left, right = script.recent_items(user), sharded.recent_items(user)
        assert list(left.ids) == list(right.ids) and list(left.scores) == list(right.scores)
        assert script.counters(user) == sharded.counters(user)
    item_ids = frame["item_id"].unique().sort().to_list()
    for left, right in zip(
        coviewed(script, item_ids, 500), coviewed(sharded, item_ids, 500), strict=True
    ):
        assert dict(zip(*left, strict=True)) == dict(zip(*right, strict=True))
    pop_a, pop_b = popular(script, 100, now=NOW), popular(sharded, 100, now=NOW)
    assert dict(zip(pop_a.ids, pop_a.scores.round(9), strict=True)) == dict(
        zip(pop_b.ids, pop_b.scores.round(9), strict=True)
    )
    assert stats(script) == stats(sharded)
    # The request read falls back to per-slot commands and reads the same.
    user = frame["user_id"][0]
    request = FeatureRequest(user, "s", 100, 10, 5, ("coview",), 20)
    read_a, read_b = script.read_request(request, now=NOW), sharded.read_request(request, now=NOW)
    assert list(read_a.recent.ids) == list(read_b.recent.ids)
    for left, right in zip(read_a.lists["coview"], read_b.lists["coview"], strict=True):
        assert list(left.ids) == list(right.ids)
    # The stream carries every accepted event once and no duplicate, in the same order.
    streams = [EventStream(s.redis, s.namespace) for s in (script, sharded)]
    for stream in streams:
        stream.ensure_group()
    read = [s.read("c", 10_000, None).events for s in streams]
    assert read[0].height == stats(script)["accepted"]
    assert read[0]["event_id"].to_list() == read[1]["event_id"].to_list()


@pytest.mark.single_node
def test_the_sharded_path_for_redis_cluster_matches_the_script(
    redis_client: redis.Redis, namespace: str
) -> None:
    """The per-slot backends forced onto the one server, beside the Lua scripts."""
    from feature_repo.connection import clear_namespace

    script = FeatureStore(redis_client, namespace)
    sharded = FeatureStore(redis_client, namespace + "-sharded", cluster=True)
    try:
        assert_same_features(script, sharded, duplicated_events())
    finally:
        clear_namespace(redis_client, namespace + "-sharded")


def test_a_real_cluster_keeps_what_one_node_keeps(
    single_node_client: redis.Redis, cluster_client: RedisCluster
) -> None:
    """The Lua scripts on one server beside the per-slot backends on the three-node cluster."""
    from feature_repo.connection import clear_namespace

    namespace = f"test-{uuid.uuid4().hex[:12]}"
    script = FeatureStore(single_node_client, namespace)
    sharded = FeatureStore(cluster_client, namespace)
    try:
        assert_same_features(script, sharded, duplicated_events())
        # The cluster's keys are spread over its masters, and SCAN finds them on all of them.
        keys = list(cluster_client.scan_iter(match=sharded.keys.pattern(), count=1000))
        per_node = {cluster_client.get_node_from_key(key).name for key in keys}
        assert len(per_node) == 3
        assert sorted(keys) == sorted(single_node_client.scan_iter(match=f"{namespace}:*"))
    finally:
        clear_namespace(single_node_client, namespace)
        assert clear_namespace(cluster_client, namespace) > 0
        assert not list(cluster_client.scan_iter(match=f"{namespace}:*"))


def test_the_kind_of_client_picks_the_backends(redis_client: Client, namespace: str) -> None:
    store = FeatureStore(redis_client, namespace)
    if isinstance(redis_client, RedisCluster):
        assert type(store._ingest) is ClusterIngest and type(store._reads) is ClusterReads
    else:
        assert type(store._ingest) is SingleNodeIngest and type(store._reads) is Reads
    # The per-slot backends can be forced onto one server (the comparison below runs them so).
    forced = FeatureStore(redis_client, namespace, cluster=True)
    assert type(forced._ingest) is ClusterIngest and type(forced._reads) is ClusterReads


def test_one_users_repeats_move_an_item_by_a_bounded_amount(store: FeatureStore) -> None:
    spam = [("spammer", "spam", "purchase", 0)] * 200
    store.ingest(events([("spammer", "a", "view", 0), *spam]), now=NOW)
    store.ingest(events([("spammer", "spam", "purchase", 0)] * 50, start_id=1000), now=NOW)
    lists = store.global_lists(10, now=NOW)
    score = dict(zip(lists.popularity.ids.tolist(), lists.popularity.scores.tolist(), strict=True))
    cap = store.config.repeat_cap
    harmonic = sum(1.0 / n for n in range(1, cap + 1))
    # 250 purchases of one user weigh as much as `cap` of them with weights 1, 1/2, ... 1/cap.
    assert score["spam"] == pytest.approx(10.0 * harmonic)
    # Co-view counts the user once, however often they come back.
    assert store.item_lists(["a"], ["coview"], 10)["coview"][0].scores.tolist() == [1.0]
    # A second user adds their own bounded share.
    store.ingest(events([("other", "spam", "purchase", 0)], start_id=2000), now=NOW)
    after = store.global_lists(10, now=NOW)
    assert after.popularity.scores[0] == pytest.approx(10.0 * harmonic + 10.0)
    assert store.redis.ttl(store.keys.repeats("spammer")) > 0


def test_repeats_are_unbounded_when_the_window_is_off(redis_client, namespace: str) -> None:
    store = FeatureStore(redis_client, namespace, FeatureConfig(repeat_window=0))
    store.ingest(events([("u1", "x", "view", 0)] * 20), now=NOW)
    assert store.global_lists(1, now=NOW).popularity.scores[0] == pytest.approx(20.0)


def test_the_live_catalog_upserts_attributes_and_counts_new_items_users(
    store: FeatureStore,
) -> None:
    store = FeatureStore(store.redis, store.namespace, FeatureConfig(count_new_item_users=True))
    store.ingest(events([("u1", "new", "view", 0), ("u2", "new", "view", 0)]), now=NOW)
    assert store.global_lists(1, now=NOW).catalog_version is None
    frame = pl.DataFrame(
        {"item_id": ["a", "b"], "price": [9.5, None], "in_stock": [False, None]},
        schema={"item_id": pl.String, "price": pl.Float64, "in_stock": pl.Boolean},
    )
    assert store.write_catalog(frame) == 2
    # A later write of only a title keeps the price and the stock flag.
    store.write_catalog(pl.DataFrame({"item_id": ["a"], "title": ["Shoe"]}))
    read = store.catalog(["a", "b", "new"], ["price", "title"], count_users=True)
    assert read.size == 2
    assert read.values["in_stock"] == ["0", "1", None]
    assert read.values["price"] == ["9.5", None, None]
    assert read.values["title"] == ["Shoe", None, None]
    assert read.users == [None, None, 2]
    assert store.global_lists(1, now=NOW).catalog_version == "2"


def test_rate_limit_buckets_give_from_all_or_none(store: FeatureStore) -> None:
    # Two buckets of one request (its key's and its address'), refilling slowly.
    buckets = [("key:k:read", 0.01, 3.0, 5), ("ip:1.2.3.4", 0.01, 1.0, 1)]
    assert store.take_tokens(buckets) == (0, [3, 1])
    wait, taken = store.take_tokens(buckets)
    # The address is empty: nothing is taken from the key's bucket either.
    assert taken == [] and wait > 90_000
    assert store.take_tokens([("key:k:read", 0.01, 3.0, 1)])[1] == []
    assert store.redis.pttl(store.keys.rate_limit("ip:1.2.3.4")) > 0
