"""An experiment's report (its analysis on the logged impressions and the events) and the
decision acting on the registry: promote the winning treatment, roll back a losing one, record
why on every version involved. The `experiment_report` asset, its sensor and
`recsys experiment status` call these."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import polars as pl

from config import get_settings
from feature_repo.event_store import EventStore, open_event_store
from feature_repo.experiment_store import ExperimentStore
from training.experiments import POPULARITY, Experiment, target_version
from training.registry import CHALLENGER, CHAMPION, ModelRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Action:
    """What acting on a decision did."""

    experiment: str
    decision: str
    reason: str
    promoted: str | None = None  # the version made champion
    rolled_back: str | None = None  # the version taken out of service
    champion_before: str | None = None
    champion_after: str | None = None
    stopped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def arm_version(target: str, registry: ModelRegistry) -> str | None:
    """The registered version an arm target serves now (None for the popularity policy)."""
    if target == POPULARITY:
        return None
    if target in (CHAMPION, CHALLENGER):
        found = registry.get_version(target)
        return found.version if found is not None else None
    return target_version(target)


def act(
    experiment: Experiment,
    decision: str,
    reason: str,
    details: dict[str, Any],
    registry: ModelRegistry,
    store: ExperimentStore,
    now: float | None = None,
) -> Action:
    """Carry out one decision of the analysis.

    - `promote:<arm>`: the arm's version becomes champion (the one it replaces is kept as
      `previous-champion` for a rollback); if it already is the champion, no alias moves.
    - `rollback:<arm>`: the arm leaves service: if its version is the champion now, champion
      goes back to the version it replaced; a challenger loses its alias.
    - `stop:*` and `invalid:*`: the experiment ends, no alias moves.
    - `continue`: nothing.
    Every decision but `continue` ends the experiment (status `decided`) and is recorded on the
    MLflow versions of every arm (tag `experiment.<name>`).
    """
    now = time.time() if now is None else now
    if decision == "continue":
        return Action(experiment.name, decision, reason)
    kind, _, arm_name = decision.partition(":")
    champion = registry.get_version(CHAMPION)
    before = champion.version if champion is not None else None
    versions = {a.name: arm_version(a.target, registry) for a in experiment.arms}
    promoted = rolled_back = None
    if kind == "promote":
        version = versions.get(arm_name)
        if version is not None and version != before:
            registry.promote(version, f"experiment {experiment.name}: {reason}")
            promoted = version
    elif kind == "rollback":
        version = versions.get(arm_name)
        if version is not None and version == before:
            registry.rollback(f"experiment {experiment.name}: {reason}")
            rolled_back = version
        elif version is not None:
            challenger = registry.get_version(CHALLENGER)
            if challenger is not None and challenger.version == version:
                registry.client.delete_registered_model_alias(registry.model_name, CHALLENGER)
            rolled_back = version
    champion = registry.get_version(CHAMPION)
    after = champion.version if champion is not None else None
    record = {
        "decision": decision,
        "reason": reason,
        "decided_at": now,
        "promoted": promoted,
        "rolled_back": rolled_back,
        "champion_before": before,
        "champion_after": after,
        **{k: v for k, v in details.items() if k not in ("decision", "reason")},
    }
    text = json.dumps(record, default=str, sort_keys=True)
    for version in {v for v in versions.values() if v is not None}:
        registry.tag_version(version, f"experiment.{experiment.name}", text)
    store.update(experiment.stopped("decided", now, record))
    log.info("experiment %s decided %s: %s", experiment.name, decision, reason)
    return Action(
        experiment.name, decision, reason, promoted, rolled_back, before, after, stopped=True
    )


def read_inputs(
    events_store: EventStore, experiment: Experiment
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The experiment's impressions and the events since its start (attribution windows reach
    back from each event, so events before the start cannot be attributed to it)."""
    logs = events_store.read_impressions(since=experiment.started_at)
    logs = logs.filter(pl.col("experiment") == experiment.name)
    events = events_store.read(since_timestamp=int(experiment.started_at), with_context=True)
    return logs, events


def open_events() -> EventStore:
    config = get_settings()
    return open_event_store(config.store.postgres_url, config.home_dir())
