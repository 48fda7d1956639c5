"""Acting on experiment decisions against a real MLflow registry, and the report on logs."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from tests.training.test_registry import _register
from training.experiment_report import (
    act,
    log_report_run,
    metric_over_time,
    power_note,
    report,
    summary,
)
from training.experiments import new_experiment
from training.registry import CHALLENGER, CHAMPION, PREVIOUS_CHAMPION, ModelRegistry


@pytest.fixture
def two_versions(registry: ModelRegistry) -> tuple[str, str]:
    from tests.conftest import tiny_bundle

    bundle = tiny_bundle()
    v1 = _register(registry, bundle, 0.3)
    registry.gate(v1, 0.3, margin=0.0)
    v2 = _register(registry, bundle, 0.2)  # the challenger
    return v1, v2


def test_a_winning_challenger_is_promoted_and_can_be_rolled_back_by_hand(
    registry: ModelRegistry, two_versions: tuple[str, str]
) -> None:
    v1, v2 = two_versions
    experiment = new_experiment("win", "champion", ["challenger"], now=1.0)
    action, decided = act(experiment, "promote:challenger", "better", {"p": 0.01}, registry, 2.0)
    assert (action.promoted, action.champion_before, action.champion_after) == (v2, v1, v2)
    assert registry.get_version(CHAMPION).version == v2
    assert registry.get_version(PREVIOUS_CHAMPION).version == v1
    assert registry.get_version(CHALLENGER) is None
    assert decided.status == "decided" and decided.decision["decision"] == "promote:challenger"
    # The decision is on both versions.
    for version in (v1, v2):
        tags = registry.client.get_model_version("test-model", version).tags
        assert json.loads(tags["experiment.win"])["promoted"] == v2
    assert registry.rollback("by hand") == (v2, v1)
    assert registry.get_version(CHAMPION).version == v1
    with pytest.raises(RuntimeError, match="nothing to roll back to"):
        registry.rollback("again")


def test_a_losing_challenger_loses_its_alias_and_the_champion_stays(
    registry: ModelRegistry, two_versions: tuple[str, str]
) -> None:
    v1, v2 = two_versions
    experiment = new_experiment("lose", "champion", ["challenger"], now=1.0)
    action, _ = act(experiment, "rollback:challenger", "worse", {}, registry, 2.0)
    assert action.rolled_back == v2 and action.champion_after == v1
    assert registry.get_version(CHALLENGER) is None


def test_a_champion_that_wins_against_popularity_keeps_its_alias(
    registry: ModelRegistry, two_versions: tuple[str, str]
) -> None:
    v1, _ = two_versions
    experiment = new_experiment("pop", "popularity", ["champion"], now=1.0)
    action, decided = act(experiment, "promote:champion", "better", {}, registry, 2.0)
    assert action.promoted is None and action.champion_after == v1
    assert decided.decision["champion_before"] == decided.decision["champion_after"] == v1
    # Continue changes nothing.
    action, same = act(experiment, "continue", "collecting", {}, registry, 3.0)
    assert not action.stopped and same == experiment


def _logs_and_events(n_users: int, ctr: dict[str, float], seed: int = 0):
    """Impressions of 5 items per user per variant and clicks with the given per-item rates."""
    rng = np.random.default_rng(seed)
    rows, events = [], []
    arms = list(ctr)
    for i in range(n_users):
        variant = arms[i % len(arms)]
        items = [f"i{j}" for j in rng.choice(50, 5, replace=False)]
        request_id = f"r{i}"
        rows.append(
            {
                "request_id": request_id,
                "user_id": f"u{i}",
                "timestamp": 1000.0 + i,
                "route": "recommend",
                "items": items,
                "scores": [1.0] * 5,
                "sources": ["als"] * 5,
                "variant": variant,
                "experiment": "e",
                "model_version": "1",
                "latency_ms": 5.0,
                "status": "ok",
                "context": None,
            }
        )
        for position, item in enumerate(items):
            if rng.random() < ctr[variant]:
                events.append((f"u{i}", item, "click", 1000 + i + 5, request_id, position))
    logs = pl.DataFrame(rows)
    frame = pl.DataFrame(
        events,
        schema=["user_id", "item_id", "event_type", "timestamp", "request_id", "position"],
        orient="row",
    ).with_columns(pl.col("timestamp").cast(pl.Int64), pl.lit(None, pl.Float64).alias("value"))
    return logs, frame


def test_report_decides_and_logs_an_mlflow_run(registry: ModelRegistry) -> None:
    experiment = new_experiment(
        "e", "champion", ["popularity"], min_users=100, min_duration_s=0, now=1000.0
    )
    logs, events = _logs_and_events(4000, {"champion": 0.20, "popularity": 0.08})
    analysis = report(experiment, logs, events, now=6000.0)
    assert analysis.decision == "rollback:popularity", analysis.reason
    assert "sample ratio" in summary(analysis)
    assert "needs about" in power_note(analysis, experiment)
    over_time = metric_over_time(experiment, logs, events)
    last = over_time.group_by("variant").agg(pl.col("ctr").last())
    rates = dict(zip(last["variant"], last["ctr"], strict=True))
    assert rates["champion"] > 0.15 > 0.1 > rates["popularity"]
    run_id = log_report_run(registry, experiment, analysis, logs, events)
    run = registry.client.get_run(run_id)
    assert run.data.tags["recsys.decision"] == "rollback:popularity"
    assert run.data.metrics["champion.users"] == 2000
    artifacts = {a.path for a in registry.client.list_artifacts(run_id)}
    assert {"analysis.json", "ctr_over_time.png"} <= artifacts
