"""Simulated shoppers that follow the generator's truth: who clicks and buys what they are shown.

Pure numpy/polars; the HTTP driver that shows them a live service is orchestration/simulator.py.

The model (a position-based click model on the generator's own browsing model):
- affinity(u, i): the chance that one browse of user u lands on item i, exactly as
  training/generate.py draws a view: a category by the user's taste, then a (price tier, style)
  by the user's tier and style weights times the popularity that (tier, style) holds in that
  category, then an item by its popularity (times its trend on the window's last day) within it.
  So within a category, affinity is proportional to tier_pref(tier) * style(style) * weight: the
  style weights are the personal part a model can learn from co-occurrence and popularity cannot.
- interest(u, i) = 1 - (1 - affinity)^V, V the archetype's mean views per session: the chance the
  item would have come up in one of the user's own sessions. A loyal customer's favourite also
  comes up when a repeat session reopens it (LOYAL_REPEAT_SESSION / N_FAVOURITES).
- P(click | shown at position p) = bias(p) * interest * P_CLICK[archetype], bias(p) =
  1 / log2(p + 2) (p = 0 first): the shopper examines the slot, then would they have clicked it
  on their own.
- P(add_to_cart | click) = P_CART[archetype], P(purchase | add_to_cart) = P_BUY[archetype] (times
  the price-sensitive factor of the item's tier); a favourite of a loyal customer has the
  generator's favourite funnel. Items the truth does not know (new items) interest nobody.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from training.analytics_common import SEGMENTS
from training.generate import (
    EXTRA_VIEWS,
    FAVOURITE_FUNNEL,
    LOYAL,
    LOYAL_REPEAT_SESSION,
    N_FAVOURITES,
    N_PRICE_TIERS,
    N_STYLES,
    P_BUY,
    P_CART,
    P_CLICK,
    PRICE_SENSITIVE,
    PRICE_SENSITIVE_BUY_FACTOR,
    Truth,
    draw_favourites,
    draw_quantity,
    draw_styles,
    draw_tastes,
)

# Answers a shopper asks for per visit: a visit shows recommendations on several pages (home,
# a category or product page, the basket), and the generator's sessions hold six views on average
# (1 + the archetypes' mean extra views of 5.0); three answers, each followed by the clicks it
# drew, is a modest visit. One answer per user throws away most of what a visit would show an
# experiment: the unit is the user, so the answers are more of the same user's evidence.
REQUESTS_PER_VISIT = 3

# The event types a shopper sends, in funnel order.
FUNNEL_EVENTS = ("click", "add_to_cart", "purchase")


def position_bias(positions: np.ndarray | int) -> np.ndarray:
    """The chance a shopper examines the slot at 0-based `positions`: 1 / log2(p + 2)."""
    p = np.asarray(positions, dtype=np.float64)
    if np.any(p < 0):
        raise ValueError("positions start at 0")
    return 1.0 / np.log2(p + 2.0)


@dataclass(frozen=True)
class Odds:
    """Per shown item: P(click | shown at its position), P(add_to_cart | click) and
    P(purchase | add_to_cart)."""

    click: np.ndarray
    cart: np.ndarray
    buy: np.ndarray

    @property
    def purchase(self) -> np.ndarray:
        """P(purchase | click)."""
        return self.cart * self.buy


class ShopperModel:
    """A Truth indexed for fast look-ups: the users' and items' arrays by row."""

    def __init__(self, truth: Truth) -> None:
        self.truth = truth
        users, items = truth.users, truth.items
        n_cat = len(truth.categories)
        self.user_ids = users["user_id"].to_numpy().astype(str)
        self.item_ids = items["item_id"].to_numpy().astype(str)
        self._user_order = np.argsort(self.user_ids)
        self._item_order = np.argsort(self.item_ids)
        self.archetype = (
            users["archetype"].replace_strict(SEGMENTS, list(range(len(SEGMENTS)))).to_numpy()
        )
        self.taste = _matrix(users["taste"], n_cat)
        self.tier_pref = _matrix(users["tier_pref"], N_PRICE_TIERS)
        # A truth written before styles existed has one style that everyone likes equally.
        styled = "style" in users.columns and "style" in items.columns
        self.n_styles = N_STYLES if styled else 1
        self.style_pref = (
            _matrix(users["style"], N_STYLES) if styled else np.ones((users.height, 1))
        )
        fav = self.item_index(users["favourites"].explode().to_numpy().astype(str))
        self.favourites = fav.reshape(users.height, -1)
        self.category = items["category_index"].to_numpy().astype(np.int64)
        self.tier = items["tier"].to_numpy().astype(np.int64)
        self.style = (
            items["style"].to_numpy().astype(np.int64) if styled else np.zeros(items.height, int)
        )
        self.weight = items["weight"].to_numpy().astype(np.float64)
        self.price = items["price"].to_numpy().astype(np.float64)
        n_ts = N_PRICE_TIERS * self.n_styles
        group = (self.category * N_PRICE_TIERS + self.tier) * self.n_styles + self.style
        self.group_weight = np.bincount(group, weights=self.weight, minlength=n_cat * n_ts).reshape(
            n_cat, N_PRICE_TIERS, self.n_styles
        )
        # Per user and category: the tier- and style-weighted popularity mass a browse
        # normalises by.
        self._norm = np.einsum(
            "ut,us,cts->uc", self.tier_pref, self.style_pref, self.group_weight, optimize=True
        )

    @property
    def n_users(self) -> int:
        return int(self.user_ids.size)

    def user_index(self, user_ids: np.ndarray | list[str]) -> np.ndarray:
        """Rows of `user_ids`; a user the truth does not know is an error."""
        rows = _lookup(self.user_ids, self._user_order, user_ids)
        if np.any(rows < 0):
            unknown = np.asarray(user_ids, dtype=str)[rows < 0][:3]
            raise KeyError(f"users not in the truth: {', '.join(unknown)}")
        return rows

    def item_index(self, item_ids: np.ndarray | list[str]) -> np.ndarray:
        """Rows of `item_ids`, -1 for an item the truth does not know."""
        return _lookup(self.item_ids, self._item_order, item_ids)

    def affinity(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """P(one browse of user row u lands on item row i), pairwise; 0 for item -1."""
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        known = items >= 0
        i = np.where(known, items, 0)
        c, t, s = self.category[i], self.tier[i], self.style[i]
        norm = self._norm[users, c]
        value = (
            self.taste[users, c] * self.tier_pref[users, t] * self.style_pref[users, s]
        ) * self.weight[i]
        value = np.divide(value, norm, out=np.zeros_like(value), where=norm > 0)
        return np.where(known, value, 0.0)

    def odds(self, users: np.ndarray, items: np.ndarray, positions: np.ndarray | int) -> Odds:
        """The Odds of user rows `users` shown item rows `items` (-1: unknown) at `positions`."""
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        users, items = np.broadcast_arrays(users, items)
        arch = self.archetype[users]
        views = 1.0 + EXTRA_VIEWS[arch]
        miss = (1.0 - self.affinity(users, items)) ** views
        favourite = (
            (arch == LOYAL) & (items >= 0) & (self.favourites[users] == items[:, None]).any(axis=1)
        )
        miss = np.where(favourite, miss * (1.0 - LOYAL_REPEAT_SESSION / N_FAVOURITES), miss)
        interest = 1.0 - miss
        click_rate = np.where(favourite, FAVOURITE_FUNNEL[0], P_CLICK[arch])
        click = position_bias(np.broadcast_to(positions, users.shape)) * interest * click_rate
        cart = np.where(favourite, FAVOURITE_FUNNEL[1], P_CART[arch])
        buy = np.where(favourite, FAVOURITE_FUNNEL[2], P_BUY[arch])
        tier = self.tier[np.where(items >= 0, items, 0)]
        buy = np.where(arch == PRICE_SENSITIVE, buy * PRICE_SENSITIVE_BUY_FACTOR[tier], buy)
        return Odds(click, np.where(items >= 0, cart, 0.0), np.where(items >= 0, buy, 0.0))

    def with_new_users(self, n: int, rng: np.random.Generator, prefix: str) -> ShopperModel:
        """This truth plus `n` users drawn from the generator's prior (ids prefix0, prefix1...)."""
        if n <= 0:
            return self
        n_cat = len(self.truth.categories)
        archetype, taste, tier_pref = draw_tastes(rng, n, n_cat)
        taste = taste / taste.sum(axis=1, keepdims=True)
        stable = (self.truth.items["trend"] == "stable").to_numpy()
        pop = self.truth.items["popularity"].to_numpy()
        favourites = draw_favourites(rng, taste, self.category, pop, stable)
        columns = {}
        if self.n_styles > 1:
            style = draw_styles(rng, n)
            columns["style"] = pl.Series(list(style), dtype=pl.Array(pl.Float64, N_STYLES)).cast(
                pl.List(pl.Float64)
            )
        new = pl.DataFrame(
            {
                "user_id": [f"{prefix}{j}" for j in range(n)],
                "archetype": pl.Series(SEGMENTS).gather(archetype),
                "taste": pl.Series(list(taste), dtype=pl.Array(pl.Float64, n_cat)).cast(
                    pl.List(pl.Float64)
                ),
                "tier_pref": pl.Series(
                    list(tier_pref), dtype=pl.Array(pl.Float64, N_PRICE_TIERS)
                ).cast(pl.List(pl.Float64)),
                "favourites": pl.Series(
                    list(self.item_ids[favourites]), dtype=pl.Array(pl.String, N_FAVOURITES)
                ).cast(pl.List(pl.String)),
                **columns,
            }
        )
        users = pl.concat([self.truth.users.select(new.columns), new])
        return ShopperModel(Truth(users, self.truth.items, self.truth.categories))


