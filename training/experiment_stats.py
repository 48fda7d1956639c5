"""Online experiment statistics: attribution of events to impressions, per-user metrics, SRM,
CUPED, the mixture SPRT (anytime-valid p-values and confidence sequences), power, guardrails and
the decision an experiment report acts on. Pure: numpy, scipy and polars."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import polars as pl
from scipy import optimize, stats

ATTRIBUTED_EVENT_TYPES: tuple[str, ...] = ("click", "add_to_cart", "purchase")
DEFAULT_WINDOW_SECONDS = 24 * 3600.0
SRM_ALPHA = 0.001
CI_LEVEL = 0.95
# The mSPRT's mixing standard deviation in units of the metric's pooled standard deviation: the
# test is most powerful for effects near this size (Johari et al. 2017, section 4.3); 0.1 sd is a
# typical effect of a ranking change on a per-user metric.
DEFAULT_TAU_SD = 0.1
DEFAULT_LOOK_EVERY = 100
# A look counts only once every arm has this many users: the normal approximation (and the
# variance estimate the mSPRT plugs in) is poor below it, and with the running minimum one early
# fluke would stay rejected for good.
MIN_ARM_USERS = 30
DEFAULT_PRE_PERIOD_SECONDS = 28 * 86400.0
METRICS: dict[str, str] = {
    "ctr": "ctr",
    "conversion": "converted",
    "converted": "converted",
    "revenue": "revenue",
    "revenue_per_user": "revenue",
    "clicks": "clicks",
    "add_to_carts": "add_to_carts",
    "purchases": "purchases",
}
"""Decision metrics analyse() accepts, and the user_metrics() column each one names."""

ATTRIBUTED_SCHEMA: dict[str, pl.DataType] = {
    "request_id": pl.String(),
    "user_id": pl.String(),
    "item_id": pl.String(),
    "event_type": pl.String(),
    "timestamp": pl.Float64(),
    "position": pl.Int64(),
    "variant": pl.String(),
    "experiment": pl.String(),
    "model_version": pl.String(),
    "revenue": pl.Float64(),
    "how": pl.String(),
}


# --------------------------------------------------------------------------- attribution


def _impression_items(logs: pl.DataFrame) -> pl.DataFrame:
    """One row per (impression, position): the logs exploded by item."""
    return (
        logs.select(
            pl.col("request_id").cast(pl.String),
            pl.col("user_id").cast(pl.String),
            pl.col("timestamp").cast(pl.Float64).alias("impression_ts"),
            pl.col("items").cast(pl.List(pl.String)).alias("item_id"),
            pl.int_ranges(pl.col("items").list.len()).alias("position"),
            pl.col("variant").cast(pl.String),
            pl.col("experiment").cast(pl.String),
            pl.col("model_version").cast(pl.String),
        )
        .explode("item_id", "position")
        .drop_nulls("item_id")
        .with_columns(pl.col("position").cast(pl.Int64))
        # An item listed twice in one answer is credited to its first position.
        .unique(["request_id", "item_id"], keep="first", maintain_order=True)
    )


def attribute(
    events: pl.DataFrame,
    logs: pl.DataFrame,
    window_seconds: float = DEFAULT_WINDOW_SECONDS,
    prices: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Attribute each click, add_to_cart and purchase to the impression that caused it.

    An event naming a logged `request_id` goes to that impression if the item is in it (else it is
    dropped: it came from somewhere else). An event without a request_id, or naming one that is not
    in the logs, goes to the latest impression of that item to that user at or before the event and
    at most `window_seconds` earlier (answers compared by their whole second, the resolution of
    stored events). `prices` (item_id, price) gives revenue = price x quantity
    (`value`, null = 1) for purchases; a missing price counts 0. Unattributed events are dropped.
    Returns ATTRIBUTED_SCHEMA, one row per attributed event.
    """
    if window_seconds < 0:
        raise ValueError(f"window_seconds must be >= 0, got {window_seconds}")
    empty = pl.DataFrame(schema=ATTRIBUTED_SCHEMA)
    if events.is_empty() or logs.is_empty():
        return empty
    ev = events.filter(pl.col("event_type").cast(pl.String).is_in(ATTRIBUTED_EVENT_TYPES))
    ev = ev.select(
        pl.col("request_id").cast(pl.String)
        if "request_id" in ev.columns
        else pl.lit(None, pl.String).alias("request_id"),
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        pl.col("event_type").cast(pl.String),
        pl.col("timestamp").cast(pl.Float64),
        pl.col("value").cast(pl.Float64)
        if "value" in ev.columns
        else pl.lit(None, pl.Float64).alias("value"),
    )
    if ev.is_empty():
        return empty
    shown = _impression_items(logs)
    known = logs.select(pl.col("request_id").cast(pl.String)).unique()

    named = ev.join(known, on="request_id", how="semi")
    by_request = named.join(
        shown.drop("user_id"), on=["request_id", "item_id"], how="inner"
    ).with_columns(pl.lit("request_id").alias("how"))

    unnamed = ev.join(known, on="request_id", how="anti")  # null ids never match: kept here
    by_window = (
        unnamed.drop("request_id")
        .sort("timestamp")
        .join_asof(
            # Events are stored in whole seconds (EVENT_SCHEMA), answers to the millisecond: an
            # answer at 100.7 s precedes a click stored as 100, so answers count by their second.
            shown.with_columns(pl.col("impression_ts").floor().alias("_second")).sort("_second"),
            left_on="timestamp",
            right_on="_second",
            by=["user_id", "item_id"],
            strategy="backward",
            tolerance=float(window_seconds),
            # Sorted by time above; polars cannot verify it within `by` groups and would warn.
            check_sortedness=False,
        )
        .drop_nulls("request_id")
        .drop("_second")
        .with_columns(pl.lit("window").alias("how"))
    )
    out = pl.concat([by_request.select(by_window.columns), by_window], how="vertical")
    quantity = pl.col("value").fill_null(1.0)
    if prices is not None and not prices.is_empty():
        out = out.join(
            prices.select(pl.col("item_id").cast(pl.String), pl.col("price").cast(pl.Float64))
            .drop_nulls("price")
            .unique("item_id"),
            on="item_id",
            how="left",
        )
    else:
        out = out.with_columns(pl.lit(None, pl.Float64).alias("price"))
    revenue = (
        pl.when(pl.col("event_type") == "purchase")
        .then(pl.col("price").fill_null(0.0) * quantity)
        .otherwise(0.0)
    )
    return out.with_columns(revenue.alias("revenue")).select(
        [pl.col(c).cast(t) for c, t in ATTRIBUTED_SCHEMA.items()]
    )


