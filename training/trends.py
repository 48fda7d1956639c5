"""Trend analysis of items and categories: velocity, trend type, seasonality, bursts, forecast.

Pure functions over the canonical event frame; all items are analysed at once as 2-D arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import polars as pl
from scipy.sparse import csr_matrix
from scipy.special import ndtr

from training.analytics_common import TREND_TYPES, reference_time
from training.events import DEFAULT_EVENT_WEIGHTS

DIRECTIONS: tuple[str, ...] = ("down", "flat", "up")
DAY = 86_400


def _default_weights() -> dict[str, float]:
    # The interaction matrix's weights; here a rating counts as one event of interest.
    return {**DEFAULT_EVENT_WEIGHTS, "rating": 1.0}


@dataclass
class TrendConfig:
    """Windows, weights and thresholds of the trend analysis (see docs/analytics.md)."""

    lookback_days: int = 90
    """History used for the trend type, the forecast and weekly seasonality."""
    recent_days: int = 7
    """The recent window of velocity and of the burst test."""
    prior_days: int = 7
    """The window just before the recent one, which velocity compares against."""
    event_weights: dict[str, float] = field(default_factory=_default_weights)
    """Weight of each event type in velocity, forecast and trend score."""
    trend_threshold: float = 0.7
    """Fitted log-change across the lookback beyond which an item is rising or falling."""
    min_z: float = 1.5
    """How many standard errors a slope or an excess variance must clear to count."""
    slope_ridge: float = 1.0
    """Ridge penalty on the slope: shrinks the slopes of items with very few events towards 0."""
    volatility_threshold: float = 0.5
    """Excess squared coefficient of variation of daily counts above which an item is volatile."""
    burst_z: float = 4.0
    """Robust (median/MAD) z-score of a recent day that flags a burst."""
    burst_min_events: int = 5
    """A burst day needs at least this many distinct users."""
    forecast_days: int = 7
    """Horizon of the forecast and of the trend score."""
    falling_level_days: int = 14
    """Last days of the window on which a falling item's forecast level is re-fitted."""
    daily_season_days: int = 14
    """Hourly history used for daily (hour-of-day) seasonality."""
    season_min_events: int = 30
    """Series with fewer events get no seasonality estimate (NaN)."""
    future_tolerance_s: int = 300
    """Events later than now plus this are dropped (and counted) as clock errors."""
    chunk_items: int = 4096
    """Items per block in the hourly Fourier analysis, to bound memory."""


@dataclass
class TrendResult:
    """Per-item and per-category trend tables plus what was dropped on the way in."""

    items: pl.DataFrame
    categories: pl.DataFrame
    now: int
    window_days: int
    dropped_future: int = 0
    dropped_old: int = 0


@dataclass
class _Series:
    """Dense daily count arrays for a set of series (items or categories)."""

    unique: np.ndarray  # series x days: distinct users per day
    weighted: np.ndarray  # series x days: event-type-weighted events per day
    n_events: np.ndarray


