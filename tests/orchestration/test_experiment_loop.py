"""The experiment loop as a user runs it: `recsys experiment start`, impressions and attributed
clicks in the event store, the `experiment_report` asset materialised, the `experiment_decisions`
sensor promoting the winner (decision recorded on both versions, an MLflow report run), and
`recsys rollback` moving the champion back; a broken split is flagged and alerted."""

from __future__ import annotations

import json

import dagster as dg
import mlflow
import numpy as np
import polars as pl
import pytest

from assets.experiments import experiment_report
from config import get_settings
from feature_repo.event_store import open_event_store
from feature_repo.experiment_store import open_experiment_store
from orchestration.cli import main
from orchestration.environment import resources_for
from orchestration.jobs import experiment_decisions
from tests.conftest import tiny_bundle
from tests.orchestration.conftest import pipeline_registry
from training.experiments import assign
from training.registry import CHALLENGER, CHAMPION, GATE_METRIC


@pytest.fixture
def challenger(champion: str) -> str:
    registry = pipeline_registry()
    with registry.start_run("challenger-fixture"):
        mlflow.log_metric(GATE_METRIC, 0.2)
        return registry.log_bundle(tiny_bundle())


def _served(experiment_name: str, ctr: dict[str, float], n_users: int, skew: float = 0.0):
    """Impressions of 5 items for users assigned as the service would, and their clicks."""
    config = get_settings()
    with open_experiment_store(config.store.postgres_url, config.home_dir()) as store:
        experiment = store.get(experiment_name)
    users = [f"user{i}" for i in range(n_users)]
    arms = assign(experiment, users)
    rng = np.random.default_rng(1)
    names = [a.name for a in experiment.arms]
    logs, events = [], []
    for i, (user, arm) in enumerate(zip(users, arms, strict=True)):
        variant = names[arm]
        if skew and variant == names[1] and rng.random() < skew:
            variant = names[0]  # a broken split: some treatment users logged as control
        items = [f"i{j}" for j in rng.choice(30, 5, replace=False)]
        request_id = f"req-{i}"
        stamp = experiment.started_at + 0.5 + i * 0.002
        logs.append(
            {"request_id": request_id, "user_id": user, "timestamp": stamp, "route": "/recommend",
             "items": items, "scores": [1.0] * 5, "sources": ["als"] * 5, "variant": variant,
             "experiment": experiment_name, "model_version": "1", "latency_ms": 4.0,
             "status": "ok", "cached": False}
        )  # fmt: skip
        for position, item in enumerate(items):
            if rng.random() < ctr[variant]:
                events.append(
                    {"user_id": user, "item_id": item, "event_type": "click",
                     "timestamp": int(stamp) + 2, "request_id": request_id, "position": position}
                )  # fmt: skip
    with open_event_store(config.store.postgres_url, config.home_dir()) as store:
        store.append_impressions(pl.DataFrame(logs))
        store.append(pl.DataFrame(events))


def _decide(instance: dg.DagsterInstance) -> dict:
    resources = resources_for()
    result = dg.materialize([experiment_report], instance=instance, resources=resources)
    decisions = result.asset_materializations_for_node("experiment_report")[0].metadata
    context = dg.build_sensor_context(instance=instance, resources=resources)
    experiment_decisions(context)
    return decisions["decisions"].value


def test_a_winning_challenger_is_promoted_by_the_sensor_and_rolled_back_by_hand(
    champion: str, challenger: str, capsys: pytest.CaptureFixture
) -> None:
    assert (
        main(["experiment", "start", "e1", "--treatment", "challenger", "--min-users", "100",
              "--min-hours", "0"]) == 0
    )  # fmt: skip
    _served("e1", {"champion": 0.05, "challenger": 0.25}, 1200)
    instance = dg.DagsterInstance.ephemeral()
    decisions = _decide(instance)
    assert decisions["e1"]["decision"] == "promote:challenger", decisions
    registry = pipeline_registry()
    assert registry.get_version(CHAMPION).version == challenger
    assert registry.get_version(CHALLENGER) is None
    for version in (champion, challenger):
        tags = registry.client.get_model_version(registry.model_name, version).tags
        assert json.loads(tags["experiment.e1"])["promoted"] == challenger
    run = registry.client.get_run(decisions["e1"]["mlflow_run_id"])
    assert run.data.tags["recsys.decision"] == "promote:challenger"
    capsys.readouterr()
    assert main(["experiment", "list"]) == 0
    assert "e1: decided" in capsys.readouterr().out
    # The sensor acts once per report.
    context = dg.build_sensor_context(instance=instance, resources=resources_for())
    experiment_decisions(context)
    assert main(["rollback"]) == 0
    assert registry.get_version(CHAMPION).version == champion
    assert main(["rollback"]) == 1  # nothing left to roll back to
    assert "nothing to roll back to" in capsys.readouterr().err


def test_a_broken_split_is_flagged_and_alerted(champion: str, challenger: str) -> None:
    assert main(["experiment", "start", "e2", "--treatment", "challenger", "--json"]) == 0
    _served("e2", {"champion": 0.1, "challenger": 0.1}, 3000, skew=0.2)
    decisions = _decide(dg.DagsterInstance.ephemeral())
    assert decisions["e2"]["decision"] == "invalid:srm", decisions
    assert pipeline_registry().get_version(CHAMPION).version == champion
    failures = (get_settings().home_dir() / "run_failures.jsonl").read_text()
    assert "e2" in failures and "sample ratio mismatch" in failures
    assert main(["experiment", "status", "e2"]) == 0
