"""Segment-aware re-ranking and the trend cold start, measured with the serving ranker on a
temporal split of generated data (nDCG@10 per segment, with and without each segment's boost).

Run: .venv/bin/python benchmarks/segment_rerank.py [--seeds 0 1 2] [--price-boosts 0.15 0.3 0.6]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.analytics import ndcg_at_k, plain_popularity, show, temporal_split  # noqa: E402
from feature_repo.definitions import EVENT_WEIGHTS, FeatureConfig  # noqa: E402
from feature_repo.types import EMPTY, ScoredItems, UserProfile  # noqa: E402
from serving.bundle import ServingModel  # noqa: E402
from serving.personalise import trend_reasons  # noqa: E402
from serving.ranking import LiveFeatures, Ranker, RankingParams  # noqa: E402
from serving.schemas import Filters  # noqa: E402
from serving.settings import (  # noqa: E402
    DEFAULT_SEGMENT_RULES,
    SUGGESTED_SEGMENT_RULES,
    SegmentRule,
    ServingSettings,
    blend_weights,
)
from training.generate import generate  # noqa: E402
from training.hybrid import HybridRecommender  # noqa: E402
from training.segments import segment_users  # noqa: E402
from training.train import (  # noqa: E402
    blend,
    fit_component,
    interactions_from,
    sequences_for,
    split_training_data,
)
from training.trends import analyze_trends, trend_popularity_scores  # noqa: E402

K = 10
CANDIDATES = 100
# Every segment's rule: the default ones and the suggested ones, each measured on its segment.
RULES = {**SUGGESTED_SEGMENT_RULES, **DEFAULT_SEGMENT_RULES}
FILTERS = Filters(in_stock_only=False)  # held-out interactions include out-of-stock items


def train_bundle(train: pl.DataFrame, catalog: pl.DataFrame, seed: int) -> HybridRecommender:
    """ALS, Item2Vec, EASE and popularity with the pipeline's default parameters, blended with
    weights tuned on a validation split (as the training job does, without the grids)."""
    interactions = interactions_from(train, catalog=catalog)
    data = split_training_data(train, interactions, 0.2, seed=seed)
    items = interactions.item_ids
    params = {
        "als": {"factors": 64, "regularization": 20.0, "alpha": 1.0, "iterations": 15},
        "ease": {"l2": 300.0},
        "popularity": {},
    }
    results = {
        name: fit_component(name, p, data.train, data.validation, interactions.matrix)
        for name, p in params.items()
    }
    results["item2vec"] = fit_component(
        "item2vec",
        {"vector_size": 64, "epochs": 10, "workers": 2, "seed": seed},
        data.train,
        data.validation,
        interactions.matrix,
        train_sequences=sequences_for(data.train_events, items, 30.0),
        full_sequences=sequences_for(train, items, 30.0),
    )
    return blend(results, data, catalog, seed=seed)[0]


def decayed(train: pl.DataFrame, now: float, half_life: float, n: int) -> ScoredItems:
    """What Redis would hold after ingesting `train` live: decayed event weight per item."""
    rate = np.log(2.0) / half_life
    weight = pl.col("event_type").replace_strict(
        EVENT_WEIGHTS, default=1.0, return_dtype=pl.Float64
    )
    age = pl.lit(now) - pl.col("timestamp").cast(pl.Float64)
    top = (
        train.group_by("item_id")
        .agg((weight * (-rate * age).exp()).sum().alias("score"))
        .sort("score", "item_id", descending=[True, False])
        .head(n)
    )
    return ScoredItems(top["item_id"].to_numpy().astype(str), top["score"].to_numpy())


def recent_items(train: pl.DataFrame, now: float) -> dict[str, ScoredItems]:
    """Each user's live recent items (latest touch, newest first, last 30 days, at most 100)."""
    cfg = FeatureConfig()
    latest = (
        train.filter(pl.col("timestamp") >= now - cfg.recent_ttl)
        .group_by("user_id", "item_id")
        .agg(pl.col("timestamp").max())
        .sort("user_id", "timestamp", descending=[False, True])
        .group_by("user_id", maintain_order=True)
        .head(cfg.recent_cap)
        .group_by("user_id", maintain_order=True)
        .agg("item_id", "timestamp")
    )
    return {
        user: ScoredItems(np.array(ids, dtype=str), np.array(ts, dtype=np.float64))
        for user, ids, ts in latest.iter_rows()
    }


