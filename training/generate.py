"""Seeded synthetic e-commerce data: events, catalog and the ground truth that produced them.

Everything is drawn with numpy in whole arrays (no loop over users, sessions or events).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl

# The ground truth speaks the analyses' vocabulary, so segments and trend types can be scored
# against it.
from training.analytics_common import SEGMENTS, TREND_TYPES
from training.data import CATALOG_SCHEMA, EVENT_SCHEMA, EVENT_TYPE_DTYPE

DEFAULT_END = datetime(2026, 11, 1, tzinfo=UTC)

# (name, log-price level) per category: electronics cost more than books.
CATEGORIES: tuple[tuple[str, float], ...] = (
    ("electronics", 5.3),
    ("computers", 6.0),
    ("phones", 5.6),
    ("home", 3.8),
    ("kitchen", 3.6),
    ("furniture", 5.4),
    ("clothing", 3.4),
    ("shoes", 4.0),
    ("beauty", 2.9),
    ("health", 3.0),
    ("sports", 3.9),
    ("toys", 3.1),
    ("books", 2.6),
    ("grocery", 1.9),
    ("garden", 3.5),
    ("pet_supplies", 2.8),
)
# Per trend type, in TREND_TYPES order.
_TREND_SHARE = np.array([0.4, 0.2, 0.2, 0.2])
_POP_EXPONENT = 0.7
_POP_NOISE = 0.2
# Rising items ramp linearly from 1 - s to 1 + s over the window (falling the reverse).
_RAMP = (0.8, 0.97)
_VOLATILE_BASE = 0.15
N_PRICE_TIERS = 5
# Styles: a latent taste that cuts across categories (say minimalist, sporty, classic, kids...).
# Each item has one; each user a Dirichlet weight over them that multiplies an item's popularity
# within its (category, tier), so who likes which items is personal beyond the category and
# learnable from co-occurrence, while the global popularity ranking cannot see it.
N_STYLES = 8
# Dirichlet concentration of a user's style weights: about 0.35 on the favourite style (2.8x the
# even 1/8) and under 0.05 on the three least liked; a floor keeps every style reachable.
STYLE_CONCENTRATION = 0.6
STYLE_FLOOR = 0.01

# Per archetype, in SEGMENTS order. Views per session are 1 + Poisson(extra_views).
_ARCH_SHARE = np.array([0.22, 0.16, 0.15, 0.15, 0.14, 0.18])
EXTRA_VIEWS = np.array([5.0, 2.5, 14.0, 0.4, 2.0, 6.0])
P_CLICK = np.array([0.35, 0.70, 0.60, 0.90, 0.60, 0.60])
P_CART = np.array([0.08, 0.55, 0.12, 0.85, 0.40, 0.35])
P_BUY = np.array([0.25, 0.80, 0.60, 0.90, 0.70, 0.60])
_P_LIKE = np.array([0.15, 0.08, 0.10, 0.05, 0.12, 0.06])
_GAP_SECONDS = np.array([40.0, 45.0, 110.0, 12.0, 40.0, 55.0])
_SESSION_RATE = np.array([1.0, 0.8, 0.5, 1.3, 1.5, 0.8])
# Preferred price tier (0 = cheapest fifth of its category) for everyone but price_sensitive.
PRICE_SENSITIVE = SEGMENTS.index("price_sensitive")
LOYAL = SEGMENTS.index("loyal_customer")
_PRICE_SENSITIVE_TIERS = np.array([0.6, 0.27, 0.09, 0.03, 0.01])
# price_sensitive users compare across tiers but mostly buy the cheap ones.
PRICE_SENSITIVE_BUY_FACTOR = np.array([1.0, 0.55, 0.15, 0.1, 0.05])
LOYAL_REPEAT_SESSION = 0.5
N_FAVOURITES = 3
# (click, add_to_cart, purchase) probabilities of a view of one of a loyal customer's favourites.
FAVOURITE_FUNNEL = (0.92, 0.85, 0.9)
_P_SHARE = 0.02
_P_RATING = 0.25

# Column order of the per-view event flags; events of one view are emitted in this order.
_FLAG_TYPES: tuple[str, ...] = (
    "view",
    "click",
    "like",
    "share",
    "add_to_cart",
    "purchase",
    "rating",
)
_DOW_WEIGHT = np.array([0.9, 0.85, 0.9, 0.95, 1.1, 1.35, 1.3])  # Monday .. Sunday
_HOUR_WEIGHT = np.array(
    [0.15, 0.08, 0.05, 0.04, 0.05, 0.1, 0.3, 0.6, 0.8, 0.9, 0.95, 1.0,
     1.1, 1.0, 0.95, 0.95, 1.0, 1.1, 1.3, 1.6, 1.8, 1.7, 1.2, 0.5]
)  # fmt: skip


TRUTH_DIR = "truth"


@dataclass
class Truth:
    """The latent tastes the generator drew, which a simulated shopper follows
    (training/simulate.py).

    users: user_id, archetype, taste (list: the share of the user's browsing per category, in
    `categories` order, summing to 1), tier_pref (list: weights of the N_PRICE_TIERS price tiers),
    style (list: weights of the N_STYLES styles, summing to 1; a truth written before styles has
    none and counts as one style), favourites (list of N_FAVOURITES item ids: reopened by loyal
    customers).
    items: item_id, category, category_index, tier (price fifth within the category, 0 =
    cheapest), style (index into the users' style weights), price, in_stock, popularity (the
    base power-law weight), trend, weight (popularity times the trend multiplier of the window's
    last day: the shop "now").
    """

    users: pl.DataFrame
    items: pl.DataFrame
    categories: tuple[str, ...]

    def write(self, folder: Path) -> Path:
        """users.parquet, items.parquet and meta.json (the category order) in `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.users.write_parquet(folder / "users.parquet")
        self.items.write_parquet(folder / "items.parquet")
        meta = {
            "categories": list(self.categories),
            "price_tiers": N_PRICE_TIERS,
            "styles": N_STYLES,
        }
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def read(cls, folder: Path) -> Truth:
        """What `write` wrote; accepts the generated data's folder or its truth/ folder."""
        folder = Path(folder)
        if not (folder / "meta.json").exists() and (folder / TRUTH_DIR / "meta.json").exists():
            folder = folder / TRUTH_DIR
        missing = [
            n for n in ("users.parquet", "items.parquet", "meta.json") if not (folder / n).exists()
        ]
        if missing:
            raise FileNotFoundError(
                f"{folder}: no generator truth ({', '.join(missing)} missing); "
                "`recsys generate --out DIR` writes it to DIR/truth"
            )
        meta = json.loads((folder / "meta.json").read_text())
        return cls(
            pl.read_parquet(folder / "users.parquet"),
            pl.read_parquet(folder / "items.parquet"),
            tuple(meta["categories"]),
        )


@dataclass
class GeneratedData:
    """Generated events (EVENT_SCHEMA), catalog (CATALOG_SCHEMA) and the truth behind them."""

    events: pl.DataFrame
    catalog: pl.DataFrame
    truth: Truth

    @property
    def truth_users(self) -> pl.DataFrame:
        """user_id, archetype: what the segment analysis is scored against."""
        return self.truth.users.select("user_id", "archetype")

    @property
    def truth_items(self) -> pl.DataFrame:
        """item_id, trend: what the trend analysis is scored against."""
        return self.truth.items.select("item_id", "trend")


@dataclass
class _Catalog:
    category: np.ndarray  # int, per item
    tier: np.ndarray  # price fifth within the category, 0 = cheapest
    price: np.ndarray
    brand: np.ndarray  # int, global brand index
    n_brands_per_cat: np.ndarray
    pop: np.ndarray  # base popularity weight, power law
    trend: np.ndarray  # index into TREND_TYPES
    multiplier: np.ndarray  # items x days popularity multiplier
    style: np.ndarray  # int, per item, < N_STYLES


@dataclass
class _Users:
    archetype: np.ndarray
    taste_cum: np.ndarray  # users x categories, cumulative
    tier_pref: np.ndarray  # users x tiers
    activity: np.ndarray
    span_start: np.ndarray  # hour bins
    span_end: np.ndarray
    favourites: np.ndarray  # users x N_FAVOURITES item indices (used by loyal customers)
    style: np.ndarray  # users x N_STYLES weights, rows sum to 1


def _categorical(rng: np.random.Generator, cum: np.ndarray) -> np.ndarray:
    """One draw per row of a row-wise cumulative probability matrix."""
    u = rng.random(cum.shape[0]) * cum[:, -1]
    return np.minimum((cum < u[:, None]).sum(axis=1), cum.shape[1] - 1)


def _make_catalog(
    rng: np.random.Generator, n_items: int, days: int, style_rng: np.random.Generator
) -> _Catalog:
    n_cat = min(len(CATEGORIES), n_items)
    cat_weight = rng.dirichlet(np.full(n_cat, 4.0))
    category = np.concatenate(
        [np.arange(n_cat), rng.choice(n_cat, size=n_items - n_cat, p=cat_weight)]
    )
    level = np.array([lvl for _, lvl in CATEGORIES[:n_cat]])
    price = np.round(np.maximum(np.exp(level[category] + rng.normal(0, 0.55, n_items)), 0.5), 2)
    # Price fifth within the category, from the within-category rank.
    order = np.lexsort((price, category))
    counts = np.bincount(category, minlength=n_cat)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(n_items, dtype=np.int64)
    rank[order] = np.arange(n_items) - np.repeat(starts, counts)
    tier = np.minimum((rank * N_PRICE_TIERS) // np.maximum(counts[category], 1), N_PRICE_TIERS - 1)

    n_brands_per_cat = np.maximum(1, np.round(counts / 25)).astype(np.int64)
    brand_offset = np.concatenate([[0], np.cumsum(n_brands_per_cat)[:-1]])
    # Zipf-like brand shares within the category: brand k gets weight 1/(k+1).
    u = rng.random(n_items)
    k = np.floor(np.power(n_brands_per_cat[category] + 1.0, u) - 1.0).astype(np.int64)
    brand = brand_offset[category] + np.minimum(k, n_brands_per_cat[category] - 1)

    # Power-law popularity by a random rank, with mild noise.
    pop_rank = rng.permutation(n_items) + 1
    pop = pop_rank**-_POP_EXPONENT * rng.lognormal(0.0, _POP_NOISE, n_items)

    trend = rng.choice(len(TREND_TYPES), size=n_items, p=_TREND_SHARE)
    t = np.linspace(0.0, 1.0, days)[None, :]
    slope = rng.uniform(*_RAMP, n_items)[:, None]
    multiplier = np.ones((n_items, days))
    rising = trend == TREND_TYPES.index("rising")
    falling = trend == TREND_TYPES.index("falling")
    volatile = trend == TREND_TYPES.index("volatile")
    multiplier[rising] = (1.0 + slope * (2.0 * t - 1.0))[rising]
    multiplier[falling] = (1.0 - slope * (2.0 * t - 1.0))[falling]
    # Volatile: a low base with several short bursts, rescaled to mean 1.
    n_vol = int(volatile.sum())
    if n_vol:
        n_bursts = 6
        burst_day = rng.integers(0, days, size=(n_vol, n_bursts))
        burst_height = rng.uniform(3.0, 9.0, size=(n_vol, n_bursts))
        burst_height[rng.random((n_vol, n_bursts)) < 0.3] = 0.0
        burst_height[:, 0] = np.maximum(burst_height[:, 0], 4.0)
        since = np.arange(days)[None, None, :] - burst_day[:, :, None]
        shape = np.where(since >= 0, np.exp(-np.maximum(since, 0) / 1.2), 0.0)
        vol = _VOLATILE_BASE + (burst_height[:, :, None] * shape).sum(axis=1)
        multiplier[volatile] = vol / vol.mean(axis=1, keepdims=True)
    # Stable items still wobble a little from day to day.
    stable = trend == TREND_TYPES.index("stable")
    multiplier[stable] *= rng.lognormal(0.0, 0.05, size=(int(stable.sum()), days))
    style = style_rng.integers(0, N_STYLES, n_items)
    return _Catalog(category, tier, price, brand, n_brands_per_cat, pop, trend, multiplier, style)


def draw_tastes(
    rng: np.random.Generator, n_users: int, n_categories: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The generator's prior of a user: (archetype, taste over categories, price-tier weights).

    taste rows are unnormalised Dirichlet(0.3) draws; tier weights sum to about 1.
    """
    archetype = rng.choice(len(SEGMENTS), size=n_users, p=_ARCH_SHARE)
    taste = rng.dirichlet(np.full(n_categories, 0.3), size=n_users) + 1e-3
    # Price level: a preferred tier with a softmax spread; price_sensitive users sit at the bottom.
    centre = rng.uniform(1.0, 4.0, n_users)
    tiers = np.arange(N_PRICE_TIERS)[None, :]
    tier_pref = np.exp(-0.5 * ((tiers - centre[:, None]) / 1.1) ** 2)
    ps = archetype == PRICE_SENSITIVE
    tier_pref[ps] = _PRICE_SENSITIVE_TIERS
    tier_pref = tier_pref / tier_pref.sum(axis=1, keepdims=True) + 1e-4
    return archetype, taste, tier_pref


def draw_styles(rng: np.random.Generator, n_users: int) -> np.ndarray:
    """The generator's prior of a user's style weights: users x N_STYLES, rows summing to 1."""
    style = rng.dirichlet(np.full(N_STYLES, STYLE_CONCENTRATION), size=n_users) + STYLE_FLOOR
    return style / style.sum(axis=1, keepdims=True)


def draw_favourites(
    rng: np.random.Generator,
    taste: np.ndarray,
    category: np.ndarray,
    pop: np.ndarray,
    stable: np.ndarray,
) -> np.ndarray:
    """N_FAVOURITES item indices per user from the user's favourite category, by popularity,
    preferring stable items (staples); loyal customers' repeat sessions reopen them."""
    n_users, n_cat = taste.shape
    top_cat = np.argmax(taste, axis=1)
    fav_weight = pop * np.where(stable, 1.0, 1e-3)
    order = np.argsort(category, kind="stable")
    cum = np.cumsum(fav_weight[order])
    counts = np.bincount(category, minlength=n_cat)
    ends = np.cumsum(counts)
    starts = ends - counts
    base = np.where(starts > 0, cum[np.maximum(starts - 1, 0)], 0.0)
    total = cum[ends - 1] - base
    u = rng.random((n_users, N_FAVOURITES))
    target = base[top_cat][:, None] + u * total[top_cat][:, None]
    pos = np.searchsorted(cum, target, side="right")
    pos = np.clip(pos, starts[top_cat][:, None], (ends[top_cat] - 1)[:, None])
    return order[pos]


def _make_users(
    rng: np.random.Generator,
    n_users: int,
    days: int,
    catalog: _Catalog,
    style_rng: np.random.Generator,
) -> _Users:
    n_cat = int(catalog.category.max()) + 1
    archetype, taste, tier_pref = draw_tastes(rng, n_users, n_cat)
    taste_cum = np.cumsum(taste, axis=1)
    activity = rng.lognormal(0.0, 0.5, n_users) * _SESSION_RATE[archetype]

    # Activity span in hour bins. Spans are placed so every day is equally covered on average;
    # loyal customers stay for (nearly) the whole window.
    hours = days * 24
    length = rng.uniform(0.2, 0.8, n_users) * hours
    start = rng.uniform(-length, hours)
    end = np.minimum(start + length, hours)
    start = np.clip(start, 0.0, hours - 1.0)
    loyal = archetype == LOYAL
    start[loyal] = rng.uniform(0.0, 0.06, int(loyal.sum())) * hours
    end[loyal] = hours - rng.uniform(0.0, 0.06, int(loyal.sum())) * hours
    end = np.maximum(end, start + 1.0)

    stable = catalog.trend == TREND_TYPES.index("stable")
    favourites = draw_favourites(rng, taste, catalog.category, catalog.pop, stable)
    style = draw_styles(style_rng, n_users)
    return _Users(archetype, taste_cum, tier_pref, activity, start, end, favourites, style)


def _hour_weights(days: int, end: datetime) -> np.ndarray:
    """Relative traffic of every hour in the window: weekly and daily seasonality."""
    start_ts = int(end.timestamp()) - days * 86400
    hour_ts = start_ts + 3600 * np.arange(days * 24)
    dow = ((hour_ts // 86400) + 3) % 7  # 1970-01-01 was a Thursday (Monday = 0)
    hod = (hour_ts // 3600) % 24
    return _DOW_WEIGHT[dow] * _HOUR_WEIGHT[hod]


def _item_sampler(catalog: _Catalog, days: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative weights laid out day by day, then by (category, tier, style) group.

    Returns (order, cum, group_total) with cum of length days * n_items; group g of day d
    occupies positions d * n_items + group_start[g] .. and has total weight group_total[d, g].
    """
    group = _item_group(catalog)
    order = np.argsort(group, kind="stable")
    weight = (catalog.pop[:, None] * catalog.multiplier)[order].T  # days x items
    cum = np.cumsum(weight.ravel())
    n_groups = (int(catalog.category.max()) + 1) * N_PRICE_TIERS * N_STYLES
    group_total = np.zeros((days, n_groups))
    for d in range(days):
        group_total[d] = np.bincount(group[order], weights=weight[d], minlength=n_groups)
    return order, cum, group_total


def _item_group(catalog: _Catalog) -> np.ndarray:
    """Each item's (category, tier, style) group index."""
    return (catalog.category * N_PRICE_TIERS + catalog.tier) * N_STYLES + catalog.style


def _sample_items(
    rng: np.random.Generator,
    day: np.ndarray,
    group: np.ndarray,
    order: np.ndarray,
    cum: np.ndarray,
    group_total: np.ndarray,
    group_start: np.ndarray,
    group_count: np.ndarray,
) -> np.ndarray:
    n_items = order.size
    first = day * n_items + group_start[group]
    before = np.where(first > 0, cum[np.maximum(first - 1, 0)], 0.0)
    target = before + rng.random(day.size) * group_total[day, group]
    pos = np.searchsorted(cum, target, side="right")
    pos = np.clip(pos, first, first + group_count[group] - 1) - day * n_items
    return order[pos]


def _simulate(
    rng: np.random.Generator,
    users: _Users,
    catalog: _Catalog,
    n_sessions_target: float,
    hour_cum: np.ndarray,
    sampler: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> dict[str, np.ndarray]:
    """Simulate sessions and their events; returns per-event arrays grouped by session."""
    n_users = users.archetype.size
    # Sessions per user in proportion to activity times the length of the user's span, so the
    # traffic per day is the same across the window.
    # Everyone gets one session when the budget allows it (else some users stay silent).
    rate = users.activity * (users.span_end - users.span_start)
    share = rate / rate.sum()
    if n_sessions_target >= n_users:
        n_sess_u = 1 + rng.poisson(share * (n_sessions_target - n_users))
    else:
        n_sess_u = rng.poisson(share * n_sessions_target)
    sess_user = np.repeat(np.arange(n_users), n_sess_u)
    n_sess = sess_user.size
    arch = users.archetype[sess_user]

    # Session start: an hour bin within the user's span, drawn by the seasonal traffic curve.
    lo = np.floor(users.span_start[sess_user]).astype(np.int64)
    hi = np.maximum(np.ceil(users.span_end[sess_user]).astype(np.int64), lo + 1)
    c_lo = np.where(lo > 0, hour_cum[np.maximum(lo - 1, 0)], 0.0)
    c_hi = hour_cum[hi - 1]
    hour_bin = np.searchsorted(hour_cum, c_lo + rng.random(n_sess) * (c_hi - c_lo), side="right")
    hour_bin = np.clip(hour_bin, lo, hi - 1)
    sess_start = hour_bin * 3600 + rng.integers(0, 3600, n_sess)
    sess_day = hour_bin // 24

    loyal_repeat = (arch == LOYAL) & (rng.random(n_sess) < LOYAL_REPEAT_SESSION)
    extra = np.where(loyal_repeat, 0.5, EXTRA_VIEWS[arch])
    n_views = 1 + rng.poisson(extra)
    view_sess = np.repeat(np.arange(n_sess), n_views)
    n_v = view_sess.size
    first_view = np.ones(n_v, dtype=bool)
    first_view[1:] = view_sess[1:] != view_sess[:-1]
    v_user = sess_user[view_sess]
    v_arch = arch[view_sess]
    v_day = sess_day[view_sess]

    # A session browses one category, with an occasional detour.
    sess_cat = _categorical(rng, users.taste_cum[sess_user])
    v_cat = sess_cat[view_sess]
    detour = rng.random(n_v) < 0.15
    v_cat[detour] = _categorical(rng, users.taste_cum[v_user[detour]])

    # Price tier and style together, each (tier, style) weighted by the user's weights of both
    # times the popularity it holds in that category on that day; then an item by popularity
    # within it. So an item's chance is taste(category) * tier_pref(tier) * style(style) *
    # popularity, normalised within the category (training/simulate.py's affinity).
    order, cum, group_total = sampler
    mass = group_total.reshape(group_total.shape[0], -1, N_PRICE_TIERS, N_STYLES)[v_day, v_cat]
    weight = users.tier_pref[v_user][:, :, None] * users.style[v_user][:, None, :] * mass
    v_ts = _categorical(rng, np.cumsum(weight.reshape(n_v, N_PRICE_TIERS * N_STYLES), axis=1))
    group = v_cat * (N_PRICE_TIERS * N_STYLES) + v_ts
    n_groups = group_total.shape[1]
    item_group = _item_group(catalog)[order]
    group_count = np.bincount(item_group, minlength=n_groups)
    group_start = np.concatenate([[0], np.cumsum(group_count)[:-1]])
    v_item = _sample_items(rng, v_day, group, order, cum, group_total, group_start, group_count)

    # Loyal customers' repeat sessions open on one of their favourite items.
    fav_view = loyal_repeat[view_sess] & first_view
    pick = rng.integers(0, N_FAVOURITES, int(fav_view.sum()))
    v_item[fav_view] = users.favourites[v_user[fav_view], pick]

    p_click = np.where(fav_view, FAVOURITE_FUNNEL[0], P_CLICK[v_arch])
    p_cart = np.where(fav_view, FAVOURITE_FUNNEL[1], P_CART[v_arch])
    p_buy = np.where(fav_view, FAVOURITE_FUNNEL[2], P_BUY[v_arch])
    ps = v_arch == PRICE_SENSITIVE
    p_buy[ps] *= PRICE_SENSITIVE_BUY_FACTOR[catalog.tier[v_item[ps]]]

    flags = np.zeros((n_v, len(_FLAG_TYPES)), dtype=bool)
    flags[:, 0] = True
    click = rng.random(n_v) < p_click
    cart = click & (rng.random(n_v) < p_cart)
    buy = cart & (rng.random(n_v) < p_buy)
    flags[:, 1] = click
    flags[:, 2] = click & (rng.random(n_v) < _P_LIKE[v_arch])
    flags[:, 3] = rng.random(n_v) < _P_SHARE
    flags[:, 4] = cart
    flags[:, 5] = buy
    flags[:, 6] = buy & (rng.random(n_v) < _P_RATING)

    ev_view, ev_type = np.nonzero(flags)
    n_ev = ev_view.size
    ev_sess = view_sess[ev_view]
    quantity = draw_quantity(rng, n_v)
    rating = np.clip(np.round(rng.normal(4.0, 1.0, n_v)), 1, 5)
    value = np.full(n_ev, np.nan)
    is_qty = (ev_type == 4) | (ev_type == 5)
    value[is_qty] = quantity[ev_view[is_qty]]
    is_rating = ev_type == 6
    value[is_rating] = rating[ev_view[is_rating]]

    # Seconds between consecutive events of a session; the first event is at the session start.
    gap = 1.0 + rng.exponential(_GAP_SECONDS[arch[ev_sess]])
    sess_first = np.ones(n_ev, dtype=bool)
    sess_first[1:] = ev_sess[1:] != ev_sess[:-1]
    gap[sess_first] = 0.0
    csum = np.cumsum(np.floor(gap))
    offset = csum - csum[np.flatnonzero(sess_first)][np.cumsum(sess_first) - 1]
    return {
        "session": ev_sess,
        "user": sess_user[ev_sess],
        "item": v_item[ev_view],
        "type": ev_type,
        "value": value,
        "rel_ts": sess_start[ev_sess] + offset.astype(np.int64),
        "n_sessions": np.array([n_sess]),
    }


def draw_quantity(rng: np.random.Generator, n: int) -> np.ndarray:
    """Units of a cart or purchase: 1 mostly, else 2 or 3."""
    return np.where(rng.random(n) < 0.85, 1.0, rng.integers(2, 4, n).astype(np.float64))


def _trim(rng: np.random.Generator, sim: dict[str, np.ndarray], n_events: int) -> np.ndarray:
    """Indices of the events kept: whole sessions in random order, the last one cut short.

    Every user's first session goes before all second-and-later ones, so trimming thins heavy
    users rather than silencing light ones.
    """
    n_sess = int(sim["n_sessions"][0])
    sizes = np.bincount(sim["session"], minlength=n_sess)
    sess_user = np.zeros(n_sess, dtype=np.int64)
    sess_user[sim["session"]] = sim["user"]
    first = np.ones(n_sess, dtype=bool)
    first[1:] = sess_user[1:] != sess_user[:-1]
    perm = np.concatenate(
        [rng.permutation(np.flatnonzero(first)), rng.permutation(np.flatnonzero(~first))]
    )
    cum = np.cumsum(sizes[perm])
    n_full = int(np.searchsorted(cum, n_events, side="right"))
    keep_sess = np.zeros(n_sess, dtype=bool)
    keep_sess[perm[:n_full]] = True
    keep = keep_sess[sim["session"]]
    short = n_events - (int(cum[n_full - 1]) if n_full else 0)
    if short > 0 and n_full < n_sess:
        last = perm[n_full]
        idx = np.flatnonzero(sim["session"] == last)[:short]
        keep[idx] = True
    return np.flatnonzero(keep)


def generate(
    n_users: int,
    n_items: int,
    n_events: int,
    seed: int = 0,
    days: int = 90,
    end: datetime | None = None,
) -> GeneratedData:
    """Generate a reproducible e-commerce data set; the same arguments give the same frames.

    Events span `days` days ending at `end` (default 2026-11-01 UTC), sorted by timestamp.
    """
    if n_users < 1 or n_items < 1 or n_events < 0 or days < 1:
        raise ValueError(
            f"need n_users >= 1, n_items >= 1, n_events >= 0, days >= 1; got n_users={n_users}, "
            f"n_items={n_items}, n_events={n_events}, days={days}"
        )
    end = end or DEFAULT_END
    if end.tzinfo is None:
        end = end.replace(tzinfo=UTC)
    rng = np.random.default_rng(seed)
    # Styles come from their own stream, so the catalog and users of a seed are what they were
    # before styles existed; only which item a view lands on changed.
    style_rng = np.random.default_rng([seed, N_STYLES])
    catalog = _make_catalog(rng, n_items, days, style_rng)
    users = _make_users(rng, n_users, days, catalog, style_rng)
    hour_cum = np.cumsum(_hour_weights(days, end))
    sampler = _item_sampler(catalog, days)

    # Expected events per session, from the archetype parameters, sizes the first attempt.
    per_view = 1 + P_CLICK * (1 + _P_LIKE + P_CART * (1 + P_BUY * (1 + _P_RATING))) + _P_SHARE
    per_session = float((_ARCH_SHARE * _SESSION_RATE * (1 + EXTRA_VIEWS) * per_view).sum())
    per_session /= float((_ARCH_SHARE * _SESSION_RATE).sum())
    n_sessions = 1.08 * n_events / per_session
    sim = _simulate(rng, users, catalog, n_sessions, hour_cum, sampler)
    while sim["session"].size < n_events:
        n_sessions *= 1.15 * n_events / max(sim["session"].size, 1)
        sim = _simulate(rng, users, catalog, n_sessions, hour_cum, sampler)
    keep = _trim(rng, sim, n_events)

    start_ts = int(end.timestamp()) - days * 86400
    ts = np.minimum(start_ts + sim["rel_ts"][keep], int(end.timestamp()) - 1)
    # Stable sort keeps each session's funnel order when two events share a second.
    by_time = np.argsort(ts, kind="stable")
    keep = keep[by_time]
    ts = ts[by_time]

    user_names = _ids("u", n_users)
    item_names = _ids("i", n_items)
    type_names = pl.Series(_FLAG_TYPES).cast(EVENT_TYPE_DTYPE)
    value = sim["value"][keep]
    events = pl.DataFrame(
        {
            "user_id": user_names.gather(sim["user"][keep]),
            "item_id": item_names.gather(sim["item"][keep]),
            "event_type": type_names.gather(sim["type"][keep]),
            "timestamp": pl.Series(ts, dtype=pl.Int64),
            "value": pl.Series(value, dtype=pl.Float64, nan_to_null=True),
            "session_id": pl.Series(sim["session"][keep]),
            "event_id": pl.int_range(0, keep.size, eager=True),
        }
    ).with_columns(
        (pl.lit(f"s{seed}-") + pl.col("session_id").cast(pl.String)).alias("session_id"),
        (pl.lit(f"e{seed}-") + pl.col("event_id").cast(pl.String)).alias("event_id"),
    )
    events = events.select(pl.col(c).cast(t) for c, t in EVENT_SCHEMA.items())

    cat_names = pl.Series([name for name, _ in CATEGORIES])
    brand_cat = np.repeat(np.arange(catalog.n_brands_per_cat.size), catalog.n_brands_per_cat)
    brand_in_cat = np.arange(brand_cat.size) - np.repeat(
        np.cumsum(catalog.n_brands_per_cat) - catalog.n_brands_per_cat, catalog.n_brands_per_cat
    )
    brand_names = pl.DataFrame(
        {"c": cat_names.gather(brand_cat), "k": pl.Series(brand_in_cat + 1)}
    ).select(pl.format("{} brand {}", pl.col("c").str.to_titlecase(), pl.col("k")))["c"]
    cats = cat_names.gather(catalog.category)
    catalog_frame = pl.DataFrame(
        {
            "item_id": item_names,
            "title": cats,
            "category": cats,
            "brand": brand_names.gather(catalog.brand),
            "price": catalog.price,
            "in_stock": rng.random(n_items) < 0.9,
        }
    ).with_columns(
        pl.format("{} {}", pl.col("category").str.to_titlecase(), pl.col("item_id")).alias("title")
    )
    catalog_frame = catalog_frame.select(pl.col(c).cast(t) for c, t in CATALOG_SCHEMA.items())
    return GeneratedData(events, catalog_frame, _truth(users, catalog, catalog_frame))


def _truth(users: _Users, catalog: _Catalog, catalog_frame: pl.DataFrame) -> Truth:
    item_names = catalog_frame["item_id"]
    n_cat = users.taste_cum.shape[1]
    taste = np.diff(users.taste_cum, axis=1, prepend=0.0)
    taste = taste / taste.sum(axis=1, keepdims=True)
    n_users = taste.shape[0]
    truth_users = pl.DataFrame(
        {
            "user_id": _ids("u", n_users),
            "archetype": pl.Series(SEGMENTS).gather(users.archetype),
            "taste": pl.Series(list(taste), dtype=pl.Array(pl.Float64, n_cat)).cast(
                pl.List(pl.Float64)
            ),
            "tier_pref": pl.Series(
                list(users.tier_pref), dtype=pl.Array(pl.Float64, N_PRICE_TIERS)
            ).cast(pl.List(pl.Float64)),
            "style": pl.Series(list(users.style), dtype=pl.Array(pl.Float64, N_STYLES)).cast(
                pl.List(pl.Float64)
            ),
            "favourites": pl.Series(
                list(item_names.to_numpy()[users.favourites]),
                dtype=pl.Array(pl.String, N_FAVOURITES),
            ).cast(pl.List(pl.String)),
        }
    )
    cat_names = pl.Series([name for name, _ in CATEGORIES[:n_cat]])
    truth_items = pl.DataFrame(
        {
            "item_id": item_names,
            "category": cat_names.gather(catalog.category),
            "category_index": pl.Series(catalog.category, dtype=pl.Int32),
            "tier": pl.Series(catalog.tier, dtype=pl.Int32),
            "style": pl.Series(catalog.style, dtype=pl.Int32),
            "price": catalog_frame["price"],
            "in_stock": catalog_frame["in_stock"],
            "popularity": catalog.pop,
            "trend": pl.Series(TREND_TYPES).gather(catalog.trend),
            "weight": catalog.pop * catalog.multiplier[:, -1],
        }
    )
    return Truth(truth_users, truth_items, tuple(cat_names.to_list()))


def _ids(prefix: str, n: int) -> pl.Series:
    """Zero-padded ids ("u0042"), so they sort in numeric order as strings."""
    width = len(str(max(n - 1, 0)))
    digits = pl.int_range(0, n, eager=True).cast(pl.String).str.zfill(width)
    return (prefix + digits).alias("id")


def write_generated(data: GeneratedData, out_dir: Path) -> dict[str, Path]:
    """Write events.csv, catalog.csv, truth_users.csv and truth_items.csv into out_dir, and the
    whole truth (what a shopper simulator follows, `Truth.write`) into out_dir/truth."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = {
        "events": data.events,
        "catalog": data.catalog,
        "truth_users": data.truth_users,
        "truth_items": data.truth_items,
    }
    paths: dict[str, Path] = {}
    for name, frame in frames.items():
        path = out_dir / f"{name}.csv"
        frame.write_csv(path)
        paths[name] = path
    paths["truth"] = data.truth.write(out_dir / TRUTH_DIR)
    return paths
