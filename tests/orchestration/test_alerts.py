"""Alerts against a real local webhook: failed runs, failed checks, blocked promotions, a webhook
that is down or slow, and the daemon's sensors as well as the CLI's in-process runner."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import dagster as dg
import pytest

from config import SettingsError, get_settings, load_settings
from config.settings import effective
from feature_repo.event_store import open_event_store
from orchestration import alerts
from orchestration.definitions import build_definitions
from orchestration.jobs import alert_on_findings, record_run_failure
from orchestration.runner import run_job
from tests.orchestration.conftest import UI_URL, WebhookReceiver, failure_log
from tests.orchestration.test_pipeline import _config, _zero_ratings


def _fields(post: dict) -> str:
    """Everything a person reads in a posted message, as one string."""
    return json.dumps(post)


def test_failed_run_alerts_with_job_run_step_error_and_link(webhook: WebhookReceiver) -> None:
    result = run_job("training_job", _config(), persistent=False)
    assert not result.success
    assert len(webhook.posts) == 1
    post = webhook.posts[0]
    assert set(post) == {"text", "blocks"}
    assert post["blocks"][0]["text"]["text"] == "recsys: Run failed"
    body = _fields(post)
    for expected in ("training_job", result.run_id, "raw_events", "event store is empty"):
        assert expected in body, expected
    assert f"{UI_URL}/runs/{result.run_id}" in post["text"]
    assert f"<{UI_URL}/runs/{result.run_id}|Open the run>" in body
    # The failure log keeps its entry (the same fields as before, plus what kind of alert).
    (entry,) = failure_log()
    assert entry["run_id"] == result.run_id and entry["job"] == "training_job"
    assert entry["kind"] == alerts.RUN_FAILURE and "event store is empty" in entry["message"]


def test_no_link_without_a_ui_url_and_no_post_without_a_webhook(
    webhook: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RECSYS_DAGSTER_UI_URL")
    result = run_job("training_job", _config(), persistent=False)
    assert "/runs/" not in _fields(webhook.posts[0])
    monkeypatch.delenv("RECSYS_ALERT_WEBHOOK_URL")
    run_job("training_job", _config(), persistent=False)
    assert len(webhook.posts) == 1
    assert [e["run_id"] for e in failure_log()][0] == result.run_id
    assert len(failure_log()) == 2


def test_failing_blocking_check_alerts_beside_the_failed_run(
    webhook: WebhookReceiver, redis_env: str
) -> None:
    with open_event_store(None, get_settings().home) as store:
        store.append(_zero_ratings())
    result = run_job("training_job", _config(), persistent=False)
    assert not result.success
    kinds = [post["blocks"][0]["text"]["text"] for post in webhook.posts]
    assert kinds == ["recsys: Run failed", "recsys: Asset check failed"]
    check = _fields(webhook.posts[1])
    assert "interaction_matrix_not_empty on interaction_matrix" in check
    assert "blocking check failed" in check and "non_zeros=" in check
    assert [e["kind"] for e in failure_log()] == [alerts.RUN_FAILURE, alerts.CHECK_FAILURE]


def test_failing_non_blocking_check_alerts_although_the_run_succeeds(
    webhook: WebhookReceiver, redis_env: str, events_csv: Path
) -> None:
    # The shop's events are from 2023: the trend analysis' freshness check (a warning) fails.
    config = {"ops": {"raw_events": {"config": {"events_path": str(events_csv)}}}}
    result = run_job("trends_job", config, persistent=False)
    assert result.success
    (post,) = webhook.posts
    body = _fields(post)
    assert "recsys: Asset check failed" in body
    assert "trend_analysis_fresh on trend_analysis" in body and "non-blocking" in body
    assert "trends_job" in body and result.run_id in body
    assert failure_log()[0]["kind"] == alerts.CHECK_FAILURE


def test_blocked_promotion_alerts(
    webhook: WebhookReceiver, redis_env: str, events_csv: Path, champion: str
) -> None:
    # No hybrid gains a whole nDCG point over the champion: the gate keeps it.
    result = run_job(
        "training_job",
        _config(events_csv, champion_gate={"config": {"margin": 1.0}}),
        persistent=False,
    )
    assert result.success
    (post,) = [p for p in webhook.posts if "Promotion blocked" in p["text"]]
    body = _fields(post)
    assert "champion_gate" in body and "training_job" in body and result.run_id in body
    assert "the champion keeps serving" in body and "< champion 0.3000 + margin 1.0" in body
    assert any(e["kind"] == alerts.PROMOTION_BLOCKED for e in failure_log())


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_down_webhook_does_not_fail_the_run_and_the_failure_log_keeps_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(
        "RECSYS_ALERT_WEBHOOK_URL", f"http://127.0.0.1:{_closed_port()}/services/s3cr3t-token"
    )
    result = run_job("training_job", _config(), persistent=False)
    # The run's own outcome is reported, not the webhook's.
    assert not result.success
    (entry,) = failure_log()
    assert entry["run_id"] == result.run_id and entry["kind"] == alerts.RUN_FAILURE
    warnings = [r.getMessage() for r in caplog.records if "alert not delivered" in r.getMessage()]
    assert warnings and "s3cr3t-token" not in warnings[0]


def test_a_slow_webhook_times_out_quickly_and_is_retried(
    webhook: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    webhook.hang.set()
    monkeypatch.setenv("RECSYS_ALERT_TIMEOUT_SECONDS", "0.5")
    monkeypatch.setenv("RECSYS_ALERT_RETRIES", "1")
    alert = alerts.Alert(alerts.RUN_FAILURE, "training_job", "r" * 36, "raw_events", "boom")
    started = time.monotonic()
    delivered = alerts.notify([alert], get_settings().home_dir(), get_settings().orchestration)
    took = time.monotonic() - started
    assert delivered == [False]
    assert len(webhook.posts) == 2  # the first attempt and one retry
    # Two timeouts of 0.5 s and a 0.5 s pause, not the 30 s the receiver would hang.
    assert took < 5
    assert failure_log()[0]["message"] == "boom"


def test_webhook_errors_are_retried_with_backoff_until_it_answers(
    webhook: WebhookReceiver,
) -> None:
    webhook.statuses = [500, 503]
    alert = alerts.Alert(alerts.CHECK_FAILURE, "trends_job", "r" * 36, "a on b", "failed")
    assert alerts.notify([alert], get_settings().home_dir(), get_settings().orchestration) == [True]
    assert len(webhook.posts) == 3
    assert webhook.paths == ["/services/T0/B0/s3cr3t-token"] * 3


def test_messages_never_carry_a_password() -> None:
    alert = alerts.Alert(
        alerts.RUN_FAILURE,
        "training_job",
        "r" * 36,
        "raw_events",
        "cannot reach postgresql://alice:hunter2@db.internal:5432/events (timeout); "
        "redis://:redispw@cache:6379/0 refused",
    )
    body = _fields(alerts.slack_message(alert, UI_URL))
    assert "hunter2" not in body and "redispw" not in body
    assert "postgresql://alice@db.internal:5432/events" in body
    assert "hunter2" not in json.dumps(alert.record())
    long = alerts.Alert(alerts.RUN_FAILURE, "j", "r", "s", "x" * 10_000)
    section = alerts.slack_message(long)["blocks"][2]["text"]["text"]
    assert len(section) < 3000


def _run_in(instance: dg.DagsterInstance, job: str, run_config: dict) -> dg.ExecuteInProcessResult:
    """A run recorded in `instance` without the runner's own alerting (as the daemon sees it)."""
    job_def = build_definitions().resolve_job_def(job)
    return job_def.execute_in_process(
        run_config=run_config, instance=instance, raise_on_error=False
    )


