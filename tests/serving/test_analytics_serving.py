"""Trend lists and user profiles in serving: /trending, /user_profile, the cold-start path and
segment-aware re-ranking (known-answer data), through the real ASGI app and the ranker."""

from __future__ import annotations

import time

import numpy as np
import polars as pl
import pytest
from starlette.testclient import TestClient

from feature_repo.types import ScoredItems, UserProfile
from serving.bundle import ServingModel, price_percentiles
from serving.personalise import trend_reasons
from serving.ranking import LiveFeatures, Ranker, RankingParams
from serving.schemas import Filters
from serving.settings import (
    DEFAULT_SEGMENT_RULES,
    SUGGESTED_SEGMENT_RULES,
    SegmentRule,
    ServingSettings,
)
from tests.serving.conftest import Registered
from training.hybrid import HybridRecommender

NOW = time.time()

TREND_ITEMS = pl.DataFrame(
    {
        "item_id": ["hat", "scarf", "boots", "socks"],
        "category": ["accessories", "accessories", "shoes", "shoes"],
        "trend_type": ["rising", "volatile", "stable", "falling"],
        "strength": [0.7, 0.5, 0.1, 0.6],
        "confidence": [0.9, 0.7, 0.8, 0.95],
        "velocity": [0.8, 1.5, 0.0, -0.7],
        "predicted_direction": ["up", "flat", "flat", "down"],
        "trend_score": [50.0, 40.0, 30.0, 5.0],
        "burst": [False, True, False, False],
    }
)
TREND_CATEGORIES = pl.DataFrame(
    {
        "category": ["accessories", "shoes"],
        "trend_type": ["rising", "stable"],
        "strength": [0.5, 0.1],
        "confidence": [0.8, 0.9],
        "velocity": [0.6, 0.0],
        "predicted_direction": ["up", "flat"],
        "trend_score": [90.0, 35.0],
        "burst": [True, False],
    }
)


def post_events(client: TestClient, rows: list[tuple[str, str, str]]) -> None:
    start = int(time.time()) - len(rows)
    events = [
        {"user_id": u, "item_id": i, "event_type": t, "timestamp": start + n}
        for n, (u, i, t) in enumerate(rows, start=1)
    ]
    assert client.post("/events", json={"events": events}).status_code == 200


def recommend(client: TestClient, **body) -> dict:
    response = client.post("/recommend", json=body)
    assert response.status_code == 200, response.text
    return response.json()


# -- /trending -------------------------------------------------------------------------------


def test_trending_global_and_per_category(client: TestClient, store) -> None:
    # Before any analysis: nothing for a category, the live trending list globally.
    post_events(client, [("u1", "kettle", "view")])
    assert client.post("/trending", json={"category": "c1"}).json()["source"] == "none"
    live = client.post("/trending", json={"k": 3}).json()
    assert live["source"] == "live" and [i["item_id"] for i in live["items"]] == ["kettle"]
    assert live["items"][0]["trend_type"] is None

    store.push_trends(TREND_ITEMS, TREND_CATEGORIES, analysed_at=NOW - 60)
    body = client.post("/trending", json={"k": 2}).json()
    assert body["source"] == "trend_analysis" and body["analysed_at"] == NOW - 60
    assert [i["item_id"] for i in body["items"]] == ["hat", "scarf"]
    hat, scarf = body["items"]
    assert hat == {
        "item_id": "hat",
        "score": 50.0,
        "category": "accessories",
        "reason": "rising this week",
        "trend_type": "rising",
        "strength": 0.7,
        "confidence": 0.9,
        "burst": False,
        "velocity": 0.8,
        "predicted_direction": "up",
    }
    assert scarf["reason"] == "going viral" and scarf["burst"] is True
    assert [c["category"] for c in body["categories"]] == ["accessories", "shoes"]
    assert body["categories"][0]["trend_score"] == 90.0

    shoes = client.post("/trending", json={"k": 5, "category": "shoes"}).json()
    assert [i["item_id"] for i in shoes["items"]] == ["boots", "socks"]
    assert shoes["items"][0]["reason"] == "popular this week"
    assert [c["category"] for c in shoes["categories"]] == ["shoes"]
    none = client.post("/trending", json={"category": "garden"}).json()
    assert none == {**none, "items": [], "categories": [], "source": "none"}
    assert client.post("/trending", json={"k": 0}).status_code == 422
    assert client.post("/trending", json={"k": 3, "bogus": 1}).json()["field"] == "bogus"


