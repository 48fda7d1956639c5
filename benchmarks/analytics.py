"""Benchmark of the trend and segment analyses on generated data: accuracy against the generator's
truth; on a temporal split, trend-aware versus plain popularity at nDCG@10 and the error of the
trend forecast; runtime at scale.

Run: .venv/bin/python benchmarks/analytics.py [--seeds 0 1] [--scale]
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl
from rich.console import Console
from rich.progress import Progress
from sklearn.metrics import adjusted_rand_score

from training.generate import generate
from training.segments import segment_users
from training.trends import TrendConfig, analyze_trends, trend_popularity_scores

DAY = 86_400
K = 10
CANDIDATES = 400


def ndcg_at_k(scores: pl.DataFrame, train: pl.DataFrame, test: pl.DataFrame, k: int = K) -> float:
    """Mean nDCG@k over test users of one global ranking, each user's train items excluded.

    Relevant: the items a user interacted with in the test window and not in train.
    """
    seen = train.select("user_id", "item_id").unique()
    relevant = (
        test.select("user_id", "item_id").unique().join(seen, on=["user_id", "item_id"], how="anti")
    )
    users = relevant.select("user_id").unique()
    top = scores.sort("score", "item_id", descending=[True, False]).head(CANDIDATES)
    ranked = (
        users.join(top.with_row_index("pos").select("item_id", "pos"), how="cross")
        .join(seen, on=["user_id", "item_id"], how="anti")
        .sort("user_id", "pos")
        .with_columns(pl.int_range(pl.len()).over("user_id").alias("rank"))
        .filter(pl.col("rank") < k)
    )
    hits = ranked.join(
        relevant.with_columns(pl.lit(1.0).alias("rel")), on=["user_id", "item_id"], how="left"
    )
    dcg = hits.group_by("user_id").agg(
        (pl.col("rel").fill_null(0.0) / (pl.col("rank") + 2).log(2)).sum().alias("dcg")
    )
    # Ideal DCG of n relevant items, for n = 0..k, looked up by each user's count.
    ideal_by_n = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))])
    ideal = relevant.group_by("user_id").agg(pl.len().clip(upper_bound=k).alias("n"))
    ideal = ideal.with_columns(pl.Series("idcg", ideal_by_n[ideal["n"].to_numpy()]))
    joined = ideal.join(dcg, on="user_id", how="left").with_columns(pl.col("dcg").fill_null(0.0))
    return float((joined["dcg"] / joined["idcg"]).mean())


def plain_popularity(train: pl.DataFrame) -> pl.DataFrame:
    """Plain popularity: the number of train events per item."""
    return train.group_by("item_id").agg(pl.len().cast(pl.Float64).alias("score"))


def forecast_errors(
    train: pl.DataFrame, test: pl.DataFrame, catalog: pl.DataFrame, now: int
) -> tuple[float, float]:
    """The trend forecast of the test window against what happened in it: the mean absolute
    error over all items, and falling items' total forecast over their total actual."""
    weights = TrendConfig().event_weights
    actual = (
        test.with_columns(
            pl.col("event_type")
            .cast(pl.String)
            .replace_strict(weights, default=0.0, return_dtype=pl.Float64)
            .alias("w")
        )
        .group_by("item_id")
        .agg(pl.col("w").sum().alias("actual"))
    )
    items = (
        analyze_trends(train, catalog, now=now)
        .items.join(actual, on="item_id", how="left")
        .with_columns(pl.col("actual").fill_null(0.0))
    )
    mae = float((items["forecast"] - items["actual"]).abs().mean())
    falling = items.filter(pl.col("trend_type") == "falling")
    return mae, float(falling["forecast"].sum() / max(falling["actual"].sum(), 1.0))


def temporal_split(events: pl.DataFrame, test_days: int) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    cut = int(events["timestamp"].max()) + 1 - test_days * DAY  # type: ignore[arg-type]
    return events.filter(pl.col("timestamp") < cut), events.filter(pl.col("timestamp") >= cut), cut


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def accuracy_rows(seeds: list[int], test_days: int, progress: Progress) -> list[dict[str, Any]]:
    rows = []
    task = progress.add_task("generated 5k users / 2k items / 300k events", total=len(seeds))
    for seed in seeds:
        data = generate(5000, 2000, 300_000, seed=seed)
        segments, t_seg = timed(segment_users, data.events, data.catalog)
        users = segments.users.join(data.truth_users, on="user_id")
        trends, t_trend = timed(analyze_trends, data.events, data.catalog)
        items = trends.items.join(data.truth_items, on="item_id")
        train, test, cut = temporal_split(data.events, test_days)
        plain = ndcg_at_k(plain_popularity(train), train, test)
        last_week = train.filter(pl.col("timestamp") >= cut - 7 * DAY)
        recent = ndcg_at_k(plain_popularity(last_week), train, test)
        trend = ndcg_at_k(trend_popularity_scores(train, now=cut - 1), train, test)
        mae, falling_ratio = forecast_errors(train, test, data.catalog, cut - 1)
        rows.append(
            {
                "seed": seed,
                "users": users.height,
                "segment ARI": adjusted_rand_score(users["archetype"], users["segment"]),
                "segment named acc": float((users["segment"] == users["archetype"]).mean()),
                "items": items.height,
                "trend agreement": float((items["trend_type"] == items["trend"]).mean()),
                "nDCG@10 plain pop": plain,
                "nDCG@10 last-7-days pop": recent,
                "nDCG@10 trend pop": trend,
                "forecast MAE": mae,
                "falling forecast / actual": falling_ratio,
                "segments s": t_seg,
                "trends s": t_trend,
            }
        )
        progress.advance(task)
    return rows


def scale_rows(progress: Progress) -> list[dict[str, Any]]:
    task = progress.add_task("5M events / 500k users / 50k items", total=3)
    data, t_gen = timed(generate, 500_000, 50_000, 5_000_000, 0)
    progress.advance(task)
    trends, t_trend = timed(analyze_trends, data.events, data.catalog)
    progress.advance(task)
    segments, t_seg = timed(segment_users, data.events, data.catalog)
    progress.advance(task)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return [
        {"step": "generate 5M events", "seconds": t_gen, "rows out": data.events.height},
        {"step": "analyze_trends", "seconds": t_trend, "rows out": trends.items.height},
        {"step": "segment_users", "seconds": t_seg, "rows out": segments.users.height},
        {"step": "peak RSS of the process (GB)", "seconds": float("nan"), "rows out": rss_gb},
    ]


def show(title: str, rows: list[dict[str, Any]]) -> None:
    """Print rows as a Markdown table."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "|".join("---:" for _ in rows[0]) + "|")
    for row in rows:
        cells = (f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values())
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-days", type=int, default=7)
    parser.add_argument("--scale", action="store_true", help="also time both analyses at 5M events")
    args = parser.parse_args()
    console = Console()
    with Progress(console=console, transient=True) as progress:
        rows = accuracy_rows(args.seeds, args.test_days, progress)
        big = scale_rows(progress) if args.scale else []
    show(f"Accuracy on generated data (temporal split: last {args.test_days} days)", rows)
    if big:
        show("Runtime at scale (5M events, 500k users, 50k items, 2 cores)", big)


if __name__ == "__main__":
    main()
