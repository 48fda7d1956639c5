"""`recsys lineage VERSION`: a registered version's chain, from its aliases and MLflow run down to
the Dagster run that trained it and the events it was trained on."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from config import get_settings
from training.registry import ModelRegistry


def dagster_run(run_id: str) -> dict[str, Any]:
    """The run's status as the Dagster instance under RECSYS_HOME (or its PostgreSQL storage)
    knows it; `known: false` when that instance has no such run (or there is no instance)."""
    import dagster as dg

    from orchestration.runner import ensure_dagster_home

    if not get_settings().dagster_home().exists():
        return {"run_id": run_id, "known": False, "status": None}
    ensure_dagster_home()
    with dg.DagsterInstance.get() as instance:
        run = instance.get_run_by_id(run_id)
        if run is None:
            return {"run_id": run_id, "known": False, "status": None}
        return {
            "run_id": run_id,
            "known": True,
            "status": run.status.value,
            "job_name": run.job_name,
        }


def lineage_chain(version: str, registry: ModelRegistry | None = None) -> dict[str, Any]:
    """ModelRegistry.describe of `version` with the Dagster run's status added (`dagster_run`,
    null when the version was not trained by Dagster). Raises UnknownVersionError."""
    if registry is None:
        config = get_settings()
        registry = ModelRegistry(
            config.mlflow_tracking_uri(), config.mlflow.model_name, cache_dir=config.model_cache()
        )
    chain = registry.describe(version)
    run_id = chain["dagster_run_id"]
    chain["dagster_run"] = dagster_run(run_id) if run_id else None
    return chain


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def format_chain(chain: dict[str, Any]) -> str:
    """The chain as indented text, one link per block."""
    lines = [
        f"model {chain['model_name']} version {chain['version']} "
        f"(registered {_when(chain['created_at'])})",
        f"  aliases: {', '.join(chain['aliases']) or '(none)'}",
    ]
    run = chain["mlflow_run"]
    if run is None:
        lines.append("  MLflow run: (none recorded)")
    else:
        lines.append(f"  MLflow run: {run['run_id']} ({run['run_name']}, {run['status']})")
        for name in sorted(run["metrics"]):
            lines.append(f"    {name}: {run['metrics'][name]:.4g}")
    lines.append(f"  trained by: {chain['trained_by']}")
    dagster = chain["dagster_run"]
    if dagster is None:
        lines.append("  Dagster run: none (not trained by Dagster)")
    elif dagster["known"]:
        lines.append(
            f"  Dagster run: {dagster['run_id']} ({dagster['job_name']}, {dagster['status']})"
        )
    else:
        lines.append(
            f"  Dagster run: {dagster['run_id']} (unknown to the Dagster instance under "
            "RECSYS_HOME)"
        )
    data = chain["data"]
    if data is None:
        lines.append("  data: (not recorded)")
    else:
        lines.append(
            f"  data: {data['event_count']} events from {_when(data['min_timestamp'])} to "
            f"{_when(data['max_timestamp'])} ({data['store']} event store)"
        )
    return "\n".join(lines)


def cmd_lineage(args: argparse.Namespace) -> int:
    from training.registry import UnknownVersionError

    try:
        chain = lineage_chain(args.version)
    except UnknownVersionError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(chain, indent=2) if args.json else format_chain(chain), flush=True)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lineage",
        help="print a model version's chain: aliases, MLflow run, Dagster run, training data",
    )
    p.add_argument("version", help="registered version number of the model (e.g. 3)")
    p.add_argument("--json", action="store_true", help="print the chain as JSON")
    p.set_defaults(func=cmd_lineage)
