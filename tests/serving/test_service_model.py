"""The service over a registered champion: the personalised multi-stage blend, fold-in, business
rules, hot swaps, challenger traffic and serving the last good model when MLflow is down."""

from __future__ import annotations

import threading
import time
from collections import Counter

import bentoml
import pytest
from starlette.testclient import TestClient

from tests.serving.conftest import Registered, catalog_of, seen_items, train_hybrid


def recommend(client: TestClient, **body) -> dict:
    response = client.post("/recommend", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def group(item_id: str) -> int:
    """make_events puts items i0..i9 in group 0, i10..i19 in group 1, ..."""
    return int(item_id[1:]) // 10


def test_champion_serves_a_personalised_blend(
    served_champion: Registered, client: TestClient
) -> None:
    body = recommend(client, user_id="u1", k=8)
    assert body["variant"] == "champion" and body["model_version"] == "1"
    items = body["items"]
    assert len(items) == 8
    ids = [i["item_id"] for i in items]
    assert not set(ids) & seen_items(served_champion.bundle, "u1")
    catalog = catalog_of(served_champion.bundle)
    assert all(catalog[i]["in_stock"] for i in ids)
    sources = Counter(s for item in items for s in item["sources"])
    assert sources["als"] and sources["ease"]
    # u1 is in group 1 (users u % 4): its block's items come first.
    assert group(ids[0]) == 1
    assert all(item["reason"] for item in items)
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True) or len({catalog[i]["category"] for i in ids}) > 1


def test_filters_and_the_category_cap(served_champion: Registered, client: TestClient) -> None:
    catalog = catalog_of(served_champion.bundle)
    only = recommend(client, user_id="u2", k=5, filters={"categories": ["c1"]})["items"]
    assert only and all(catalog[i["item_id"]]["category"] == "c1" for i in only)
    priced = recommend(client, user_id="u2", k=10, filters={"price_min": 20, "price_max": 30})
    assert all(20 <= catalog[i["item_id"]]["price"] <= 30 for i in priced["items"])
    banned = [i["item_id"] for i in only[:2]]
    rest = recommend(
        client, user_id="u2", k=5, filters={"categories": ["c1"], "exclude_item_ids": banned}
    )
    assert not {i["item_id"] for i in rest["items"]} & set(banned)
    with_oos = recommend(client, user_id="u2", k=40, filters={"in_stock_only": False})["items"]
    assert any(not catalog[i["item_id"]]["in_stock"] for i in with_oos)
    # At most ceil(0.4 * k) items per category while other categories have candidates.
    top = recommend(client, user_id="u3", k=10)["items"]
    per_category = Counter(catalog[i["item_id"]]["category"] for i in top)
    assert max(per_category.values()) <= 4
    unseen = recommend(client, user_id="u3", k=10, exclude_seen=False)["items"]
    assert {i["item_id"] for i in unseen} & seen_items(served_champion.bundle, "u3")


def test_unknown_user_with_live_events_is_folded_in(
    served_champion: Registered, client: TestClient
) -> None:
    cold = recommend(client, user_id="newbie", k=5)
    assert all(set(i["sources"]) <= {"popularity", "trending"} for i in cold["items"])
    events = [
        {"user_id": "newbie", "item_id": f"i{n}", "event_type": "view", "event_id": f"nb{n}"}
        for n in (20, 21, 22, 23)
    ]
    assert client.post("/events", json={"events": events}).json()["accepted"] == 4
    warm = recommend(client, user_id="newbie", k=5)
    assert warm["cached"] is False
    assert any("als" in i["sources"] for i in warm["items"])
    assert sum(group(i["item_id"]) == 2 for i in warm["items"]) >= 3


def test_new_items_from_events_surface_as_new_arrivals(
    served_champion: Registered, client: TestClient
) -> None:
    others = [
        {"user_id": f"shopper{n}", "item_id": item, "event_type": "view", "event_id": f"s{n}{item}"}
        for n in range(3)
        for item in ("i11", "fresh-item")
    ]
    body = client.post("/events", json={"events": others}).json()
    assert body["accepted"] == 6 and body["unknown_items"] == 3
    # A new item is recommended once the live catalog lists it (POST /items).
    assert client.post("/items", json={"items": [{"item_id": "fresh-item"}]}).status_code == 200
    client.post(
        "/events",
        json={
            "events": [{"user_id": "u5", "item_id": "i11", "event_type": "view", "event_id": "x"}]
        },
    )
    items = recommend(client, user_id="u5", k=10)["items"]
    fresh = [i for i in items if i["item_id"] == "fresh-item"]
    assert fresh and "coview" in fresh[0]["sources"]
    assert fresh[0]["reason"].endswith("new arrival")


