"""The asset graph end to end: embedded defaults, PostgreSQL storage, the gate, failures."""

from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from config import get_settings
from feature_repo.event_store import open_event_store
from orchestration.definitions import build_definitions
from orchestration.environment import resources_for
from orchestration.runner import run_job
from tests.conftest import make_events
from tests.orchestration.conftest import model_versions
from training.data import EVENT_TYPES
from training.registry import CHAMPION, ModelRegistry

# Small grids keep the tests fast; the defaults are exercised by the benchmarks.
FAST = {
    "als_model": {"config": {"factors": 8, "grid_factors": [8], "grid_regularization": [1.0]}},
    "item_item_model": {"config": {"grid_ease_l2": [10.0]}},
    "item2vec_model": {"config": {"vector_size": 8, "epochs": 2}},
}


def _config(events: Path | None = None, catalog: Path | None = None, **extra: dict) -> dict:
    ops: dict = {**FAST, **extra}
    if events:
        ops["raw_events"] = {"config": {"events_path": str(events)}}
    if catalog:
        ops["item_catalog"] = {"config": {"catalog_path": str(catalog)}}
    return {"ops": ops}


def _registry() -> ModelRegistry:
    return ModelRegistry(get_settings().mlflow_tracking_uri(), get_settings().mlflow.model_name)


def test_definitions_load_with_every_asset_job_schedule_and_sensor() -> None:
    defs = build_definitions()
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {
        "raw_events",
        "item_catalog",
        "interaction_matrix",
        "training_split",
        "als_model",
        "item2vec_model",
        "item_item_model",
        "popularity_model",
        "hybrid_ranker",
        "model_evaluation",
        "champion_gate",
        "registered_model",
        "batch_recommendations",
        "item_neighbors",
        "popularity_snapshot",
        "online_features",
        "online_popularity",
        "online_catalog",
    } <= keys
    assert defs.resolve_job_def("training_job")
    assert {s.name for s in defs.schedules} >= {"hourly_ingest", "daily_training"}
    assert {s.name for s in defs.sensors} >= {"new_events_sensor", "record_run_failure"}


def test_training_job_on_embedded_defaults_registers_a_champion(
    events_csv: Path, catalog_csv: Path, recsys_home: Path, redis_env: str
) -> None:
    result = run_job("training_job", _config(events_csv, catalog_csv), persistent=False)
    assert result.success
    registered = result.output_for_node("registered_model")
    assert registered["promoted"]
    champion = _registry().get_version(CHAMPION)
    assert champion is not None and champion.version == registered["version"]
    assert champion.metrics["hybrid_validation_ndcg_at_10"] > 0
    table = result.output_for_node("model_evaluation")
    assert set(table["model"]) == {"als", "item2vec", "ease", "popularity", "hybrid"}
    assert {
        "precision@10",
        "recall@10",
        "ndcg@10",
        "map@10",
        "hit_rate@10",
        "coverage@10",
        "novelty@10",
    } <= set(table.columns)
    recs = result.output_for_node("batch_recommendations")
    assert {"generated_at", "expires_at"} <= set(recs.columns)
    events = pl.read_csv(events_csv)
    assert recs["user_id"].n_unique() == events["user_id"].n_unique()
    checks = result.get_asset_check_evaluations()
    assert checks and all(c.passed for c in checks)
    assert (recsys_home / "events").exists(), "events went to the embedded store"
    # The run is in MLflow with params, metrics and artifacts.
    run = _registry().client.get_run(registered["run_id"])
    assert "als.factors" in run.data.params
    artifacts = {a.path for a in _registry().client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/evaluation.md", "evaluation/evaluation.png"} <= artifacts
    # The promoted model's offline features reached Redis for the service.
    store = resources_for("local")["redis"].store()
    assert store.namespace == redis_env
    lists = store.item_lists(["i1"], ["itemitem", "neighbors"], k=5)
    assert len(lists["itemitem"][0]) > 0 and len(lists["neighbors"][0]) > 0
    assert len(store.global_lists(5).batch_popularity) == 5
    # The catalog reached the live catalog the service ranks with.
    catalog = pl.read_csv(catalog_csv)
    read = store.catalog(catalog["item_id"].cast(pl.String).to_list()[:3], ["category"])
    assert read.size == catalog.height
    assert read.values["category"] == catalog["category"].cast(pl.String).to_list()[:3]


def test_failed_run_registers_nothing_and_champion_keeps_serving(
    events_csv: Path, redis_env: str
) -> None:
    assert run_job("training_job", _config(events_csv), persistent=False).success
    champion = _registry().get_version(CHAMPION)
    broken = _config(item_item_model={"config": {"kind": "bogus"}})
    result = run_job("training_job", broken, persistent=False)
    assert not result.success
    after = _registry().get_version(CHAMPION)
    assert after.version == champion.version
    versions = _registry().client.search_model_versions(
        f"name='{get_settings().mlflow.model_name}'"
    )
    assert len(versions) == 1


def test_registration_is_the_last_step_and_every_check_blocks_before_it() -> None:
    graph = build_definitions().resolve_job_def("training_job").asset_layer.asset_graph
    registered = dg.AssetKey("registered_model")
    before = set(graph.upstream_key_iterator(registered))
    assert before == set(graph.executable_asset_keys) - {registered}
    checks = graph.asset_check_keys
    assert checks
    for key in checks:
        assert graph.get_check_spec(key).blocking, f"{key.name} does not block"
        assert key.asset_key in before, f"{key.name} runs after registration"


def test_run_that_fails_after_training_registers_nothing(
    events_csv: Path, champion: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redis is down: the pushes fail after every model was trained and checked.
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    result = run_job("training_job", _config(events_csv), persistent=False)
    assert not result.success
    ran = {e.step_key for e in result.all_events if e.event_type_value == "STEP_SUCCESS"}
    assert {"hybrid_ranker", "batch_recommendations", "item_neighbors"} <= ran
    assert "registered_model" not in ran
    assert model_versions() == [champion]
    assert _registry().get_version(CHAMPION).version == champion


def _one_user_one_item(n: int = 200) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": ["u1"] * n,
            "item_id": ["i1"] * n,
            "event_type": ["view"] * n,
            "timestamp": [1_700_000_000 + i for i in range(n)],
        }
    )