# --------------------------------------------------------------------------- per-user metrics

USER_METRICS_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.String(),
    "variant": pl.String(),
    "first_seen": pl.Float64(),
    "impressions": pl.Int64(),
    "clicks": pl.Int64(),
    "add_to_carts": pl.Int64(),
    "purchases": pl.Int64(),
    "revenue": pl.Float64(),
    "ctr": pl.Float64(),
    "converted": pl.Float64(),
    "pre_engagement": pl.Float64(),
}


def experiment_start(logs: pl.DataFrame, experiment: str) -> float | None:
    """The first impression of the experiment (epoch s), or None when it has none."""
    ts = logs.filter(pl.col("experiment") == experiment)["timestamp"]
    return None if ts.is_empty() else float(ts.min())  # type: ignore[arg-type]


def user_metrics(
    logs: pl.DataFrame,
    attributed: pl.DataFrame,
    experiment: str,
    pre_period: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """One row per user (the randomisation unit) of `experiment` (USER_METRICS_SCHEMA).

    The variant is the one of the user's first impression; first_seen is that impression's time.
    Counts come from the attributed events of the experiment; ctr = clicks / impressions of the
    user; converted is 1 when the user bought anything. `pre_period` holds events (any type):
    pre_engagement counts each user's events before the experiment's first impression (0 without),
    the CUPED covariate.
    """
    exp_logs = logs.filter(pl.col("experiment") == experiment)
    if exp_logs.is_empty():
        return pl.DataFrame(schema=USER_METRICS_SCHEMA)
    start = float(exp_logs["timestamp"].min())  # type: ignore[arg-type]
    users = (
        exp_logs.select(
            pl.col("user_id").cast(pl.String),
            pl.col("variant").cast(pl.String),
            pl.col("timestamp").cast(pl.Float64),
        )
        .sort("timestamp")
        .group_by("user_id", maintain_order=True)
        .agg(
            pl.col("variant").first(),
            pl.col("timestamp").first().alias("first_seen"),
            pl.len().cast(pl.Int64).alias("impressions"),
        )
    )
    outcomes = (
        attributed.filter(pl.col("experiment") == experiment)
        .group_by("user_id")
        .agg(
            (pl.col("event_type") == "click").sum().cast(pl.Int64).alias("clicks"),
            (pl.col("event_type") == "add_to_cart").sum().cast(pl.Int64).alias("add_to_carts"),
            (pl.col("event_type") == "purchase").sum().cast(pl.Int64).alias("purchases"),
            pl.col("revenue").sum().cast(pl.Float64).alias("revenue"),
        )
    )
    out = users.join(outcomes, on="user_id", how="left").with_columns(
        pl.col("clicks", "add_to_carts", "purchases").fill_null(0),
        pl.col("revenue").fill_null(0.0),
    )
    if pre_period is not None and not pre_period.is_empty():
        pre = (
            pre_period.filter(pl.col("timestamp").cast(pl.Float64) < start)
            .group_by(pl.col("user_id").cast(pl.String))
            .agg(pl.len().cast(pl.Float64).alias("pre_engagement"))
        )
        out = out.join(pre, on="user_id", how="left")
    else:
        out = out.with_columns(pl.lit(None, pl.Float64).alias("pre_engagement"))
    return out.with_columns(
        (pl.col("clicks") / pl.col("impressions")).alias("ctr"),
        (pl.col("purchases") > 0).cast(pl.Float64).alias("converted"),
        pl.col("pre_engagement").fill_null(0.0),
    ).select([pl.col(c).cast(t) for c, t in USER_METRICS_SCHEMA.items()])


# --------------------------------------------------------------------------- tests and estimators


def srm_test(
    counts_by_variant: Mapping[str, int] | Sequence[int],
    expected_shares: Mapping[str, float] | Sequence[float],
) -> tuple[float, float]:
    """Sample-ratio mismatch: Pearson's chi-squared of the users per variant against the
    configured shares (normalised to sum 1). Returns (chi2, p); SRM is flagged at p < SRM_ALPHA."""
    if isinstance(counts_by_variant, Mapping):
        if not isinstance(expected_shares, Mapping):
            raise TypeError("counts by variant name need expected shares by variant name")
        missing = set(counts_by_variant) ^ set(expected_shares)
        if missing:
            raise ValueError(f"variants without both a count and a share: {sorted(missing)}")
        names = sorted(counts_by_variant)
        observed = np.array([counts_by_variant[n] for n in names], dtype=float)
        shares = np.array([expected_shares[n] for n in names], dtype=float)  # type: ignore[index]
    else:
        observed = np.asarray(counts_by_variant, dtype=float)
        shares = np.asarray(expected_shares, dtype=float)
    if observed.shape != shares.shape or observed.size < 2:
        raise ValueError("srm_test needs one expected share per variant, and two variants or more")
    if np.any(shares <= 0):
        raise ValueError(f"expected shares must be positive, got {shares.tolist()}")
    total = observed.sum()
    if total == 0:
        return 0.0, 1.0
    expected = total * shares / shares.sum()
    chi2, p = stats.chisquare(observed, expected)
    return float(chi2), float(p)


def cuped_theta(y: np.ndarray, x: np.ndarray) -> float:
    """CUPED's theta = cov(y, x) / var(x), pooled over all variants (0 when x is constant)."""
    y = np.asarray(y, dtype=float)
    x = np.asarray(x, dtype=float)
    if y.size < 2:
        return 0.0
    var_x = float(np.var(x, ddof=1))
    if var_x <= 0 or not math.isfinite(var_x):
        return 0.0
    return float(np.cov(y, x, ddof=1)[0, 1] / var_x)


def cuped_adjust(y: np.ndarray, x: np.ndarray, theta: float | None = None) -> np.ndarray:
    """The CUPED-adjusted metric y - theta (x - mean x): same mean, less variance when x and y
    correlate (Deng et al. 2013)."""
    y = np.asarray(y, dtype=float)
    x = np.asarray(x, dtype=float)
    if y.size == 0:
        return y
    theta = cuped_theta(y, x) if theta is None else theta
    return y - theta * (x - x.mean())


def mean_ci(values: np.ndarray, level: float = CI_LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): the normal-approximation confidence interval of a mean."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    m = float(v.mean())
    if v.size < 2:
        return m, -math.inf, math.inf
    half = stats.norm.ppf(0.5 + level / 2) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return m, m - half, m + half


@dataclass(frozen=True)
class SequentialPath:
    """The mSPRT evaluated at growing prefixes of the data (looks).

    n: users seen at each look; estimate: the difference (or mean) at each look; p_value: the
    always-valid p-value, the running minimum over the looks; lower/upper: the always-valid
    confidence sequence, the running intersection of the looks' intervals."""

    n: np.ndarray
    estimate: np.ndarray
    p_value: np.ndarray
    lower: np.ndarray
    upper: np.ndarray

    def first_rejection(self, alpha: float) -> int | None:
        """Users seen at the first look whose p-value fell below alpha, or None."""
        hit = np.flatnonzero(self.p_value < alpha)
        return int(self.n[hit[0]]) if hit.size else None


def msprt(
    estimate: np.ndarray | float,
    variance: np.ndarray | float,
    tau: float,
    alpha: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The normal mixture SPRT at one or more looks (Johari et al., "Always valid inference").

    `estimate` is the observed difference (asymptotically normal, mean theta) and `variance` its
    variance. With the mixing distribution theta ~ N(0, tau^2) the mixture likelihood ratio is
    Lambda = sqrt(V / (V + tau^2)) exp(est^2 tau^2 / (2 V (V + tau^2))); the always-valid p-value
    is min(1, 1 / Lambda) and the 1 - alpha confidence sequence est +/- sqrt(V (V + tau^2) / tau^2
    (2 log(1 / alpha) + log((V + tau^2) / V))). Returns (p, lower, upper) per look, not yet
    made monotone (sequential_path does). A look with no variance carries no evidence: p = 1.
    """
    if tau <= 0 or not math.isfinite(tau):
        raise ValueError(f"the mixing sd tau must be positive and finite, got {tau}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    est = np.atleast_1d(np.asarray(estimate, dtype=float))
    var = np.atleast_1d(np.asarray(variance, dtype=float))
    t2 = tau * tau
    ok = np.isfinite(est) & np.isfinite(var) & (var > 0)
    v = np.where(ok, var, 1.0)
    e = np.where(ok, est, 0.0)
    log_lambda = 0.5 * np.log(v / (v + t2)) + e * e * t2 / (2.0 * v * (v + t2))
    p = np.where(ok, np.minimum(1.0, np.exp(-log_lambda)), 1.0)
    half = np.sqrt(v * (v + t2) / t2 * (2.0 * math.log(1.0 / alpha) + np.log((v + t2) / v)))
    lower = np.where(ok, e - half, -np.inf)
    upper = np.where(ok, e + half, np.inf)
    return p, lower, upper


def _checkpoints(n: int, look_every: int | None) -> np.ndarray:
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if look_every is None or look_every <= 0:
        return np.array([n], dtype=np.int64)
    looks = np.arange(look_every, n + 1, look_every, dtype=np.int64)
    return looks if looks.size and looks[-1] == n else np.append(looks, n)


def _monotone(p: np.ndarray, lower: np.ndarray, upper: np.ndarray, previous_p: float | None):
    p = np.minimum.accumulate(p)
    if previous_p is not None:
        p = np.minimum(p, previous_p)
    return p, np.maximum.accumulate(lower), np.minimum.accumulate(upper)


def _looks_and_tau(
    y: np.ndarray, look_every: int | None, tau: float | None
) -> tuple[np.ndarray, float]:
    """The looks of a path over `y`, and the mixing sd: `tau`, else DEFAULT_TAU_SD x sd(y)."""
    if tau is None:
        sd = float(np.std(y, ddof=1)) if y.size > 1 else 0.0
        tau = DEFAULT_TAU_SD * sd if sd > 0 else 1.0
    return _checkpoints(y.size, look_every), tau


def _no_looks() -> SequentialPath:
    z = np.zeros(0)
    return SequentialPath(z.astype(np.int64), z, z, z, z)


def sequential_path(
    values: np.ndarray,
    is_treatment: np.ndarray,
    alpha: float,
    tau: float | None = None,
    look_every: int | None = DEFAULT_LOOK_EVERY,
    previous_p: float | None = None,
) -> SequentialPath:
    """Two-sample mSPRT on the difference in means (treatment - control) of per-user values given
    in arrival order, looked at after every `look_every` users and at the end.

    At each look: est = mean_T - mean_C, V = s_T^2 / n_T + s_C^2 / n_C (the normal approximation),
    then msprt(). `tau` defaults to DEFAULT_TAU_SD x the pooled sd of all values. The p-values are
    the running minimum over looks (and `previous_p`, a p-value reported earlier), so they never
    rise as data grows; the confidence sequence is the running intersection. Looks before each
    arm has MIN_ARM_USERS users carry no evidence (p = 1, an unbounded sequence)."""
    y = np.asarray(values, dtype=float)
    t = np.asarray(is_treatment, dtype=bool)
    if y.shape != t.shape:
        raise ValueError("values and is_treatment must have the same length")
    looks, tau = _looks_and_tau(y, look_every, tau)
    if looks.size == 0:
        return _no_looks()
    idx = looks - 1

    def moments(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        n = np.cumsum(mask)[idx].astype(float)
        s = np.cumsum(np.where(mask, y, 0.0))[idx]
        ss = np.cumsum(np.where(mask, y * y, 0.0))[idx]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = s / n
            var = np.maximum(ss - n * mean * mean, 0.0) / (n - 1)
        return n, mean, var

    n_t, m_t, v_t = moments(t)
    n_c, m_c, v_c = moments(~t)
    with np.errstate(invalid="ignore", divide="ignore"):
        est = m_t - m_c
        enough = (n_t >= MIN_ARM_USERS) & (n_c >= MIN_ARM_USERS)
        var = np.where(enough, v_t / n_t + v_c / n_c, np.nan)
    p, lower, upper = msprt(est, var, tau, alpha)
    p, lower, upper = _monotone(p, lower, upper, previous_p)
    return SequentialPath(looks, est, p, lower, upper)


def one_sample_path(
    values: np.ndarray,
    alpha: float,
    tau: float | None = None,
    look_every: int | None = DEFAULT_LOOK_EVERY,
    previous_p: float | None = None,
) -> SequentialPath:
    """The mSPRT of H0: mean = 0 for values in arrival order (est = mean, V = s^2 / n), e.g. the
    per-user preferences of an interleaving experiment; monotone like sequential_path."""
    y = np.asarray(values, dtype=float)
    looks, tau = _looks_and_tau(y, look_every, tau)
    if looks.size == 0:
        return _no_looks()
    idx = looks - 1
    n = looks.astype(float)
    s = np.cumsum(y)[idx]
    ss = np.cumsum(y * y)[idx]
    mean = s / n
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(
            n >= MIN_ARM_USERS, np.maximum(ss - n * mean * mean, 0.0) / (n - 1) / n, np.nan
        )
    p, lower, upper = msprt(mean, var, tau, alpha)
    p, lower, upper = _monotone(p, lower, upper, previous_p)
    return SequentialPath(looks, mean, p, lower, upper)


def power_users(
    baseline_mean: float,
    baseline_sd: float,
    mde_relative: float,
    alpha: float = 0.05,
    power: float = 0.8,
    shares: Sequence[float] = (0.5, 0.5),
) -> int:
    """Users (all arms together) a fixed-horizon two-sided z-test needs to detect a relative
    change `mde_relative` of the mean with the given power: with delta = mde x |mean| and the
    control share s_c (shares[0]) against the smallest treatment share s_t,
    N = (z_{1-alpha/2} + z_power)^2 sd^2 (1/s_c + 1/s_t) / delta^2, scaled up to cover every arm.
    The sequential test needs more: sequential_users() estimates how many."""
    delta, s_c, s_t, total_share = _power_inputs(baseline_mean, baseline_sd, mde_relative, shares)
    _check_rates(alpha, power)
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    n = z * z * baseline_sd**2 * (1 / s_c + 1 / s_t) / delta**2
    return int(math.ceil(n * total_share))


def sequential_users(
    baseline_mean: float,
    baseline_sd: float,
    mde_relative: float,
    alpha: float = 0.05,
    power: float = 0.8,
    shares: Sequence[float] = (0.5, 0.5),
    tau: float | None = None,
) -> int:
    """Users the mSPRT needs so that, at the MDE, its final look alone rejects with the given
    power: the N where delta / sqrt(V) = b(N) + z_power, b the mSPRT's boundary on |z| (solved
    from Lambda = 1 / alpha). An upper bound: an earlier look may already have rejected.
    `tau` defaults to DEFAULT_TAU_SD x sd, as in sequential_path."""
    delta, s_c, s_t, total_share = _power_inputs(baseline_mean, baseline_sd, mde_relative, shares)
    _check_rates(alpha, power)
    tau = DEFAULT_TAU_SD * baseline_sd if tau is None else tau
    t2 = tau * tau
    z_power = stats.norm.ppf(power)

    def gap(log_n: float) -> float:
        n = math.exp(log_n)
        v = baseline_sd**2 * (1 / (n * s_c) + 1 / (n * s_t))
        boundary = math.sqrt((v + t2) / t2 * (2 * math.log(1 / alpha) + math.log((v + t2) / v)))
        return delta / math.sqrt(v) - boundary - z_power

    lo, hi = 0.0, math.log(1e13)
    if gap(hi) < 0:
        raise ValueError("the sequential test cannot reach this power at any sample size")
    n = math.exp(optimize.brentq(gap, lo, hi)) if gap(lo) < 0 else 1.0
    return int(math.ceil(n * total_share))


def _check_rates(alpha: float, power: float) -> None:
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"alpha and power must lie in (0, 1), got {alpha} and {power}")


def _power_inputs(
    mean: float, sd: float, mde_relative: float, shares: Sequence[float]
) -> tuple[float, float, float, float]:
    delta = abs(mde_relative * mean)
    if delta == 0 or not math.isfinite(delta):
        raise ValueError("the minimum detectable effect (mde_relative x baseline_mean) must be > 0")
    if sd <= 0:
        raise ValueError(f"baseline_sd must be positive, got {sd}")
    sh = np.asarray(shares, dtype=float)
    if sh.size < 2 or np.any(sh <= 0):
        raise ValueError(f"shares need a control and at least one treatment, all > 0: {shares}")
    s_c, s_t = float(sh[0]), float(sh[1:].min())
    # N counts every arm: the pair (control, smallest treatment) holds s_c + s_t of all users.
    return delta, s_c, s_t, float(sh.sum()) / (s_c + s_t)


# --------------------------------------------------------------------------- guardrails


@dataclass(frozen=True)
class GuardrailThresholds:
    """A treatment breaks a guardrail when, against the control: its p99 latency exceeds
    latency_ratio x control + latency_slack_ms; its error rate exceeds control + error_rate_delta;
    its catalog coverage falls below coverage_ratio x control. Checked only once both arms served
    min_impressions answers (a p99 of ten requests is noise); with the answers' latencies and
    statuses at hand, a latency or error breach must also be significant: a one-sided binomial
    test at `significance` that more than 1% of the treatment's answers are slower than the
    limit (its p99 is above it), or that its error rate is above the limit, so an A/A's noisy
    tail does not roll a version back."""

    latency_ratio: float = 1.2
    latency_slack_ms: float = 5.0
    error_rate_delta: float = 0.01
    coverage_ratio: float = 0.5
    min_impressions: int = 200
    significance: float = 0.001


@dataclass(frozen=True)
class VariantGuardrails:
    variant: str
    impressions: int
    p99_latency_ms: float
    error_rate: float
    coverage: float


@dataclass(frozen=True)
class GuardrailBreach:
    variant: str
    guardrail: str
    value: float
    limit: float


def variant_guardrails(
    logs: pl.DataFrame, experiment: str, catalog_size: int | None = None
) -> dict[str, VariantGuardrails]:
    """Per variant of the experiment: answers, p99 latency_ms, share of status "error", and
    catalog coverage = distinct items served / catalog_size (default: distinct items in all
    logs)."""
    if catalog_size is None:
        catalog_size = int(logs.select(pl.col("items").explode().drop_nulls().n_unique()).item())
    size = max(int(catalog_size), 1)
    rows = (
        logs.filter(pl.col("experiment") == experiment)
        .group_by(pl.col("variant").cast(pl.String))
        .agg(
            pl.len().alias("impressions"),
            pl.col("latency_ms").cast(pl.Float64).quantile(0.99, "linear").alias("p99"),
            (pl.col("status") == "error").mean().alias("error_rate"),
            (pl.col("items").explode().drop_nulls().n_unique() / size).alias("coverage"),
        )
        .sort("variant")
    )
    return {
        r["variant"]: VariantGuardrails(
            r["variant"],
            int(r["impressions"]),
            float(r["p99"]) if r["p99"] is not None else math.nan,
            float(r["error_rate"]),
            float(r["coverage"]),
        )
        for r in rows.iter_rows(named=True)
    }


def guardrail_breaches(
    per_variant: Mapping[str, VariantGuardrails],
    control: str,
    treatments: Sequence[str],
    thresholds: GuardrailThresholds | None = None,
    logs: pl.DataFrame | None = None,
) -> list[GuardrailBreach]:
    """The guardrails each treatment breaks against the control (see GuardrailThresholds);
    with the experiment's `logs`, latency and error breaches must be significant."""
    th = thresholds or GuardrailThresholds()

    def significant(variant: str, over: pl.Expr, share: float) -> bool:
        """Whether the variant's answers matching `over` are significantly more than `share`."""
        if logs is None:
            return True
        rows = logs.filter(pl.col("variant") == variant)
        hits = int(rows.select(over.sum()).item() or 0)
        return bool(stats.binom.sf(hits - 1, rows.height, min(share, 1.0)) < th.significance)

    base = per_variant.get(control)
    if base is None or base.impressions < th.min_impressions:
        return []
    out: list[GuardrailBreach] = []
    for name in treatments:
        g = per_variant.get(name)
        if g is None or g.impressions < th.min_impressions:
            continue
        limit = th.latency_ratio * base.p99_latency_ms + th.latency_slack_ms
        slow = pl.col("latency_ms").cast(pl.Float64) > limit
        if g.p99_latency_ms > limit and significant(name, slow, 0.01):
            out.append(GuardrailBreach(name, "p99_latency_ms", g.p99_latency_ms, limit))
        limit = base.error_rate + th.error_rate_delta
        failed = pl.col("status") == "error"
        if g.error_rate > limit and significant(name, failed, limit):
            out.append(GuardrailBreach(name, "error_rate", g.error_rate, limit))
        limit = th.coverage_ratio * base.coverage
        if g.coverage < limit:
            out.append(GuardrailBreach(name, "coverage", g.coverage, limit))
    return out


# --------------------------------------------------------------------------- the analysis


def to_jsonable(obj: Any) -> Any:
    """obj with non-finite floats replaced by None, so json.dumps gives strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    return obj


@dataclass(frozen=True)
class Estimate:
    """A value with its 95% confidence interval (normal approximation over users)."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class VariantSummary:
    variant: str
    users: int
    impressions: int
    ctr: Estimate
    conversion: Estimate
    revenue_per_user: Estimate


@dataclass(frozen=True)
class TreatmentResult:
    """A treatment against the control on the decision metric, CUPED-adjusted. lift: difference
    of means with its fixed-horizon 95% CI; relative_lift: lift / control mean; p_value and
    confidence_sequence: the always-valid mSPRT results (at level 1 - alpha / treatments)."""

    treatment: str
    metric: str
    control_mean: float
    treatment_mean: float
    lift: Estimate
    relative_lift: float
    p_value: float
    confidence_sequence: tuple[float, float]
    variance_reduction: float
    significant: bool


@dataclass(frozen=True)
class ExperimentAnalysis:
    experiment: str
    control: str
    metric: str
    alpha: float
    started_at: float | None
    now: float
    duration_s: float
    variants: tuple[VariantSummary, ...]
    treatments: tuple[TreatmentResult, ...]
    srm_chi2: float
    srm_p_value: float
    srm: bool
    guardrails: tuple[VariantGuardrails, ...]
    breaches: tuple[GuardrailBreach, ...]
    decision: str
    reason: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (non-finite numbers become null)."""
        return to_jsonable(asdict(self))


def _estimate(values: np.ndarray) -> Estimate:
    return Estimate(*mean_ci(values))


def analyse(
    logs: pl.DataFrame,
    events: pl.DataFrame,
    experiment: str,
    control: str,
    treatments: Sequence[str],
    metric: str = "ctr",
    alpha: float = 0.05,
    min_users: int = 1000,
    min_duration_s: float = 7 * 86400.0,
    max_duration_s: float = 28 * 86400.0,
    now: float | None = None,
    prices: pl.DataFrame | None = None,
    guardrails: GuardrailThresholds | None = None,
    *,
    shares: Mapping[str, float] | None = None,
    window_seconds: float = DEFAULT_WINDOW_SECONDS,
    pre_period_seconds: float = DEFAULT_PRE_PERIOD_SECONDS,
    catalog_size: int | None = None,
    tau_sd: float = DEFAULT_TAU_SD,
    look_every: int = DEFAULT_LOOK_EVERY,
    previous_p_values: Mapping[str, float] | None = None,
) -> ExperimentAnalysis:
    """Analyse an A/B experiment at the user level and decide (see docs/experiments.md).

    Decision, in this order: "invalid:srm" when the users per variant fail the SRM test against
    `shares` (equal when not given) at p < SRM_ALPHA; "rollback:<t>" when a treatment breaks a
    guardrail — both at once; then, only after min_users per arm and min_duration_s:
    "rollback:<t>" when a treatment is significantly worse on the metric, "promote:<t>" when one
    is significantly better (the largest lift among those); "stop:no-difference" once
    max_duration_s passed; else "continue". Significance is the mSPRT at alpha / len(treatments).
    `previous_p_values` (per treatment, from an earlier report) keeps the p-values monotone
    across reports.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)}")
    if not treatments:
        raise ValueError("an experiment needs at least one treatment")
    if control in treatments:
        raise ValueError(f"the control {control!r} cannot also be a treatment")
    column = METRICS[metric]
    variants = [control, *treatments]
    exp_logs = logs.filter(pl.col("experiment") == experiment)
    start = experiment_start(logs, experiment)
    now = float(now) if now is not None else float(exp_logs["timestamp"].max() or 0.0)
    duration = 0.0 if start is None else max(0.0, now - start)

    # All answers, not only the experiment's: a later answer outside it may be the one that
    # showed the item last, and then the click is not the experiment's.
    attributed = attribute(events, logs, window_seconds, prices)
    pre = None
    if start is not None and not events.is_empty():
        pre = events.filter(
            pl.col("timestamp").cast(pl.Float64).is_between(start - pre_period_seconds, start)
        )
    users = user_metrics(exp_logs, attributed, experiment, pre).sort("first_seen", "user_id")

    summaries = []
    counts: dict[str, int] = {}
    for name in variants:
        u = users.filter(pl.col("variant") == name)
        counts[name] = u.height
        summaries.append(
            VariantSummary(
                name,
                u.height,
                int(u["impressions"].sum()),
                _estimate(u["ctr"].to_numpy()),
                _estimate(u["converted"].to_numpy()),
                _estimate(u["revenue"].to_numpy()),
            )
        )
    expected = dict(shares) if shares is not None else {v: 1.0 for v in variants}
    if missing := [v for v in variants if v not in expected]:
        raise ValueError(f"shares name no traffic share for the variants {missing}")
    srm_chi2, srm_p = srm_test(counts, {v: expected[v] for v in variants})
    srm = srm_p < SRM_ALPHA

    in_arms = users.filter(pl.col("variant").is_in(variants))
    y_all = in_arms[column].to_numpy().astype(float)
    x_all = in_arms["pre_engagement"].to_numpy().astype(float)
    theta = cuped_theta(y_all, x_all)
    adjusted = cuped_adjust(y_all, x_all, theta)
    sd_all = float(np.std(adjusted, ddof=1)) if adjusted.size > 1 else 0.0
    tau = tau_sd * sd_all if sd_all > 0 else 1.0
    arm = in_arms["variant"].to_numpy()
    level = alpha / len(treatments)
    z = stats.norm.ppf(1 - (1 - CI_LEVEL) / 2)
    results = []
    for name in treatments:
        pair = (arm == control) | (arm == name)
        y, t = adjusted[pair], arm[pair] == name
        raw = y_all[pair]
        path = sequential_path(y, t, level, tau, look_every, (previous_p_values or {}).get(name))
        yc, yt = y[~t], y[t]
        mc = float(yc.mean()) if yc.size else math.nan
        mt = float(yt.mean()) if yt.size else math.nan
        se = (
            math.sqrt(yc.var(ddof=1) / yc.size + yt.var(ddof=1) / yt.size)
            if yc.size > 1 and yt.size > 1
            else math.inf
        )
        raw_var = float(np.var(raw, ddof=1)) if raw.size > 1 else 0.0
        reduction = 1 - float(np.var(y, ddof=1)) / raw_var if raw_var > 0 else 0.0
        p = float(path.p_value[-1]) if path.n.size else 1.0
        cs = (
            (float(path.lower[-1]), float(path.upper[-1])) if path.n.size else (-math.inf, math.inf)
        )
        results.append(
            TreatmentResult(
                name,
                metric,
                mc,
                mt,
                Estimate(mt - mc, mt - mc - z * se, mt - mc + z * se),
                (mt - mc) / mc if mc else math.nan,
                p,
                cs,
                reduction,
                p < level,
            )
        )

    per_variant = variant_guardrails(logs, experiment, catalog_size)
    breaches = guardrail_breaches(
        per_variant,
        control,
        treatments,
        guardrails,
        exp_logs.select("variant", "latency_ms", "status"),
    )
    decision, reason = _decide(
        results, breaches, srm, srm_p, counts, control, min_users, duration,
        min_duration_s, max_duration_s, level,
    )  # fmt: skip
    return ExperimentAnalysis(
        experiment=experiment,
        control=control,
        metric=metric,
        alpha=alpha,
        started_at=start,
        now=now,
        duration_s=duration,
        variants=tuple(summaries),
        treatments=tuple(results),
        srm_chi2=srm_chi2,
        srm_p_value=srm_p,
        srm=srm,
        guardrails=tuple(per_variant[v] for v in variants if v in per_variant),
        breaches=tuple(breaches),
        decision=decision,
        reason=reason,
        extra={"cuped_theta": theta, "tau": tau, "level_per_treatment": level},
    )