def _matrix(column: pl.Series, width: int) -> np.ndarray:
    if column.is_empty():
        return np.zeros((0, width))
    return column.cast(pl.Array(pl.Float64, width)).to_numpy().reshape(-1, width)


def _lookup(ids: np.ndarray, order: np.ndarray, wanted: np.ndarray | list[str]) -> np.ndarray:
    wanted = np.asarray(wanted, dtype=str)
    if not ids.size or not wanted.size:
        return np.full(wanted.shape, -1, dtype=np.int64)
    sorted_ids = ids[order]
    pos = np.clip(np.searchsorted(sorted_ids, wanted), 0, ids.size - 1)
    return np.where(sorted_ids[pos] == wanted, order[pos], -1).astype(np.int64)


def preference(
    truth: Truth | ShopperModel,
    user_ids: np.ndarray | list[str],
    item_ids: np.ndarray | list[str],
    positions: np.ndarray | int = 0,
) -> Odds:
    """The Odds of each (user, item, position): P(click | shown there), P(add_to_cart | click),
    P(purchase | add_to_cart); `.purchase` is P(purchase | click). Pairwise, vectorised."""
    model = truth if isinstance(truth, ShopperModel) else ShopperModel(truth)
    return model.odds(model.user_index(user_ids), model.item_index(item_ids), positions)