def user_ndcg(ranked: list[str], relevant: set[str]) -> float:
    gains = [1.0 / np.log2(rank + 2) for rank, item in enumerate(ranked[:K]) if item in relevant]
    ideal = sum(1.0 / np.log2(rank + 2) for rank in range(min(len(relevant), K)))
    return float(sum(gains) / ideal) if ideal else 0.0


def evaluate_seed(seed: int, test_days: int, price_boosts: list[float]) -> dict[str, Any]:
    started = time.perf_counter()
    data = generate(5000, 2000, 300_000, seed=seed)
    train, test, cut = temporal_split(data.events, test_days)
    now = float(cut - 1)
    bundle = train_bundle(train, data.catalog, seed)
    model = ServingModel(bundle, "bench", "champion")
    settings = ServingSettings()
    model.blend = blend_weights(settings, model.weights)

    segments = segment_users(train, data.catalog, now=int(now)).users
    profiles = {
        row["user_id"]: UserProfile(
            row["user_id"],
            segment=row["segment"],
            preferences={"top_categories": row["top_categories"], "top_brands": row["top_brands"]},
        )
        for row in segments.select("user_id", "segment", "top_categories", "top_brands").iter_rows(
            named=True
        )
    }
    trends = analyze_trends(train, data.catalog, now=int(now)).items
    listed = trends.filter(pl.col("trend_score") > 0).sort(
        "trend_score", "item_id", descending=[True, False]
    )
    listed = listed.head(CANDIDATES)
    trend = ScoredItems(listed["item_id"].to_numpy().astype(str), listed["trend_score"].to_numpy())
    reasons = trend_reasons(listed.select("trend_type", "burst").to_dicts())
    cfg = FeatureConfig()
    popularity = decayed(train, now, cfg.popularity_half_life, CANDIDATES)
    trending = decayed(train, now, cfg.trending_half_life, CANDIDATES)
    recent = recent_items(train, now)

    seen = train.select("user_id", "item_id").unique()
    relevant_frame = (
        test.select("user_id", "item_id").unique().join(seen, on=["user_id", "item_id"], how="anti")
    )
    relevant = {
        u: set(items) for u, items in relevant_frame.group_by("user_id").agg("item_id").iter_rows()
    }
    known = set(segments["user_id"].to_list())

    def rank(ranker: Ranker, user: str, profile: UserProfile | None, cold: bool) -> list[str]:
        live = LiveFeatures(
            recent=EMPTY if cold else recent.get(user, EMPTY),
            popularity=popularity,
            trending=trending,
            trend=trend,
            trend_reasons=reasons,
            profile=profile,
        )
        return ranker.recommend(
            model=model,
            weights=model.blend,
            user_id=user,
            k=K,
            filters=FILTERS,
            exclude_seen=True,
            live=live,
            now=now,
        ).item_ids

    plain = Ranker(RankingParams(segment_rules={}))
    boosted = Ranker(RankingParams(segment_rules=dict(RULES)))
    price_variants = {
        boost: Ranker(RankingParams(segment_rules={"price_sensitive": SegmentRule(price=boost)}))
        for boost in price_boosts
    }
    rows: dict[str, dict[str, list[float]]] = {}
    price_rows: dict[float, list[float]] = {b: [] for b in price_boosts}
    pct_plain: list[float] = []
    pct_boosted: list[float] = []
    warm_users = sorted(u for u in relevant if u in known)
    for user in warm_users:
        profile = profiles[user]
        base = rank(plain, user, profile, cold=False)
        with_boost = rank(boosted, user, profile, cold=False)
        entry = rows.setdefault(profile.segment, {"plain": [], "boosted": []})
        entry["plain"].append(user_ndcg(base, relevant[user]))
        entry["boosted"].append(user_ndcg(with_boost, relevant[user]))
        if profile.segment == "price_sensitive":
            for boost, ranker in price_variants.items():
                price_rows[boost].append(
                    user_ndcg(rank(ranker, user, profile, False), relevant[user])
                )
            pct_plain.append(float(np.nanmean(model.price_percentile[model.item_index(base)])))
            pct_boosted.append(
                float(np.nanmean(model.price_percentile[model.item_index(with_boost)]))
            )

    # Users who come back in the test window with no history at all: the cold-start path
    # (trend list first) against the blend without a trend list (popularity and trending).
    cold_users = sorted(u for u in relevant if u not in known)
    cold_trend = [user_ndcg(rank(plain, u, None, True), relevant[u]) for u in cold_users]
    no_trend = Ranker(RankingParams(segment_rules={}, cold_start_blend={}))
    cold_pop = [
        user_ndcg(
            no_trend.recommend(
                model=model,
                weights=model.blend,
                user_id=u,
                k=K,
                filters=FILTERS,
                exclude_seen=True,
                live=LiveFeatures(popularity=popularity, trending=trending),
                now=now,
            ).item_ids,
            relevant[u],
        )
        for u in cold_users
    ]
    return {
        "seed": seed,
        "segments": rows,
        "price": price_rows,
        "pct": (float(np.mean(pct_plain)), float(np.mean(pct_boosted))),
        "cold": (
            len(cold_users),
            float(np.mean(cold_pop or [0])),
            float(np.mean(cold_trend or [0])),
        ),
        "global": (
            ndcg_at_k(plain_popularity(train), train, test),
            ndcg_at_k(trend_popularity_scores(train, now=cut - 1), train, test),
        ),
        "seconds": time.perf_counter() - started,
    }


