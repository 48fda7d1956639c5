"""Team-draft interleaving: the draft's properties, click credit per team, the per-user analysis,
and its sensitivity against an A/B split of the same simulated shoppers."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from training.experiment_stats import sequential_path
from training.interleaving import (
    interleaving_analysis,
    interleaving_credit,
    seed_for,
    team_draft,
    user_preferences,
)


def test_team_draft_lists_k_distinct_items_split_evenly_and_reproducibly() -> None:
    rng = np.random.default_rng(0)
    pool = [f"i{j}" for j in range(40)]
    firsts = set()
    for trial in range(300):
        a = list(rng.permutation(pool)[:20])
        b = list(rng.permutation(pool)[:20])
        k = int(rng.integers(1, 16))
        seed = seed_for(f"req-{trial}")
        items, teams = team_draft(a, b, k, seed)
        assert len(items) == len(teams) == k
        assert len(set(items)) == k
        assert set(items) <= set(a) | set(b)
        n_a = teams.count("a")
        assert {n_a, k - n_a} <= {k // 2, (k + 1) // 2}
        # Each team's items appear in the order of its own ranking.
        for label, ranking in (("a", a), ("b", b)):
            drafted = [it for it, tm in zip(items, teams, strict=True) if tm == label]
            assert drafted == sorted(drafted, key=ranking.index)
        assert team_draft(a, b, k, seed) == (items, teams)
        firsts.add(teams[0])
    assert firsts == {"a", "b"}  # the coin decides who drafts first


def test_team_draft_with_identical_rankings_keeps_the_order_and_fills_from_the_longer_one() -> None:
    ranking = [f"i{j}" for j in range(10)]
    items, _ = team_draft(ranking, ranking, 6, seed=5)
    assert items == ranking[:6]
    items, teams = team_draft(["x"], ["y", "z", "w"], 4, seed=1, labels=("A", "B"))
    assert sorted(items) == ["w", "x", "y", "z"]
    assert teams.count("A") == 1 and teams.count("B") == 3
    assert team_draft(["x"], ["x"], 5, seed=2)[0] == ["x"]
    assert seed_for("r1") == seed_for("r1") != seed_for("r2")


def _interleaved(rows: list[tuple[str, str, float, list[str], list[str]]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "request_id": [r[0] for r in rows],
            "user_id": [r[1] for r in rows],
            "timestamp": [r[2] for r in rows],
            "items": [r[3] for r in rows],
            "teams": [r[4] for r in rows],
            "experiment": "il",
            "variant": "interleaved",
        }
    )


def _clicks(pairs: list[tuple[str, int]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "request_id": [p[0] for p in pairs],
            "position": [p[1] for p in pairs],
            "event_type": "click",
            "experiment": "il",
        },
        schema_overrides={"position": pl.Int64},
    )


def test_credit_and_preferences_are_aggregated_per_user_first() -> None:
    t = ["A", "B", "A", "B"]
    logs = _interleaved(
        [
            ("r1", "u1", 1.0, ["a", "b", "c", "d"], t),
            ("r2", "u1", 2.0, ["a", "b", "c", "d"], t),
            ("r3", "u1", 3.0, ["a", "b", "c", "d"], t),
            ("r4", "u2", 4.0, ["a", "b", "c", "d"], t),
            ("r5", "u3", 5.0, ["a", "b", "c", "d"], t),
            ("r6", "u4", 6.0, ["a", "b", "c", "d"], t),
        ]
    )
    # u1: A wins r1 (2 vs 1), B wins r2, r3 no click -> tie overall (1 win each).
    # u2: B wins; u3: tied impression (1 vs 1); u4: no clicks at all (no preference).
    clicks = _clicks([("r1", 0), ("r1", 2), ("r1", 1), ("r2", 3), ("r4", 1), ("r5", 0), ("r5", 1)])
    credit = interleaving_credit(logs, clicks, "il", "A", "B").sort("request_id")
    assert credit.select("clicks_a", "clicks_b").rows() == [
        (2, 1), (0, 1), (0, 0), (0, 1), (1, 1), (0, 0),
    ]  # fmt: skip
    prefs = user_preferences(credit)
    assert prefs.select("user_id", "wins_a", "wins_b", "ties", "score").rows() == [
        ("u1", 1, 1, 0, 0.0),
        ("u2", 0, 1, 0, 1.0),
        ("u3", 0, 0, 1, 0.0),
    ]
    res = interleaving_analysis(logs, clicks, "il", "A", "B", min_users=1)
    assert (res.users, res.users_with_preference) == (4, 3)
    assert (res.prefer_a, res.prefer_b, res.tied) == (0, 1, 2)
    assert res.delta.value == pytest.approx((1 + 2 / 2) / 3 - 0.5)
    assert res.decision == "continue"
    json.dumps(res.to_dict(), allow_nan=False)
    with pytest.raises(ValueError, match="teams"):
        interleaving_credit(logs.drop("teams"), clicks, "il", "A", "B")


# --------------------------------------------------------------------------- simulation

K, N_ITEMS = 10, 60


def _world(rng: np.random.Generator, n_users: int):
    """Shoppers of very unequal activity (1 to 30 answers each) and propensity to click; every
    answer has its own true relevance of each item."""
    answers = np.minimum(1 + rng.poisson(rng.lognormal(0.3, 1.0, n_users)), 30)
    user = np.repeat(np.arange(n_users), answers)
    bias = rng.normal(0, 1.5, n_users)[user]
    relevance = rng.normal(size=(user.size, N_ITEMS))
    return user, bias, relevance


def _rank(rng: np.random.Generator, relevance: np.ndarray, noise: float) -> np.ndarray:
    """A ranker that sees the relevance through noise: less noise, a better ranker."""
    return np.argsort(-(relevance + rng.normal(0, noise, relevance.shape)), axis=1)[:, :K]


def _click(rng, relevance: np.ndarray, shown: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Position-biased clicks: examination 1 / (1 + position)^0.7 times attraction."""
    r = np.take_along_axis(relevance, shown, 1)
    p = (1.0 / (1 + np.arange(K)) ** 0.7) / (1 + np.exp(-(1.5 * r - 3.5 + bias[:, None])))
    return rng.random(p.shape) < p


