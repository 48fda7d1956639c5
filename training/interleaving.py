"""Team-draft interleaving (Radlinski, Kurup and Joachims 2008): merge two rankings into one list
whose every position is credited to the ranker that drafted it, and analyse the users' clicks as
a per-user preference with an anytime-valid sequential test."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl

from training.experiment_stats import (
    CI_LEVEL,
    DEFAULT_LOOK_EVERY,
    DEFAULT_TAU_SD,
    Estimate,
    mean_ci,
    one_sample_path,
    to_jsonable,
)

CREDIT_SCHEMA: dict[str, pl.DataType] = {
    "request_id": pl.String(),
    "user_id": pl.String(),
    "timestamp": pl.Float64(),
    "clicks_a": pl.Int64(),
    "clicks_b": pl.Int64(),
}


def seed_for(request_id: str) -> int:
    """The team-draft seed of a request: a stable 64-bit hash of its request_id, so the same
    request always interleaves the same way (and a replay reproduces the teams)."""
    digest = hashlib.blake2b(request_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def team_draft(
    ranking_a: Sequence[str],
    ranking_b: Sequence[str],
    k: int,
    seed: int,
    labels: tuple[str, str] = ("a", "b"),
) -> tuple[list[str], list[str]]:
    """Interleave two rankings by team draft: in each round the team with fewer picks (a coin
    flip, drawn from `seed`, when both have as many) adds its highest-ranked item not yet in the
    list. Returns (items, teams): at most k distinct items and, per position, the label of the team
    that drafted it. While both rankings have items left, the teams' sizes differ by at most one
    (each has floor(k/2) or ceil(k/2)); when one runs out the other fills the list."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    rankings = (list(ranking_a), list(ranking_b))
    coins = np.random.default_rng(seed).random(k) < 0.5
    items: list[str] = []
    teams: list[str] = []
    taken: set[str] = set()
    cursor = [0, 0]
    picks = [0, 0]

    def next_free(team: int) -> str | None:
        ranking, i = rankings[team], cursor[team]
        while i < len(ranking) and ranking[i] in taken:
            i += 1
        cursor[team] = i
        return ranking[i] if i < len(ranking) else None

    # A loop over the k positions of one answer (k is small), not over events or users.
    for step in range(k):
        first = 0 if picks[0] < picks[1] or (picks[0] == picks[1] and coins[step]) else 1
        team = first
        item = next_free(team)
        if item is None:
            team = 1 - first
            item = next_free(team)
            if item is None:
                break
        taken.add(item)
        items.append(item)
        teams.append(labels[team])
        picks[team] += 1
    return items, teams


def interleaving_credit(
    logs: pl.DataFrame, attributed: pl.DataFrame, experiment: str, arm_a: str, arm_b: str
) -> pl.DataFrame:
    """Clicks per impression on the items each team contributed (CREDIT_SCHEMA), one row per
    interleaved impression of the experiment (with no clicks: zeros). A click is matched to its
    position's team through its attributed request_id and position."""
    exp = logs.filter(pl.col("experiment") == experiment)
    if "teams" not in exp.columns:
        raise ValueError("an interleaving analysis needs the `teams` column of recommendation_logs")
    exp = exp.filter(pl.col("teams").is_not_null())
    shown = (
        exp.select(
            pl.col("request_id").cast(pl.String),
            pl.col("teams").cast(pl.List(pl.String)).alias("team"),
            pl.int_ranges(pl.col("teams").list.len()).alias("position"),
        )
        .explode("team", "position")
        .with_columns(pl.col("position").cast(pl.Int64))
    )
    clicks = (
        attributed.filter((pl.col("experiment") == experiment) & (pl.col("event_type") == "click"))
        .select(pl.col("request_id").cast(pl.String), pl.col("position").cast(pl.Int64))
        .join(shown, on=["request_id", "position"], how="inner")
        .group_by("request_id")
        .agg(
            (pl.col("team") == arm_a).sum().cast(pl.Int64).alias("clicks_a"),
            (pl.col("team") == arm_b).sum().cast(pl.Int64).alias("clicks_b"),
        )
    )
    return (
        exp.select(
            pl.col("request_id").cast(pl.String),
            pl.col("user_id").cast(pl.String),
            pl.col("timestamp").cast(pl.Float64),
        )
        .join(clicks, on="request_id", how="left")
        .with_columns(pl.col("clicks_a", "clicks_b").fill_null(0))
        .select([pl.col(c).cast(t) for c, t in CREDIT_SCHEMA.items()])
    )


def user_preferences(credit: pl.DataFrame) -> pl.DataFrame:
    """Per user with at least one clicked impression, in order of that user's first impression:
    wins_a, wins_b, ties (impressions where one team got more clicks, or both as many) and the
    preference score sign(wins_b - wins_a) in {-1, 0, 1} (positive: B preferred)."""
    per_impression = credit.with_columns(
        (pl.col("clicks_b") - pl.col("clicks_a")).sign().alias("outcome"),
        ((pl.col("clicks_a") + pl.col("clicks_b")) > 0).alias("clicked"),
    )
    return (
        per_impression.sort("timestamp", "request_id")
        .group_by("user_id", maintain_order=True)
        .agg(
            pl.col("timestamp").first().alias("first_seen"),
            (pl.col("clicked") & (pl.col("outcome") < 0)).sum().cast(pl.Int64).alias("wins_a"),
            (pl.col("clicked") & (pl.col("outcome") > 0)).sum().cast(pl.Int64).alias("wins_b"),
            (pl.col("clicked") & (pl.col("outcome") == 0)).sum().cast(pl.Int64).alias("ties"),
        )
        .filter((pl.col("wins_a") + pl.col("wins_b") + pl.col("ties")) > 0)
        .with_columns((pl.col("wins_b") - pl.col("wins_a")).sign().cast(pl.Float64).alias("score"))
        .sort("first_seen", "user_id")
    )


