"""User profiles and trend lists in Redis: pushes, one-round-trip reads, replacement, TTLs."""

from __future__ import annotations

import json

import polars as pl
import pytest
import redis
from redis.crc import key_slot

from feature_repo.definitions import FEATURES_BY_NAME, PROFILE_FIELDS, Keys
from feature_repo.store import FeatureStore
from feature_repo.types import FeatureRequest

NOW = 1_800_000_000.0


def profiles() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": ["thrifty", "fan", "single"],
            "segment": ["price_sensitive", "loyal_customer", "browser"],
            "r_score": [5, 4, 1],
            "f_score": [3, 5, 1],
            "m_score": [2, 5, 1],
            "rfm": ["532", "455", "111"],
            "engagement": [0.8, 0.9, float("nan")],
            "churn_risk": [0.1, 0.05, None],
            "lifetime_value": [120.5, 990.0, 0.0],
            "price_percentile": [0.12, 0.6, 0.5],
            "preferences": [
                {"top_categories": ["c0"], "top_brands": ["b1"], "price_low": 9.5},
                {"top_categories": ["c1", "c2"], "top_brands": ["b2"], "price_low": None},
                {"top_categories": [], "top_brands": [], "price_low": None},
            ],
        }
    )


def trend_items() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "item_id": ["a", "b", "c", "d", "e", "f"],
            "category": ["shoes", "shoes", "hats", "hats", None, "shoes"],
            "trend_type": ["rising", "stable", "volatile", "falling", "stable", "stable"],
            "strength": [0.7, 0.1, 0.5, 0.6, 0.0, 0.0],
            "confidence": [0.9, 0.8, 0.7, 0.95, 0.0, 0.0],
            "velocity": [0.8, 0.0, 1.5, -0.7, float("nan"), 0.0],
            "predicted_direction": ["up", "flat", "flat", "down", "flat", "flat"],
            "trend_score": [50.0, 30.0, 40.0, 5.0, 1.0, 0.0],
            "burst": [False, False, True, False, False, False],
            "burst_z": [0.5, 0.1, 6.0, 0.0, 0.0, 0.0],
        }
    )


def trend_categories() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "category": ["shoes", "hats", "unknown"],
            "trend_type": ["rising", "volatile", "stable"],
            "strength": [0.4, 0.5, 0.0],
            "confidence": [0.8, 0.6, 0.1],
            "velocity": [0.3, 1.0, 0.0],
            "predicted_direction": ["up", "flat", "flat"],
            "trend_score": [80.0, 45.0, 1.0],
            "burst": [False, True, False],
        }
    )


class CountingRedis(redis.Redis):
    """Counts the commands sent (a pipeline counts once per command, a script once)."""

    sent = 0

    def execute_command(self, *args, **options):
        CountingRedis.sent += 1
        return super().execute_command(*args, **options)


def test_profiles_round_trip_with_ttl_and_the_users_slot(store: FeatureStore) -> None:
    assert store.push_user_profiles(profiles(), now=NOW) == 3
    thrifty = store.user_profile("thrifty")
    assert thrifty.known and thrifty.segment == "price_sensitive"
    assert (thrifty.r_score, thrifty.f_score, thrifty.m_score, thrifty.rfm) == (5, 3, 2, "532")
    assert thrifty.engagement == 0.8 and thrifty.lifetime_value == 120.5
    assert thrifty.price_percentile == 0.12 and thrifty.updated_at == NOW
    assert thrifty.preferences == {"top_categories": ["c0"], "top_brands": ["b1"], "price_low": 9.5}
    # NaN and null scores read back as unknown, never as NaN.
    single = store.user_profile("single")
    assert single.engagement is None and single.churn_risk is None and single.lifetime_value == 0
    assert set(store.redis.hkeys(store.keys.profile("thrifty"))) == set(PROFILE_FIELDS)

    keys = Keys(store.namespace)
    assert key_slot(keys.profile("thrifty").encode()) == key_slot(keys.recent("thrifty").encode())
    ttl = store.redis.ttl(keys.profile("fan"))
    assert 0 < ttl <= FEATURES_BY_NAME["user_profile"].ttl_seconds

    unknown = store.user_profile("never-profiled")
    assert not unknown.known and unknown.segment == "unknown" and unknown.preferences == {}


def test_a_new_push_overwrites_every_field(store: FeatureStore) -> None:
    store.push_user_profiles(profiles(), now=NOW)
    store.push_user_profiles(
        pl.DataFrame({"user_id": ["thrifty"], "segment": ["buyer"]}), now=NOW + 1
    )
    again = store.user_profile("thrifty")
    assert again.segment == "buyer" and again.rfm is None and again.preferences == {}
    assert again.updated_at == NOW + 1
    # Preferences may also come as JSON text.
    store.push_user_profiles(
        pl.DataFrame(
            {"user_id": ["x"], "segment": ["buyer"], "preferences": ['{"top_brands": ["b9"]}']}
        )
    )
    assert store.user_profile("x").preferences == {"top_brands": ["b9"]}


