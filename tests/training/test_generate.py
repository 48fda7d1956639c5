"""Tests for the synthetic e-commerce generator: schema, determinism and the planted structure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from training.analytics_common import SEGMENTS, TREND_TYPES
from training.data import CATALOG_SCHEMA, EVENT_SCHEMA, validate_catalog, validate_events
from training.generate import N_STYLES, GeneratedData, Truth, generate, write_generated


@pytest.fixture(scope="module")
def data() -> GeneratedData:
    return generate(n_users=1500, n_items=400, n_events=80_000, seed=7)


def test_events_match_schema_exactly(data: GeneratedData) -> None:
    assert dict(data.events.schema) == EVENT_SCHEMA
    assert list(data.events.columns) == list(EVENT_SCHEMA)
    assert data.events.height == 80_000
    assert data.events["event_id"].n_unique() == data.events.height
    assert data.events["session_id"].null_count() == 0
    assert data.events["timestamp"].is_sorted()


def test_catalog_and_truth_frames(data: GeneratedData) -> None:
    catalog = data.catalog
    assert dict(catalog.schema) == CATALOG_SCHEMA
    assert catalog.height == 400
    assert 10 <= catalog["category"].n_unique() <= 20
    assert catalog["price"].min() > 0
    assert 0.8 < catalog["in_stock"].mean() < 0.97
    assert set(data.truth_items["trend"].unique()) == set(TREND_TYPES)
    assert set(data.truth_users["archetype"].unique()) == set(SEGMENTS)
    assert set(data.events["item_id"].unique()) <= set(catalog["item_id"])
    assert set(data.events["user_id"].unique()) <= set(data.truth_users["user_id"])


def test_prices_depend_on_category(data: GeneratedData) -> None:
    medians = data.catalog.group_by("category").agg(pl.col("price").median())["price"]
    assert medians.max() / medians.min() > 10


def test_time_window_and_default_end() -> None:
    small = generate(50, 30, 2_000, seed=1, days=10)
    end = 1_793_491_200  # 2026-11-01T00:00:00Z
    assert small.events["timestamp"].max() < end
    assert small.events["timestamp"].min() >= end - 10 * 86400


def test_same_seed_same_data_other_seed_differs() -> None:
    a = generate(300, 80, 6_000, seed=3)
    b = generate(300, 80, 6_000, seed=3)
    c = generate(300, 80, 6_000, seed=4)
    assert a.events.equals(b.events)
    assert a.catalog.equals(b.catalog)
    assert a.truth_users.equals(b.truth_users)
    assert a.truth_items.equals(b.truth_items)
    assert not a.events.equals(c.events)


def test_tiny_sizes_work() -> None:
    tiny = generate(1, 1, 5, seed=0)
    assert tiny.events.height == 5
    assert tiny.catalog.height == 1
    empty = generate(3, 3, 0, seed=0)
    assert empty.events.height == 0
    assert dict(empty.events.schema) == EVENT_SCHEMA


def test_written_csv_passes_validation(data: GeneratedData, tmp_path: Path) -> None:
    paths = write_generated(data, tmp_path)
    assert set(paths) == {"events", "catalog", "truth_users", "truth_items", "truth"}
    # Read as raw text, as the file readers do, then through the contract's validation.
    events = validate_events(pl.read_csv(paths["events"], infer_schema=False)).frame
    assert events.equals(data.events)
    catalog = validate_catalog(pl.read_csv(paths["catalog"], infer_schema=False)).frame
    assert catalog.equals(data.catalog)
    truth = pl.read_csv(paths["truth_users"])
    assert truth.columns == ["user_id", "archetype"]
    assert pl.read_csv(paths["truth_items"]).columns == ["item_id", "trend"]
    # The whole truth round-trips, from the data folder or its truth/ folder.
    for folder in (tmp_path, paths["truth"]):
        back = Truth.read(folder)
        assert back.users.equals(data.truth.users) and back.items.equals(data.truth.items)
        assert back.categories == data.truth.categories
    with pytest.raises(FileNotFoundError, match="recsys generate"):
        Truth.read(tmp_path / "nowhere")


def test_truth_is_what_drew_the_events(data: GeneratedData) -> None:
    users, items = data.truth.users, data.truth.items
    assert users["user_id"].equals(data.truth_users["user_id"])
    taste = np.vstack(users["taste"].to_numpy())
    assert taste.shape == (1500, len(data.truth.categories))
    assert np.allclose(taste.sum(axis=1), 1.0)
    assert items.select("item_id", "price", "in_stock").equals(
        data.catalog.select("item_id", "price", "in_stock")
    )
    assert (items["category"] == data.catalog["category"]).all()
    # Users browse the categories of their taste: the share of a user's views in the category
    # the truth says they like most is far above the uniform share (1 / 16).
    views = data.events.filter(pl.col("event_type") == "view").join(
        items.select("item_id", "category_index"), on="item_id"
    )
    top = pl.DataFrame({"user_id": users["user_id"], "top": taste.argmax(axis=1)})
    share = views.join(top, on="user_id").select((pl.col("category_index") == pl.col("top")).mean())
    assert share.item() > 5 / len(data.truth.categories)
    # Within the categories, users view the styles they like: the user's weight of the viewed
    # item's style averages about E[sum w^2] (0.28), where styles the user were blind to would
    # give the even 1 / N_STYLES (0.125).
    style = np.vstack(users["style"].to_numpy())
    assert style.shape == (1500, N_STYLES) and np.allclose(style.sum(axis=1), 1.0)
    styled = views.join(items.select("item_id", "style"), on="item_id").join(
        users.with_row_index("row").select("user_id", "row"), on="user_id"
    )
    weight = style[styled["row"].to_numpy(), styled["style"].to_numpy()]
    assert weight.mean() > 1.8 / N_STYLES
    # Loyal customers rebuy their favourites.
    favourites = users.filter(pl.col("archetype") == "loyal_customer").explode("favourites")
    bought = data.events.filter(pl.col("event_type") == "purchase").join(
        favourites.select("user_id", pl.col("favourites").alias("item_id")),
        on=["user_id", "item_id"],
    )
    assert bought.height > 100


def test_funnel_narrows(data: GeneratedData) -> None:
    counts = dict(data.events["event_type"].cast(pl.String).value_counts().iter_rows())
    assert counts["purchase"] < counts["add_to_cart"] < counts["click"] < counts["view"]
    # Each session's funnel is in order: a purchase follows a cart of the same item.
    first = (
        data.events.with_row_index("row")
        .group_by("session_id", "item_id", "event_type")
        .agg(pl.col("row").min())
        .pivot("event_type", index=["session_id", "item_id"], values="row")
    )
    bought = first.filter(pl.col("purchase").is_not_null())
    assert (bought["add_to_cart"] < bought["purchase"]).all()
    assert (bought["view"] < bought["add_to_cart"]).all()


def test_item_popularity_is_heavy_tailed(data: GeneratedData) -> None:
    counts = np.sort(data.events["item_id"].value_counts()["count"].to_numpy())[::-1]
    top_decile_share = counts[: counts.size // 10].sum() / counts.sum()
    assert top_decile_share > 0.35
    assert counts[0] > 20 * np.median(counts)


def test_weekly_seasonality() -> None:
    big = generate(3000, 300, 150_000, seed=2)
    dow = big.events.select(pl.from_epoch("timestamp").dt.weekday().alias("dow"))[
        "dow"
    ].value_counts()
    by_day = dict(dow.iter_rows())
    weekend = (by_day[6] + by_day[7]) / 2
    midweek = (by_day[2] + by_day[3]) / 2
    assert weekend > 1.2 * midweek


def test_item_trends_are_visible(data: GeneratedData) -> None:
    start = data.events["timestamp"].min()
    span = data.events["timestamp"].max() - start
    share = (
        data.events.with_columns(((pl.col("timestamp") - start) * 3 // (span + 1)).alias("third"))
        .group_by("item_id")
        .agg(
            (pl.col("third") == 0).sum().alias("early"),
            (pl.col("third") == 2).sum().alias("late"),
        )
        .join(data.truth_items, on="item_id")
        .group_by("trend")
        .agg(pl.col("late").sum() / pl.col("early").sum())
    )
    ratio = dict(share.iter_rows())
    assert ratio["rising"] > 2.0
    assert ratio["falling"] < 0.5
    assert 0.75 < ratio["stable"] < 1.33
    # Volatile items pile events into a few days.
    daily = (
        data.events.with_columns((pl.col("timestamp") // 86400).alias("day"))
        .group_by("item_id", "day")
        .len()
        .group_by("item_id")
        .agg((pl.col("len").max() / pl.col("len").sum()).alias("peak"))
        .join(data.truth_items, on="item_id")
        .group_by("trend")
        .agg(pl.col("peak").median())
    )
    peak = dict(daily.iter_rows())
    assert peak["volatile"] > 2 * peak["stable"]


def _user_profile(data: GeneratedData) -> pl.DataFrame:
    events = data.events.join(data.catalog.select("item_id", "category", "price"), on="item_id")
    pct = data.catalog.with_columns(
        pl.col("price").rank().over("category").truediv(pl.len().over("category")).alias("pct")
    ).select("item_id", "pct")
    sessions = events.group_by("user_id", "session_id").agg(
        pl.len().alias("n"),
        (pl.col("timestamp").max() - pl.col("timestamp").min()).alias("duration"),
    )
    per_user = (
        events.join(pct, on="item_id")
        .group_by("user_id")
        .agg(
            (pl.col("event_type") == "view").sum().alias("views"),
            (pl.col("event_type") == "purchase").sum().alias("purchases"),
            pl.col("pct").filter(pl.col("event_type") == "purchase").mean().alias("buy_pct"),
            pl.col("item_id")
            .filter(pl.col("event_type") == "purchase")
            .n_unique()
            .alias("distinct"),
            (pl.col("timestamp").max() - pl.col("timestamp").min()).alias("tenure"),
        )
    )
    per_session = sessions.group_by("user_id").agg(
        pl.col("n").mean().alias("session_len"), pl.col("duration").mean().alias("duration")
    )
    return (
        per_user.join(per_session, on="user_id")
        .join(data.truth_users, on="user_id")
        .with_columns(
            (pl.col("purchases") / pl.col("views")).alias("conversion"),
            (1 - pl.col("distinct") / pl.col("purchases")).fill_nan(0.0).alias("repeat"),
        )
        .group_by("archetype")
        .agg(
            pl.col(c).median()
            for c in ("conversion", "session_len", "duration", "buy_pct", "repeat", "tenure")
        )
    )


def test_archetypes_behave_as_designed(data: GeneratedData) -> None:
    p = {row["archetype"]: row for row in _user_profile(data).iter_rows(named=True)}
    others = list(SEGMENTS)
    # browser: the lowest conversion; buyer and impulse buyer: high conversion.
    assert p["browser"]["conversion"] == min(p[a]["conversion"] for a in others)
    assert p["buyer"]["conversion"] > 5 * p["browser"]["conversion"]
    # researcher: the longest sessions; impulse buyer: the shortest.
    assert p["researcher"]["session_len"] == max(p[a]["session_len"] for a in others)
    assert p["impulse_buyer"]["duration"] == min(p[a]["duration"] for a in others)
    assert p["impulse_buyer"]["conversion"] == max(p[a]["conversion"] for a in others)
    # loyal customer: repeat purchases over the longest tenure.
    assert p["loyal_customer"]["repeat"] == max(p[a]["repeat"] for a in others)
    assert p["loyal_customer"]["tenure"] == max(p[a]["tenure"] for a in others)
    # price sensitive: buys in the lowest price percentiles of each category.
    assert p["price_sensitive"]["buy_pct"] == min(p[a]["buy_pct"] for a in others)
    assert p["price_sensitive"]["buy_pct"] < 0.3
