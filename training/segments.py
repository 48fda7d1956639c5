"""Behavioural user segmentation with RFM, engagement, churn risk, lifetime value and preferences.

Pure functions over the canonical event frame; the segmentation is a clustering learned from
standardised behavioural features whose clusters are named by their centroid profiles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import polars as pl
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

from training.analytics_common import SEGMENT_SCORES, SEGMENTS, reference_time
from training.evaluation import to_markdown
from training.events import DEFAULT_EVENT_WEIGHTS

DAY = 86_400

FEATURE_DOC: dict[str, str] = {
    "conversion": (
        "log-odds of purchases per viewed item, (purchases + 0.5) / (views + purchases + 1); "
        "all events stand in for views when there are none"
    ),
    "cart_rate": "log-odds of add_to_cart per click, (carts + 0.5) / (clicks + carts + 1)",
    "session_length": "log of the mean number of events per session",
    "views_per_session": "log of the mean number of item views per session",
    "session_duration": "log(1 + mean seconds from a session's first to its last event)",
    "seconds_per_event": "log(1 + mean seconds between consecutive events of a session)",
    "buying_sessions": "log-odds of the share of sessions with a purchase",
    "repeat_purchase": "share of purchases of an item (or brand) the user had bought before",
    "tenure": "days from first to last event, as a share of the observed window",
    "price_percentile": (
        "mean within-category price percentile (0 = cheapest) of the user's items, weighted by "
        "event type so purchases count most; 0.5 when prices are unknown"
    ),
}


# How each segment shows in standardised features: a cluster is named by the segment whose
# signature has the largest dot product with its centre (one cluster per segment, Hungarian).
SIGNATURES: dict[str, dict[str, float]] = {
    "browser": {"conversion": -2.0, "buying_sessions": -2.0, "cart_rate": -1.0},
    "buyer": {
        "conversion": 1.0,
        "buying_sessions": 1.0,
        "cart_rate": 1.0,
        "repeat_purchase": -0.5,
        "tenure": -0.5,
        "price_percentile": 0.5,
    },
    "researcher": {
        "session_length": 1.5,
        "views_per_session": 1.5,
        "session_duration": 1.5,
        "seconds_per_event": 1.0,
    },
    "impulse_buyer": {
        "session_length": -1.5,
        "session_duration": -1.5,
        "seconds_per_event": -1.5,
        "conversion": 1.5,
    },
    "loyal_customer": {"repeat_purchase": 2.0, "tenure": 2.0},
    "price_sensitive": {"price_percentile": -3.0},
}
# A segment cannot be recognised when all of its defining features are constant.
_NEEDS: dict[str, tuple[str, ...]] = {
    "loyal_customer": ("repeat_purchase", "tenure"),
    "price_sensitive": ("price_percentile",),
}


def _default_interest_weights() -> dict[str, float]:
    # The interaction matrix's weights; here a rating counts as one event of interest.
    return {**DEFAULT_EVENT_WEIGHTS, "rating": 1.0}


def _default_price_weights() -> dict[str, float]:
    return {
        "view": 1.0,
        "click": 2.0,
        "add_to_cart": 4.0,
        "purchase": 12.0,
        "like": 2.0,
        "share": 2.0,
        "rating": 0.0,
    }


@dataclass
class SegmentConfig:
    """Knobs of the segmentation and of the per-user scores (see docs/analytics.md)."""

    n_clusters: int = 6
    """k-means clusters; each is named after the segment its centroid profile fits best."""
    features: tuple[str, ...] = tuple(FEATURE_DOC)
    """Behavioural features clustered on (names of FEATURE_DOC)."""
    seed: int = 0
    """Seed of k-means and of the sampling."""
    min_users: int = 30
    """Below this many users nothing is learned: users who bought are buyers, others browsers."""
    max_fit_users: int = 200_000
    """k-means is fit on a random sample of at most this many users, then applied to all."""
    session_gap_s: int = 1800
    """Inactivity gap that starts a new session when events carry no session_id."""
    price_weights: dict[str, float] = field(default_factory=_default_price_weights)
    """Event-type weights of the price-percentile feature (purchases dominate)."""
    interest_weights: dict[str, float] = field(default_factory=_default_interest_weights)
    """Event-type weights of the preference vector and the engagement score."""
    ltv_horizon_days: float = 365.0
    """Future horizon of the lifetime-value estimate."""
    recent_days: int = 30
    """Window of the engagement score's recent-activity component."""
    top_n: int = 3
    """How many categories and brands the preference vector lists."""


