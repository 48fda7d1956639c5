"""An experiment's report (its analysis on the logged impressions and the events) and the
decision acting on the registry: promote the winning treatment, roll back a losing one, record
why on every version involved. The `experiment_report` asset, the `experiment_decisions` sensor
and `recsys experiment status` call these."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from training.experiment_stats import (
    DEFAULT_WINDOW_SECONDS,
    Estimate,
    ExperimentAnalysis,
    analyse,
    attribute,
    power_users,
    sequential_users,
)
from training.experiments import POPULARITY, Experiment, target_version
from training.interleaving import InterleavingAnalysis, interleaving_analysis
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
    now: float | None = None,
) -> tuple[Action, Experiment]:
    """Carry out one decision of the analysis.

    - `promote:<arm>`: the arm's version becomes champion (the one it replaces is kept as
      `previous-champion` for a rollback); if it already is the champion, no alias moves.
    - `rollback:<arm>`: the arm leaves service: if its version is the champion now, champion
      goes back to the version it replaced; a challenger loses its alias.
    - `stop:*` and `invalid:*`: the experiment ends, no alias moves.
    - `continue`: nothing.
    Every decision but `continue` ends the experiment (status `decided`: the caller stores the
    experiment returned) and is recorded on the MLflow versions of every arm (tag
    `experiment.<name>`).
    """
    now = time.time() if now is None else now
    if decision == "continue":
        return Action(experiment.name, decision, reason), experiment
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
    log.info("experiment %s decided %s: %s", experiment.name, decision, reason)
    action = Action(
        experiment.name, decision, reason, promoted, rolled_back, before, after, stopped=True
    )
    return action, experiment.stopped("decided", now, record)


def report(
    experiment: Experiment,
    logs: pl.DataFrame,
    events: pl.DataFrame,
    catalog: pl.DataFrame | None = None,
    now: float | None = None,
    previous_p_values: dict[str, float] | None = None,
) -> ExperimentAnalysis | InterleavingAnalysis:
    """The experiment's analysis now, on its logged impressions and the events (attributed to
    them: `feature_repo.experiment_store.read_inputs` reads both); prices and the catalog's
    size come from the stored catalog when there is one."""
    logs = logs.filter(pl.col("experiment") == experiment.name)
    now = time.time() if now is None else now
    priced = catalog is not None and catalog.height > 0 and "price" in catalog.columns
    prices = catalog.select("item_id", "price") if priced else None
    if experiment.kind == "interleave":
        a, b = experiment.arms
        attributed = attribute(events, logs, DEFAULT_WINDOW_SECONDS, prices)
        return interleaving_analysis(
            logs,
            attributed,
            experiment.name,
            a.name,
            b.name,
            experiment.alpha,
            experiment.min_users,
            experiment.min_duration_s,
            experiment.max_duration_s,
            now,
            previous_p_value=(previous_p_values or {}).get(b.name),
        )
    return analyse(
        logs,
        events,
        experiment.name,
        experiment.control.name,
        [t.name for t in experiment.treatments],
        experiment.metric,
        experiment.alpha,
        experiment.min_users,
        experiment.min_duration_s,
        experiment.max_duration_s,
        now,
        prices,
        experiment.guardrails,
        shares={
            a.name: float(s) for a, s in zip(experiment.arms, experiment.shares(), strict=True)
        },
        catalog_size=catalog.height if catalog is not None and catalog.height else None,
        previous_p_values=previous_p_values,
    )


def stored_catalog(home: Path) -> pl.DataFrame | None:
    """The catalog the last import stored under RECSYS_HOME (LocalStateResource), if any."""
    path = Path(home) / "catalog.parquet"
    return pl.read_parquet(path) if path.exists() else None


def summary(analysis: ExperimentAnalysis | InterleavingAnalysis) -> str:
    """The analysis as the lines a person reads: per variant, per treatment, the decision."""
    lines: list[str] = []
    if isinstance(analysis, InterleavingAnalysis):
        a = analysis
        lines.append(
            f"interleaving {a.arm_b} against {a.arm_a}: {a.users} users "
            f"({a.users_with_preference} with a preference: {a.prefer_b} for {a.arm_b}, "
            f"{a.prefer_a} for {a.arm_a}, {a.tied} tied), {a.impressions} impressions"
        )
        lines.append(
            f"  preference for {a.arm_b}: {a.delta.value:+.4f} "
            f"[{a.delta.low:+.4f}, {a.delta.high:+.4f}], always-valid p = {a.p_value:.3g}"
        )
    else:
        lines.append(
            f"{'variant':<16} {'users':>7} {'answers':>8}  {'CTR [95% CI]':<27} "
            f"{'conversion [95% CI]':<27} revenue/user"
        )
        for v in analysis.variants:
            lines.append(
                f"{v.variant:<16} {v.users:>7} {v.impressions:>8}  {_ci(v.ctr):<27} "
                f"{_ci(v.conversion):<27} {v.revenue_per_user.value:.2f}"
            )
        for t in analysis.treatments:
            lines.append(
                f"{t.treatment} vs {analysis.control} on {t.metric}: lift {t.lift.value:+.4g} "
                f"({t.relative_lift:+.1%}), always-valid p = {t.p_value:.3g}, "
                f"CUPED variance -{t.variance_reduction:.0%}"
            )
        lines.append(
            f"sample ratio: p = {analysis.srm_p_value:.3g}" + (" MISMATCH" if analysis.srm else "")
        )
        for b in analysis.breaches:
            lines.append(
                f"guardrail broken: {b.variant} {b.guardrail} {b.value:.4g} > {b.limit:.4g}"
            )
    lines.append(f"decision: {analysis.decision} ({analysis.reason})")
    return "\n".join(lines)


def power_note(analysis: ExperimentAnalysis, experiment: Experiment, mde: float = 0.05) -> str:
    """How many users the experiment needs to detect a relative change `mde` of its metric,
    from the control's mean and spread so far (a fixed-horizon test, and the sequential one)."""
    control = next((v for v in analysis.variants if v.variant == analysis.control), None)
    estimate = None
    if control is not None:
        estimate = {"ctr": control.ctr, "conversion": control.conversion}.get(
            experiment.metric, control.revenue_per_user
        )
    if control is None or estimate is None or control.users < 30 or not estimate.value:
        return f"power: too few control users yet to size a {mde:.0%} change"
    sd = (estimate.high - estimate.low) / (2 * 1.959964) * math.sqrt(control.users)
    shares = tuple(float(x) for x in experiment.shares())
    fixed = power_users(estimate.value, sd, mde, experiment.alpha, 0.8, shares)
    sequential = sequential_users(estimate.value, sd, mde, experiment.alpha, 0.8, shares)
    return (
        f"power: detecting a {mde:.0%} relative change of {experiment.metric} "
        f"(control {estimate.value:.4g}, sd {sd:.3g}) with 80% power needs about {fixed} users "
        f"at a fixed horizon, {sequential} with the always-valid test"
    )