@pytest.fixture
def fresh_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service re-reads the live lists on every request (set before `client` starts it)."""
    monkeypatch.setenv("RECSYS_GLOBAL_LISTS_TTL", "0")


def test_trending_falls_back_to_live_items_of_the_category(
    served_champion: Registered,
    fresh_lists: None,
    client: TestClient,
    store,
    serving_model: ServingModel,
) -> None:
    # make_catalog: category c(i % 4); i1 and i5 are in c1, i2 in c2; new-sku is in no catalog.
    post_events(
        client,
        [
            ("u1", "i1", "view"),
            ("u2", "i5", "purchase"),
            ("u3", "i2", "view"),
            ("u4", "new-sku", "view"),
        ],
    )
    body = client.post("/trending", json={"k": 6, "category": "c1"}).json()
    assert body["source"] == "live" and body["analysed_at"] is None and body["categories"] == []
    items = body["items"]
    ids = [i["item_id"] for i in items]
    # The category's items on the live trending list first (a purchase outweighs a view) ...
    assert ids[:2] == ["i5", "i1"]
    assert [i["reason"] for i in items[:2]] == ["trending now", "trending now"]
    # ... then its most popular items in training, up to k, each once.
    in_c1 = serving_model.category == "c1"
    order = np.argsort(-np.where(in_c1, serving_model.popularity, -np.inf), kind="stable")
    popular = [i for i in serving_model.item_ids[order[: in_c1.sum()]] if i not in ("i5", "i1")]
    assert ids[2:] == popular[:4]
    assert [i["reason"] for i in items[2:]] == ["popular"] * 4
    assert all(i["category"] == "c1" for i in items)
    assert all(i["trend_type"] is None and i["predicted_direction"] is None for i in items)

    # An item no catalog lists is not shown; listed in the live catalog without a category, it
    # is in category `unknown`, as in the trend analysis.
    assert client.post("/trending", json={"category": "unknown"}).json()["items"] == []
    client.post("/items", json={"items": [{"item_id": "new-sku"}]})
    unknown = client.post("/trending", json={"category": "unknown"}).json()
    assert [i["item_id"] for i in unknown["items"]] == ["new-sku"]
    assert client.post("/trending", json={"category": "garden"}).json()["source"] == "none"
    # The global fallback: the live trending list, then popular items.
    glob = client.post("/trending", json={"k": 6}).json()
    assert glob["source"] == "live"
    glob_ids = [i["item_id"] for i in glob["items"]]
    assert glob_ids[0] == "i5" and set(glob_ids[1:4]) == {"i1", "i2", "new-sku"}
    assert len(set(glob_ids)) == 6
    assert [i["reason"] for i in glob["items"]] == ["trending now"] * 4 + ["popular"] * 2

    # Once an analysis lists the category, it serves.
    store.push_trends(
        pl.DataFrame({"item_id": ["i9"], "category": ["c1"], "trend_score": [3.0]}), None
    )
    analysed = client.post("/trending", json={"k": 6, "category": "c1"}).json()
    assert analysed["source"] == "trend_analysis"
    assert [i["item_id"] for i in analysed["items"]] == ["i9"]


# -- profiles --------------------------------------------------------------------------------


def test_user_profile_known_and_unknown(client: TestClient, store) -> None:
    store.push_user_profiles(
        pl.DataFrame(
            {
                "user_id": ["thrifty"],
                "segment": ["price_sensitive"],
                "r_score": [5],
                "f_score": [3],
                "m_score": [2],
                "rfm": ["532"],
                "engagement": [0.8],
                "churn_risk": [0.1],
                "lifetime_value": [120.5],
                "price_percentile": [0.12],
                "preferences": [{"top_categories": ["c0"], "top_brands": ["b1"]}],
            }
        ),
        now=NOW,
    )
    body = client.post("/user_profile", json={"user_id": "thrifty"}).json()
    assert body["segment"] == "price_sensitive" and body["known"] is True
    assert (body["rfm"], body["r_score"], body["lifetime_value"]) == ("532", 5, 120.5)
    assert body["preferences"] == {"top_categories": ["c0"], "top_brands": ["b1"]}
    assert body["updated_at"] == NOW
    assert body["ranking_rule"]["price"] == DEFAULT_SEGMENT_RULES["price_sensitive"].price
    assert client.get("/users/thrifty/profile").json() == body

    unknown = client.post("/user_profile", json={"user_id": "stranger"})
    assert unknown.status_code == 200
    assert unknown.json() == {
        "user_id": "stranger",
        "segment": "unknown",
        "known": False,
        "r_score": None,
        "f_score": None,
        "m_score": None,
        "rfm": None,
        "engagement": None,
        "churn_risk": None,
        "lifetime_value": None,
        "price_percentile": None,
        "preferences": {},
        "updated_at": None,
        "ranking_rule": None,
    }
    assert client.post("/user_profile", json={}).json()["field"] == "user_id"


def test_openapi_documents_the_new_endpoints(client: TestClient) -> None:
    paths = client.get("/docs.json").json()["paths"]
    for path in ("/trending", "/user_profile", "/users/{user_id}/profile"):
        assert path in paths, path
    schema = client.get("/docs.json").json()["components"]["schemas"]
    assert "segment" in schema["RecommendResponse"]["properties"]
    assert {"trend_type", "burst", "reason"} <= set(schema["TrendingItem"]["properties"])
    assert "fallback" in paths["/trending"]["post"]["description"]


# -- cold start ------------------------------------------------------------------------------


def test_cold_start_serves_trending_items_then_popular_ones(client: TestClient, store) -> None:
    # Live popularity: laces (a purchase) above shoes.
    post_events(client, [("u1", "shoes", "view"), ("u2", "laces", "purchase")])
    store.push_trends(TREND_ITEMS, TREND_CATEGORIES)
    body = recommend(client, user_id="newcomer", k=6)
    ids = [i["item_id"] for i in body["items"]]
    assert ids[:3] == ["hat", "scarf", "boots"]
    # Popular items fill in (a weak trend item may come after a strongly popular one).
    assert set(ids[3:]) == {"socks", "laces", "shoes"}
    reasons = [i["reason"] for i in body["items"][:3]]
    assert reasons == ["rising this week", "going viral", "popular this week"]
    assert body["items"][0]["sources"]["trend"] == 1.0
    # A user with history is not cold: their own signals lead.
    warm = recommend(client, user_id="u1", k=6)
    assert [i["item_id"] for i in warm["items"]][:4] != ["hat", "scarf", "boots", "socks"]


def test_cold_start_with_a_champion_serves_the_trend_list(
    served_champion: Registered, client: TestClient, store
) -> None:
    items = pl.DataFrame(
        {
            "item_id": ["i7", "i21", "i33"],
            "category": ["c3", "c1", "c1"],
            "trend_score": [3.0, 2.0, 1.0],
        }
    )
    store.push_trends(items, None)
    body = recommend(client, user_id="brand-new-user", k=5)
    assert body["variant"] == "champion"
    assert [i["item_id"] for i in body["items"]][:3] == ["i7", "i21", "i33"]
    assert body["segment"] is None


# -- segment-aware re-ranking ----------------------------------------------------------------


def test_price_percentiles_within_category() -> None:
    catalog = pl.DataFrame(
        {
            "category": ["a", "a", "a", "b", None, None, "a"],
            "price": [10.0, 30.0, 20.0, 5.0, 1.0, 3.0, None],
        }
    )
    pct = price_percentiles(catalog)
    np.testing.assert_allclose(pct[:6], [0.0, 1.0, 0.5, 0.5, 0.0, 0.2])
    assert np.isnan(pct[6])


@pytest.fixture(scope="module")
def serving_model(trained_bundle: HybridRecommender) -> ServingModel:
    return ServingModel(trained_bundle, "1", "champion")


def _popular(ids: list[str], scores: list[float]) -> ScoredItems:
    return ScoredItems(np.array(ids, dtype=str), np.array(scores))


def test_price_sensitive_user_gets_cheaper_items_first(serving_model: ServingModel) -> None:
    # Category c0 of make_catalog: i0, i4, ..., i36 at 10 + i. Popularity favours the dear ones.
    live = LiveFeatures(popularity=_popular(["i16", "i12", "i8", "i4"], [1.0, 0.96, 0.92, 0.88]))
    ranker = Ranker(RankingParams())
    weights = {"popularity": 1.0}

    def rank(profile: UserProfile | None):
        features = LiveFeatures(popularity=live.popularity, profile=profile)
        return ranker.recommend(
            model=serving_model,
            weights=weights,
            user_id="newcomer",
            k=4,
            filters=Filters(),
            exclude_seen=True,
            live=features,
            now=0,
        )

    plain = rank(None)
    assert plain.item_ids == ["i16", "i12", "i8", "i4"] and plain.segment is None
    assert all("boost" not in r for r in plain.reasons)
    thrifty = rank(UserProfile("newcomer", segment="price_sensitive"))
    assert thrifty.item_ids == ["i4", "i8", "i12", "i16"]
    assert thrifty.segment == "price_sensitive"
    # Percentiles 1/9 .. 4/9 against the 0.5 cutoff: x(1 + 0.3 (1 - pct / 0.5)).
    expected = [0.88 * (1 + 0.3 * (1 - (1 / 9) / 0.5)), 0.92 * (1 + 0.3 * (1 - (2 / 9) / 0.5))]
    np.testing.assert_allclose(thrifty.scores[:2], expected, rtol=1e-5)
    assert (
        thrifty.reasons[0] == "popular right now; price_sensitive boost: low price in its category"
    )
    # A segment without a price rule changes nothing here.
    assert rank(UserProfile("newcomer", segment="impulse_buyer")).item_ids == plain.item_ids


@pytest.fixture
def no_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service caches no response (set before the `client` fixture starts it)."""
    monkeypatch.setenv("RECSYS_CACHE_TTL", "0")