def test_daemon_sensors_alert_on_failed_runs_and_on_findings_of_succeeded_ones(
    webhook: WebhookReceiver, redis_env: str, events_csv: Path
) -> None:
    state = {"state": build_definitions().resources["state"]}
    with dg.instance_for_test() as instance:
        failed = _run_in(instance, "training_job", _config())
        assert not failed.success and not webhook.posts
        failure_event = instance.all_logs(failed.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)[
            0
        ].dagster_event
        context = dg.build_run_status_sensor_context(
            sensor_name=record_run_failure.name,
            dagster_event=failure_event,
            dagster_instance=instance,
            dagster_run=failed.dagster_run,
            resources=state,
        ).for_run_failure()
        record_run_failure(context)
        assert len(webhook.posts) == 1
        assert failed.run_id in webhook.texts()[0] and "raw_events" in webhook.texts()[0]

        config = {"ops": {"raw_events": {"config": {"events_path": str(events_csv)}}}}
        succeeded = _run_in(instance, "trends_job", config)
        assert succeeded.success
        success_event = instance.all_logs(
            succeeded.run_id, of_type=dg.DagsterEventType.RUN_SUCCESS
        )[0].dagster_event
        context = dg.build_run_status_sensor_context(
            sensor_name=alert_on_findings.name,
            dagster_event=success_event,
            dagster_instance=instance,
            dagster_run=succeeded.dagster_run,
            resources=state,
        )
        alert_on_findings(context)
    assert len(webhook.posts) == 2
    assert "trend_analysis_fresh" in webhook.texts()[1]
    assert [e["kind"] for e in failure_log()] == [alerts.RUN_FAILURE, alerts.CHECK_FAILURE]


def test_alert_settings_reject_malformed_values_and_hide_the_webhook() -> None:
    with pytest.raises(SettingsError, match="RECSYS_ALERT_TIMEOUT_SECONDS='soon'"):
        load_settings({"RECSYS_ALERT_TIMEOUT_SECONDS": "soon"})
    with pytest.raises(SettingsError, match="RECSYS_ALERT_RETRIES='-1'"):
        load_settings({"RECSYS_ALERT_RETRIES": "-1"})
    webhook = "https://hooks.slack.com/services/T0/B0/s3cr3t-token"
    shown = dict(
        (name, value)
        for name, _, value in effective(load_settings({"RECSYS_ALERT_WEBHOOK_URL": webhook}))
    )
    assert shown["RECSYS_ALERT_WEBHOOK_URL"] == "https://hooks.slack.com/..."


def test_the_run_link_takes_a_ui_url_with_or_without_its_slash() -> None:
    alert = alerts.Alert(alerts.RUN_FAILURE, "j", "run-1", "s", "x")
    for base in ("http://ui.example", "http://ui.example/"):
        assert "<http://ui.example/runs/run-1|Open the run>" in _fields(
            alerts.slack_message(alert, base)
        )