def _ci(e: Estimate) -> str:
    return f"{e.value:.4f} [{e.low:.4f}, {e.high:.4f}]"


REPORT_EXPERIMENT = "recsys-online-experiments"


def metric_over_time(
    experiment: Experiment, logs: pl.DataFrame, events: pl.DataFrame, bucket_s: float = 3600.0
) -> pl.DataFrame:
    """Per variant and time bucket since the start: cumulative impressions, attributed clicks
    and purchases, and the cumulative CTR (clicks per impression) — what the report's plot
    draws."""
    logs = logs.filter(pl.col("experiment") == experiment.name)
    if logs.is_empty():
        return pl.DataFrame(
            schema={"variant": pl.String, "bucket": pl.Float64, "impressions": pl.Int64,
                    "clicks": pl.Int64, "purchases": pl.Int64, "ctr": pl.Float64}
        )  # fmt: skip
    attributed = attribute(events, logs, DEFAULT_WINDOW_SECONDS)
    start = experiment.started_at

    # Each bucket named by its start, in hours since the experiment's start.
    bucket = (
        ((pl.col("timestamp").cast(pl.Float64) - start) / bucket_s).floor() * bucket_s / 3600.0
    ).alias("bucket")
    shown = logs.group_by("variant", bucket).agg(
        pl.col("items").list.len().sum().cast(pl.Int64).alias("impressions")
    )
    acted = attributed.group_by("variant", bucket).agg(
        (pl.col("event_type").cast(pl.String) == "click").sum().cast(pl.Int64).alias("clicks"),
        (pl.col("event_type").cast(pl.String) == "purchase")
        .sum()
        .cast(pl.Int64)
        .alias("purchases"),
    )
    return (
        shown.join(acted, on=["variant", "bucket"], how="full", coalesce=True)
        .fill_null(0)
        .sort("variant", "bucket")
        .with_columns(pl.col("impressions", "clicks", "purchases").cum_sum().over("variant"))
        .with_columns((pl.col("clicks") / pl.col("impressions").clip(1)).alias("ctr"))
    )