@dataclass
class SegmentModel:
    """A fitted segmentation: scaler, k-means and the cluster-to-segment names."""

    features: tuple[str, ...]
    center: np.ndarray
    scale: np.ndarray
    kmeans: KMeans | None
    """None when there was too little to learn from; then `predict` falls back to a rule."""
    cluster_segment: list[str]
    centroids: pl.DataFrame
    """Cluster centres in standardised units, with their segment and share of users."""

    def clusters(self, features: pl.DataFrame) -> np.ndarray:
        """Cluster index of each row of a feature frame (columns named as in `features`)."""
        if self.kmeans is None:
            return np.zeros(features.height, dtype=np.int64)
        x = (features.select(self.features).to_numpy() - self.center) / self.scale
        return self.kmeans.predict(np.nan_to_num(x))

    def predict(self, features: pl.DataFrame) -> pl.Series:
        """Segment name of each row of a feature frame (as made by `user_features`)."""
        if self.kmeans is None:
            # Too few users, or no feature that varies: buyers versus browsers is all we can say.
            return features.select(
                pl.when(pl.col("n_purchases") > 0)
                .then(pl.lit("buyer"))
                .otherwise(pl.lit("browser"))
                .alias("segment")
            )["segment"]
        return pl.Series("segment", self.cluster_segment).gather(self.clusters(features))


@dataclass
class SegmentResult:
    """Per-user table, the fitted model and what each feature means."""

    users: pl.DataFrame
    model: SegmentModel
    feature_doc: dict[str, str]
    dropped_future: int = 0


def _logit(p: pl.Expr) -> pl.Expr:
    return (p / (1.0 - p)).log()


def _with_sessions(events: pl.DataFrame, gap_s: int) -> pl.DataFrame:
    """Sort by user and time; fill missing session ids by splitting on inactivity gaps."""
    frame = events.sort("user_id", "timestamp")
    derived = (
        (
            (pl.col("user_id") != pl.col("user_id").shift(1))
            | ((pl.col("timestamp") - pl.col("timestamp").shift(1)) > gap_s)
        )
        .fill_null(True)
        .cum_sum()
    )
    return frame.with_columns(
        pl.coalesce(pl.col("session_id"), pl.lit("gap-") + derived.cast(pl.String)).alias(
            "session_id"
        )
    )


def _item_attributes(catalog: pl.DataFrame | None) -> pl.DataFrame:
    """item_id, category, brand, price and within-category price percentile (0 = cheapest)."""
    schema = {
        "item_id": pl.String,
        "category": pl.String,
        "brand": pl.String,
        "price": pl.Float64,
    }
    if catalog is None or "item_id" not in catalog.columns:
        frame = pl.DataFrame(schema=schema)
    else:
        frame = catalog.select(
            pl.col(c).cast(t) if c in catalog.columns else pl.lit(None, dtype=t).alias(c)
            for c, t in schema.items()
        ).unique("item_id", keep="last")
    # Items without a category are ranked within the whole catalog.
    group = pl.col("category").fill_null("")
    rank = pl.col("price").rank("average").over(group)
    count = pl.col("price").count().over(group)
    return frame.with_columns(
        pl.when(count > 1).then((rank - 1) / (count - 1)).otherwise(0.5).alias("price_pct")
    )