def _decide(
    results: Sequence[TreatmentResult],
    breaches: Sequence[GuardrailBreach],
    srm: bool,
    srm_p: float,
    counts: Mapping[str, int],
    control: str,
    min_users: int,
    duration: float,
    min_duration_s: float,
    max_duration_s: float,
    level: float,
) -> tuple[str, str]:
    """The decision rule of analyse() and interleaving_analysis(), shared."""
    if srm:
        return "invalid:srm", (
            f"sample ratio mismatch (p = {srm_p:.2g} < {SRM_ALPHA}): assignment or logging is "
            f"broken, users per variant {dict(counts)}; no result can be trusted"
        )
    if breaches:
        b = breaches[0]
        return f"rollback:{b.variant}", (
            f"{b.variant} breaks the {b.guardrail} guardrail: {b.value:.4g} against a limit of "
            f"{b.limit:.4g}"
        )
    fewest = min(counts.values()) if counts else 0
    if fewest < min_users or duration < min_duration_s:
        return "continue", (
            f"collecting: {fewest} users in the smallest arm (minimum {min_users}), "
            f"{duration / 3600:.1f} h of {min_duration_s / 3600:.1f} h minimum"
        )
    losers = [r for r in results if r.significant and r.confidence_sequence[1] < 0]
    if losers:
        r = min(losers, key=lambda r: r.confidence_sequence[1])
        return f"rollback:{r.treatment}", (
            f"{r.treatment} is worse than {control} on {r.metric}: always-valid p = "
            f"{r.p_value:.3g} < {level:.3g}, difference in [{r.confidence_sequence[0]:.4g}, "
            f"{r.confidence_sequence[1]:.4g}]"
        )
    winners = [r for r in results if r.significant and r.confidence_sequence[0] > 0]
    if winners:
        r = max(winners, key=lambda r: r.lift.value)
        return f"promote:{r.treatment}", (
            f"{r.treatment} beats {control} on {r.metric}: always-valid p = {r.p_value:.3g} < "
            f"{level:.3g}, difference in [{r.confidence_sequence[0]:.4g}, "
            f"{r.confidence_sequence[1]:.4g}], relative lift {r.relative_lift:+.2%}"
        )
    if duration >= max_duration_s:
        return "stop:no-difference", (
            f"maximum duration {max_duration_s / 3600:.1f} h reached without a significant "
            f"difference on {results[0].metric if results else 'the metric'}"
        )
    return "continue", "no significant difference yet"
