"""Orchestration fixtures: a champion already serving (registered without a training run) and a
local webhook receiver for alerts."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator

import mlflow
import pytest

from config import get_settings
from orchestration.environment import resources_for
from tests.conftest import tiny_bundle
from training.registry import GATE_METRIC, ModelRegistry


def pipeline_registry() -> ModelRegistry:
    """The registry the pipeline writes to in this test's environment."""
    return resources_for("local")["tracking"].registry()


@pytest.fixture
def champion() -> str:
    """Version 1 of the pipeline's registered model, promoted to champion; returns the version.

    Registered straight through the registry, which is several times faster than a training run.
    """
    bundle = tiny_bundle()
    registry = pipeline_registry()
    with registry.start_run("champion-fixture"):
        mlflow.log_metric(GATE_METRIC, 0.3)
        version = registry.log_bundle(bundle)
    assert registry.gate(version, 0.3, margin=0.0).promoted
    return version


def model_versions() -> list[str]:
    """Every version of the pipeline's registered model."""
    registry = pipeline_registry()
    found = registry.client.search_model_versions(f"name='{registry.model_name}'")
    return sorted(str(v.version) for v in found)


class WebhookReceiver:
    """A real HTTP server on an OS-assigned port that records every POST it is sent.

    It answers `statuses` in turn (then 200), or never answers while `hang` is set.
    """

    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.paths: list[str] = []
        self.statuses: list[int] = []
        self.hang = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.paths.append(self.path)
                receiver.posts.append(json.loads(body))
                if receiver.hang.is_set():
                    time.sleep(30)
                    return
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T0/B0/s3cr3t-token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def texts(self) -> list[str]:
        return [post["text"] for post in self.posts]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


UI_URL = "http://dagster.example:3000"


@pytest.fixture
def webhook(monkeypatch: pytest.MonkeyPatch) -> Iterator[WebhookReceiver]:
    """A local webhook receiver, configured as the alert webhook with a Dagster UI link."""
    receiver = WebhookReceiver()
    monkeypatch.setenv("RECSYS_ALERT_WEBHOOK_URL", receiver.url)
    monkeypatch.setenv("RECSYS_DAGSTER_UI_URL", UI_URL)
    monkeypatch.setenv("RECSYS_ALERT_TIMEOUT_SECONDS", "2")
    yield receiver
    receiver.close()


def failure_log() -> list[dict]:
    """The lines of this test's failure log (`$RECSYS_HOME/run_failures.jsonl`)."""
    path = get_settings().home / "run_failures.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