@pytest.mark.single_node
def test_request_reads_carry_the_profile_in_the_same_round_trip(
    redis_client: redis.Redis, namespace: str
) -> None:
    store = FeatureStore(redis_client, namespace)
    store.push_user_profiles(profiles(), now=NOW)
    counting = FeatureStore(CountingRedis(connection_pool=redis_client.connection_pool), namespace)
    counting.read_request(
        FeatureRequest("thrifty", "sig", 10, 10, 5, ("coview",), 5), now=NOW
    )  # loads the script
    CountingRedis.sent = 0
    found = counting.read_request(
        FeatureRequest("thrifty", "sig", 10, 10, 5, ("coview",), 5), now=NOW
    )
    assert CountingRedis.sent == 1

    # The profile comes back parsed, in the same round trip.
    assert found.profile.segment == "price_sensitive"
    state = store.read_request(FeatureRequest("fan", "sig", 10, 10), now=NOW)
    assert state.profile.user_id == "fan" and state.profile.segment == "loyal_customer"
    assert not store.read_request(FeatureRequest("nobody", "s", 1, 1)).profile.known


def test_trend_lists_global_and_per_category(store: FeatureStore) -> None:
    counts = store.push_trends(trend_items(), trend_categories(), analysed_at=NOW - 60, now=NOW)
    # f has trend_score 0: not trending, not listed.
    assert counts == {
        "trend_items": 5,
        "category_lists": 3,
        "items_with_info": 5,
        "categories": 3,
    }
    top = store.trending_items(3)
    assert list(top.items.ids) == ["a", "c", "b"]
    assert list(top.items.scores) == [50.0, 40.0, 30.0]
    assert top.info[0] == {
        "category": "shoes",
        "trend_type": "rising",
        "strength": 0.7,
        "confidence": 0.9,
        "velocity": 0.8,
        "predicted_direction": "up",
        "burst": False,
    }
    assert top.info[1]["burst"] is True and top.info[1]["trend_type"] == "volatile"
    assert [c["category"] for c in top.categories] == ["shoes", "hats", "unknown"]
    assert top.categories[0]["trend_score"] == 80.0
    assert (top.analysed_at, top.pushed_at) == (NOW - 60, NOW)

    hats = store.trending_items(10, category="hats")
    assert list(hats.items.ids) == ["c", "d"]
    assert [c["category"] for c in hats.categories] == ["hats"]
    # Items without a category are listed under `unknown`; NaN info becomes null.
    unknown = store.trending_items(10, category="unknown")
    assert list(unknown.items.ids) == ["e"] and unknown.info[0]["velocity"] is None
    nothing = store.trending_items(10, category="no-such-category")
    assert len(nothing) == 0 and nothing.categories == []


def test_trend_push_replaces_everything_and_drops_vanished_categories(
    store: FeatureStore,
) -> None:
    store.push_trends(trend_items(), trend_categories(), now=NOW)
    newer = pl.DataFrame(
        {"item_id": ["z", "a"], "category": ["shoes", "shoes"], "trend_score": [9.0, 3.0]}
    )
    store.push_trends(newer, trend_categories().filter(pl.col("category") == "shoes"), now=NOW)
    assert list(store.trending_items(10).items.ids) == ["z", "a"]
    assert len(store.trending_items(10, category="hats")) == 0
    assert not store.redis.exists(store.keys.trend_category("hats"))
    # Info exists only for listed items; the columns a table lacks are left out.
    info = store.redis.hgetall(store.keys.trend_info)
    assert set(info) == {"z", "a"} and json.loads(info["z"]) == {"category": "shoes"}
    assert not store.redis.keys(f"{store.namespace}:*staging*")
    for key in (store.keys.trend_items, store.keys.trend_info, store.keys.trend_meta):
        assert 0 < store.redis.ttl(key) <= store.config.trends_ttl, key

    store.push_trends(newer.clear(), None, now=NOW)
    empty = store.trending_items(10)
    assert len(empty) == 0 and empty.categories == [] and empty.pushed_at == NOW


@pytest.mark.single_node
def test_lists_are_capped_and_the_read_is_one_round_trip(
    redis_client: redis.Redis, namespace: str
) -> None:
    from feature_repo.definitions import FeatureConfig

    store = FeatureStore(
        CountingRedis(connection_pool=redis_client.connection_pool),
        namespace,
        FeatureConfig(trend_list_cap=3),
    )
    many = pl.DataFrame(
        {
            "item_id": [f"i{n}" for n in range(10)],
            "category": ["x", "y"] * 5,
            "trend_score": [float(n + 1) for n in range(10)],
        }
    )
    store.push_trends(many, None, now=NOW)
    assert list(store.trending_items(10).items.ids) == ["i9", "i8", "i7"]
    assert list(store.trending_items(10, "x").items.ids) == ["i8", "i6", "i4"]
    store.trending_items(1)  # the script is loaded
    CountingRedis.sent = 0
    store.trending_items(3, "y")
    assert CountingRedis.sent == 1
    # Every key is in the {global} slot, so a Redis Cluster runs the swap and the read too.
    slots = {
        key_slot(k.encode())
        for k in (
            store.keys.trend_items,
            store.keys.trend_info,
            store.keys.trend_categories,
            store.keys.trend_meta,
            store.keys.trend_category("x"),
            store.keys.popularity,
        )
    }
    assert len(slots) == 1
