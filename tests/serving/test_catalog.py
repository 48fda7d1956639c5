"""The live catalog and abuse resistance against the real service and Redis: the spam experiment
of issue 10, stock and price changes on the next request, POST /items validation, the gate on
items no catalog lists and the new-items path."""

from __future__ import annotations

import time

import numpy as np
import polars as pl
import pytest
from starlette.testclient import TestClient

from tests.serving.conftest import Registered

SPAM = "SPAM: visit evil.example"


@pytest.fixture
def uncached(monkeypatch: pytest.MonkeyPatch) -> None:
    """No response cache and no worker-cached global lists: every answer is ranked afresh, so a
    comparison of two answers compares two rankings."""
    monkeypatch.setenv("RECSYS_CACHE_TTL", "0")
    monkeypatch.setenv("RECSYS_GLOBAL_LISTS_TTL", "0")


def recommend(client: TestClient, **body) -> dict:
    response = client.post("/recommend", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def ids(items: list[dict]) -> list[str]:
    return [i["item_id"] for i in items]


def post_events(client: TestClient, events: list[dict]) -> dict:
    response = client.post("/events", json={"events": events})
    assert response.status_code == 200, response.text
    return response.json()


def views(users: list[str], items: list[str], tag: str) -> list[dict]:
    return [
        {"user_id": u, "item_id": i, "event_type": "view", "event_id": f"{tag}-{u}-{i}"}
        for u in users
        for i in items
    ]


def test_the_spam_experiment_changes_no_other_users_answers(
    uncached: None, served_champion: Registered, client: TestClient
) -> None:
    # Some live traffic, so live popularity, trending and co-view all have lists; the attacker
    # views a real item first, so the spam lands in that item's co-view list, which u5's
    # recommendations read.
    post_events(client, views([f"shopper{n}" for n in range(4)], ["i11", "i12", "i25"], "live"))
    post_events(client, views(["u5", "attacker"], ["i11"], "anchor"))

    def answers() -> tuple[list[str], list[str], list[str], list[str]]:
        trending = client.post("/trending", json={"k": 10}).json()
        popular = client.post("/popular", json={"k": 10}).json()
        return (
            ids(recommend(client, user_id="u5", k=10)["items"]),
            ids(recommend(client, user_id="a-new-visitor", k=10)["items"]),
            ids(trending["items"]),
            ids(popular["items"]),
        )

    before = answers()
    assert all(before)
    # 200 fake purchases from one user of an item no catalog lists.
    spam = [
        {"user_id": "attacker", "item_id": SPAM, "event_type": "purchase", "event_id": f"a{n}"}
        for n in range(200)
    ]
    assert post_events(client, spam)["accepted"] == 200
    after = answers()
    assert after == before
    assert SPAM not in {item for answer in after for item in answer}
    similar = client.post("/similar_items", json={"item_id": "i11", "k": 10}).json()
    assert SPAM not in ids(similar["items"])


def test_spam_is_bounded_even_where_it_passes_the_gate(
    uncached: None, served_champion: Registered, client: TestClient
) -> None:
    """With the spam item in the catalog, one user's 200 purchases still count as five."""
    client.post("/items", json={"items": [{"item_id": SPAM}]})
    post_events(client, views([f"shopper{n}" for n in range(3)], ["i12"], "live"))
    spam = [
        {"user_id": "attacker", "item_id": SPAM, "event_type": "purchase", "event_id": f"a{n}"}
        for n in range(200)
    ]
    post_events(client, spam)
    scores = {
        i["item_id"]: i["score"] for i in client.post("/popular", json={"k": 5}).json()["items"]
    }
    # 10 x (1 + 1/2 + ... + 1/5), not 2,000; three views of i12 weigh 3.
    assert scores[SPAM] == pytest.approx(10 * (1 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5), rel=1e-3)
    assert scores["i12"] == pytest.approx(3.0, rel=1e-3)


def test_a_stock_or_price_change_applies_to_the_next_request(
    served_champion: Registered, client: TestClient
) -> None:
    # The response cache stays on (its default): the change must not hide behind it.
    first = recommend(client, user_id="u5", k=10, fields=["title", "price", "in_stock"])
    top = first["items"][0]
    assert top["title"] == f"Item {top['item_id'][1:]}" and top["in_stock"] is True
    assert recommend(client, user_id="u5", k=10)["cached"] is False
    assert recommend(client, user_id="u5", k=10)["cached"] is True
    written = client.post(
        "/items", json={"items": [{"item_id": top["item_id"], "in_stock": False}]}
    )
    assert written.status_code == 200 and written.json() == {"written": 1}
    time.sleep(0.1)  # the worker re-reads the catalog's version with its global lists (50 ms)
    sold_out = recommend(client, user_id="u5", k=10)
    assert sold_out["cached"] is False
    assert top["item_id"] not in ids(sold_out["items"])
    # Back in stock, at a new price the answer shows.
    client.post(
        "/items", json={"items": [{"item_id": top["item_id"], "in_stock": True, "price": 1.5}]}
    )
    time.sleep(0.1)
    again = recommend(client, user_id="u5", k=10, fields=["price"])
    back = [i for i in again["items"] if i["item_id"] == top["item_id"]]
    assert back and back[0]["price"] == 1.5 and "title" not in back[0]
    # Price filters read the live price too.
    cheap = recommend(client, user_id="u5", k=10, filters={"price_max": 2.0})
    assert ids(cheap["items"]) == [top["item_id"]]


def test_a_category_change_moves_an_item_between_filters(
    uncached: None, served_champion: Registered, client: TestClient
) -> None:
    shoes = recommend(client, user_id="u5", k=10, filters={"categories": ["shoes"]})
    assert shoes["items"] == []
    body = recommend(client, user_id="u5", k=10)
    moved = body["items"][0]["item_id"]
    client.post("/items", json={"items": [{"item_id": moved, "category": "shoes"}]})
    shoes = recommend(
        client, user_id="u5", k=10, filters={"categories": ["shoes"]}, fields=["category"]
    )
    assert [(i["item_id"], i["category"]) for i in shoes["items"]] == [(moved, "shoes")]


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"item_id": "x", "price": -1}, "items[0].price"),
        ({"item_id": "x", "price": "cheap"}, "items[0].price"),
        ({"item_id": "x", "in_stock": "yes"}, "items[0].in_stock"),
        ({"item_id": "x", "colour": "red"}, "items[0].colour"),
        ({"item_id": ""}, "items[0].item_id"),
        ({"title": "no id"}, "items[0].item_id"),
        ({"item_id": "x", "title": "t" * 1001}, "items[0].title"),
    ],
)
def test_items_are_validated_and_the_error_names_the_field(
    client: TestClient, item: dict, field: str
) -> None:
    response = client.post("/items", json={"items": [item]})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field
    assert client.post("/items", json={"items": []}).status_code == 422
    many = {"items": [{"item_id": f"i{n}"} for n in range(1001)]}
    assert client.post("/items", json=many).json()["field"] == "items"


