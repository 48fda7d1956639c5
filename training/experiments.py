"""Online experiments: their definition, validation and the deterministic assignment of users to
arms (a salted hash), shared by the service, the CLI and the report asset.

The statistics that decide an experiment live in training/experiment_stats.py; this module only
says who sees what.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import polars as pl

from training.experiment_stats import METRICS, GuardrailThresholds
from training.registry import CHALLENGER, CHAMPION, ModelRegistry

POPULARITY = "popularity"
KINDS = ("ab", "interleave")
STATUSES = ("running", "stopped", "decided")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_VERSION = re.compile(r"^version:([1-9][0-9]{0,9})$")
# Hash resolution: 2^52 buckets, exact in a float64.
_BUCKETS = float(1 << 52)

ExperimentKind = Literal["ab", "interleave"]


class ExperimentError(ValueError):
    """An experiment definition a user wrote is invalid; the message says which part."""


def parse_target(target: str) -> str:
    """A valid arm target (`champion`, `challenger`, `popularity` or `version:N`), or raises."""
    text = target.strip()
    if text in (CHAMPION, CHALLENGER, POPULARITY) or _VERSION.match(text):
        return text
    if text.isdigit():
        return f"version:{int(text)}"
    raise ExperimentError(
        f"unknown arm target {target!r}: use champion, challenger, popularity or version:N"
    )


def target_version(target: str) -> str | None:
    """The registered version a `version:N` target names, else None."""
    found = _VERSION.match(target)
    return found.group(1) if found else None


@dataclass(frozen=True)
class Arm:
    """One variant of an experiment: its name (what answers and logs call it), what serves it
    and its share of the experiment's users."""

    name: str
    target: str
    share: float = 1.0


@dataclass(frozen=True)
class Experiment:
    """An online experiment: the control is the first arm, the treatments the others."""

    name: str
    arms: tuple[Arm, ...]
    kind: ExperimentKind = "ab"
    traffic: float = 1.0  # share of all users who enter the experiment
    metric: str = "ctr"
    alpha: float = 0.05
    min_users: int = 200  # per arm, before any decision but a guardrail's or SRM's
    min_duration_s: float = 3600.0
    max_duration_s: float = 14 * 86400.0
    guardrails: GuardrailThresholds = field(default_factory=GuardrailThresholds)
    salt: str = ""
    status: str = "running"
    started_at: float = 0.0
    stopped_at: float | None = None
    decision: dict[str, Any] | None = None
    # The always-valid p-value of each treatment at the last report: the next one never goes
    # above it (an always-valid p-value is a running minimum).
    last_p_values: dict[str, float] | None = None

    @property
    def control(self) -> Arm:
        return self.arms[0]

    @property
    def treatments(self) -> tuple[Arm, ...]:
        return self.arms[1:]

    @property
    def running(self) -> bool:
        return self.status == "running"

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise ExperimentError(f"experiment {self.name!r} has no arm {name!r}")

    def versions(self) -> set[str]:
        """The registered versions its arms name explicitly (`version:N`)."""
        return {v for arm in self.arms if (v := target_version(arm.target)) is not None}

    def shares(self) -> np.ndarray:
        """Each arm's share of the experiment's users, summing to 1."""
        weights = np.array([arm.share for arm in self.arms], dtype=np.float64)
        return weights / weights.sum()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Experiment:
        values = dict(data)
        values["arms"] = tuple(Arm(**arm) for arm in values.get("arms", ()))
        values["guardrails"] = GuardrailThresholds(**(values.get("guardrails") or {}))
        return validate(cls(**values))

    def stopped(
        self, status: str, now: float, decision: dict[str, Any] | None = None
    ) -> Experiment:
        return replace(self, status=status, stopped_at=now, decision=decision or self.decision)


def new_experiment(
    name: str,
    control: str,
    treatments: Sequence[str],
    *,
    kind: ExperimentKind = "ab",
    shares: Sequence[float] | None = None,
    traffic: float = 1.0,
    metric: str = "ctr",
    alpha: float = 0.05,
    min_users: int = 200,
    min_duration_s: float = 3600.0,
    max_duration_s: float = 14 * 86400.0,
    guardrails: GuardrailThresholds | None = None,
    now: float | None = None,
) -> Experiment:
    """A running experiment from what a user types: targets name the arms (`champion`,
    `challenger`, `popularity`, `version:N`); the salt is the name and the start time, so
    a restarted experiment of the same name reshuffles its users."""
    started = time.time() if now is None else now
    targets = [parse_target(control), *(parse_target(t) for t in treatments)]
    names = _arm_names(targets)
    if shares is None:
        shares = [1.0] * len(targets)
    if len(shares) != len(targets):
        raise ExperimentError(
            f"{len(shares)} shares for {len(targets)} arms: give one share per arm"
        )
    arms = tuple(Arm(n, t, float(s)) for n, t, s in zip(names, targets, shares, strict=True))
    return validate(
        Experiment(
            name=name,
            arms=arms,
            kind=kind,
            traffic=traffic,
            metric=metric,
            alpha=alpha,
            min_users=min_users,
            min_duration_s=min_duration_s,
            max_duration_s=max_duration_s,
            guardrails=guardrails or GuardrailThresholds(),
            salt=f"{name}:{started:.6f}",
            started_at=started,
        )
    )


