"""User segmentation tests: agreement with generated archetypes, scores, robustness."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import adjusted_rand_score

from training.data import EVENT_SCHEMA
from training.generate import GeneratedData, generate
from training.segments import (
    FEATURE_DOC,
    SEGMENTS,
    SIGNATURES,
    SegmentConfig,
    compute_segments,
    feature_documentation,
    segment_model_json,
    segment_profile,
    segment_users,
    user_features,
)


@pytest.fixture(scope="module")
def data() -> GeneratedData:
    return generate(5000, 2000, 300_000, seed=21)


@pytest.fixture(scope="module")
def small() -> GeneratedData:
    return generate(600, 200, 30_000, seed=5)


def _event(user: str, item: str, etype: str, ts: int, session: str | None = None) -> dict:
    return {
        "user_id": user,
        "item_id": item,
        "event_type": etype,
        "timestamp": ts,
        "value": None,
        "session_id": session,
        "event_id": f"{user}-{item}-{etype}-{ts}",
    }


def test_segments_recover_generated_archetypes(data: GeneratedData) -> None:
    result = segment_users(data.events, data.catalog)
    joined = result.users.join(data.truth_users, on="user_id")
    assert joined.height == data.events["user_id"].n_unique()
    assert adjusted_rand_score(joined["archetype"], joined["segment"]) >= 0.7
    # The names are right too, not only the partition.
    assert (joined["segment"] == joined["archetype"]).mean() >= 0.85
    assert set(result.users["segment"].unique()) == set(SEGMENTS)


def test_model_predicts_what_it_assigned(small: GeneratedData) -> None:
    result = segment_users(small.events, small.catalog)
    again = result.model.predict(result.users)
    assert again.equals(result.users["segment"])
    assert set(result.model.centroids["segment"]) == set(SEGMENTS)
    assert result.model.centroids["share"].sum() == pytest.approx(1.0)
    assert set(result.feature_doc) == set(FEATURE_DOC)


def test_scores_are_in_range_and_complete(small: GeneratedData) -> None:
    users = segment_users(small.events, small.catalog).users
    required = [
        "user_id",
        "segment",
        "r_score",
        "f_score",
        "m_score",
        "rfm",
        "engagement",
        "churn_risk",
        "lifetime_value",
        "top_categories",
        "top_brands",
        "price_low",
        "price_high",
        "preferred_hour",
        "daypart",
    ]
    assert users.select(required).null_count().sum_horizontal().item() == 0
    for col in ("r_score", "f_score", "m_score"):
        assert users[col].is_between(1, 5).all()
    assert users["engagement"].is_between(0, 1).all()
    assert users["churn_risk"].is_between(0, 1).all()
    assert (users["lifetime_value"] >= users["monetary"]).all()
    # Users who never bought have the lowest frequency and monetary scores.
    never = users.filter(pl.col("n_purchases") == 0)
    assert (never["f_score"] == 1).all() and (never["m_score"] == 1).all()
    assert (never["lifetime_value"] == 0).all()


def test_churn_risk_grows_with_recency() -> None:
    now = 1_800_000_000
    day = 86_400
    rows = []
    # Two users who visited daily for 20 days; one stopped 30 days ago.
    for d in range(20):
        rows.append(_event("active", "a", "view", now - d * day, f"a{d}"))
        rows.append(_event("lapsed", "a", "view", now - (30 + d) * day, f"l{d}"))
    frame = pl.DataFrame(rows, schema=EVENT_SCHEMA)
    users = segment_users(frame, now=now).users
    risk = dict(users.select("user_id", "churn_risk").iter_rows())
    assert risk["lapsed"] > 0.9
    assert risk["active"] < 0.1


def test_single_event_user_gets_a_segment(small: GeneratedData) -> None:
    solo = pl.DataFrame(
        [_event("solo", "i000", "view", int(small.events["timestamp"].max()))],
        schema=EVENT_SCHEMA,
    )
    users = segment_users(pl.concat([small.events, solo]), small.catalog).users
    row = users.filter(pl.col("user_id") == "solo").row(0, named=True)
    assert row["segment"] in SEGMENTS
    assert row["n_events"] == 1
    assert row["churn_risk"] == 0.0
    assert row["rfm"] == "511"


def test_catalog_without_price_or_category(small: GeneratedData) -> None:
    bare = small.catalog.select("item_id", "brand")
    result = segment_users(small.events, bare)
    # Without prices nobody can be called price sensitive; the rest still segment.
    assert "price_percentile" not in result.model.features
    assert set(result.users["segment"].unique()) == set(SEGMENTS) - {"price_sensitive"}
    assert (result.users["price_percentile"] == 0.5).all()
    assert result.users["price_low"].null_count() == result.users.height
    no_catalog = segment_users(small.events)
    assert no_catalog.users.height == result.users.height


def test_missing_session_ids_are_derived_from_gaps() -> None:
    now = 1_800_000_000
    rows = [
        _event("u", "a", "view", now - 7200),
        _event("u", "a", "click", now - 7100),
        _event("u", "b", "view", now - 100),
    ]
    features = user_features(pl.DataFrame(rows, schema=EVENT_SCHEMA), now=now)
    assert features["n_sessions"].item() == 2
    assert features["events_per_session"].item() == 1.5


def test_tiny_population_falls_back_to_a_rule() -> None:
    now = 1_800_000_000
    rows = [
        _event("buys", "a", "purchase", now - 10, "s1"),
        _event("looks", "a", "view", now - 20, "s2"),
    ]
    result = segment_users(pl.DataFrame(rows, schema=EVENT_SCHEMA), now=now)
    assert result.model.kmeans is None
    segment = dict(result.users.select("user_id", "segment").iter_rows())
    assert segment == {"buys": "buyer", "looks": "browser"}


def test_future_events_are_dropped_and_counted(small: GeneratedData) -> None:
    now = int(small.events["timestamp"].quantile(0.9))
    result = segment_users(small.events, small.catalog, now=now)
    assert result.dropped_future == small.events.filter(pl.col("timestamp") > now).height
    assert result.users["last_ts"].max() <= now


def test_device_preference_when_given(small: GeneratedData) -> None:
    events = small.events.with_columns(pl.lit("mobile").alias("device"))
    users = segment_users(events, small.catalog, config=SegmentConfig(top_n=2)).users
    assert (users["device"] == "mobile").all()
    assert users["top_categories"].list.len().max() <= 2


def test_segment_profile_shares_and_means_largest_first() -> None:
    users = pl.DataFrame(
        {
            "segment": ["buyer", "browser", "browser", "browser"],
            "engagement": [0.8, 0.1, 0.2, 0.3],
            "churn_risk": [0.2, 0.5, 0.5, 0.8],
            "lifetime_value": [100.0, 0.0, 0.0, 3.0],
            "n_events": [10, 1, 2, 3],
            "n_purchases": [2, 0, 0, 1],
        }
    )
    profile = segment_profile(users)
    assert profile.columns[:3] == ["segment", "users", "share"]
    rows = {r["segment"]: r for r in profile.iter_rows(named=True)}
    assert profile["segment"].to_list() == ["browser", "buyer"]
    assert rows["browser"]["users"] == 3 and rows["browser"]["share"] == pytest.approx(0.75)
    assert rows["browser"]["engagement"] == pytest.approx(0.2)
    assert rows["browser"]["events"] == pytest.approx(2.0)
    assert rows["browser"]["buyers"] == pytest.approx(1 / 3)
    assert rows["buyer"]["lifetime_value"] == pytest.approx(100.0)


def test_segment_model_json_reproduces_the_assigned_segments(small: GeneratedData) -> None:
    result = compute_segments(small.events, small.catalog, SegmentConfig())
    saved = json.loads(segment_model_json(result))
    model = result.model
    assert saved["features"] == list(model.features) and model.kmeans is not None
    features = user_features(small.events, small.catalog, config=SegmentConfig())
    features = features.join(result.users.select("user_id", "segment"), on="user_id")
    x = (features.select(saved["features"]).to_numpy() - saved["center"]) / saved["scale"]
    names = [saved["cluster_segment"][c] for c in model.kmeans.predict(np.nan_to_num(x))]
    assert names == features["segment"].to_list()


def test_feature_documentation_names_the_features_used_and_the_rule() -> None:
    now = 1_800_000_000
    rows = [_event("buys", "a", "purchase", now - 10, "s1"), _event("looks", "a", "view", now)]
    tiny = segment_users(pl.DataFrame(rows, schema=EVENT_SCHEMA), now=now)
    doc = feature_documentation(tiny)
    assert "`buyer`, the rest `browser`" in doc and "Hungarian" not in doc
    for name in FEATURE_DOC:
        used = "yes" if name in tiny.model.features else "no"
        assert f"| {name} | {used} |" in doc


def test_feature_documentation_of_a_learned_segmentation(small: GeneratedData) -> None:
    config = SegmentConfig(features=("conversion", "cart_rate", "tenure"), n_clusters=3)
    result = segment_users(small.events, small.catalog, config=config)
    doc = feature_documentation(result)
    assert "| conversion | yes |" in doc and "| price_percentile | no |" in doc
    assert "k = 3" in doc and "Hungarian" in doc
    for segment in SIGNATURES:
        assert f"| {segment} | " in doc
