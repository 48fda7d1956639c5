"""Forgetting a user reaches the next model: train, forget (recsys forget-user), retrain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from config import get_settings
from feature_repo.event_store import open_event_store
from orchestration.cli import main
from orchestration.runner import run_job
from tests.orchestration.test_pipeline import _config, _registry


def test_the_model_trained_after_forgetting_has_no_trace_of_the_user(
    events_csv: Path,
    catalog_csv: Path,
    recsys_home: Path,
    redis_env: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = run_job("training_job", _config(events_csv, catalog_csv), persistent=False)
    assert first.success
    before = _registry().load_bundle(first.output_for_node("registered_model")["version"])
    assert "u0" in set(before.user_ids.tolist()), "the user was in the first model"
    with open_event_store(get_settings().store.postgres_url, recsys_home) as store:
        assert not store.read_recommendations("u0").is_empty(), "and had batch lists"

    capsys.readouterr()
    assert main(["forget-user", "u0", "--actor", "dpo@shop", "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["removed"]["events"] > 0 and done["actor"] == "dpo@shop"

    # Retrained on what the store holds now.
    second = run_job("training_job", _config(), persistent=False)
    assert second.success
    version = second.output_for_node("registered_model")["version"]
    after = _registry().load_bundle(version)
    users = set(after.user_ids.tolist())
    assert "u0" not in users and "u1" in users
    recs = second.output_for_node("batch_recommendations")
    assert "u0" not in set(recs["user_id"])
    with open_event_store(get_settings().store.postgres_url, recsys_home) as store:
        assert store.read_recommendations("u0").is_empty()
        lists = store.read_recommendations("u1")
        assert not lists.is_empty() and set(lists["model_version"]) == {str(version)}
        assert "u0" not in set(store.read()["user_id"])
