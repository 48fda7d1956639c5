"""orchestration/stack.py's table of services against docker-compose.yml (commands, environment,
health checks, dependencies), and the local rendering `recsys stack` runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestration.stack import (
    COMPOSE,
    EXTERNAL,
    MARKER,
    PLATFORM_ENV,
    POSTGRES_DURABILITY,
    REDIS_DURABILITY,
    SERVICES,
    SETTINGS,
    Process,
    Stack,
    Target,
    by_name,
    durability_warnings,
    platform_environment,
    processes,
    render,
)
from tests.test_docker_compose import (
    COMPOSE_FILE,
    depends_on,
    environment,
    interpolate,
    option,
    tokens,
    volume_mounts,
)

# Compose's monitoring services: they scrape the recommender; the stack leaves them out.
MONITORING = ("prometheus", "grafana")


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return interpolate(raw, {})["services"]


def test_the_table_names_every_platform_service(services: dict[str, Any]) -> None:
    assert set(services) == {s.name for s in SERVICES} | set(EXTERNAL) | set(MONITORING)


@pytest.mark.parametrize("name", [s.name for s in SERVICES])
def test_compose_runs_the_tables_command(services: dict[str, Any], name: str) -> None:
    service = by_name(name)
    expected = render(service.command, COMPOSE.values(service))
    assert tokens(services[name]["command"]) == expected


@pytest.mark.parametrize("name", [s.name for s in SERVICES])
def test_compose_has_the_tables_health_check(services: dict[str, Any], name: str) -> None:
    service = by_name(name)
    check = services[name].get("healthcheck")
    if service.health is None:
        assert check is None
        return
    assert tokens(check["test"]) == ["CMD", *render(service.health.test, COMPOSE.values(service))]
    timing = {
        "interval": service.health.interval,
        "timeout": service.health.timeout,
        "retries": service.health.retries,
        "start_period": service.health.start_period,
    }
    found = {
        "interval": check["interval"],
        "timeout": check["timeout"],
        "retries": check["retries"],
        "start_period": check.get("start_period", "0s"),
    }
    assert found == {
        key: value if key == "retries" else f"{value}s" for key, value in timing.items()
    }


@pytest.mark.parametrize("name", [s.name for s in SERVICES])
def test_compose_waits_for_what_the_table_does(services: dict[str, Any], name: str) -> None:
    assert set(depends_on(services[name])) == set(by_name(name).depends_on)


def test_the_table_starts_dependencies_first() -> None:
    seen: set[str] = set(EXTERNAL)
    for service in SERVICES:
        assert set(service.depends_on) <= seen, f"{service.name} starts before its dependency"
        seen.add(service.name)


def test_compose_shares_the_tables_platform_environment(
    raw: dict[str, Any], services: dict[str, Any]
) -> None:
    expected = platform_environment(COMPOSE)
    assert interpolate(raw["x-recsys-env"], {}) == expected
    # Deployment knobs stay overridable from compose's environment, with the table's default.
    for name in PLATFORM_ENV:
        if name in SETTINGS:
            assert raw["x-recsys-env"][name] == f"${{{name}:-{expected[name]}}}", name
    for service in SERVICES:
        env = environment(services[service.name])
        if service.platform_env:
            assert {k: env.get(k) for k in expected} == expected, service.name
        else:
            assert not env.keys() & expected.keys(), service.name


def test_a_private_home_is_a_container_without_the_data_volume(services: dict[str, Any]) -> None:
    for service in SERVICES:
        mounted = {target for _, _, target in volume_mounts(services[service.name])}
        if service.private_home:
            assert COMPOSE.home not in mounted, service.name
    assert COMPOSE.home in {t for _, _, t in volume_mounts(services["dagster-code"])}


def _local(tmp_path: Path, **environ: str) -> Stack:
    folder = tmp_path / "stack"
    target = Target.local(
        folder,
        "postgresql://postgres@127.0.0.1:5432/test?sslmode=disable",
        "redis://127.0.0.1:6379/9",
        "shop",
        3700,
        tmp_path,
        environ,
    )
    return Stack(folder, target)


def test_local_rendering_uses_loopback_own_ports_and_databases(tmp_path: Path) -> None:
    stack = _local(tmp_path, RECSYS_RETRAIN_MIN_EVENTS="50")
    env = platform_environment(stack.target)
    assert env["RECSYS_POSTGRES_URL"] == "postgresql://postgres@127.0.0.1:5432/shop_events"
    assert env["RECSYS_DAGSTER_POSTGRES_URL"].startswith("postgresql+psycopg2://")
    assert env["RECSYS_DAGSTER_POSTGRES_URL"].endswith("/shop_dagster")
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:3700"
    assert env["RECSYS_RETRAIN_MIN_EVENTS"] == "50" and env["RECSYS_MODEL_NAME"] == "recsys-hybrid"
    ports = [
        stack.target.ports[p.service.name] + p.replica
        for p in processes()
        if p.replica or (p.service.name in stack.target.ports)
    ]
    assert len(ports) == len(set(ports)) == 5 and min(ports) == 3700
    assert stack.replica_urls() == ["http://127.0.0.1:3703", "http://127.0.0.1:3704"]
    for process in processes():
        argv = stack.command(process)
        assert "0.0.0.0" not in argv and not any("{" in part for part in argv), argv
    mlflow = stack.command(Process(by_name("mlflow")))
    assert mlflow[mlflow.index("--backend-store-uri") + 1].endswith("127.0.0.1:5432/shop_mlflow")
    a, b = (stack.environment(Process(by_name("recommender"), i), {}) for i in range(2))
    assert a["RECSYS_HOME"] != b["RECSYS_HOME"] and a["BENTOML_HOME"] != b["BENTOML_HOME"]
    assert a[MARKER] == b[MARKER] == str(stack.folder)
    consumer = stack.environment(Process(by_name("consumer")), {})
    assert consumer["RECSYS_HOME"] == str(tmp_path) and consumer["REDIS_URL"].endswith("/9")


def test_local_dagster_instance_is_dockers_with_local_paths(tmp_path: Path) -> None:
    stack = _local(tmp_path)
    instance = stack.dagster_instance()
    docker = yaml.safe_load((Path(__file__).parents[1] / "docker" / "dagster.yaml").read_text())
    assert instance["storage"] == docker["storage"]  # dagster-postgres, URL from the environment
    assert instance["run_coordinator"] == docker["run_coordinator"]
    text = json.dumps(instance)
    assert "/data" not in text and "/opt/dagster" not in text
    assert instance["local_artifact_storage"]["config"]["base_dir"].startswith(str(tmp_path))
    (server,) = [entry["grpc_server"] for entry in stack.workspace()["load_from"]]
    assert (server["host"], server["port"]) == ("127.0.0.1", stack.target.ports["dagster-code"])


def test_a_pid_file_naming_another_process_is_not_running(tmp_path: Path) -> None:
    stack = _local(tmp_path)
    process = Process(by_name("consumer"))
    stack.folder.mkdir(parents=True)
    assert stack.running(process) is None
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import psutil

        started = psutil.Process(sleeper.pid).create_time()
        stack.pid_file(process).write_text(json.dumps([sleeper.pid, started]))
        assert stack.running(process) == sleeper.pid
        # The same pid with another start time: a reused pid, not the process started.
        stack.pid_file(process).write_text(json.dumps([sleeper.pid, started - 100]))
        assert stack.running(process) is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_down_stops_a_marked_orphan(tmp_path: Path) -> None:
    """What a crashed service left (no pid file names it) is found by its marker and stopped."""
    stack = _local(tmp_path)
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"],
        env={**os.environ, MARKER: str(stack.folder)},
    )
    other = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"],
        env={**os.environ, MARKER: str(tmp_path / "another-stack")},
    )
    try:
        assert [p.pid for p in stack.marked()] == [orphan.pid]
        assert stack.down(grace=5) == 1
        assert orphan.wait(timeout=10) is not None
        assert other.poll() is None, "down stopped a process of another stack"
    finally:
        for child in (orphan, other):
            child.kill()
            child.wait()


def test_stack_commands_parse() -> None:
    from orchestration.cli import build_parser

    for action in ("up", "down", "status", "env"):
        assert build_parser().parse_args(["stack", action]).action == action


def test_compose_redis_has_the_durability_the_stack_expects(services: dict[str, Any]) -> None:
    command = tokens(services["redis"]["command"])
    assert {name: option(command, f"--{name}") for name in REDIS_DURABILITY} == REDIS_DURABILITY
    # PostgreSQL runs with its defaults there, which are the ones the stack expects.
    assert "command" not in services["postgres"]


def test_durability_warnings_say_what_a_crash_loses() -> None:
    assert durability_warnings(REDIS_DURABILITY, POSTGRES_DURABILITY) == []
    (redis_off,) = durability_warnings(
        {**REDIS_DURABILITY, "appendonly": "no"}, POSTGRES_DURABILITY
    )
    assert "restart of Redis loses every accepted event" in redis_off
    (async_commit,) = durability_warnings(
        REDIS_DURABILITY, {**POSTGRES_DURABILITY, "synchronous_commit": "off"}
    )
    assert "already acknowledged: lost events" in async_commit