def _fit_log_linear(
    counts: np.ndarray, exposure: np.ndarray, x: np.ndarray, ridge: float, iters: int = 25
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Poisson regression log mu = a + b x + log exposure, for every row at once.

    The intercept is profiled out; b gets a ridge penalty. Returns (a, b, standard error of b).
    Rows without counts get b = 0 and an infinite standard error.
    """
    total = counts.sum(axis=1)
    has = total > 0
    b = np.zeros(counts.shape[0])
    cx = counts @ x
    for _ in range(iters):
        w = exposure[None, :] * np.exp(b[:, None] * x[None, :])
        s0 = w.sum(axis=1)
        s1 = w @ x
        s2 = w @ (x * x)
        m1 = s1 / s0
        grad = cx - total * m1 - ridge * b
        hess = total * (s2 / s0 - m1 * m1) + ridge
        step = np.where(has, grad / hess, 0.0)
        b = np.clip(b + np.clip(step, -2.0, 2.0), -12.0, 12.0)
        if np.abs(step).max(initial=0.0) < 1e-6:
            break
    w = exposure[None, :] * np.exp(b[:, None] * x[None, :])
    s0 = w.sum(axis=1)
    m1 = (w @ x) / s0
    info = total * ((w @ (x * x)) / s0 - m1 * m1) + ridge
    with np.errstate(divide="ignore"):
        a = np.where(has, np.log(np.where(has, total, 1.0) / s0), -np.inf)
        se = np.where(has, 1.0 / np.sqrt(info), np.inf)
    return a, b, se


def _season_share(series: np.ndarray, period: int) -> tuple[np.ndarray, np.ndarray]:
    """Share of a series' variance at the period and its harmonics, by FFT; and the peak phase.

    The series length is cut (from the start) to a whole number of periods; a linear trend is
    removed first so a rise does not leak into low frequencies.
    """
    n = (series.shape[1] // period) * period
    if n < 2 * period:
        nan = np.full(series.shape[0], np.nan)
        return nan, nan
    y = series[:, -n:].astype(np.float64)
    t = np.arange(n) - (n - 1) / 2
    slope = (y @ t) / (t @ t)
    y = y - y.mean(axis=1, keepdims=True) - slope[:, None] * t[None, :]
    power = np.abs(np.fft.rfft(y, axis=1)) ** 2
    power[:, 0] = 0.0
    cycles = n // period
    harmonics = np.arange(cycles, power.shape[1], cycles)
    total = power.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, power[:, harmonics].sum(axis=1) / total, 0.0)
    profile = y.reshape(y.shape[0], cycles, period).mean(axis=1)
    return share, np.argmax(profile, axis=1).astype(np.float64)


def _robust_burst(daily: np.ndarray, recent: int) -> np.ndarray:
    """Largest robust z-score of a recent day against the days before it.

    Scale: 1.4826 MAD, floored by a Poisson standard deviation so sparse series do not divide
    by zero.
    """
    if daily.shape[1] <= recent:
        return np.zeros(daily.shape[0])
    history = daily[:, :-recent]
    med = np.median(history, axis=1)
    mad = 1.4826 * np.median(np.abs(history - med[:, None]), axis=1)
    scale = np.maximum(mad, np.sqrt(med + 1.0))
    return (daily[:, -recent:].max(axis=1) - med) / scale


def _analyze(series: _Series, cfg: TrendConfig, dow_factor: np.ndarray) -> dict[str, np.ndarray]:
    """Every per-series statistic, as arrays aligned with the rows of `series`."""
    unique, weighted = series.unique, series.weighted
    n_rows, n_days = unique.shape
    x = (np.arange(n_days) - (n_days - 1) / 2) / max(n_days, 1)
    a, b, se = _fit_log_linear(unique, dow_factor, x, cfg.slope_ridge)
    n_unique = unique.sum(axis=1)

    # Volatility: excess variance of daily counts around the fitted trend, relative to it.
    with np.errstate(invalid="ignore"):
        baseline = np.exp(a[:, None] + b[:, None] * x[None, :]) * dow_factor[None, :]
    baseline[n_unique == 0] = 0.0
    resid2 = ((unique - baseline) ** 2).sum(axis=1)
    mu1 = baseline.sum(axis=1)
    mu2 = (baseline**2).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        volatility = np.where(mu2 > 0, (resid2 - mu1) / mu2, 0.0)
        vol_se = np.where(mu2 > 0, np.sqrt(mu1 + 2 * mu2) / mu2, np.inf)
        vol_z = np.where(mu2 > 0, volatility / vol_se, 0.0)
    volatility = np.maximum(volatility, 0.0)

    thr = cfg.trend_threshold
    z_slope = np.where(np.isfinite(se), b / se, 0.0)
    is_vol = (volatility > cfg.volatility_threshold) & (vol_z > cfg.min_z)
    is_rise = ~is_vol & (b > thr) & (z_slope > cfg.min_z)
    is_fall = ~is_vol & (b < -thr) & (z_slope < -cfg.min_z)
    trend = np.zeros(n_rows, dtype=np.int64)
    trend[is_rise] = 1
    trend[is_fall] = 2
    trend[is_vol] = 3

    # Strength: the size of the movement of the detected kind, squashed into 0..1.
    strength = 1.0 - np.exp(-np.abs(b) / 1.5)
    strength[is_vol] = (1.0 - np.exp(-np.sqrt(volatility) / 1.5))[is_vol]
    strength[n_unique == 0] = 0.0
    # Confidence: a normal approximation of the probability that the label is right.
    se_f = np.where(np.isfinite(se), se, 1e9)
    p_rise = ndtr((b - thr) / se_f)
    p_fall = ndtr((-thr - b) / se_f)
    p_vol = ndtr(
        (volatility - cfg.volatility_threshold) / np.where(np.isfinite(vol_se), vol_se, 1e9)
    )
    confidence = (1.0 - p_rise - p_fall) * (1.0 - p_vol)
    confidence[is_rise] = p_rise[is_rise]
    confidence[is_fall] = p_fall[is_fall]
    confidence[is_vol] = p_vol[is_vol]
    confidence[n_unique == 0] = 0.0
    confidence = np.clip(confidence, 0.0, 1.0)

    recent = weighted[:, -cfg.recent_days :].sum(axis=1)
    prior_lo = max(n_days - cfg.recent_days - cfg.prior_days, 0)
    prior = weighted[:, prior_lo : max(n_days - cfg.recent_days, 0)].sum(axis=1)
    prior_len = max(n_days - cfg.recent_days - prior_lo, 0)
    recent_len = min(cfg.recent_days, n_days)
    velocity = np.log((recent / max(recent_len, 1) + 1.0) / (prior / max(prior_len, 1) + 1.0))
    if prior_len == 0:
        velocity[:] = 0.0

    # Forecast: for rising and falling items the fitted curve (its level re-fitted to the
    # weighted events) extrapolated over the horizon, at most 15% up or down a day; for stable
    # and volatile items the mean weighted rate of the window, the less noisy estimate.
    trending = (trend == 1) | (trend == 2)
    slope = np.where(trending, b, 0.0)
    with np.errstate(over="ignore"):
        shape = np.exp(slope[:, None] * x[None, :]) * dow_factor[None, :]
    level_end = weighted.sum(axis=1) / shape.sum(axis=1) * np.exp(slope * x[-1])
    # A log-linear curve cannot follow a decline towards zero, so fitted to the whole window it
    # ends above a falling item's recent level: re-fit that level on the last days.
    lo = max(n_days - cfg.falling_level_days, 0)
    recent_level = weighted[:, lo:].sum(axis=1) / shape[:, lo:].sum(axis=1) * np.exp(slope * x[-1])
    level_end = np.where(trend == 2, recent_level, level_end)
    per_day = np.clip(slope / max(n_days, 1), -0.15, 0.15)
    ahead = np.arange(1, cfg.forecast_days + 1)
    forecast = level_end * np.exp(per_day[:, None] * ahead[None, :]).sum(axis=1)
    forecast *= dow_factor.mean()
    # The direction of that forecast. A significant slope of a stable item is not enough: its
    # forecast is flat, and so is its direction (the slope is under 2x across the whole window).
    direction = np.sign(slope).astype(np.int64) + 1

    weekly, weekly_peak = _season_share(unique, 7)
    few = series.n_events < cfg.season_min_events
    weekly[few] = np.nan
    weekly_peak[few] = np.nan

    burst_z = _robust_burst(unique, cfg.recent_days)
    burst = (burst_z >= cfg.burst_z) & (
        unique[:, -cfg.recent_days :].max(axis=1) >= cfg.burst_min_events
    )
    return {
        "n_events": series.n_events,
        "recent_score": recent,
        "prior_score": prior,
        "velocity": velocity,
        "trend_type": trend,
        "strength": strength,
        "confidence": confidence,
        "log_change": b,
        "log_change_se": se,
        "volatility": volatility,
        "predicted_direction": direction,
        "forecast": forecast,
        "weekly_seasonality": weekly,
        "weekly_peak_day": weekly_peak,
        "burst_z": burst_z,
        "burst": burst,
        "trend_score": forecast,
    }


def _hourly_seasonality(
    hourly: csr_matrix | None, eligible: np.ndarray, cfg: TrendConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Hour-of-day seasonality of the eligible rows of a sparse (rows x hours) matrix, in blocks."""
    n_rows = eligible.size
    share = np.full(n_rows, np.nan)
    peak = np.full(n_rows, np.nan)
    if hourly is None:
        return share, peak
    rows = np.flatnonzero(eligible)
    for lo in range(0, rows.size, cfg.chunk_items):
        block = rows[lo : lo + cfg.chunk_items]
        share[block], peak[block] = _season_share(hourly[block].toarray(), 24)
    return share, peak


def _dow_factor(unique_total: np.ndarray, bin_dow: np.ndarray) -> np.ndarray:
    """Relative traffic of each day bin by its day of week, from all series together."""
    n_days = unique_total.size
    if n_days < 14 or unique_total.sum() < 200:
        return np.ones(n_days)
    per_dow = np.bincount(bin_dow, weights=unique_total, minlength=7)
    bins = np.bincount(bin_dow, minlength=7)
    mean_by_dow = per_dow / np.maximum(bins, 1)
    factor = mean_by_dow / max(unique_total.mean(), 1e-12)
    factor = np.where(factor > 0, factor, 1.0)
    return factor[bin_dow]


def _frame(keys: pl.DataFrame, stats: dict[str, np.ndarray]) -> pl.DataFrame:
    trend_names = pl.Series(TREND_TYPES)
    direction_names = pl.Series(DIRECTIONS)
    columns = {k: v for k, v in stats.items() if k not in ("trend_type", "predicted_direction")}
    frame = pl.DataFrame(columns).with_columns(
        trend_type=trend_names.gather(stats["trend_type"]),
        predicted_direction=direction_names.gather(stats["predicted_direction"]),
        n_events=pl.Series(stats["n_events"], dtype=pl.Int64),
    )
    order = [
        "n_events",
        "trend_type",
        "strength",
        "confidence",
        "velocity",
        "recent_score",
        "prior_score",
        "log_change",
        "log_change_se",
        "volatility",
        "predicted_direction",
        "forecast",
        "trend_score",
        "burst",
        "burst_z",
        "weekly_seasonality",
        "weekly_peak_day",
        "daily_seasonality",
        "daily_peak_hour",
    ]
    return pl.concat([keys, frame.select(order)], how="horizontal")


def analyze_trends(
    events: pl.DataFrame,
    catalog: pl.DataFrame | None = None,
    now: datetime | int | None = None,
    config: TrendConfig | None = None,
) -> TrendResult:
    """Trend type, strength, confidence, velocity, forecast, seasonality and bursts per item
    and per category.

    `now` (default: the latest event) ends the analysis window; events after now plus
    `future_tolerance_s` are dropped and counted, those just after now count as now. Order of
    the input does not matter. Items in the catalog without events get an all-zero series:
    stable, strength 0, confidence 0.
    """
    cfg = config or TrendConfig()
    now_ts = reference_time(events, now, not_after_wall_clock=False)
    ts = events["timestamp"]
    future = ts > now_ts + cfg.future_tolerance_s
    dropped_future = int(future.sum())
    frame = events.filter(~future).select(
        "user_id",
        "item_id",
        pl.col("event_type").cast(pl.String),
        pl.col("timestamp").clip(upper_bound=now_ts),
    )
    earliest = now_ts - cfg.lookback_days * DAY
    if frame.height:
        earliest = max(earliest, int(frame["timestamp"].min()))  # type: ignore[arg-type]
    # Day bins end at now. When the data starts inside the window, its first bin is partly
    # covered: that share enters the exposure (a sliver under 10% is dropped instead).
    span = now_ts - earliest
    n_days = max(1, min(cfg.lookback_days, -(-span // DAY)))
    coverage = np.ones(n_days)
    if n_days * DAY > span and n_days > 1:
        first_cover = (span - (n_days - 1) * DAY) / DAY
        if first_cover < 0.1:
            n_days -= 1
            coverage = np.ones(n_days)
        else:
            coverage[0] = first_cover
    frame = frame.with_columns(
        (n_days - 1 - (now_ts - pl.col("timestamp")) // DAY).alias("day"),
        (cfg.daily_season_days * 24 - 1 - (now_ts - pl.col("timestamp")) // 3600).alias("hour"),
    )
    dropped_old = int((frame["day"] < 0).sum())
    frame = frame.filter(pl.col("day") >= 0)

    # Every catalog item and every item with events, with its category ("unknown" if none).
    ids = frame.select(pl.col("item_id").unique())
    if catalog is not None and "item_id" in catalog.columns:
        cat_col = (
            pl.col("category").cast(pl.String)
            if "category" in catalog.columns
            else pl.lit(None, dtype=pl.String)
        )
        known = catalog.select(pl.col("item_id").cast(pl.String), cat_col.alias("category"))
        known = known.unique("item_id", keep="last")
        ids = pl.concat([known.select("item_id"), ids]).unique()
        keys = ids.join(known, on="item_id", how="left")
    else:
        keys = ids.with_columns(pl.lit(None, dtype=pl.String).alias("category"))
    keys = (
        keys.with_columns(pl.col("category").fill_null("unknown"))
        .sort("item_id")
        .with_row_index("idx")
    )
    frame = frame.join(keys.select("item_id", "idx"), on="item_id", how="left")
    n_items = keys.height

    weights = cfg.event_weights
    frame = frame.with_columns(
        pl.col("event_type")
        .replace_strict(list(weights), list(weights.values()), default=0.0, return_dtype=pl.Float64)
        .alias("w")
    )
    item = frame["idx"].to_numpy().astype(np.int64)
    day = frame["day"].to_numpy()
    weighted = np.bincount(
        item * n_days + day, weights=frame["w"].to_numpy(), minlength=n_items * n_days
    ).reshape(n_items, n_days)
    pairs = frame.select("user_id", "idx", "day").unique()
    unique = (
        np.bincount(
            pairs["idx"].to_numpy().astype(np.int64) * n_days + pairs["day"].to_numpy(),
            minlength=n_items * n_days,
        )
        .reshape(n_items, n_days)
        .astype(np.float64)
    )
    n_events = np.bincount(item, minlength=n_items)

    n_hours = cfg.daily_season_days * 24
    recent_hours = frame.filter(pl.col("hour") >= 0)
    hourly = None
    if n_days >= cfg.daily_season_days:
        hourly = csr_matrix(
            (
                np.ones(recent_hours.height),
                (recent_hours["idx"].to_numpy(), recent_hours["hour"].to_numpy()),
            ),
            shape=(n_items, n_hours),
        )
    bin_start = now_ts - (n_days - np.arange(n_days)) * DAY
    bin_dow = (((bin_start + DAY // 2) // DAY) + 3) % 7
    dow = _dow_factor(unique.sum(axis=0) / coverage, bin_dow) * coverage

    def run(
        uniq: np.ndarray, wtd: np.ndarray, hrs: csr_matrix | None, counts: np.ndarray
    ) -> dict[str, np.ndarray]:
        stats = _analyze(_Series(uniq, wtd, counts), cfg, dow)
        eligible = counts >= cfg.season_min_events
        share, peak = _hourly_seasonality(hrs, eligible, cfg)
        hour_start = now_ts - n_hours * 3600
        stats["daily_seasonality"] = share
        # Hour bins end at now, not on the clock hour: name each by the hour of its midpoint.
        stats["daily_peak_hour"] = ((hour_start + peak * 3600 + 1800) // 3600) % 24
        # Peak day as a weekday (0 = Monday), from the day bin the profile phase falls on.
        n_cut = (n_days // 7) * 7
        first = n_days - n_cut
        peak_day = stats["weekly_peak_day"]
        ok = np.isfinite(peak_day)
        mapped = np.full(peak_day.size, np.nan)
        mapped[ok] = bin_dow[first + peak_day[ok].astype(np.int64)]
        stats["weekly_peak_day"] = mapped
        return stats

    item_stats = run(unique, weighted, hourly, n_events)
    items = _frame(keys.select("item_id", "category"), item_stats)

    # Categories: the same analysis on the sums of their items' series.
    cats = keys.select(pl.col("category").unique().sort()).with_row_index("cidx")
    item_cat = keys.join(cats, on="category", how="left").sort("idx")["cidx"].to_numpy()
    member = csr_matrix(
        (np.ones(n_items), (item_cat, np.arange(n_items))), shape=(cats.height, n_items)
    )
    cat_stats = run(
        np.asarray(member @ unique),
        np.asarray(member @ weighted),
        (member @ hourly).tocsr() if hourly is not None else None,
        np.asarray(member @ n_events).astype(np.int64),
    )
    categories = _frame(cats.select("category"), cat_stats)
    return TrendResult(items, categories, now_ts, int(n_days), dropped_future, dropped_old)


def trend_popularity_scores(
    events: pl.DataFrame,
    now: datetime | int | None = None,
    config: TrendConfig | None = None,
) -> pl.DataFrame:
    """Trend-aware popularity: the expected weighted events of each item over the forecast
    horizon (rising and falling items extrapolated along their fitted trend). Highest first."""
    result = analyze_trends(events, None, now, config)
    return result.items.select("item_id", pl.col("trend_score").alias("score")).sort(
        "score", "item_id", descending=[True, False]
    )


def compute_trends(
    events: pl.DataFrame,
    catalog: pl.DataFrame | None,
    config: TrendConfig | None = None,
    now: int | None = None,
) -> TrendResult:
    """The trend analysis as the `trend_analysis` asset and `recsys trends` run it: ending at
    `now`, else at the newest event but never past the wall clock."""
    return analyze_trends(events, catalog, reference_time(events, now), config)


def top_movers(items: pl.DataFrame, n: int) -> pl.DataFrame:
    """Rising, falling, volatile or bursting items, by strength x confidence (highest first)."""
    return (
        items.filter((pl.col("trend_type") != "stable") | pl.col("burst"))
        .with_columns((pl.col("strength") * pl.col("confidence")).alias("score"))
        .sort(["score", "item_id"], descending=[True, False])
        .head(n)
        .select(
            "item_id",
            "category",
            "trend_type",
            "strength",
            "confidence",
            "log_change",
            "velocity",
            "burst",
            "forecast",
            "n_events",
        )
    )


def trend_summary(result: TrendResult) -> dict[str, float]:
    """Counts per trend type (items and categories), bursts and mean strength and confidence
    over the items that had events."""
    items, categories = result.items, result.categories
    active = items.filter(pl.col("n_events") > 0)
    summary: dict[str, float] = {"items": items.height, "categories": categories.height}
    for kind in TREND_TYPES:
        summary[f"items_{kind}"] = int((items["trend_type"] == kind).sum())
        summary[f"categories_{kind}"] = int((categories["trend_type"] == kind).sum())
    summary["bursts"] = int(items["burst"].sum())
    summary["items_with_events"] = active.height
    summary["mean_strength"] = float(active["strength"].mean() or 0.0)
    summary["mean_confidence"] = float(active["confidence"].mean() or 0.0)
    summary["window_days"] = result.window_days
    summary["dropped_future"] = result.dropped_future
    summary["dropped_old"] = result.dropped_old
    return summary