def _users_until(
    credit: pl.DataFrame, prefs: pl.DataFrame, with_preference: int | None
) -> int | None:
    """All users (with a preference or not) seen by the time the given number of users with a
    preference was reached: the sample size an A/B test of the same traffic is compared with."""
    if with_preference is None:
        return None
    last = prefs["first_seen"][with_preference - 1]
    return int(credit.filter(pl.col("timestamp") <= last)["user_id"].n_unique())


@dataclass(frozen=True)
class InterleavingAnalysis:
    """An interleaving experiment of arm_b against arm_a. delta: the user-level preference for B,
    (users preferring B + tied users / 2) / users - 1/2, in [-1/2, 1/2], with its 95% CI;
    p_value and confidence_sequence: the always-valid mSPRT on the per-user scores, the sequence
    expressed on the delta's scale; detected_at_users: users exposed (with a preference or not) by
    the first look whose p-value fell below alpha (None: not yet)."""

    experiment: str
    arm_a: str
    arm_b: str
    alpha: float
    impressions: int
    users: int
    users_with_preference: int
    prefer_a: int
    prefer_b: int
    tied: int
    delta: Estimate
    p_value: float
    confidence_sequence: tuple[float, float]
    detected_at_users: int | None
    duration_s: float
    decision: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (non-finite numbers become null)."""
        return to_jsonable(asdict(self))


def interleaving_analysis(
    logs: pl.DataFrame,
    attributed: pl.DataFrame,
    experiment: str,
    arm_a: str,
    arm_b: str,
    alpha: float = 0.05,
    min_users: int = 100,
    min_duration_s: float = 0.0,
    max_duration_s: float = 14 * 86400.0,
    now: float | None = None,
    *,
    tau_sd: float = DEFAULT_TAU_SD,
    look_every: int = DEFAULT_LOOK_EVERY,
    previous_p_value: float | None = None,
    tau: float | None = None,
) -> InterleavingAnalysis:
    """Analyse a team-draft interleaving experiment and decide, like analyse(): "continue" before
    min_users users with a preference and min_duration_s; then "promote:<arm_b>" when B is
    significantly preferred, "rollback:<arm_b>" when A is; "stop:no-difference" after
    max_duration_s; else "continue". The mSPRT's mixing sd is `tau` on the score's scale when
    given, else tau_sd x the scores' sd."""
    credit = interleaving_credit(logs, attributed, experiment, arm_a, arm_b)
    prefs = user_preferences(credit)
    scores = prefs["score"].to_numpy().astype(float)
    start = float(credit["timestamp"].min()) if credit.height else None  # type: ignore[arg-type]
    now = float(now) if now is not None else float(credit["timestamp"].max() or 0.0)
    duration = 0.0 if start is None else max(0.0, now - start)

    if tau is None:
        sd = float(np.std(scores, ddof=1)) if scores.size > 1 else 0.0
        tau = tau_sd * sd if sd > 0 else tau_sd
    path = one_sample_path(scores, alpha, tau, look_every, previous_p_value)
    p = float(path.p_value[-1]) if path.n.size else 1.0
    lo, hi = (
        (float(path.lower[-1]) / 2, float(path.upper[-1]) / 2)
        if path.n.size
        else (
            -math.inf,
            math.inf,
        )
    )
    mean, low, high = mean_ci(scores, CI_LEVEL)
    delta = Estimate(mean / 2, low / 2, high / 2)
    n_pref = int(prefs.height)
    prefer_b = int((scores > 0).sum())
    prefer_a = int((scores < 0).sum())

    if n_pref < min_users or duration < min_duration_s:
        decision, reason = (
            "continue",
            (
                f"collecting: {n_pref} users with a preference (minimum {min_users}), "
                f"{duration / 3600:.1f} h of {min_duration_s / 3600:.1f} h minimum"
            ),
        )
    elif p < alpha and lo > 0:
        decision, reason = (
            f"promote:{arm_b}",
            (
                f"users prefer {arm_b} to {arm_a}: always-valid p = {p:.3g} < {alpha}, "
                f"delta in [{lo:.4g}, {hi:.4g}]"
            ),
        )
    elif p < alpha and hi < 0:
        decision, reason = (
            f"rollback:{arm_b}",
            (
                f"users prefer {arm_a} to {arm_b}: always-valid p = {p:.3g} < {alpha}, "
                f"delta in [{lo:.4g}, {hi:.4g}]"
            ),
        )
    elif duration >= max_duration_s:
        decision, reason = (
            "stop:no-difference",
            (f"maximum duration {max_duration_s / 3600:.1f} h reached without a preference"),
        )
    else:
        decision, reason = "continue", "no significant preference yet"
    return InterleavingAnalysis(
        experiment=experiment,
        arm_a=arm_a,
        arm_b=arm_b,
        alpha=alpha,
        impressions=int(credit.height),
        users=int(credit["user_id"].n_unique()) if credit.height else 0,
        users_with_preference=n_pref,
        prefer_a=prefer_a,
        prefer_b=prefer_b,
        tied=n_pref - prefer_a - prefer_b,
        delta=delta,
        p_value=p,
        confidence_sequence=(lo, hi),
        detected_at_users=_users_until(credit, prefs, path.first_rejection(alpha)),
        duration_s=duration,
        decision=decision,
        reason=reason,
    )