def _arm_names(targets: Sequence[str]) -> list[str]:
    # An arm is called after its target (`version:3` -> `v3`); a repeated target (A/A) gets a
    # suffix, so every arm has a name of its own.
    names: list[str] = []
    for target in targets:
        version = target_version(target)
        base = f"v{version}" if version else target
        name = base
        n = 2
        while name in names:
            name = f"{base}-{n}"
            n += 1
        names.append(name)
    return names


def validate(experiment: Experiment) -> Experiment:
    """The experiment, or ExperimentError naming what is wrong."""
    e = experiment
    if not NAME_PATTERN.match(e.name):
        raise ExperimentError(
            f"invalid experiment name {e.name!r}: letters, digits, '.', '_' or '-', at most 64"
        )
    if len(e.arms) < 2:
        raise ExperimentError("an experiment needs a control and at least one treatment")
    if e.kind not in KINDS:
        raise ExperimentError(f"unknown kind {e.kind!r}: use one of {', '.join(KINDS)}")
    if e.kind == "interleave" and len(e.arms) != 2:
        raise ExperimentError("an interleaving experiment compares exactly two rankers")
    if e.metric not in METRICS:
        raise ExperimentError(f"unknown metric {e.metric!r}: use one of {', '.join(METRICS)}")
    if e.status not in STATUSES:
        raise ExperimentError(f"unknown status {e.status!r}")
    if not 0.0 < e.traffic <= 1.0:
        raise ExperimentError(f"traffic must be in (0, 1], got {e.traffic}")
    if not 0.0 < e.alpha < 0.5:
        raise ExperimentError(f"alpha must be in (0, 0.5), got {e.alpha}")
    if e.min_users < 1:
        raise ExperimentError(f"min_users must be at least 1, got {e.min_users}")
    if e.min_duration_s < 0 or e.max_duration_s <= 0 or e.max_duration_s < e.min_duration_s:
        raise ExperimentError("durations: 0 <= min_duration <= max_duration and max_duration > 0")
    names = [a.name for a in e.arms]
    if len(set(names)) != len(names):
        raise ExperimentError(f"arm names repeat: {names}")
    for arm in e.arms:
        parse_target(arm.target)
        if not arm.share > 0:
            raise ExperimentError(f"arm {arm.name!r}: its share must be positive")
    return e


def check_arms(experiment: Experiment, registry: ModelRegistry) -> Experiment:
    """Every arm names something the registry has (a version, the challenger alias), or
    ExperimentError saying which does not; returns the experiment."""
    for arm in experiment.arms:
        version = target_version(arm.target)
        if version is not None and not registry.version_exists(version):
            raise ExperimentError(
                f"arm {arm.name!r}: model {registry.model_name!r} has no version {version}"
            )
        if arm.target == CHALLENGER and registry.get_version(CHALLENGER) is None:
            raise ExperimentError(
                f"arm {arm.name!r}: model {registry.model_name!r} has no challenger; train one "
                "(recsys pipeline) or name a version (version:N)"
            )
    return experiment


def _unit_interval(salt: str, user_ids: Sequence[str], purpose: str) -> np.ndarray:
    """A uniform number in [0, 1) per user, stable for (salt, purpose, user)."""
    prefix = f"{salt}\0{purpose}\0".encode()
    values = np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(prefix + u.encode(), digest_size=8).digest(), "big")
            >> 12
            for u in user_ids
        ),
        dtype=np.float64,
        count=len(user_ids),
    )
    return values / _BUCKETS


def assign(experiment: Experiment, user_ids: Sequence[str]) -> np.ndarray:
    """Each user's arm index in the experiment, or -1 for users outside its traffic share.

    Two independent hashes salted by the experiment: one admits the user to the experiment, the
    other picks the arm, so the arms' populations are alike whatever the traffic share, and two
    experiments' assignments are independent of each other.
    """
    if not len(user_ids):
        return np.empty(0, dtype=np.int64)
    admitted = _unit_interval(experiment.salt, user_ids, "traffic") < experiment.traffic
    cuts = np.cumsum(experiment.shares())
    cuts[-1] = 1.0
    arm = np.searchsorted(cuts, _unit_interval(experiment.salt, user_ids, "arm"), side="right")
    return np.where(admitted, arm, -1).astype(np.int64)


def assign_one(experiment: Experiment, user_id: str) -> Arm | None:
    """The arm one user sees, or None outside the experiment (the request path)."""
    index = int(assign(experiment, [user_id])[0])
    return experiment.arms[index] if index >= 0 else None


def choose(experiments: Sequence[Experiment], user_id: str) -> tuple[Experiment, Arm] | None:
    """The experiment and arm that serve a user: the first running experiment (oldest first)
    that admits them. Experiments that pick the served model are exclusive, so a user sees one
    variant; each admits a random share of the users the earlier ones left, with its own salt,
    so its arms stay balanced."""
    for experiment in experiments:
        if experiment.running:
            arm = assign_one(experiment, user_id)
            if arm is not None:
                return experiment, arm
    return None


def assignment_frame(experiment: Experiment, user_ids: pl.Series) -> pl.DataFrame:
    """user_id and the arm each would be assigned (null outside the traffic share)."""
    index = assign(experiment, user_ids.to_list())
    names = np.array([arm.name for arm in experiment.arms] + [None], dtype=object)
    return pl.DataFrame({"user_id": user_ids, "variant": names[index]})
