"""`recsys experiment start|status|stop|list` and `recsys rollback`: online experiments and the
champion alias by hand, on the store and registry the environment names."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from config import get_settings
from feature_repo.experiment_store import ExperimentStore, open_experiment_store
from training.experiment_stats import METRICS
from training.experiments import (
    KINDS,
    Experiment,
    check_arms,
    new_experiment,
)
from training.registry import ModelRegistry


def _print(text: str = "") -> None:
    print(text, flush=True)


def open_store() -> ExperimentStore:
    config = get_settings()
    return open_experiment_store(config.store.postgres_url, config.home_dir())


def open_registry() -> ModelRegistry:
    config = get_settings()
    return ModelRegistry(
        config.mlflow_tracking_uri(), config.mlflow.model_name, cache_dir=config.model_cache()
    )


def describe(experiment: Experiment) -> str:
    arms = ", ".join(
        f"{a.name}={a.target} ({share:.0%})"
        for a, share in zip(experiment.arms, experiment.shares(), strict=True)
    )
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(experiment.started_at))
    line = (
        f"{experiment.name}: {experiment.status}, {experiment.kind}, {experiment.metric}, "
        f"traffic {experiment.traffic:.0%}, arms {arms}; started {started} UTC"
    )
    if experiment.decision:
        decision = experiment.decision
        line += f"; decision {decision.get('decision')}: {decision.get('reason')}"
    return line


def cmd_experiment_start(args: argparse.Namespace) -> int:
    fields = {
        "name": args.name,
        "control": args.control,
        "treatments": args.treatment,
        "kind": args.kind,
        "shares": [float(s) for s in args.shares.split(",")] if args.shares else None,
        "traffic": args.traffic,
        "metric": args.metric,
        "alpha": args.alpha,
        "min_users": args.min_users,
        "min_duration_s": args.min_hours * 3600.0,
        "max_duration_s": args.max_days * 86400.0,
    }
    with open_store() as store:
        experiment = store.start(check_arms(new_experiment(**fields), open_registry()))
    _show(experiment.to_dict() if args.json else describe(experiment), args.json)
    return 0


def cmd_experiment_stop(args: argparse.Namespace) -> int:
    with open_store() as store:
        experiment = store.stop(args.name)
    _show(experiment.to_dict() if args.json else describe(experiment), args.json)
    return 0


def cmd_experiment_list(args: argparse.Namespace) -> int:
    with open_store() as store:
        experiments = store.all()
    if args.json:
        _show([e.to_dict() for e in experiments], True)
    elif not experiments:
        _print("no experiments yet: recsys experiment start NAME --treatment challenger")
    else:
        for experiment in experiments:
            _print(describe(experiment))
    return 0


def cmd_experiment_status(args: argparse.Namespace) -> int:
    from feature_repo.event_store import open_event_store
    from feature_repo.experiment_store import read_inputs
    from training.experiment_report import power_note, report, stored_catalog, summary
    from training.interleaving import InterleavingAnalysis

    config = get_settings()
    with open_store() as store:
        experiment = store.get(args.name)
    with open_event_store(config.store.postgres_url, config.home_dir()) as events:
        logs, frame = read_inputs(events, experiment)
    analysis = report(experiment, logs, frame, stored_catalog(config.home_dir()))
    if args.json:
        _show({"experiment": experiment.to_dict(), "analysis": analysis.to_dict()}, True)
    else:
        _print(describe(experiment))
        _print(summary(analysis))
        if not isinstance(analysis, InterleavingAnalysis):
            _print(power_note(analysis, experiment, args.mde))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    moved_from, moved_to = open_registry().rollback(args.reason)
    _print(f"champion moved back from version {moved_from} to version {moved_to}")
    return 0


def _show(value: Any, as_json: bool) -> None:
    _print(json.dumps(value, indent=2, default=str) if as_json else str(value))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from orchestration.cli import HelpFormatter

    p = sub.add_parser("experiment", help="start, watch and stop online experiments")
    actions = p.add_subparsers(
        dest="action",
        metavar="action",
        required=True,
        help="start: a new experiment; status: its analysis now; stop: end it; list: all of them",
    )

    p = actions.add_parser("start", help="start an experiment (control first, then treatments)")
    p.add_argument("name", help="the experiment's name (letters, digits, . _ -)")
    p.add_argument(
        "--control", default="champion", help="champion, challenger, popularity or version:N"
    )
    p.add_argument(
        "--treatment",
        action="append",
        required=True,
        help="a treatment arm (repeat for several): champion, challenger, popularity, version:N",
    )
    p.add_argument(
        "--kind", choices=KINDS, default="ab", help="A/B split or team-draft interleaving"
    )
    p.add_argument("--shares", default=None, help="comma-separated weight per arm (default equal)")
    p.add_argument("--traffic", type=float, default=1.0, help="share of all users in the test")
    p.add_argument("--metric", choices=sorted(METRICS), default="ctr", help="the decision metric")
    p.add_argument("--alpha", type=float, default=0.05, help="false-positive rate of the test")
    p.add_argument("--min-users", type=int, default=200, help="users per arm before deciding")
    p.add_argument("--min-hours", type=float, default=1.0, help="hours before deciding")
    p.add_argument("--max-days", type=float, default=14.0, help="days before it stops undecided")
    p.add_argument("--json", action="store_true", help="print the experiment as JSON")
    p.set_defaults(func=cmd_experiment_start)

    p = actions.add_parser("status", help="the experiment and its analysis now")
    p.add_argument("name")
    p.add_argument(
        "--mde", type=float, default=0.05, help="relative change to size the experiment for"
    )
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_experiment_status)

    p = actions.add_parser("stop", help="stop an experiment (everyone sees the champion again)")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_experiment_stop)

    p = actions.add_parser("list", help="every experiment, oldest first")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_experiment_list)

    for action in actions.choices.values():
        action.formatter_class = HelpFormatter

    p = sub.add_parser("rollback", help="move the champion alias back to the version it replaced")
    p.add_argument("--reason", default="rolled back by hand", help="recorded on the version")
    p.set_defaults(func=cmd_rollback)