def _zero_ratings() -> pl.DataFrame:
    """Plenty of users and items, but every event is a rating of 0: a matrix of no confidence."""
    return make_events().with_columns(
        pl.lit("rating").cast(pl.Enum(EVENT_TYPES)).alias("event_type"),
        pl.lit(0.0).alias("value"),
        pl.lit(None, dtype=pl.String).alias("event_id"),
    )


# (events written straight into the store, what the failure says)
POISONS = {
    "one-user-one-item": (_one_user_one_item, "not enough data to train on"),
    "zero-ratings": (_zero_ratings, "interaction_matrix_not_empty on interaction_matrix"),
}


@pytest.mark.parametrize(
    ("backend", "poison"),
    [
        ("embedded", "one-user-one-item"),
        ("postgres", "one-user-one-item"),
        ("embedded", "zero-ratings"),
    ],
)
def test_run_on_a_poisoned_store_registers_nothing_and_champion_keeps_serving(
    backend: str,
    poison: str,
    champion: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    redis_env: str,
) -> None:
    if backend == "postgres":
        monkeypatch.setenv("RECSYS_POSTGRES_URL", request.getfixturevalue("postgres_url"))
    make, expected = POISONS[poison]
    events = make()
    with open_event_store(get_settings().store.postgres_url, get_settings().home) as store:
        assert store.append(events) == events.height
    result = run_job("training_job", _config(), persistent=False)
    assert not result.success
    from orchestration.runner import failure_message

    assert expected in failure_message(result)
    ran = {e.step_key for e in result.all_events if e.event_type_value == "STEP_SUCCESS"}
    assert "registered_model" not in ran and "online_features" not in ran
    assert model_versions() == [champion]
    assert _registry().get_version(CHAMPION).version == champion


def test_empty_event_store_fails_with_a_clear_message() -> None:
    result = run_job("training_job", _config(), persistent=False)
    assert not result.success
    from orchestration.runner import failure_message

    assert "event store is empty" in failure_message(result)


def test_new_events_sensor_triggers_at_threshold(
    events_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from orchestration.jobs import new_events_sensor
    from training.data import read_events

    resources = resources_for("local")
    events = read_events(events_csv)
    with resources["event_store"].open() as store:
        store.append(events.head(300))
    monkeypatch.setenv("RECSYS_RETRAIN_MIN_EVENTS", "10")

    def evaluate(cursor: str | None):  # noqa: ANN202
        ctx = dg.build_sensor_context(
            cursor=cursor,
            resources={"event_store": resources["event_store"]},
            instance=dg.DagsterInstance.ephemeral(),
        )
        return new_events_sensor(ctx)

    # The events already stored when the sensor first runs (a demo's) start no training.
    first = evaluate(None)
    assert not first.run_requests and first.cursor
    assert isinstance(evaluate(first.cursor), dg.SkipReason)
    with resources["event_store"].open() as store:
        store.append(events.slice(300))
    monkeypatch.setenv("RECSYS_RETRAIN_MIN_EVENTS", "100000")
    assert isinstance(evaluate(first.cursor), dg.SkipReason)
    monkeypatch.setenv("RECSYS_RETRAIN_MIN_EVENTS", "10")
    result = evaluate(first.cursor)
    assert len(result.run_requests) == 1 and float(result.cursor) > float(first.cursor)
    assert isinstance(evaluate(result.cursor), dg.SkipReason), "nothing new since the trigger"


@pytest.mark.postgres
def test_training_job_with_postgres_dagster_storage_event_store_and_mlflow(
    events_csv: Path,
    postgres_database,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
    recsys_home: Path,
) -> None:
    postgres_url = postgres_database()
    monkeypatch.setenv("RECSYS_POSTGRES_URL", postgres_url)
    monkeypatch.setenv("RECSYS_DAGSTER_POSTGRES_URL", postgres_database())
    # MLflow and Dagster both migrate with alembic: each needs a database of its own.
    mlflow_url = postgres_database().replace("postgresql://", "postgresql+psycopg://")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_url)
    result = run_job("training_job", _config(events_csv), resources=resources_for("local"))
    assert result.success
    assert "postgres" in (recsys_home / "dagster" / "dagster.yaml").read_text()
    instance = dg.DagsterInstance.get()
    try:
        assert instance.get_run_by_id(result.run_id) is not None
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    finally:
        instance.dispose()
    import psycopg

    with psycopg.connect(postgres_url) as conn:
        stored = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    assert stored == pl.read_csv(events_csv).height
    assert _registry().get_version(CHAMPION) is not None
    assert not (recsys_home / "events").exists(), "nothing went to the embedded store"