def log_report_run(
    registry: ModelRegistry,
    experiment: Experiment,
    analysis: ExperimentAnalysis | InterleavingAnalysis,
    logs: pl.DataFrame,
    events: pl.DataFrame,
) -> str:
    """One MLflow run per report (experiment `recsys-online-experiments`): the arms as params,
    per-variant figures and p-values as metrics, the decision as tags, the analysis as JSON and
    a plot of the cumulative CTR over time per variant. Returns the run id."""
    client = registry.client
    found = client.get_experiment_by_name(REPORT_EXPERIMENT)
    experiment_id = (
        found.experiment_id
        if found is not None
        else client.create_experiment(
            REPORT_EXPERIMENT, artifact_location=registry.artifact_location
        )
    )
    run = client.create_run(
        experiment_id,
        run_name=f"{experiment.name} report",
        tags={
            "recsys.experiment": experiment.name,
            "recsys.decision": analysis.decision,
            "recsys.reason": analysis.reason[:5000],
        },
    )
    run_id = run.info.run_id
    params = {f"arm.{a.name}": f"{a.target} ({a.share:g})" for a in experiment.arms}
    params.update({"kind": experiment.kind, "metric": experiment.metric, "alpha": experiment.alpha})
    for key, value in params.items():
        client.log_param(run_id, key, str(value))
    metrics: dict[str, float] = {"duration_hours": analysis.duration_s / 3600.0}
    if isinstance(analysis, InterleavingAnalysis):
        metrics.update(
            users=analysis.users,
            preference=analysis.delta.value,
            p_value=analysis.p_value,
        )
    else:
        metrics["srm_p_value"] = analysis.srm_p_value
        for v in analysis.variants:
            metrics.update(
                {
                    f"{v.variant}.users": v.users,
                    f"{v.variant}.impressions": v.impressions,
                    f"{v.variant}.ctr": v.ctr.value,
                    f"{v.variant}.conversion": v.conversion.value,
                    f"{v.variant}.revenue_per_user": v.revenue_per_user.value,
                }
            )
        for t in analysis.treatments:
            metrics[f"{t.treatment}.p_value"] = t.p_value
            metrics[f"{t.treatment}.lift"] = t.lift.value
    for key, value in metrics.items():
        if value is not None and value == value:  # no NaN
            client.log_metric(run_id, key.replace(":", "_"), float(value))
    client.log_text(run_id, json.dumps(analysis.to_dict(), indent=1), "analysis.json")
    over_time = metric_over_time(experiment, logs, events)
    if over_time.height:
        client.log_figure(run_id, _plot(over_time, experiment.name), "ctr_over_time.png")
    client.set_terminated(run_id)
    return run_id


def _plot(over_time: pl.DataFrame, name: str) -> Any:  # a matplotlib Figure
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    for (variant,), part in over_time.group_by("variant", maintain_order=True):
        axis.plot(part["bucket"].to_numpy(), part["ctr"].to_numpy(), marker=".", label=variant)
    axis.set_xlabel("hours since the start")
    axis.set_ylabel("cumulative CTR (clicks per item shown)")
    axis.set_title(f"experiment {name}")
    axis.legend()
    figure.tight_layout()
    plt.close(figure)
    return figure


def p_values(analysis: ExperimentAnalysis | InterleavingAnalysis) -> dict[str, float]:
    """Each treatment's always-valid p-value in the analysis (kept for the next report)."""
    if isinstance(analysis, InterleavingAnalysis):
        return {analysis.arm_b: analysis.p_value}
    return {t.treatment: t.p_value for t in analysis.treatments}
