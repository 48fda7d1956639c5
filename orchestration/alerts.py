"""Failure alerts: a failed run, a failed asset check or a blocked promotion goes to the failure
log (`$RECSYS_HOME/run_failures.jsonl`) and, when configured, to a Slack-compatible webhook.

One path for both ways a run executes: the daemon's run-status sensors (orchestration/jobs.py)
and the CLI's in-process runner (orchestration/runner.py) call `alert_run`.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from config.settings import OrchestrationSettings, redact_url, webhook_host

FAILURE_LOG = "run_failures.jsonl"
RUN_FAILURE = "run_failure"
CHECK_FAILURE = "check_failure"
PROMOTION_BLOCKED = "promotion_blocked"
EXPERIMENT_ACTION = "experiment_action"  # a treatment rolled back, an experiment invalid
# The asset whose materialization says whether the new model replaces the champion.
GATE_ASSET = dg.AssetKey("champion_gate")

_TITLES = {
    RUN_FAILURE: "Run failed",
    CHECK_FAILURE: "Asset check failed",
    PROMOTION_BLOCKED: "Promotion blocked",
    EXPERIMENT_ACTION: "Experiment rolled back or invalid",
}
# Slack's limits: 150 characters of header, 3000 of a section.
_SUMMARY_CHARS = 1500
# What Dagster wraps an asset's exception in (a retry that ran out is a RetryRequested...).
_WRAPPERS = ("Dagster", "RetryRequested")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alert:
    """One thing a person should look at: what happened, in which run, to what, and why."""

    kind: str
    job: str
    run_id: str
    subject: str
    summary: str

    @property
    def title(self) -> str:
        return _TITLES.get(self.kind, self.kind)

    def record(self) -> dict[str, Any]:
        """The failure log's line (`run_id`, `job`, `failed_at`, `message` as before)."""
        return {
            "run_id": self.run_id,
            "job": self.job,
            "failed_at": time.time(),
            "message": redact(self.summary),
            "kind": self.kind,
            "subject": redact(self.subject),
        }


def redact(text: str) -> str:
    """`text` with every URL's password removed (an error may quote a connection URL)."""
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


def innermost_error(error: Any) -> Any:
    """The innermost error of a step failure (Dagster wraps the user's exception)."""
    while error is not None and getattr(error, "cause", None) is not None:
        error = error.cause
    return error


def user_error(error: Any) -> Any:
    """The error the asset raised: the first one below Dagster's wrappers (its own message
    names the system; the innermost cause is often a driver's bare complaint)."""
    while error is not None and error.cls_name.startswith(_WRAPPERS) and error.cause is not None:
        error = error.cause
    return error


def error_text(error: Any) -> str:
    """An error's message without the `module.ClassName: ` prefix Dagster records."""
    if error is None:
        return "unknown error"
    text = error.message.strip()
    head, sep, rest = text.partition(": ")
    return rest if sep and head.endswith(error.cls_name) else text


def run_alerts(instance: dg.DagsterInstance, run_id: str) -> list[Alert]:
    """What went wrong in a finished run, read from its event log: the first failed step (when
    the run failed), every failed asset check, and a gate that kept the champion."""
    run = instance.get_run_by_id(run_id)
    if run is None:
        return []
    job = run.job_name
    wanted = {
        dg.DagsterEventType.STEP_FAILURE,
        dg.DagsterEventType.RUN_FAILURE,
        dg.DagsterEventType.ASSET_CHECK_EVALUATION,
        dg.DagsterEventType.ASSET_MATERIALIZATION,
    }
    events = [e.dagster_event for e in instance.all_logs(run_id, of_type=wanted) if e.dagster_event]
    alerts = (
        [_run_failure(job, run_id, events)] if run.status == dg.DagsterRunStatus.FAILURE else []
    )
    for event in events:
        if event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION:
            alerts += _check_failure(job, run_id, event.event_specific_data)
        elif event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
            alerts += _promotion_blocked(job, run_id, event.event_specific_data.materialization)
    return alerts


def _check_failure(job: str, run_id: str, check: Any) -> list[Alert]:
    if check is None or check.passed:
        return []
    found = ", ".join(f"{k}={v.value}" for k, v in check.metadata.items())
    blocking = "blocking" if check.blocking else "non-blocking"
    subject = f"{check.check_name} on {check.asset_key.to_user_string()}"
    summary = f"{blocking} check failed" + (f": {found}" if found else "")
    if check.description:
        summary += f" ({check.description})"
    return [Alert(CHECK_FAILURE, job, run_id, subject, summary)]


