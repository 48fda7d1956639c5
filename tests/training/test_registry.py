"""The MLflow registry wrapper: challenger alias, the gate, and bundle download."""

import logging
import warnings
from pathlib import Path

import mlflow
import pytest

from tests.conftest import tiny_bundle
from training.registry import CHALLENGER, CHAMPION, GATE_METRIC, ModelRegistry


@pytest.fixture(scope="module")
def bundle():  # noqa: ANN201
    return tiny_bundle()


def _register(registry: ModelRegistry, bundle, value: float) -> str:  # noqa: ANN001
    with registry.start_run("test"):
        mlflow.log_metric(GATE_METRIC, value)
        return registry.log_bundle(bundle)


def test_gate_promotes_only_a_better_challenger(registry: ModelRegistry, bundle) -> None:  # noqa: ANN001
    assert registry.get_version(CHAMPION) is None
    v1 = _register(registry, bundle, 0.30)
    assert registry.get_version(CHALLENGER).version == v1
    assert registry.gate(v1, 0.30, margin=0.01).promoted
    assert registry.get_version(CHAMPION).version == v1
    assert registry.get_version(CHALLENGER) is None

    v2 = _register(registry, bundle, 0.305)
    decision = registry.gate(v2, 0.305, margin=0.01)
    assert not decision.promoted and "margin" in decision.reason
    assert registry.get_version(CHAMPION).version == v1
    assert registry.get_version(CHALLENGER).version == v2

    v3 = _register(registry, bundle, 0.32)
    assert registry.gate(v3, 0.32, margin=0.01).promoted
    assert registry.get_version(CHAMPION).version == v3


def test_registered_bundle_loads_and_recommends(registry: ModelRegistry, bundle) -> None:  # noqa: ANN001
    version = _register(registry, bundle, 0.3)
    loaded = registry.load_bundle(version)
    assert loaded.weights == bundle.weights
    again = registry.load_bundle(version)  # served from the cache
    assert (
        again.recommend_ids(["u1"], k=3)["item_id"].to_list()
        == loaded.recommend_ids(["u1"], k=3)["item_id"].to_list()
    )


def test_pyfunc_flavour_predicts(
    registry: ModelRegistry,
    bundle,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pandas as pd

    version = _register(registry, bundle, 0.3)
    # The model is logged from code, so it loads where pickle deserialisation is turned off.
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(registry.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{registry.model_name}/{version}")
    out = model.predict(pd.DataFrame({"user_id": ["u1", "nobody"]}), params={"k": 4})
    assert list(out.columns) == ["user_id", "item_id", "rank", "score"]
    assert len(out) == 8
    # The logged input example is the first known users, and the model answers it.
    example = model.input_example
    assert example["user_id"].tolist() == [str(u) for u in bundle.user_ids[:3]]
    answered = model.predict(example, params={"k": 2})
    assert answered["user_id"].tolist() == [u for u in example["user_id"] for _ in range(2)]


def test_log_bundle_logs_without_mlflow_warnings(registry: ModelRegistry, bundle) -> None:  # noqa: ANN001
    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    # MLflow's logger does not propagate to the root logger, so caplog would not see it.
    mlflow_logger = logging.getLogger("mlflow")
    collect = Collect()
    mlflow_logger.addHandler(collect)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _register(registry, bundle, 0.3)
    finally:
        mlflow_logger.removeHandler(collect)
    assert [r.getMessage() for r in collect.records] == []
    # Deprecation warnings of MLflow's own SQLAlchemy use are not about how the model is logged.
    user_warnings = [w for w in caught if issubclass(w.category, UserWarning)]
    assert [str(w.message) for w in user_warnings if "mlflow" in w.filename] == []


def test_decide_answers_like_the_gate_and_changes_nothing(registry: ModelRegistry, bundle) -> None:  # noqa: ANN001
    assert registry.decide(0.1, margin=0.0).promoted, "no champion yet"
    v1 = _register(registry, bundle, 0.30)
    assert registry.decide(0.30, margin=0.0).promoted
    assert registry.get_version(CHAMPION) is None, "deciding promoted nothing"
    assert registry.gate(v1, 0.30, margin=0.0).promoted
    worse = registry.decide(0.305, margin=0.01)
    assert not worse.promoted and worse.champion_version == v1
    assert registry.get_version(CHAMPION).version == v1


def test_bundle_download_uses_this_registry_not_mlflows_global_store(
    registry: ModelRegistry, bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    """A service never calls mlflow.set_tracking_uri: the download must not fall back to
    MLflow's process-wide default store (which creates an empty ./mlflow.db)."""
    version = _register(registry, bundle, 0.3)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    default = f"sqlite:///{elsewhere / 'mlflow.db'}"
    mlflow.set_tracking_uri(default)
    mlflow.set_registry_uri(default)
    try:
        fresh = ModelRegistry(registry.tracking_uri, registry.model_name, cache_dir=tmp_path / "c2")
        loaded = fresh.load_bundle(version)
    finally:
        mlflow.set_tracking_uri("")
        mlflow.set_registry_uri("")
    assert list(loaded.user_ids) == list(bundle.user_ids)
    assert list(elsewhere.iterdir()) == []