def test_items_no_catalog_lists_are_never_recommended(
    uncached: None, served_champion: Registered, client: TestClient
) -> None:
    shoppers = [f"shopper{n}" for n in range(10)]
    post_events(client, views(shoppers, ["i11", "unlisted"], "s"))
    post_events(client, views(["u5"], ["i11"], "u5"))
    everything = (
        ids(recommend(client, user_id="u5", k=50)["items"])
        + ids(client.post("/popular", json={"k": 50}).json()["items"])
        + ids(client.post("/trending", json={"k": 50}).json()["items"])
        + ids(client.post("/similar_items", json={"item_id": "i11", "k": 50}).json()["items"])
    )
    assert everything and "unlisted" not in everything
    # Listed in the live catalog, it is recommended like any other item.
    client.post("/items", json={"items": [{"item_id": "unlisted", "title": "Now listed"}]})
    assert "unlisted" in ids(client.post("/popular", json={"k": 50}).json()["items"])
    items = recommend(client, user_id="u5", k=50, fields=["title"])["items"]
    assert {"item_id": "unlisted", "title": "Now listed"}.items() <= next(
        i for i in items if i["item_id"] == "unlisted"
    ).items()


@pytest.fixture
def new_items_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_ALLOW_NEW_ITEMS", "1")
    monkeypatch.setenv("RECSYS_NEW_ITEM_MIN_USERS", "3")


def test_new_items_pass_when_allowed_after_enough_distinct_users(
    new_items_allowed: None, uncached: None, served_champion: Registered, client: TestClient
) -> None:
    def popular() -> list[str]:
        return ids(client.post("/popular", json={"k": 50}).json()["items"])

    # One user, however many events, is one user.
    many = [
        {"user_id": "a", "item_id": "brand-new", "event_type": "view", "event_id": f"a{n}"}
        for n in range(50)
    ]
    post_events(client, many)
    post_events(client, views(["b"], ["brand-new"], "b"))
    assert "brand-new" not in popular()
    post_events(client, views(["c"], ["brand-new"], "c"))
    assert "brand-new" in popular()
    post_events(client, views(["u5"], ["i11"], "u5"))
    assert "brand-new" in ids(recommend(client, user_id="u5", k=50)["items"])


def test_a_workers_catalog_copy_reads_only_unseen_items_and_ends_with_a_write(store) -> None:
    from feature_repo.definitions import CATALOG_FIELDS
    from serving.catalog import CatalogCache

    store.write_catalog(pl.DataFrame({"item_id": ["a", "b"], "price": [1.0, 2.0]}))
    version = store.global_lists(1).catalog_version
    fetched: list[list[str]] = []

    def fetch(missing: list[str]):
        fetched.append(missing)
        return store.catalog(missing, CATALOG_FIELDS)

    cache = CatalogCache()
    first = cache.read(np.array(["b", "a", "zz"]), version, fetch)
    assert list(first.values["price"]) == ["2.0", "1.0", None] and first.size == 2
    again = cache.read(np.array(["a", "b"]), version, fetch)
    assert list(again.values["price"]) == ["1.0", "2.0"]
    assert fetched == [["a", "b", "zz"]]  # the second read was the worker's copy
    store.write_catalog(pl.DataFrame({"item_id": ["a"], "price": [5.0]}))
    newer = store.global_lists(1).catalog_version
    assert list(cache.read(np.array(["a"]), newer, fetch).values["price"]) == ["5.0"]
    assert fetched[-1] == ["a"]