NOISE_A, NOISE_B = 1.0, 0.7  # B is the better ranker


def _ab_users_to_detect(seed: int, n_users: int) -> int | None:
    rng = np.random.default_rng(seed)
    user, bias, relevance = _world(rng, n_users)
    treat = rng.random(n_users) < 0.5
    shown = np.where(
        treat[user][:, None], _rank(rng, relevance, NOISE_B), _rank(rng, relevance, NOISE_A)
    )
    clicks = np.bincount(user, _click(rng, relevance, shown, bias).sum(1), minlength=n_users)
    return sequential_path(clicks, treat, 0.05, look_every=100).first_rejection(0.05)


def _interleaving_users_to_detect(seed: int, n_users: int):
    rng = np.random.default_rng(seed + 10_000)
    user, bias, relevance = _world(rng, n_users)
    ra, rb = _rank(rng, relevance, NOISE_A), _rank(rng, relevance, NOISE_B)
    rid = [f"s{seed}r{i}" for i in range(user.size)]
    drafts = [
        team_draft(ra[i].tolist(), rb[i].tolist(), K, seed_for(rid[i]), ("A", "B"))
        for i in range(user.size)
    ]
    shown = np.array([d[0] for d in drafts])
    clicked = _click(rng, relevance, shown, bias)
    logs = pl.DataFrame(
        {
            "request_id": rid,
            "user_id": np.char.add("u", user.astype(str)),
            "timestamp": user + np.arange(user.size) / (user.size + 1.0),
            "items": [[str(i) for i in d[0]] for d in drafts],
            "teams": [d[1] for d in drafts],
            "experiment": "il",
            "variant": "interleaved",
        }
    )
    ii, pos = np.nonzero(clicked)
    clicks = _clicks(list(zip(np.array(rid)[ii].tolist(), pos.tolist(), strict=True)))
    return interleaving_analysis(logs, clicks, "il", "A", "B", 0.05, min_users=0, look_every=20)


def test_interleaving_detects_the_better_ranker_with_several_times_fewer_users_than_ab() -> None:
    """Same shoppers, same rankers, same sequential test and alpha: the users each design needs
    until its always-valid p-value first falls below 0.05, median of 5 seeds. A/B suffers the
    spread of activity between users; interleaving compares both rankers inside each answer."""
    seeds = range(5)
    ab = [_ab_users_to_detect(s, 40_000) or 40_000 for s in seeds]
    runs = [_interleaving_users_to_detect(s, 3_000) for s in seeds]
    il = [r.detected_at_users or 3_000 for r in runs]
    assert all(r.decision == "promote:B" for r in runs), [r.reason for r in runs]
    ratio = float(np.median(ab) / np.median(il))
    print(f"users to detect: A/B {ab}, interleaving {il}, ratio {ratio:.1f}")
    assert ratio >= 4.0


def test_interleaving_aa_declares_no_preference() -> None:
    rng = np.random.default_rng(9)
    hits = 0
    for s in range(30):
        n = 400
        user, bias, relevance = _world(rng, n)
        ranking = _rank(rng, relevance, 1.0)
        rid = [f"aa{s}r{i}" for i in range(user.size)]
        drafts = [
            team_draft(ranking[i].tolist(), ranking[i].tolist(), K, seed_for(rid[i]), ("A", "B"))
            for i in range(user.size)
        ]
        clicked = _click(rng, relevance, np.array([d[0] for d in drafts]), bias)
        logs = pl.DataFrame(
            {
                "request_id": rid,
                "user_id": np.char.add("u", user.astype(str)),
                "timestamp": user.astype(float),
                "items": [[str(i) for i in d[0]] for d in drafts],
                "teams": [d[1] for d in drafts],
                "experiment": "il",
                "variant": "interleaved",
            }
        )
        ii, pos = np.nonzero(clicked)
        clicks = _clicks(list(zip(np.array(rid)[ii].tolist(), pos.tolist(), strict=True)))
        res = interleaving_analysis(logs, clicks, "il", "A", "B", min_users=0, look_every=20)
        hits += res.p_value < 0.05
    # Identical rankings credit each position to a random team: no real preference.
    assert hits <= 4
