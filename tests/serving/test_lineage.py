"""Lineage: a model trained by the Dagster training job and served names its MLflow and Dagster
runs in every answer, and `recsys lineage` prints the chain down to the training data."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from starlette.testclient import TestClient

from orchestration.cli import main
from orchestration.runner import run_job
from tests.orchestration.test_pipeline import _config
from tests.serving.conftest import Registered


def test_a_dagster_trained_model_names_its_runs_in_every_answer_and_in_recsys_lineage(
    service_app,
    namespace: str,
    events_csv: Path,
    catalog_csv: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    result = run_job("training_job", _config(events_csv, catalog_csv), show_progress=False)
    assert result.success
    registered = result.output_for_node("registered_model")
    version, mlflow_run = registered["version"], registered["run_id"]
    expected = {
        "model_version": version,
        "mlflow_run_id": mlflow_run,
        "dagster_run_id": result.run_id,
        "trained_by": "dagster",
    }
    with TestClient(service_app) as client:
        first = client.post("/recommend", json={"user_id": "u1", "k": 5}).json()
        cached = client.post("/recommend", json={"user_id": "u1", "k": 5}).json()
        assert first["lineage"] == expected and first["model_version"] == version
        assert cached["cached"] and cached["lineage"] == expected
        for route, body in (("/popular", {"k": 3}), ("/similar_items", {"item_id": "i1"})):
            assert client.post(route, json=body).json()["lineage"] == expected, route
        assert client.post("/trending", json={"k": 3}).json()["lineage"] == expected

    capsys.readouterr()
    assert main(["lineage", version, "--json"]) == 0
    chain = json.loads(capsys.readouterr().out)
    events = pl.read_csv(events_csv)
    assert chain["version"] == version and "champion" in chain["aliases"]
    assert chain["mlflow_run"]["run_id"] == mlflow_run
    assert chain["mlflow_run"]["metrics"]["hybrid_validation_ndcg_at_10"] > 0
    assert chain["dagster_run"] == {
        "run_id": result.run_id,
        "known": True,
        "status": "SUCCESS",
        "job_name": "training_job",
    }
    assert chain["data"] == {
        "event_count": events.height,
        "min_timestamp": int(events["timestamp"].min()),
        "max_timestamp": int(events["timestamp"].max()),
        "store": "parquet",
    }
    assert main(["lineage", version]) == 0
    text = capsys.readouterr().out
    assert f"Dagster run: {result.run_id} (training_job, SUCCESS)" in text
    assert f"data: {events.height} events from " in text and "(parquet event store)" in text


def test_a_model_registered_outside_dagster_says_how_it_was_trained(
    service_app, champion: Registered, capsys: pytest.CaptureFixture
) -> None:
    with TestClient(service_app) as fresh:
        answer = fresh.post("/recommend", json={"user_id": "u1", "k": 3}).json()
    run_id = champion.registry.get_version("champion").run_id
    assert answer["lineage"] == {
        "model_version": "1",
        "mlflow_run_id": run_id,
        "dagster_run_id": None,
        "trained_by": "python",
    }
    assert main(["lineage", "1", "--json"]) == 0
    chain = json.loads(capsys.readouterr().out)
    assert chain["dagster_run"] is None and chain["trained_by"] == "python"
    assert main(["lineage", "1"]) == 0
    assert "Dagster run: none (not trained by Dagster)" in capsys.readouterr().out


def test_lineage_of_an_unknown_version_is_a_clear_error(
    champion: Registered, capsys: pytest.CaptureFixture
) -> None:
    assert main(["lineage", "7"]) == 2
    err = capsys.readouterr().err
    assert "has no version '7'; registered versions: 1" in err


def test_without_a_model_the_answer_has_no_lineage(client: TestClient) -> None:
    answer = client.post("/recommend", json={"user_id": "u1", "k": 3}).json()
    assert answer["variant"] == "popularity" and answer["lineage"] is None
