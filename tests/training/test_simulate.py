"""The shopper model follows the generator's truth; its draws are seeded and pure."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from training.generate import GeneratedData, Truth, generate
from training.simulate import (
    Decisions,
    ShopperModel,
    decide,
    draw_shoppers,
    position_bias,
    preference,
    shopper_events,
    summarise,
)


@pytest.fixture(scope="module")
def data() -> GeneratedData:
    return generate(n_users=600, n_items=300, n_events=30_000, seed=5)


@pytest.fixture(scope="module")
def model(data: GeneratedData) -> ShopperModel:
    return ShopperModel(data.truth)


def _all_pairs(model: ShopperModel) -> tuple[np.ndarray, np.ndarray]:
    n_users, n_items = model.n_users, model.item_ids.size
    return np.repeat(np.arange(n_users), n_items), np.tile(np.arange(n_items), n_users)


def test_affinity_is_the_generators_browse_distribution(model: ShopperModel) -> None:
    users, items = _all_pairs(model)
    affinity = model.affinity(users, items).reshape(model.n_users, -1)
    assert np.allclose(affinity.sum(axis=1), 1.0)
    # Per category it is the user's taste.
    per_category = np.stack(
        [affinity[:, model.category == c].sum(axis=1) for c in range(model.taste.shape[1])], 1
    )
    assert np.allclose(per_category, model.taste)


def test_style_weights_rank_items_within_a_category(model: ShopperModel) -> None:
    # Two items of one category and price tier: their affinities stand in the ratio of the
    # user's weights of their styles times their popularity weights.
    group = model.category * 10 + model.tier
    values, counts = np.unique(group, return_counts=True)
    same = np.flatnonzero(group == values[counts.argmax()])
    a, b = same[0], next(i for i in same[1:] if model.style[i] != model.style[same[0]])
    users = np.arange(model.n_users)
    ratio = model.affinity(users, np.full(users.size, a)) / model.affinity(
        users, np.full(users.size, b)
    )
    expected = (model.style_pref[users, model.style[a]] * model.weight[a]) / (
        model.style_pref[users, model.style[b]] * model.weight[b]
    )
    assert np.allclose(ratio, expected)
    # So users whose favourite style is a's click a more often than those whose least liked it is.
    fav = model.style_pref.argmax(axis=1) == model.style[a]
    least = model.style_pref.argmin(axis=1) == model.style[a]
    clicks = model.odds(users, np.full(users.size, a), 0).click
    assert clicks[fav].mean() > 3 * clicks[least].mean()


def test_a_truth_without_styles_is_style_free(data: GeneratedData) -> None:
    truth = data.truth
    old = ShopperModel(
        Truth(truth.users.drop("style"), truth.items.drop("style"), truth.categories)
    )
    assert old.n_styles == 1
    users, items = _all_pairs(old)
    affinity = old.affinity(users, items).reshape(old.n_users, -1)
    assert np.allclose(affinity.sum(axis=1), 1.0)
    # Within a category it is the tier weight times popularity, as before styles.
    u, i = 3, np.flatnonzero(old.category == old.category[0])
    expected = old.tier_pref[u, old.tier[i]] * old.weight[i]
    assert np.allclose(affinity[u, i] / affinity[u, i].sum(), expected / expected.sum())
    assert old.with_new_users(2, np.random.default_rng(0), "n").n_users == old.n_users + 2


def test_affinity_predicts_what_users_viewed(data: GeneratedData, model: ShopperModel) -> None:
    users, items = _all_pairs(model)
    affinity = model.affinity(users, items).reshape(model.n_users, -1)
    views = data.events.filter(pl.col("event_type") == "view")
    u = model.user_index(views["user_id"].to_numpy())
    i = model.item_index(views["item_id"].to_numpy())
    # Items a user viewed have far more affinity than random items of the catalog.
    assert affinity[u, i].mean() > 5 * affinity.mean()


def test_users_prefer_their_categories_and_position_lowers_clicks(model: ShopperModel) -> None:
    users = np.arange(model.n_users)
    top = model.taste.argmax(axis=1)
    bottom = model.taste.argmin(axis=1)
    # For each user, the most popular item of their favourite and of their least liked category.
    best_of = np.array(
        [np.flatnonzero(model.category == c)[model.weight[model.category == c].argmax()]
         for c in range(model.taste.shape[1])]
    )  # fmt: skip
    liked = model.odds(users, best_of[top], 0).click
    disliked = model.odds(users, best_of[bottom], 0).click
    assert (liked >= disliked).mean() > 0.95
    assert liked.mean() > 10 * disliked.mean()
    # The same item shown lower is clicked less, strictly and by the position bias.
    item = best_of[top]
    clicks = np.stack([model.odds(users, item, p).click for p in range(10)])
    assert np.all(np.diff(clicks, axis=0) < 0)
    assert np.allclose(clicks[3] / clicks[0], position_bias(3))
    assert position_bias(0) == 1.0 and position_bias(2) == pytest.approx(0.5)


def test_preference_by_ids_and_funnel(data: GeneratedData, model: ShopperModel) -> None:
    truth = data.truth
    odds = preference(truth, ["u000", "u001", "u002"], ["i000", "i001", "no-such-item"], [0, 1, 2])
    assert odds.click.shape == (3,) and odds.click[2] == 0.0 and odds.purchase[2] == 0.0
    assert np.all((odds.click >= 0) & (odds.click <= 1))
    assert np.all(odds.purchase <= odds.cart)
    with pytest.raises(KeyError, match="not in the truth"):
        preference(model, ["nobody"], ["i000"])
    # Price-sensitive users buy cheap items more readily than dear ones.
    users = truth.users.with_row_index("row").filter(pl.col("archetype") == "price_sensitive")
    rows = users["row"].to_numpy()
    cheap, dear = (np.flatnonzero(model.tier == t)[0] for t in (0, 4))
    assert np.all(model.odds(rows, cheap, 0).buy > model.odds(rows, dear, 0).buy)


def test_loyal_customers_click_their_favourites(data: GeneratedData, model: ShopperModel) -> None:
    loyal = data.truth.users.with_row_index("row").filter(pl.col("archetype") == "loyal_customer")
    rows = loyal["row"].to_numpy()
    favourite = model.favourites[rows, 0]
    other = np.array([(f + 1) % model.item_ids.size for f in favourite])
    assert model.odds(rows, favourite, 0).click.mean() > model.odds(rows, other, 0).click.mean()


def test_shoppers_are_seeded(model: ShopperModel) -> None:
    a = draw_shoppers(model, 50, seed=3, new_users=10)
    b = draw_shoppers(model, 50, seed=3, new_users=10)
    c = draw_shoppers(model, 50, seed=4, new_users=10)
    assert list(a.user_ids) == list(b.user_ids) and list(a.user_ids) != list(c.user_ids)
    assert len(set(a.user_ids)) == 50
    assert sum(u.startswith("sim3-new") for u in a.user_ids) == 10
    assert a.model.truth.users.tail(10).equals(b.model.truth.users.tail(10))
    # New users have tastes (and style weights) like the generator's, and odds like anyone's.
    assert np.allclose(a.model.style_pref[-10:].sum(axis=1), 1.0)
    odds = a.model.odds(a.rows, np.zeros(50, dtype=np.int64), 0)
    assert np.all(np.isfinite(odds.click))
    with pytest.raises(ValueError, match="--new-users"):
        draw_shoppers(model, model.n_users + 1, seed=0)


def test_decisions_are_seeded_by_shopper(model: ShopperModel) -> None:
    shown = np.arange(10)
    odds = model.odds(np.full(10, 7), shown, shown)
    first = draw_shoppers(model, 5, seed=11)
    second = draw_shoppers(model, 5, seed=11)
    # Shopper 3's draws are the same whatever the other shoppers drew before.
    decide(odds, second.rngs[0])
    x, y = decide(odds, first.rngs[3]), decide(odds, second.rngs[3])
    for name in ("click", "cart", "purchase", "quantity"):
        assert np.array_equal(getattr(x, name), getattr(y, name))
    # Certain and impossible odds decide accordingly.
    always = decide(type(odds)(np.ones(4), np.ones(4), np.ones(4)), np.random.default_rng(0))
    assert always.click.all() and always.purchase.all() and always.n_events == 12
    never = decide(type(odds)(np.zeros(4), np.ones(4), np.ones(4)), np.random.default_rng(0))
    assert not never.cart.any()


def test_events_name_request_and_position() -> None:
    decisions = Decisions(
        click=np.array([False, True, True]),
        cart=np.array([False, True, False]),
        purchase=np.array([False, True, False]),
        quantity=np.array([1.0, 2.0, 1.0]),
    )
    events = shopper_events("u1", ["a", "b", "c"], decisions, "req9", 1.8e9, "s1")
    kinds = [(e["item_id"], e["event_type"], e["position"]) for e in events]
    assert kinds == [
        ("b", "click", 1),
        ("b", "add_to_cart", 1),
        ("b", "purchase", 1),
        ("c", "click", 2),
    ]
    assert all(e["request_id"] == "req9" and e["session_id"] == "s1" for e in events)
    assert events[2]["value"] == 2.0 and "value" not in events[0]
    assert len({e["event_id"] for e in events}) == 4


def test_summary_per_variant() -> None:
    answers = pl.DataFrame(
        {
            "shopper": [0, 0, 1, 2],
            "user_id": ["a", "a", "b", "c"],
            "request_id": ["r1", "r2", "r3", "r4"],
            "variant": ["champion", "champion", "challenger", "champion"],
            "impressions": [10, 10, 10, 5],
            "clicks": [2, 0, 1, 1],
            "add_to_carts": [1, 0, 0, 1],
            "purchases": [1, 0, 0, 0],
            "revenue": [30.0, 0.0, 0.0, 0.0],
        }
    )
    table = {r["variant"]: r for r in summarise(answers).iter_rows(named=True)}
    assert table["champion"]["users"] == 2 and table["champion"]["requests"] == 3
    assert table["champion"]["ctr"] == pytest.approx(3 / 25)
    assert table["champion"]["conversion"] == pytest.approx(1 / 3)
    assert table["champion"]["revenue_per_user"] == pytest.approx(15.0)
    assert table["all"]["users"] == 3 and table["all"]["impressions"] == 35
    assert table["challenger"]["purchases"] == 0
