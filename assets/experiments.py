"""The online experiments' report: per running experiment its analysis (users, impressions,
CTR, conversion, revenue per user with intervals, the always-valid p-value, sample ratio,
guardrails) and the decision the `experiment_decisions` sensor acts on."""

import json
import time
from dataclasses import replace

import dagster as dg

from assets.resources import (
    EXTERNAL_RETRY,
    EventStoreResource,
    LocalStateResource,
    MLflowResource,
)
from feature_repo.experiment_store import open_experiment_store, read_inputs
from training.experiment_report import log_report_run, p_values, report, summary

GROUP = "experiments"


@dg.asset(group_name=GROUP, compute_kind="python", retry_policy=EXTERNAL_RETRY)
def experiment_report(
    context: dg.AssetExecutionContext,
    event_store: EventStoreResource,
    tracking: MLflowResource,
    state: LocalStateResource,
) -> dg.MaterializeResult:
    """Each running experiment analysed on its logged impressions and attributed events, an
    MLflow run per experiment (metrics per variant, a plot of the metric over time), and the
    decisions in the metadata (`decisions`, by experiment)."""
    now = time.time()
    catalog = state.read_catalog()
    decisions: dict[str, dict] = {}
    tables: list[str] = []
    registry = tracking.registry()
    with (
        open_experiment_store(event_store.url or None, event_store.home) as experiments,
        event_store.open() as store,
    ):
        running = experiments.running()
        for experiment in running:
            logs, events = read_inputs(store, experiment)
            analysis = report(experiment, logs, events, catalog, now, experiment.last_p_values)
            run_id = log_report_run(registry, experiment, analysis, logs, events)
            current = experiments.get(experiment.name)
            if current.running and current.salt == experiment.salt:  # not stopped meanwhile
                experiments.update(replace(current, last_p_values=p_values(analysis)))
            record = analysis.to_dict()
            decisions[experiment.name] = {
                "decision": analysis.decision,
                "reason": analysis.reason,
                "mlflow_run_id": run_id,
                "analysis": record,
            }
            tables.append(f"### {experiment.name}\n```\n{summary(analysis)}\n```")
            context.log.info(
                f"experiment {experiment.name}: {analysis.decision}: {analysis.reason}"
            )
    return dg.MaterializeResult(
        metadata={
            "experiments": len(running),
            "decisions": dg.MetadataValue.json(
                {
                    name: {k: v for k, v in d.items() if k != "analysis"}
                    for name, d in decisions.items()
                }
            ),
            "analyses": dg.MetadataValue.json(json.loads(json.dumps(decisions, default=str))),
            "report": dg.MetadataValue.md("\n\n".join(tables) or "no running experiment"),
            "reported_at": now,
        }
    )
