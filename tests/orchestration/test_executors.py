"""Steps beyond the test's process: the multiprocess executor (the default of `recsys pipeline`),
dagster-celery workers on a real broker, and the Kubernetes instance template."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import get_args

import dagster as dg
import pytest
import yaml
from dagster._config import validate_config
from dagster._core.instance.config import dagster_instance_config
from dagster._serdes.config_class import class_from_code_pointer

from config import get_settings
from config.settings import OrchestrationSettings
from orchestration.environment import (
    available_cores,
    celery_config,
    concurrent_steps,
    executor_for,
    resources_for,
    step_threads,
)
from orchestration.runner import ensure_dagster_home, outputs, run_job
from tests.conftest import services_required
from tests.orchestration.test_pipeline import _config

ROOT = Path(__file__).resolve().parents[2]
K8S_TEMPLATE = ROOT / "deploy" / "dagster-k8s.yaml"
TRAINING_STEPS = ("als_model", "item2vec_model", "item_item_model", "popularity_model")


def _step_pids(result: dg.JobExecutionResult) -> dict[str, int]:
    return {
        event.step_key: event.pid
        for event in result.all_events
        if event.event_type_value == "STEP_START" and event.step_key and event.pid
    }


def test_the_default_executor_is_multiprocess_with_a_step_per_core(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RECSYS_DAGSTER_EXECUTOR")
    assert get_settings().orchestration.dagster_executor == "multiprocess"
    assert executor_for().name == "multiprocess"
    assert concurrent_steps() == available_cores()
    # The cores are shared out among the steps at once, one thread each at the least.
    assert step_threads() == max(1, available_cores() // available_cores())
    monkeypatch.setenv("RECSYS_DAGSTER_MAX_CONCURRENT", "1")
    assert step_threads() == available_cores()
    monkeypatch.setenv("RECSYS_STEP_THREADS", "3")
    assert resources_for("local")["compute"].threads == 3
    monkeypatch.setenv("RECSYS_DAGSTER_EXECUTOR", "in_process")
    monkeypatch.delenv("RECSYS_STEP_THREADS")
    assert executor_for().name == "in_process" and step_threads() == available_cores()


def test_the_celery_executor_without_a_broker_says_which_setting_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RECSYS_DAGSTER_EXECUTOR", "celery")
    with pytest.raises(ValueError, match="RECSYS_CELERY_BROKER_URL"):
        executor_for()


def test_multiprocess_executor_runs_the_training_job_with_each_step_in_its_own_process(
    monkeypatch: pytest.MonkeyPatch, events_csv: Path, catalog_csv: Path, redis_env: str
) -> None:
    monkeypatch.setenv("RECSYS_DAGSTER_EXECUTOR", "multiprocess")
    monkeypatch.setenv("RECSYS_DAGSTER_MAX_CONCURRENT", "2")
    result = run_job("training_job", _config(events_csv, catalog_csv), show_progress=False)
    assert isinstance(result, dg.JobExecutionResult), "not executed out of process"
    assert result.success
    pids = _step_pids(result)
    assert os.getpid() not in pids.values()
    assert len({pids[step] for step in TRAINING_STEPS}) == len(TRAINING_STEPS)
    # Outputs crossed processes through the filesystem IO manager of the persistent instance.
    storage = get_settings().dagster_home() / "storage"
    assert (storage / "als_model").is_file() and (storage / "hybrid_ranker").is_file()
    evaluation, registered = outputs(result, ["model_evaluation", "registered_model"])
    assert set(evaluation["model"]) == {"als", "item2vec", "ease", "popularity", "hybrid"}
    assert registered["promoted"]
    run = dg.DagsterInstance.get().get_run_by_id(result.run_id)
    assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
    # The step processes wrote to the same embedded (or test) Redis the service reads.
    store = resources_for("local")["redis"].store()
    assert store.namespace == redis_env
    assert len(store.global_lists(5).batch_popularity) == 5


def _celery_broker() -> str:
    """The broker of the Celery test: RECSYS_TEST_CELERY_BROKER_URL (CI sets RabbitMQ), else the
    local RabbitMQ; skips (fails on CI) when it does not answer."""
    given = os.environ.get("RECSYS_TEST_CELERY_BROKER_URL")
    url = given or "amqp://guest:guest@127.0.0.1:5672//"
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001 - any failure to connect means no broker
        if given and services_required():
            pytest.fail(f"the Celery broker {url} is unreachable: {exc}")
        pytest.skip(
            f"needs a Celery broker: {url} is unreachable ({exc}); set "
            "RECSYS_TEST_CELERY_BROKER_URL to amqp://... or redis://..."
        )
    return url


@pytest.mark.timeout(300)
def test_celery_executor_runs_steps_on_a_dagster_celery_worker(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    events_csv: Path,
    catalog_csv: Path,
    redis_env: str,
) -> None:
    broker = _celery_broker()
    monkeypatch.setenv("RECSYS_DAGSTER_EXECUTOR", "celery")
    monkeypatch.setenv("RECSYS_CELERY_BROKER_URL", broker)
    # A queue of this test's own: another worker on the same broker takes none of its steps.
    queue = f"recsys-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("RECSYS_CELERY_QUEUE", queue)
    ensure_dagster_home()
    # The instance's SQLite storage is created here, before the worker opens it too.
    dg.DagsterInstance.get()
    worker_yaml = tmp_path / "celery-worker.yaml"
    worker_yaml.write_text(yaml.safe_dump({"execution": {"config": celery_config()}}))
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(
            [
                str(Path(bin_dir) / "dagster-celery"),
                "worker",
                "start",
                "-A",
                "dagster_celery.app",
                "-y",
                str(worker_yaml),
                "-q",
                queue,
                "--",
                "--concurrency",
                "2",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        ops = {
            "raw_events": {"config": {"events_path": str(events_csv)}},
            "item_catalog": {"config": {"catalog_path": str(catalog_csv)}},
        }
        result = run_job("ingest_job", {"ops": ops}, show_progress=False)
        assert result.success, log.read_text()[-3000:]
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
    assert isinstance(result, dg.JobExecutionResult)
    pids = _step_pids(result)
    assert {"raw_events", "online_popularity"} <= set(pids)
    assert os.getpid() not in pids.values(), "a step ran in the test's process"
    # The worker received and finished the steps (the executor sends one task per step).
    worker_log = log.read_text()
    assert worker_log.count("Task execute_plan[") >= 2 * len(pids), "the worker ran no step"
    assert worker_log.count("] succeeded") >= len(pids)
    store = resources_for("local")["redis"].store()
    assert store.namespace == redis_env
    # The worker's steps pushed the live catalog and the popularity snapshot to Redis.
    lists = store.global_lists(5)
    assert lists.catalog_version is not None and len(lists.batch_popularity) > 0


def test_kubernetes_instance_template_runs_on_dagster_k8s_with_postgres_storage() -> None:
    config = yaml.safe_load(K8S_TEMPLATE.read_text())
    launcher = config["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", "K8sRunLauncher")
    assert config["storage"]["postgres"]["postgres_url"] == {"env": "RECSYS_DAGSTER_POSTGRES_URL"}
    # Dagster's own schema of dagster.yaml accepts the file.
    dagster_instance_config(str(K8S_TEMPLATE.parent), K8S_TEMPLATE.name)
    # Each configurable class exists and takes its config (checked without a cluster).
    for key in ("run_launcher", "run_coordinator", "local_artifact_storage", "compute_logs"):
        entry = config[key]
        # Dagster reads `dagster.core.*` in dagster.yaml as its `dagster._core` modules.
        module = entry["module"].replace("dagster.core.", "dagster._core.")
        cls = class_from_code_pointer(module, entry["class"])
        checked = validate_config(cls.config_type(), entry.get("config") or {})
        assert checked.success, f"{key}: {[e.message for e in checked.errors]}"
    # The run pods execute each step as a Kubernetes job, an executor the settings know.
    env_vars = dict(v.split("=", 1) for v in launcher["config"]["env_vars"])
    executors = get_args(OrchestrationSettings.model_fields["dagster_executor"].annotation)
    assert env_vars["RECSYS_DAGSTER_EXECUTOR"] == "k8s" and "k8s" in executors
    assert executor_for("k8s").name == "k8s"
    # Step outputs live on a volume every step pod mounts.
    mounts = {m["name"]: m["mountPath"] for m in launcher["config"]["volume_mounts"]}
    base_dir = config["local_artifact_storage"]["config"]["base_dir"]
    assert any(base_dir.startswith(path) for path in mounts.values())