@dataclass(frozen=True)
class Decisions:
    """What a shopper did with each item of one answer, and the units of what they carted."""

    click: np.ndarray
    cart: np.ndarray
    purchase: np.ndarray
    quantity: np.ndarray

    @property
    def n_events(self) -> int:
        return int(self.click.sum() + self.cart.sum() + self.purchase.sum())


def decide(odds: Odds, rng: np.random.Generator) -> Decisions:
    """Draw clicks, carts and purchases: a fixed number of draws per shown item, so the same answers
    and the same generator give the same decisions."""
    n = odds.click.size
    u = rng.random((3, n))
    click = u[0] < odds.click
    cart = click & (u[1] < odds.cart)
    purchase = cart & (u[2] < odds.buy)
    return Decisions(click, cart, purchase, draw_quantity(rng, n))


@dataclass(frozen=True)
class Shoppers:
    """Who shops, in order: user rows of `model` and one random generator per shopper (its
    draws do not depend on how the shoppers are interleaved)."""

    model: ShopperModel
    rows: np.ndarray
    rngs: list[np.random.Generator]
    seed: int

    @property
    def user_ids(self) -> np.ndarray:
        return self.model.user_ids[self.rows]


def draw_shoppers(model: ShopperModel, n: int, seed: int, new_users: int = 0) -> Shoppers:
    """`n` shoppers: `n - new_users` distinct users of the truth and `new_users` drawn from the
    generator's prior (ids `sim{seed}-new{j}`), shuffled. The same seed, the same shoppers."""
    if n < 1 or not 0 <= new_users <= n:
        raise ValueError(f"need users >= 1 and 0 <= new users <= users; got {n}, {new_users}")
    known = n - new_users
    if known > model.n_users:
        raise ValueError(
            f"the truth has {model.n_users} users, {known} were asked for; ask for fewer or "
            "add new users (--new-users)"
        )
    root = np.random.SeedSequence(seed)
    pick_seq, new_seq, *per_shopper = root.spawn(n + 2)
    pick = np.random.default_rng(pick_seq)
    rows = pick.choice(model.n_users, size=known, replace=False)
    base = model.n_users
    model = model.with_new_users(new_users, np.random.default_rng(new_seq), f"sim{seed}-new")
    rows = pick.permutation(np.concatenate([rows, base + np.arange(new_users)]))
    return Shoppers(model, rows, [np.random.default_rng(s) for s in per_shopper], seed)


