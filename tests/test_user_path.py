"""The README's path, run the way a user runs it: the `recsys` console script in subprocesses
with no environment variable but RECSYS_HOME (no MLFLOW_TRACKING_URI, no REDIS_URL), from a
folder of its own, talking to the service over a socket."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

RECSYS = Path(sys.executable).with_name("recsys")
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _user_env(home: Path) -> dict[str, str]:
    """What a user's shell has: PATH, HOME, a locale, and the one variable the README names."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    env = {name: os.environ[name] for name in keep if name in os.environ}
    env["RECSYS_HOME"] = str(home)
    return env


def _recsys(*args: str, env: dict[str, str], cwd: Path, timeout: float = 600) -> str:
    done = subprocess.run(
        [str(RECSYS), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"recsys {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _wait(check, what: str, timeout: float, process: subprocess.Popen):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"{what}: the process exited with {process.returncode}"
        try:
            found = check()
        except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError):
            found = None
        if found:
            return found
        assert time.monotonic() < deadline, f"{what}: nothing after {timeout} s"
        time.sleep(1)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _embedded_redis_running(home: Path) -> bool:
    registry = home / "redis" / "redis.db.settings"
    if not registry.exists():
        return False
    pidfile = Path(json.loads(registry.read_text())["pidfile"])
    if not pidfile.exists():
        return False
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
    except (ProcessLookupError, ValueError):
        return False
    return True


@pytest.fixture
def user_dirs(tmp_path: Path) -> Iterator[tuple[Path, Path, dict[str, str]]]:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    yield home, cwd, _user_env(home)


def test_the_readme_path_serves_the_champion_and_learns_from_events(
    user_dirs: tuple[Path, Path, dict[str, str]], tmp_path: Path
) -> None:
    home, cwd, env = user_dirs
    data = tmp_path / "shop"
    _recsys(
        "generate", "--users", "300", "--items", "150", "--events", "15000", "--out", str(data),
        env=env, cwd=cwd,
    )  # fmt: skip
    out = _recsys(
        "pipeline", "--events", str(data / "events.csv"), "--catalog", str(data / "catalog.csv"),
        env=env, cwd=cwd,
    )  # fmt: skip
    registered = re.search(r"registered recsys-hybrid version (\d+): promoted to champion", out)
    assert registered, out
    assert not _embedded_redis_running(home), "`recsys pipeline` left its Redis server running"

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [str(RECSYS), "serve", "--port", str(port)],
        env=env,
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    user = "u274"
    try:
        first = _wait(
            lambda: _post(f"{url}/recommend", {"user_id": user, "k": 5}),
            "the service's first answer",
            240,
            server,
        )
        assert first["variant"] == "champion", first
        assert first["model_version"] == registered.group(1)
        assert len(first["items"]) == 5
        stranger = _post(f"{url}/recommend", {"user_id": "never-seen-before", "k": 5})
        assert len(stranger["items"]) == 5, "a new visitor got nothing"

        now = int(time.time())
        clicked = ["i003", "i019", "i025"]
        events = [
            {"user_id": user, "item_id": item, "event_type": kind, "timestamp": now - 30 + n}
            for n, (item, kind) in enumerate((i, k) for i in clicked for k in ("view", "click"))
        ]
        assert _post(f"{url}/events", {"events": events})["accepted"] == len(events)
        after = _post(f"{url}/recommend", {"user_id": user, "k": 5})
        assert after["cached"] is False
        ranked = lambda body: [(i["item_id"], i["score"]) for i in body["items"]]  # noqa: E731
        assert ranked(after) != ranked(first), "the events did not change the next answer"
        assert not set(clicked) & {i["item_id"] for i in after["items"]}, "seen items served"
    finally:
        _stop(server)
        log.close()
    log_text = (tmp_path / "serve.log").read_text()
    assert "model registry check failed" not in log_text, log_text[-3000:]
    assert not _embedded_redis_running(home), "`recsys serve` left its Redis server running"

    # Opening the UIs after the pipeline must not retrain on the events already there.
    dagster_port, mlflow_port = _free_port(), _free_port()
    ui = subprocess.Popen(
        [
            str(RECSYS), "up", "--dagster-port", str(dagster_port),
            "--mlflow-port", str(mlflow_port),
        ],
        env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    graphql = f"http://127.0.0.1:{dagster_port}/graphql"
    ticks = """{ sensorOrError(sensorSelector: {repositoryLocationName: "orchestration.definitions",
      repositoryName: "__repository__", sensorName: "new_events_sensor"}) {
      ... on Sensor { sensorState { ticks(limit: 5) { status skipReason runIds } } } } }"""
    runs = "{ runsOrError { ... on Runs { results { runId jobName } } } }"
    try:
        evaluated = _wait(
            lambda: _post(graphql, {"query": ticks})["data"]["sensorOrError"]["sensorState"][
                "ticks"
            ],
            "the new-events sensor's first tick",
            300,
            ui,
        )
        assert all(not tick["runIds"] for tick in evaluated), evaluated
        jobs = [
            r["jobName"] for r in _post(graphql, {"query": runs})["data"]["runsOrError"]["results"]
        ]
        assert jobs == ["training_job"], jobs
        health = f"http://127.0.0.1:{mlflow_port}/health"
        _wait(
            lambda: urllib.request.urlopen(health, timeout=10).status == 200, "MLflow UI", 120, ui
        )
    finally:
        _stop(ui)
    # Nothing was written outside RECSYS_HOME (MLflow once created ./mlflow.db here).
    assert sorted(p.name for p in cwd.iterdir()) == []
