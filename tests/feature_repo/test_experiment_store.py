"""The experiment store on both backends: the embedded JSON file and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from feature_repo.experiment_store import (
    ExperimentStore,
    FileExperimentStore,
    UnknownExperiment,
    open_experiment_store,
)
from training.experiments import ExperimentError, new_experiment


@pytest.fixture(params=["file", "postgres"])
def experiments(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ExperimentStore]:
    if request.param == "file":
        store = open_experiment_store(None, tmp_path)
        assert isinstance(store, FileExperimentStore)
    else:
        store = open_experiment_store(request.getfixturevalue("postgres_url"), tmp_path)
    with store:
        yield store


def test_start_list_stop_and_restart(experiments: ExperimentStore) -> None:
    first = experiments.start(new_experiment("e1", "champion", ["popularity"], now=10.0))
    experiments.start(new_experiment("e2", "champion", ["challenger"], traffic=0.2, now=20.0))
    assert [e.name for e in experiments.all()] == ["e1", "e2"]
    assert experiments.get("e1") == first
    with pytest.raises(ExperimentError, match="already running"):
        experiments.start(new_experiment("e1", "champion", ["popularity"], now=30.0))
    stopped = experiments.stop("e1", now=40.0)
    assert (stopped.status, stopped.stopped_at) == ("stopped", 40.0)
    assert [e.name for e in experiments.running()] == ["e2"]
    # A stopped name may start again, with a new salt.
    again = experiments.start(new_experiment("e1", "champion", ["popularity"], now=50.0))
    assert again.salt != first.salt and experiments.get("e1").running
    with pytest.raises(UnknownExperiment, match="no experiment named 'nope'"):
        experiments.get("nope")


def test_a_decision_is_kept(experiments: ExperimentStore) -> None:
    experiment = experiments.start(new_experiment("d", "champion", ["popularity"], now=1.0))
    decided = experiment.stopped("decided", 2.0, {"decision": "promote:champion", "p": 0.01})
    experiments.update(decided)
    assert experiments.get("d").decision == {"decision": "promote:champion", "p": 0.01}


def test_a_broken_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "experiments.json").write_text("{not json")
    with pytest.raises(ExperimentError, match="experiments.json is not valid JSON"):
        open_experiment_store(None, tmp_path).all()