def _promotion_blocked(
    job: str, run_id: str, materialization: dg.AssetMaterialization
) -> list[Alert]:
    promote = materialization.metadata.get("promote")
    if materialization.asset_key != GATE_ASSET or promote is None or promote.value:
        return []
    reason = materialization.metadata.get("gate")
    summary = f"the champion keeps serving: {reason.value if reason else 'the gate said no'}"
    return [Alert(PROMOTION_BLOCKED, job, run_id, GATE_ASSET.to_user_string(), summary)]


def _run_failure(job: str, run_id: str, events: list[dg.DagsterEvent]) -> Alert:
    for event in events:
        if event.event_type == dg.DagsterEventType.STEP_FAILURE:
            data = event.step_failure_data
            top = data.error if data else None
            summary = error_text(user_error(top))
            if top is not None and top.cls_name.startswith("RetryRequested"):
                summary = f"{top.message.strip()}: {summary}"
            return Alert(RUN_FAILURE, job, run_id, event.step_key or job, summary)
    failures = [e.message for e in events if e.event_type == dg.DagsterEventType.RUN_FAILURE]
    message = next((m for m in failures if m), "the run failed")
    return Alert(RUN_FAILURE, job, run_id, job, message)


def slack_message(alert: Alert, dagster_ui_url: str = "") -> dict[str, Any]:
    """Slack-compatible JSON (`text` for notifications, `blocks` for the layout), redacted."""
    summary = redact(alert.summary)
    if len(summary) > _SUMMARY_CHARS:
        summary = summary[: _SUMMARY_CHARS - 3] + "..."
    subject = redact(alert.subject)
    link = f"{dagster_ui_url.rstrip('/')}/runs/{alert.run_id}" if dagster_ui_url else ""
    fields = [
        {"type": "mrkdwn", "text": f"*Job*\n{alert.job}"},
        {"type": "mrkdwn", "text": f"*Run*\n{alert.run_id}"},
        {"type": "mrkdwn", "text": f"*Asset / check*\n{subject}"},
    ]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": f"recsys: {alert.title}"}},
        {"type": "section", "fields": fields},
        {"type": "section", "text": {"type": "mrkdwn", "text": f"```{summary}```"}},
    ]
    if link:
        blocks.append(
            {"type": "section", "text": {"type": "mrkdwn", "text": f"<{link}|Open the run>"}}
        )
    text = f"recsys: {alert.title} in {alert.job} (run {alert.run_id[:8]}), {subject}: {summary}"
    if link:
        text += f" {link}"
    message: dict[str, Any] = {"text": text, "blocks": blocks}
    return message


def post(message: dict[str, Any], settings: OrchestrationSettings) -> bool:
    """POST `message` to the webhook: a short timeout, a few retries with backoff; True when it
    answered 2xx. Never raises: an unreachable webhook must not fail the run it reports on."""
    body = json.dumps(message).encode()
    problem = ""
    url, timeout = settings.alert_webhook_url or "", settings.alert_timeout_seconds
    for attempt in range(settings.alert_retries + 1):
        if attempt:
            time.sleep(0.5 * 2 ** (attempt - 1))
        request = urllib.request.Request(
            url,
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if 200 <= response.status < 300:
                    return True
                problem = f"HTTP {response.status}"
        except (OSError, ValueError, http.client.HTTPException) as exc:
            # HTTPError and URLError are OSErrors; the reason never holds the URL's path.
            problem = getattr(exc, "reason", None) or type(exc).__name__
    logger.warning(
        "alert not delivered to %s after %d attempts: %s",
        webhook_host(url),
        settings.alert_retries + 1,
        problem,
    )
    return False


def notify(alerts: list[Alert], home: Path, settings: OrchestrationSettings) -> list[bool]:
    """Append each alert to the failure log, then post it when a webhook is configured; per
    alert, whether the webhook took it (False without a webhook)."""
    if not alerts:
        return []
    home.mkdir(parents=True, exist_ok=True)
    with (home / FAILURE_LOG).open("a") as handle:
        for alert in alerts:
            handle.write(json.dumps(alert.record()) + "\n")
    if not settings.alert_webhook_url:
        return [False] * len(alerts)
    ui_url = settings.dagster_ui_url or ""
    return [post(slack_message(alert, ui_url), settings) for alert in alerts]


def alert_run(
    instance: dg.DagsterInstance, run_id: str, home: Path, settings: OrchestrationSettings
) -> list[Alert]:
    """Alert on everything that went wrong in a finished run; returns the alerts sent."""
    alerts = run_alerts(instance, run_id)
    notify(alerts, home, settings)
    return alerts