def test_price_sensitive_known_user_sees_cheaper_items_through_the_service(
    served_champion: Registered,
    no_cache: None,
    client: TestClient,
    store,
    serving_model: ServingModel,
) -> None:
    plain = recommend(client, user_id="u3", k=10)
    store.push_user_profiles(pl.DataFrame({"user_id": ["u3"], "segment": ["price_sensitive"]}))
    boosted = recommend(client, user_id="u3", k=10)
    assert boosted["segment"] == "price_sensitive" and plain["segment"] is None

    def percentiles(body: dict) -> np.ndarray:
        idx = serving_model.item_index(np.array([i["item_id"] for i in body["items"]]))
        return serving_model.price_percentile[idx]

    assert percentiles(boosted)[:5].mean() < percentiles(plain)[:5].mean()
    assert any("price_sensitive boost: low price" in i["reason"] for i in boosted["items"])
    cheap = [i for i in boosted["items"] if "boost" in i["reason"]]
    assert all(p < 0.5 for p in percentiles({"items": cheap}))


def test_segment_rerank_switched_off_through_the_service(
    served_champion: Registered,
    no_cache: None,
    service_app,
    namespace: str,
    store,
    serving_model: ServingModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def boosts(body: dict) -> list[str]:
        return [i["reason"] for i in body["items"] if "boost" in i["reason"]]

    # RECSYS_SEGMENT_RERANK=0: a price-sensitive profile changes nothing.
    monkeypatch.setenv("RECSYS_SEGMENT_RERANK", "0")
    with TestClient(service_app) as off:
        plain = recommend(off, user_id="u3", k=10)
        store.push_user_profiles(pl.DataFrame({"user_id": ["u3"], "segment": ["price_sensitive"]}))
        profiled = recommend(off, user_id="u3", k=10)
        rule = off.post("/user_profile", json={"user_id": "u3"}).json()
    assert rule["segment"] == "price_sensitive" and rule["ranking_rule"] is None
    assert profiled["segment"] is None and boosts(profiled) == []
    assert [(i["item_id"], i["score"], i["reason"]) for i in profiled["items"]] == [
        (i["item_id"], i["score"], i["reason"]) for i in plain["items"]
    ]

    # Switched on (the default), the same profile in the same Redis re-ranks the answer.
    monkeypatch.setenv("RECSYS_SEGMENT_RERANK", "1")
    with TestClient(service_app) as on:
        boosted = recommend(on, user_id="u3", k=10)
        rule = on.post("/user_profile", json={"user_id": "u3"}).json()
    assert rule["ranking_rule"]["price"] == DEFAULT_SEGMENT_RULES["price_sensitive"].price
    assert boosted["segment"] == "price_sensitive"
    assert boosts(boosted) and all("price_sensitive boost: low price" in r for r in boosts(boosted))
    assert [i["item_id"] for i in boosted["items"]] != [i["item_id"] for i in plain["items"]]

    def mean_percentile(body: dict) -> float:
        idx = serving_model.item_index(np.array([i["item_id"] for i in body["items"]]))
        return float(np.nanmean(serving_model.price_percentile[idx][:5]))

    assert mean_percentile(boosted) < mean_percentile(profiled)


def test_loyal_customers_get_their_brands_and_browsers_more_categories(
    serving_model: ServingModel,
) -> None:
    # make_catalog: category c(i % 4), brand b(i % 3). Popularity alone orders the candidates.
    ids = ["i2", "i1", "i6", "i5", "i3", "i7"]  # c2, c1, c2, c1, c3, c3
    live = _popular(ids, [1.0, 0.95, 0.9, 0.85, 0.8, 0.75])
    weights = {"popularity": 1.0}

    def rank(ranker: Ranker, profile: UserProfile | None, k: int) -> list[str]:
        features = LiveFeatures(popularity=live, profile=profile)
        return ranker.recommend(
            model=serving_model,
            weights=weights,
            user_id="x",
            k=k,
            filters=Filters(),
            exclude_seen=True,
            live=features,
            now=0,
        ).item_ids

    # The suggested (not default) rules: a brand boost for loyal customers.
    fan = UserProfile("x", segment="loyal_customer", preferences={"top_brands": ["b1"]})
    assert rank(Ranker(RankingParams()), fan, 3)[0] == "i2"
    ranker = Ranker(RankingParams(segment_rules=SUGGESTED_SEGMENT_RULES))
    assert rank(ranker, None, 3)[0] == "i2"
    assert rank(ranker, fan, 3)[0] == "i1"  # b1: 0.95 x 1.2 > 1.0
    reasons = ranker.recommend(
        model=serving_model,
        weights=weights,
        user_id="x",
        k=1,
        filters=Filters(),
        exclude_seen=True,
        live=LiveFeatures(popularity=live, profile=fan),
        now=0,
    ).reasons
    assert reasons == ["popular right now; loyal_customer boost: one of your brands"]

    # A browser's answer takes one item per category before any category's second one.
    browsing = Ranker(RankingParams(segment_rules={"browser": SegmentRule(category_cap=0.2)}))
    browser = UserProfile("x", segment="browser")
    assert rank(browsing, None, 5) == ["i2", "i1", "i6", "i5", "i3"]
    assert rank(browsing, browser, 5) == ["i2", "i1", "i3", "i6", "i5"]


def test_segment_rules_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServingSettings.from_env().segment_rules == DEFAULT_SEGMENT_RULES
    monkeypatch.setenv(
        "RECSYS_SEGMENT_RULES",
        '{"price_sensitive": {"price": 0.5}, "browser": "suggested", "buyer": {"category": 0.3}}',
    )
    rules = ServingSettings.from_env().segment_rules
    assert rules == {
        "price_sensitive": SegmentRule(price=0.5),
        "browser": SUGGESTED_SEGMENT_RULES["browser"],
        "buyer": SegmentRule(category=0.3),
    }
    monkeypatch.setenv("RECSYS_SEGMENT_RULES", '{"price_sensitive": null}')
    assert ServingSettings.from_env().segment_rules == {}
    monkeypatch.setenv("RECSYS_SEGMENT_RULES", '{"nobody": "suggested"}')
    with pytest.raises(ValueError, match="RECSYS_SEGMENT_RULES"):
        ServingSettings.from_env()
    monkeypatch.setenv("RECSYS_SEGMENT_RULES", '{"buyer": {"price": -1}}')
    with pytest.raises(ValueError, match="RECSYS_SEGMENT_RULES"):
        ServingSettings.from_env()
    monkeypatch.setenv("RECSYS_SEGMENT_RULES", '{"buyer": {"colour": 1}}')
    with pytest.raises(ValueError, match="RECSYS_SEGMENT_RULES"):
        ServingSettings.from_env()
    monkeypatch.setenv("RECSYS_SEGMENT_RERANK", "0")
    assert ServingSettings.from_env().segment_rules == {}
    monkeypatch.setenv("RECSYS_COLD_START_WEIGHTS", '{"popularity": 1}')
    assert ServingSettings.from_env().cold_start_blend == {"popularity": 1.0}


def test_trend_reasons() -> None:
    reasons = trend_reasons(
        [{"burst": True, "trend_type": "stable"}, {"trend_type": "rising"}, {}, {"burst": False}]
    )
    assert reasons.tolist() == ["going viral", "rising this week", "popular this week"] + [
        "popular this week"
    ]