def shopper_events(
    user_id: str,
    item_ids: list[str],
    decisions: Decisions,
    request_id: str,
    timestamp: float,
    session_id: str | None = None,
) -> list[dict[str, Any]]:
    """The events of one answer's decisions, in funnel order per item, each naming the
    request_id and the position that caused it; event_id `{request_id}:{position}:{type}`."""
    flags = np.stack([decisions.click, decisions.cart, decisions.purchase], axis=1)
    positions, kinds = np.nonzero(flags)
    events = []
    for position, kind in zip(positions.tolist(), kinds.tolist(), strict=True):
        event_type = FUNNEL_EVENTS[kind]
        event: dict[str, Any] = {
            "user_id": user_id,
            "item_id": item_ids[position],
            "event_type": event_type,
            "timestamp": timestamp,
            "event_id": f"{request_id}:{position}:{event_type}",
            "request_id": request_id,
            "position": position,
        }
        if kind > 0:
            event["value"] = float(decisions.quantity[position])
        if session_id is not None:
            event["session_id"] = session_id
        events.append(event)
    return events


ANSWER_SCHEMA = {
    "shopper": pl.Int64,
    "user_id": pl.String,
    "request_id": pl.String,
    "variant": pl.String,
    "impressions": pl.Int64,
    "clicks": pl.Int64,
    "add_to_carts": pl.Int64,
    "purchases": pl.Int64,
    "revenue": pl.Float64,
}


def summarise(answers: pl.DataFrame) -> pl.DataFrame:
    """Per variant and in total (variant `all`): users, requests, impressions, clicks, CTR,
    add_to_carts, purchases, conversion (purchases per click), revenue, revenue per user."""
    answers = answers.cast(ANSWER_SCHEMA)  # type: ignore[arg-type]
    sums = [
        pl.col("user_id").n_unique().alias("users"),
        pl.len().alias("requests"),
        *(pl.col(c).sum() for c in ("impressions", "clicks", "add_to_carts", "purchases")),
        pl.col("revenue").sum(),
    ]
    per_variant = answers.group_by("variant").agg(sums).sort("variant")
    total = answers.select(pl.lit("all").alias("variant"), *sums)
    table = pl.concat([per_variant, total])
    return table.with_columns(
        (pl.col("clicks") / pl.col("impressions")).fill_nan(0.0).alias("ctr"),
        (pl.col("purchases") / pl.col("clicks")).fill_nan(0.0).alias("conversion"),
        (pl.col("revenue") / pl.col("users")).fill_nan(0.0).alias("revenue_per_user"),
    ).select(
        "variant",
        "users",
        "requests",
        "impressions",
        "clicks",
        "ctr",
        "add_to_carts",
        "purchases",
        "conversion",
        "revenue",
        "revenue_per_user",
    )