def test_popular_by_category_and_similar_items_use_the_model(
    served_champion: Registered, client: TestClient
) -> None:
    catalog = catalog_of(served_champion.bundle)
    popular = client.post("/popular", json={"k": 5, "category": "c2"}).json()
    assert popular["model_version"] == "1" and len(popular["items"]) == 5
    assert all(catalog[i["item_id"]]["category"] == "c2" for i in popular["items"])
    similar = client.post("/similar_items", json={"item_id": "i12", "k": 4}).json()
    ids = [i["item_id"] for i in similar["items"]]
    assert len(ids) == 4 and "i12" not in ids
    assert sum(group(i) == 1 for i in ids) >= 3


def test_a_promoted_version_is_swapped_in_without_dropping_requests(
    champion: Registered, client: TestClient
) -> None:
    service = bentoml.get_current_service()
    versions: list[str] = []
    failures: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        n = 0
        while not stop.is_set():
            response = client.post("/recommend", json={"user_id": f"u{n % 80}", "k": 5})
            n += 1
            if response.status_code != 200:
                failures.append(response.status_code)
            else:
                versions.append(response.json()["model_version"])

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        time.sleep(0.3)
        new = champion.register(train_hybrid(seed=1), 0.5, promote=True)
        assert service.models.refresh()
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
    assert not failures
    assert versions[0] == "1" and versions[-1] == new == "2"
    assert set(versions) == {"1", "2"}
    metrics = client.get("/metrics").text
    assert 'recsys_model_loaded{variant="champion",version="2"} 1.0' in metrics
    assert 'recsys_model_loaded{variant="champion",version="1"} 0.0' in metrics


def test_the_poller_picks_up_a_promotion(
    champion: Registered, service_app, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_MODEL_POLL_SECONDS", "0.2")
    with TestClient(service_app) as client:
        assert recommend(client, user_id="u1")["model_version"] == "1"
        champion.register(train_hybrid(seed=2), 0.6, promote=True)
        deadline = time.monotonic() + 20
        while recommend(client, user_id="u1", k=3)["model_version"] != "2":
            assert time.monotonic() < deadline, "the new champion was not picked up"
            time.sleep(0.1)


def test_challenger_gets_its_share_of_users(
    champion: Registered, service_app, monkeypatch: pytest.MonkeyPatch
) -> None:
    champion.register(train_hybrid(seed=3), 0.1, promote=False)  # stays challenger
    monkeypatch.setenv("RECSYS_CHALLENGER_SHARE", "1.0")
    with TestClient(service_app) as client:
        body = recommend(client, user_id="u7")
        assert (body["variant"], body["model_version"]) == ("challenger", "2")
    monkeypatch.setenv("RECSYS_CHALLENGER_SHARE", "0.5")
    with TestClient(service_app) as client:
        variants = Counter(recommend(client, user_id=f"user-{n}")["variant"] for n in range(60))
        assert variants["champion"] > 10 and variants["challenger"] > 10
        # The split is sticky per user.
        assert (
            recommend(client, user_id="user-1")["variant"]
            == recommend(client, user_id="user-1")["variant"]
        )


def test_unreachable_registry_serves_the_last_good_model(
    champion: Registered, service_app, monkeypatch: pytest.MonkeyPatch
) -> None:
    with TestClient(service_app) as client:
        assert recommend(client, user_id="u1")["model_version"] == "1"
        service = bentoml.get_current_service()
        # The registry goes away while serving: checks fail, the model stays.
        service.models._registry = None
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
        assert service.models.refresh() is False
        assert recommend(client, user_id="u1", k=3)["model_version"] == "1"
    # A restart while the registry is down loads the last good version from local disk.
    with TestClient(service_app) as client:
        body = recommend(client, user_id="u1", k=3)
        assert (body["variant"], body["model_version"]) == ("champion", "1")


def test_no_registry_and_no_local_copy_starts_on_popularity(
    service_app, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with TestClient(service_app) as client:
        assert client.get("/readyz").status_code == 200
        assert recommend(client, user_id="u1")["variant"] == "popularity"
