"""Experiment definitions and the assignment of users to arms."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from training.experiments import (
    Experiment,
    ExperimentError,
    assign,
    assign_one,
    choose,
    new_experiment,
    parse_target,
)

USERS = [f"u{i}" for i in range(40_000)]


def test_targets_are_checked() -> None:
    assert parse_target("champion") == "champion"
    assert parse_target("version:12") == "version:12"
    assert parse_target("7") == "version:7"
    for bad in ("champ", "version:0", "version:x", ""):
        with pytest.raises(ExperimentError, match="unknown arm target"):
            parse_target(bad)


def test_definitions_are_validated() -> None:
    with pytest.raises(ExperimentError, match="invalid experiment name"):
        new_experiment("no spaces", "champion", ["popularity"])
    with pytest.raises(ExperimentError, match="at least one treatment"):
        new_experiment("e1", "champion", [])
    with pytest.raises(ExperimentError, match="traffic"):
        new_experiment("e1", "champion", ["popularity"], traffic=0)
    with pytest.raises(ExperimentError, match="one share per arm"):
        new_experiment("e1", "champion", ["popularity"], shares=[1, 1, 1])
    with pytest.raises(ExperimentError, match="exactly two rankers"):
        new_experiment("e1", "champion", ["popularity", "challenger"], kind="interleave")


def test_an_a_a_test_gets_distinct_arm_names_and_survives_a_round_trip() -> None:
    experiment = new_experiment("aa", "champion", ["champion"], now=100.0)
    assert [a.name for a in experiment.arms] == ["champion", "champion-2"]
    assert Experiment.from_dict(experiment.to_dict()) == experiment
    assert new_experiment("v", "version:3", ["version:4"]).versions() == {"3", "4"}


def test_assignment_is_deterministic_balanced_and_respects_shares_and_traffic() -> None:
    experiment = new_experiment("split", "champion", ["popularity"], shares=[3, 1], now=1.0)
    arms = assign(experiment, USERS)
    assert np.array_equal(arms, assign(experiment, USERS))  # stable
    counts = np.bincount(arms, minlength=2)
    # A chi-squared test of the 75/25 split: a broken hash would fail it.
    assert stats.chisquare(counts, len(USERS) * np.array([0.75, 0.25])).pvalue > 0.001
    assert assign_one(experiment, "u7").name == experiment.arms[arms[7]].name

    half = new_experiment("half", "champion", ["popularity"], traffic=0.5, now=1.0)
    inside = assign(half, USERS) >= 0
    assert abs(inside.mean() - 0.5) < 0.02


def test_two_experiments_assign_independently() -> None:
    a = assign(new_experiment("a", "champion", ["popularity"], now=1.0), USERS)
    b = assign(new_experiment("b", "champion", ["popularity"], now=1.0), USERS)
    table = np.histogram2d(a, b, bins=2)[0]
    assert stats.chi2_contingency(table).pvalue > 0.001
    # A restarted experiment of the same name gets a new salt, so a new shuffle.
    again = assign(new_experiment("a", "champion", ["popularity"], now=2.0), USERS)
    assert (again != a).mean() > 0.4


def test_a_user_is_in_at_most_one_experiment_and_the_later_ones_stay_balanced() -> None:
    first = new_experiment("first", "champion", ["popularity"], traffic=0.5, now=1.0)
    second = new_experiment("second", "champion", ["challenger"], now=2.0)
    chosen = [choose([first, second], u) for u in USERS[:8000]]
    names = np.array([c[0].name for c in chosen])
    assert abs((names == "first").mean() - 0.5) < 0.03
    in_second = [c[1].name for c in chosen if c[0].name == "second"]
    share = np.mean([name == "challenger" for name in in_second])
    assert abs(share - 0.5) < 0.04
    stopped = first.stopped("stopped", 5.0)
    assert all(choose([stopped, second], u)[0].name == "second" for u in USERS[:100])