def rule_text(segment: str) -> str:
    rule = RULES.get(segment)
    if rule is None:
        return "-"
    default = SegmentRule()
    changed = {
        f.name: getattr(rule, f.name)
        for f in dataclasses.fields(rule)
        if getattr(rule, f.name) != getattr(default, f.name)
    }
    return ", ".join(f"{k}={v}" for k, v in changed.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-days", type=int, default=7)
    parser.add_argument("--price-boosts", type=float, nargs="+", default=[0.15, 0.3, 0.6])
    args = parser.parse_args()
    results = [evaluate_seed(s, args.test_days, args.price_boosts) for s in args.seeds]

    show(
        "Global rankings (benchmarks/analytics.py's measure): plain vs trend-aware popularity",
        [
            {
                "seed": r["seed"],
                "nDCG@10 plain pop": r["global"][0],
                "nDCG@10 trend pop": r["global"][1],
            }
            for r in results
        ],
    )
    segment_rows = []
    for r in results:
        for segment, entry in sorted(r["segments"].items()):
            before, after = float(np.mean(entry["plain"])), float(np.mean(entry["boosted"]))
            segment_rows.append(
                {
                    "seed": r["seed"],
                    "segment": segment,
                    "rule": rule_text(segment),
                    "default": "on" if segment in DEFAULT_SEGMENT_RULES else "suggested",
                    "users": len(entry["plain"]),
                    "nDCG@10 without": before,
                    "nDCG@10 with": after,
                    "change %": 100.0 * (after - before) / before if before else float("nan"),
                }
            )
    show(
        "Serving ranker per segment, without and with the segment's rule (known users)",
        segment_rows,
    )
    summary = []
    for segment in sorted({row["segment"] for row in segment_rows}):
        rows = [row for row in segment_rows if row["segment"] == segment]
        before = float(np.mean([row["nDCG@10 without"] for row in rows]))
        after = float(np.mean([row["nDCG@10 with"] for row in rows]))
        summary.append(
            {
                "segment": segment,
                "rule": rows[0]["rule"],
                "default": rows[0]["default"],
                "seeds": len(rows),
                "seeds improved": sum(row["nDCG@10 with"] > row["nDCG@10 without"] for row in rows),
                "mean nDCG@10 without": before,
                "mean nDCG@10 with": after,
                "change %": 100.0 * (after - before) / before if before else float("nan"),
            }
        )
    show("Per segment over all seeds", summary)
    show(
        "price_sensitive users: nDCG@10 by price boost strength (cutoff 0.5), and the mean "
        "within-category price percentile of their top 10",
        [
            {
                "seed": r["seed"],
                "price=0 (no rule)": float(
                    np.mean(r["segments"].get("price_sensitive", {}).get("plain", [np.nan]))
                ),
                **{f"price={b}": float(np.mean(v)) for b, v in r["price"].items()},
                "mean price pct of top-10 without": r["pct"][0],
                "with default rule": r["pct"][1],
            }
            for r in results
        ],
    )
    show(
        "Cold start: users with no training history (ranker, no live events of theirs)",
        [
            {
                "seed": r["seed"],
                "users": r["cold"][0],
                "nDCG@10 popularity + trending": r["cold"][1],
                "nDCG@10 trend list first": r["cold"][2],
                "seconds (whole seed)": r["seconds"],
            }
            for r in results
        ],
    )


if __name__ == "__main__":
    main()