def user_features(
    events: pl.DataFrame,
    catalog: pl.DataFrame | None = None,
    now: datetime | int | None = None,
    config: SegmentConfig | None = None,
) -> pl.DataFrame:
    """One row per user: the behavioural features of FEATURE_DOC plus the raw counts behind them.

    Events after `now` are ignored. Users with a single event get defined (if uninformative)
    values: rates from smoothed counts, zero durations, the neutral price percentile.
    """
    cfg = config or SegmentConfig()
    now_ts = reference_time(events, now, not_after_wall_clock=False)
    frame = _with_sessions(events.filter(pl.col("timestamp") <= now_ts), cfg.session_gap_s)
    attrs = _item_attributes(catalog)
    etype = pl.col("event_type").cast(pl.String)
    frame = frame.with_columns(etype.alias("etype")).join(
        attrs.select("item_id", "price_pct"), on="item_id", how="left"
    )
    window = max(
        now_ts - int(frame["timestamp"].min()) if frame.height else 0,  # type: ignore[arg-type]
        DAY,
    )

    sessions = frame.group_by("user_id", "session_id").agg(
        pl.len().alias("n"),
        (pl.col("etype") == "view").sum().alias("views"),
        (pl.col("etype") == "purchase").any().alias("bought"),
        (pl.col("timestamp").max() - pl.col("timestamp").min()).alias("duration"),
    )
    per_session = sessions.group_by("user_id").agg(
        pl.len().alias("n_sessions"),
        pl.col("n").mean().alias("events_per_session"),
        pl.col("views").mean().alias("views_per_session_raw"),
        pl.col("bought").mean().alias("buying_share"),
        pl.col("duration").mean().alias("duration_s"),
        (pl.col("duration").sum() / (pl.col("n") - 1).sum().clip(lower_bound=1)).alias("gap_s"),
    )
    purchases = frame.filter(pl.col("etype") == "purchase")
    repeats = (
        purchases.group_by("user_id", "item_id")
        .len()
        .group_by("user_id")
        .agg(((pl.col("len") - 1).sum() / pl.col("len").sum()).alias("repeat_purchase"))
    )
    weight = etype.replace_strict(
        list(cfg.price_weights),
        list(cfg.price_weights.values()),
        default=0.0,
        return_dtype=pl.Float64,
    )
    w_known = pl.when(pl.col("price_pct").is_not_null()).then(weight).otherwise(0.0)
    counts = frame.group_by("user_id").agg(
        pl.len().alias("n_events"),
        (pl.col("etype") == "view").sum().alias("n_views"),
        (pl.col("etype") == "click").sum().alias("n_clicks"),
        (pl.col("etype") == "add_to_cart").sum().alias("n_carts"),
        (pl.col("etype") == "purchase").sum().alias("n_purchases"),
        pl.col("timestamp").min().alias("first_ts"),
        pl.col("timestamp").max().alias("last_ts"),
        (pl.col("timestamp") // DAY).n_unique().alias("active_days"),
        ((pl.col("price_pct").fill_null(0.0) * w_known).sum() / w_known.sum()).alias("_pp"),
    )
    users = (
        counts.join(per_session, on="user_id", how="left")
        .join(repeats, on="user_id", how="left")
        .with_columns(
            pl.col("repeat_purchase").fill_null(0.0),
            pl.col("_pp").fill_nan(None).fill_null(0.5).alias("price_percentile"),
            # Views may be missing (rating-only data): fall back on all events.
            pl.when(pl.col("n_views") > 0)
            .then(pl.col("n_views"))
            .otherwise(pl.col("n_events"))
            .alias("_views"),
        )
        .with_columns(
            _logit(
                (pl.col("n_purchases") + 0.5) / (pl.col("_views") + pl.col("n_purchases") + 1)
            ).alias("conversion"),
            _logit((pl.col("n_carts") + 0.5) / (pl.col("n_clicks") + pl.col("n_carts") + 1)).alias(
                "cart_rate"
            ),
            pl.col("events_per_session").log().alias("session_length"),
            (pl.col("_views") / pl.col("n_sessions")).log1p().alias("views_per_session"),
            pl.col("duration_s").log1p().alias("session_duration"),
            pl.col("gap_s").log1p().alias("seconds_per_event"),
            _logit(
                (pl.col("buying_share") * pl.col("n_sessions") + 0.5) / (pl.col("n_sessions") + 1)
            ).alias("buying_sessions"),
            ((pl.col("last_ts") - pl.col("first_ts")) / window).alias("tenure"),
        )
        .drop("_pp", "_views", "views_per_session_raw")
        .sort("user_id")
    )
    return users


def fit_segments(features: pl.DataFrame, config: SegmentConfig | None = None) -> SegmentModel:
    """Fit k-means on standardised features and name each cluster after a segment.

    Features that are constant (say, price percentile without catalog prices) are left out, and
    so are the segments that only they could reveal; k shrinks accordingly.
    """
    cfg = config or SegmentConfig()
    if features.height == 0:
        raise ValueError("cannot fit a segmentation on zero users")
    x_all = features.select(cfg.features).to_numpy().astype(np.float64)
    rng = np.random.default_rng(cfg.seed)
    sample = (
        rng.choice(features.height, cfg.max_fit_users, replace=False)
        if features.height > cfg.max_fit_users
        else np.arange(features.height)
    )
    x = np.nan_to_num(x_all[sample])
    center = x.mean(axis=0)
    scale = x.std(axis=0)
    varying = scale > 1e-9
    used = tuple(f for f, keep in zip(cfg.features, varying, strict=True) if keep)
    if features.height < cfg.min_users or not used:
        empty = pl.DataFrame(schema={"segment": pl.String, "share": pl.Float64})
        return SegmentModel(used, center[varying], scale[varying], None, [], empty)
    segments = [
        s
        for s in SEGMENTS
        if not any(n in cfg.features for n in _NEEDS.get(s, ()))
        or any(n in used for n in _NEEDS.get(s, ()))
    ]
    center, scale = center[varying], scale[varying]
    z = (x[:, varying] - center) / scale
    k = max(1, min(cfg.n_clusters - (len(SEGMENTS) - len(segments)), len(np.unique(z, axis=0))))
    kmeans = KMeans(n_clusters=k, n_init=10, random_state=cfg.seed).fit(z)
    centres = kmeans.cluster_centers_
    signature = np.array([[SIGNATURES[s].get(f, 0.0) for f in used] for s in segments])
    score = centres @ signature.T  # clusters x segments
    rows, cols = linear_sum_assignment(-score)
    names = [segments[int(np.argmax(score[c]))] for c in range(k)]
    for r, c in zip(rows, cols, strict=True):
        names[r] = segments[c]
    share = np.bincount(kmeans.labels_, minlength=k) / z.shape[0]
    centroids = pl.DataFrame(centres, schema=list(used)).with_columns(
        pl.Series("segment", names), pl.Series("share", share)
    )
    return SegmentModel(used, center, scale, kmeans, names, centroids)


def _quintile_score(col: str, descending: bool = False) -> pl.Expr:
    """1..5 by rank (5 = best); ties share a score."""
    rank = pl.col(col).rank("average", descending=descending)
    return (1 + ((rank - 1) * 5 / pl.len()).floor()).clip(1, 5).cast(pl.Int8)


def _positive_score(col: str) -> pl.Expr:
    """1 for zero, else 2..5 by quartile among the positive values."""
    positive = pl.col(col) > 0
    rank = pl.when(positive).then(pl.col(col)).rank("average")
    n_pos = positive.sum().clip(lower_bound=1)
    return (
        pl.when(positive)
        .then((2 + ((rank - 1) * 4 / n_pos).floor()).clip(2, 5))
        .otherwise(1)
        .cast(pl.Int8)
    )


def _percentile(col: str) -> pl.Expr:
    return (pl.col(col).rank("average") - 1) / (pl.len() - 1).clip(lower_bound=1)


def _top(frame: pl.DataFrame, key: str, n: int, name: str) -> pl.DataFrame:
    """Per user, the n values of `key` with the most interest weight (ties by name)."""
    return (
        frame.filter(pl.col(key).is_not_null())
        .group_by("user_id", key)
        .agg(pl.col("iw").sum())
        .sort(["user_id", "iw", key], descending=[False, True, False])
        .group_by("user_id", maintain_order=True)
        .agg(pl.col(key).head(n).alias(name))
    )


def _scores_and_preferences(
    events: pl.DataFrame,
    features: pl.DataFrame,
    catalog: pl.DataFrame | None,
    now_ts: int,
    cfg: SegmentConfig,
) -> pl.DataFrame:
    attrs = _item_attributes(catalog)
    iw = (
        pl.col("event_type")
        .cast(pl.String)
        .replace_strict(
            list(cfg.interest_weights),
            list(cfg.interest_weights.values()),
            default=0.0,
            return_dtype=pl.Float64,
        )
    )
    frame = events.join(
        attrs.select("item_id", "category", "brand", "price"), on="item_id", how="left"
    )
    frame = frame.with_columns(iw.alias("iw"))
    has_price = attrs["price"].is_not_null().any()
    median_price = attrs["price"].median() if has_price else 1.0
    bought = frame.filter(pl.col("event_type").cast(pl.String) == "purchase")
    spend = bought.group_by("user_id").agg(
        (
            pl.col("price").fill_null(median_price)
            * pl.col("value").fill_null(1.0).clip(lower_bound=1)
        )
        .sum()
        .alias("monetary"),
        pl.col("session_id").n_unique().alias("orders"),
    )
    recent_from = now_ts - cfg.recent_days * DAY
    activity = frame.group_by("user_id").agg(
        pl.col("iw").sum().alias("interest"),
        pl.col("session_id")
        .filter(pl.col("timestamp") >= recent_from)
        .n_unique()
        .alias("recent_sessions"),
        pl.col("price").quantile(0.1).alias("price_low"),
        pl.col("price").quantile(0.9).alias("price_high"),
        pl.from_epoch("timestamp").dt.hour().mode().min().alias("preferred_hour"),
    )
    users = (
        features.join(spend, on="user_id", how="left")
        .join(activity, on="user_id", how="left")
        .with_columns(
            pl.col("monetary").fill_null(0.0),
            pl.col("orders").fill_null(0).cast(pl.Int64),
            ((now_ts - pl.col("last_ts")) / DAY).alias("recency_days"),
            ((pl.col("last_ts") - pl.col("first_ts")) / DAY).alias("tenure_days"),
        )
    )
    # Visit rate per day from a user's own history; one-session users get the median rate.
    rate = (pl.col("n_sessions") - 1) / pl.col("tenure_days").clip(lower_bound=1.0)
    users = users.with_columns(
        pl.when(pl.col("n_sessions") > 1).then(rate).otherwise(None).alias("_rate")
    )
    median_rate = users["_rate"].median()
    users = users.with_columns(
        pl.col("_rate").fill_null(median_rate if median_rate is not None else 1.0 / 30)
    )
    users = users.with_columns(
        _quintile_score("recency_days", descending=True).alias("r_score"),
        _positive_score("orders").alias("f_score"),
        _positive_score("monetary").alias("m_score"),
        (
            (
                _percentile("n_sessions")
                + _percentile("active_days")
                + _percentile("interest")
                + _percentile("recent_sessions")
            )
            / 4
        ).alias("engagement"),
        (1.0 - (-pl.col("_rate") * pl.col("recency_days")).exp()).alias("churn_risk"),
    ).with_columns(
        pl.concat_str(["r_score", "f_score", "m_score"]).alias("rfm"),
        (
            pl.col("monetary")
            + (1.0 - pl.col("churn_risk"))
            * pl.col("monetary")
            / pl.col("tenure_days").clip(lower_bound=30.0)
            * cfg.ltv_horizon_days
        ).alias("lifetime_value"),
        pl.col("preferred_hour")
        .cut([5, 11, 17], labels=["night", "morning", "afternoon", "evening"], left_closed=False)
        .cast(pl.String)
        .alias("daypart"),
    )
    users = users.join(
        _top(frame, "category", cfg.top_n, "top_categories"), on="user_id", how="left"
    )
    users = users.join(_top(frame, "brand", cfg.top_n, "top_brands"), on="user_id", how="left")
    device_col = next((c for c in ("device", "context") if c in events.columns), None)
    if device_col is not None:
        device = frame.group_by("user_id").agg(
            pl.col(device_col).cast(pl.String).drop_nulls().mode().min().alias("device")
        )
        users = users.join(device, on="user_id", how="left")
    return users.drop("_rate")


def segment_users(
    events: pl.DataFrame,
    catalog: pl.DataFrame | None = None,
    now: datetime | int | None = None,
    config: SegmentConfig | None = None,
) -> SegmentResult:
    """Segment every user with events, with RFM, engagement, churn risk, LTV and preferences.

    `now` (default: the latest event) is the reference for recency and churn; later events are
    dropped and counted. The segmentation is learned from these events (see `fit_segments`).
    """
    cfg = config or SegmentConfig()
    now_ts = reference_time(events, now, not_after_wall_clock=False)
    future = events["timestamp"] > now_ts
    dropped = int(future.sum())
    events = _with_sessions(events.filter(~future), cfg.session_gap_s)
    if events.height == 0:
        raise ValueError("no events at or before now: nothing to segment")
    features = user_features(events, catalog, now_ts, cfg)
    model = fit_segments(features, cfg)
    users = features.with_columns(model.predict(features))
    users = _scores_and_preferences(events, users, catalog, now_ts, cfg)
    leading = ["user_id", *SEGMENT_SCORES]
    users = users.select(*leading, pl.exclude(leading)).sort("user_id")
    return SegmentResult(users, model, dict(FEATURE_DOC), dropped)


def compute_segments(
    events: pl.DataFrame,
    catalog: pl.DataFrame | None,
    config: SegmentConfig | None = None,
    now: int | None = None,
) -> SegmentResult:
    """The segmentation as the `user_segments` asset and `recsys segments` run it: recency and
    churn measured at `now`, else at the newest event but never past the wall clock."""
    return segment_users(events, catalog, reference_time(events, now), config)


def segment_profile(users: pl.DataFrame) -> pl.DataFrame:
    """One row per segment: users, share and the mean scores, largest segment first."""
    return (
        users.group_by("segment")
        .agg(
            pl.len().alias("users"),
            pl.col("engagement").mean(),
            pl.col("churn_risk").mean(),
            pl.col("lifetime_value").mean(),
            pl.col("n_events").mean().alias("events"),
            (pl.col("n_purchases") > 0).mean().alias("buyers"),
        )
        .with_columns((pl.col("users") / pl.col("users").sum()).alias("share"))
        .select("segment", "users", "share", pl.exclude("segment", "users", "share"))
        .sort(["users", "segment"], descending=[True, False])
    )


def feature_documentation(result: SegmentResult) -> str:
    """Markdown: what each feature is, which were used, and how a segment is decided."""
    model = result.model
    lines = [
        "# User segmentation",
        "",
        "## Features",
        "",
        "| feature | used | definition |",
        "| --- | --- | --- |",
    ]
    for name, text in result.feature_doc.items():
        lines.append(f"| {name} | {'yes' if name in model.features else 'no'} | {text} |")
    lines += ["", "## How a segment is decided", ""]
    if model.kmeans is None:
        lines.append(
            "Too few users (or no feature that varies) to learn from: users who bought are "
            "`buyer`, the rest `browser`."
        )
    else:
        lines += [
            f"The used features are standardised and clustered by k-means (k = "
            f"{model.kmeans.n_clusters}); each cluster is named by the segment whose signature "
            "(weights per standardised feature, below) has the largest dot product with its "
            "centre, one cluster per segment (Hungarian assignment).",
            "",
            "| segment | signature |",
            "| --- | --- |",
        ]
        for segment, weights in SIGNATURES.items():
            sig = ", ".join(f"{f} {w:+g}" for f, w in weights.items())
            lines.append(f"| {segment} | {sig} |")
        lines += ["", "## Cluster centres (standardised units)", "", to_markdown(model.centroids)]
    return "\n".join(lines) + "\n"


def segment_model_json(result: SegmentResult) -> str:
    """The standardisation and cluster naming of a fitted segmentation, as JSON (the k-means
    itself is logged as a model beside it)."""
    model = result.model
    return json.dumps(
        {
            "features": list(model.features),
            "center": np.asarray(model.center).tolist(),
            "scale": np.asarray(model.scale).tolist(),
            "cluster_segment": model.cluster_segment,
            "note": "segment = cluster_segment[kmeans.predict((x - center) / scale)]",
        },
        indent=2,
    )
