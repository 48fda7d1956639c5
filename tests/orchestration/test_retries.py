"""Retries of the assets that touch an external system: which assets have them, and that a run
rides out an event store that is unreachable at first, in-process (the CLI) and in the
multiprocess executor the daemon's runs use."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import dagster as dg
import pytest

from assets.resources import EXTERNAL_RETRY, external_retry_policy
from config import SettingsError
from orchestration.definitions import build_definitions
from orchestration.runner import run_job
from tests.orchestration.conftest import WebhookReceiver, failure_log

EXTERNAL_RESOURCES = {"event_store", "redis", "tracking"}


class FlakyProxy:
    """A TCP proxy in front of a real server that drops its first `failures` connections, as a
    server that is restarting or failing over does; later connections are relayed."""

    def __init__(self, target: str, failures: int) -> None:
        self.target_url = target
        parts = urlsplit(target)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.failures = failures
        self.accepted: list[float] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, password: str = "") -> str:
        """The target's URL through the proxy (TLS and GSS off: libpq would retry without them
        on a second connection itself)."""
        parts = urlsplit(self.target_url)
        user = parts.username or "postgres"
        creds = f"{user}:{password}" if password else user
        options = "sslmode=disable&gssencmode=disable"
        return f"postgresql://{creds}@127.0.0.1:{self.port}{parts.path}?{options}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted.append(time.monotonic())
            if len(self.accepted) <= self.failures:
                conn.close()
                continue
            upstream = socket.create_connection(self.target)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self.server.close()


@pytest.fixture
def flaky_store(postgres_url: str) -> Iterator[Callable[[int], FlakyProxy]]:
    """A factory of proxies to this test's PostgreSQL database that drop the first connections."""
    proxies: list[FlakyProxy] = []

    def make(failures: int) -> FlakyProxy:
        proxies.append(FlakyProxy(postgres_url, failures))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()


def test_every_asset_on_an_external_system_retries_and_pure_compute_does_not() -> None:
    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    with_policy, external = set(), set()
    for key in graph.get_all_asset_keys():
        assets_def = graph.get(key).assets_def
        if not assets_def.is_executable:
            continue
        if assets_def.op.retry_policy is not None:
            assert assets_def.op.retry_policy == EXTERNAL_RETRY
            with_policy.add(key.to_user_string())
        if assets_def.required_resource_keys & EXTERNAL_RESOURCES:
            external.add(key.to_user_string())
    assert with_policy == external
    assert {"raw_events", "online_features", "registered_model", "trend_analysis"} <= external
    assert "interaction_matrix" not in with_policy and "als_model" not in with_policy


def test_the_policy_is_exponential_with_jitter_from_the_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RECSYS_RETRY_MAX_RETRIES", "5")
    monkeypatch.setenv("RECSYS_RETRY_DELAY_SECONDS", "2")
    policy = external_retry_policy()
    assert policy.max_retries == 5 and policy.delay == 2.0
    assert policy.backoff == dg.Backoff.EXPONENTIAL and policy.jitter == dg.Jitter.PLUS_MINUS
    # Attempt n waits (2^n - 1) * delay, give or take one delay.
    for attempt, centre in ((1, 2.0), (2, 6.0), (3, 14.0)):
        waits = [policy.calculate_delay(attempt) for _ in range(200)]
        assert centre - 2.0 <= min(waits) and max(waits) <= centre + 2.0
    monkeypatch.setenv("RECSYS_RETRY_MAX_RETRIES", "-1")
    with pytest.raises(SettingsError, match="RECSYS_RETRY_MAX_RETRIES='-1'"):
        external_retry_policy()


def _import(events_csv: Path) -> dict:
    return {"ops": {"raw_events": {"config": {"events_path": str(events_csv)}}}}


@pytest.mark.postgres
def test_in_process_run_retries_an_event_store_down_at_first_with_growing_waits(
    flaky_store: Callable[[int], FlakyProxy],
    events_csv: Path,
    redis_env: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failures = EXTERNAL_RETRY.max_retries  # the last allowed attempt gets through
    proxy = flaky_store(failures)
    monkeypatch.setenv("RECSYS_POSTGRES_URL", proxy.url())
    result = run_job("ingest_job", _import(events_csv), persistent=False)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    assert len(proxy.accepted) == failures + 1
    retried = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert [e.step_key for e in retried] == ["raw_events"] * failures
    # Backoff: the waits grow as (2^n - 1) * delay (+- delay), whatever the jitter drew.
    delay = EXTERNAL_RETRY.delay
    gaps = [b - a for a, b in zip(proxy.accepted, proxy.accepted[1:], strict=False)]
    for n, gap in enumerate(gaps, start=1):
        assert gap >= (2**n - 2) * delay, (n, gaps)
    assert gaps[-1] > gaps[0]
    assert result.output_for_node("raw_events").height > 0


@pytest.mark.postgres
def test_a_store_down_for_good_fails_after_the_last_retry_and_alerts_without_the_password(
    flaky_store: Callable[[int], FlakyProxy],
    webhook: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = flaky_store(1000)
    monkeypatch.setenv("RECSYS_POSTGRES_URL", proxy.url(password="hunter2"))
    result = run_job("training_job", {}, persistent=False)
    assert not result.success
    assert len(proxy.accepted) == EXTERNAL_RETRY.max_retries + 1
    (post,) = webhook.posts
    assert "raw_events" in post["text"]
    assert "Exceeded max_retries of 3: cannot reach the PostgreSQL event store" in post["text"]
    assert "hunter2" not in str(post) and "hunter2" not in str(failure_log())
    assert failure_log()[0]["run_id"] == result.run_id


def ingest_job_of_this_environment() -> dg.JobDefinition:
    """The ingest job with the resources the environment gives a fresh process (the daemon's
    run worker builds them the same way)."""
    return build_definitions().resolve_job_def("ingest_job")


@pytest.mark.postgres
@pytest.mark.slow
def test_multiprocess_executor_of_daemon_runs_retries_too(
    flaky_store: Callable[[int], FlakyProxy],
    events_csv: Path,
    redis_env: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = flaky_store(1)
    # The step processes read the environment as a run worker does.
    monkeypatch.setenv("RECSYS_POSTGRES_URL", proxy.url())
    monkeypatch.setenv("RECSYS_DAGSTER_EXECUTOR", "multiprocess")
    job = dg.reconstructable(ingest_job_of_this_environment)
    with dg.instance_for_test() as instance:
        with dg.execute_job(
            job,
            instance=instance,
            run_config=_import(events_csv),
            asset_selection=[dg.AssetKey("raw_events")],
        ) as result:
            assert result.success
            kinds = [e.event_type_value for e in result.all_events if e.step_key == "raw_events"]
    assert kinds.count("STEP_UP_FOR_RETRY") == 1 and kinds.count("STEP_SUCCESS") == 1
    assert len(proxy.accepted) == 2
