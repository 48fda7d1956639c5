"""The `recsys` command line: generate data, run the pipeline, evaluate, batch-recommend, serve."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from config import SettingsError, get_settings
from serving.keys import AuthConfigError
from training.data import DataValidationError
from training.experiments import ExperimentError

OK, FAILED, BAD_INPUT = 0, 1, 2
# Errors a step raises about the input itself (the user fixes the data, not the platform).
_BAD_INPUT_ERRORS = ("DataValidationError", "NotEnoughDataError")


def _print(text: str = "") -> None:
    print(text, flush=True)


def _error(text: str) -> None:
    print(f"error: {text}", file=sys.stderr, flush=True)


def _import_config(args: argparse.Namespace) -> dict[str, Any]:
    ops: dict[str, Any] = {}
    events = getattr(args, "events", None)
    catalog = getattr(args, "catalog", None)
    skip = bool(getattr(args, "skip_invalid", False))
    if events:
        config: dict[str, Any] = {"events_path": str(Path(events).resolve()), "skip_invalid": skip}
        earliest = getattr(args, "earliest_timestamp", None)
        if earliest is not None:
            config["earliest_timestamp"] = earliest
        ops["raw_events"] = {"config": config}
    if catalog:
        ops["item_catalog"] = {
            "config": {"catalog_path": str(Path(catalog).resolve()), "skip_invalid": skip}
        }
    return ops


def _check_inputs(args: argparse.Namespace) -> None:
    """Fail fast on paths that do not exist; row-level validation happens in the assets."""
    for name in ("events", "catalog"):
        value = getattr(args, name, None)
        if value and not Path(value).exists():
            raise FileNotFoundError(f"{value}: no such file or folder (--{name})")


def _materialise_movielens(args: argparse.Namespace, scratch: Path) -> None:
    """A MovieLens folder is converted once to contract Parquet files the ingestion imports."""
    from training.data import read_movielens

    events = getattr(args, "events", None)
    if events and Path(events).is_dir():
        ml_events, ml_catalog = read_movielens(events)
        args.events = str(scratch / "movielens-events.parquet")
        ml_events.write_parquet(args.events)
        # MovieLens 100k is from 1997-98, before the contract's 2000-01-01: its own first
        # timestamp is the bound for this import.
        if ml_events.height:
            args.earliest_timestamp = int(ml_events["timestamp"].min())
        if not getattr(args, "catalog", None) and ml_catalog.height:
            args.catalog = str(scratch / "movielens-catalog.parquet")
            ml_catalog.write_parquet(args.catalog)


def _scratch_resources(scratch: Path) -> dict[str, Any]:
    """The environment's resources, but with events and catalog in a throw-away folder."""
    from assets.resources import LocalStateResource
    from orchestration.environment import event_store_resource, resources_for

    resources = resources_for()
    resources["event_store"] = event_store_resource("", str(scratch))
    resources["state"] = LocalStateResource(home=str(scratch))
    return resources


def _run(job: str, run_config: dict[str, Any], **kwargs: Any) -> Any:
    from orchestration.runner import error_text, failure_message, first_failure, run_job

    result = run_job(job, run_config, **kwargs)
    if not result.success:
        failure = first_failure(result)
        if failure is not None and failure[1] is not None:
            if failure[1].cls_name in _BAD_INPUT_ERRORS:
                raise DataValidationError(error_text(failure[1]))
            if failure[1].cls_name in ("FileNotFoundError", "ConnectionError"):
                raise RuntimeError(error_text(failure[1]))
        raise RuntimeError(failure_message(result))
    _report_skipped(result)
    return result


def _outputs(result: Any, *nodes: str) -> list[Any]:
    from orchestration.runner import outputs

    return outputs(result, nodes)


def _report_skipped(result: Any) -> None:
    """Say how many malformed rows `--skip-invalid` dropped (never silently)."""
    for node in ("raw_events", "item_catalog"):
        try:
            materializations = result.asset_materializations_for_node(node)
        except Exception:  # noqa: BLE001 - the node is not part of this job
            continue
        for materialization in materializations:
            entry = materialization.metadata.get("skipped_invalid")
            skipped = int(entry.value) if entry is not None else 0
            if skipped:
                kind = "event" if node == "raw_events" else "catalog"
                _print(f"skipped {skipped} invalid {kind} rows (--skip-invalid)")


def cmd_generate(args: argparse.Namespace) -> int:
    from training.generate import generate, write_generated

    started = time.perf_counter()
    data = generate(args.users, args.items, args.events, seed=args.seed)
    paths = write_generated(data, Path(args.out))
    _print(
        f"generated {data.events.height} events, {data.catalog.height} items, "
        f"{data.truth_users.height} users in {time.perf_counter() - started:.1f}s"
    )
    for name, path in paths.items():
        _print(f"  {name}: {path}")
    return OK


def cmd_simulate(args: argparse.Namespace) -> int:
    """Simulated shoppers against a running service; a summary per variant."""
    from rich.progress import Progress

    from orchestration.simulator import SimulationConfig, SimulationError, simulate
    from training.generate import Truth

    config = SimulationConfig(
        url=args.url,
        users=args.users,
        seed=args.seed,
        new_users=args.new_users,
        requests_per_user=args.requests_per_user,
        k=args.k,
        exclude_seen=not args.keep_seen,
        concurrency=args.concurrency,
        api_key=args.api_key,
    )
    try:
        truth = Truth.read(Path(args.truth))
        with Progress(transient=True, disable=args.json or not sys.stderr.isatty()) as progress:
            task = progress.add_task("shoppers", total=args.users)
            result = simulate(truth, config, on_done=lambda: progress.advance(task))
    except ValueError as exc:
        _error(str(exc))
        return BAD_INPUT
    except SimulationError as exc:
        _error(str(exc))
        return FAILED
    if args.json:
        _print(json.dumps(result.as_dict(), indent=2))
        return OK
    table = result.summary.with_columns(
        pl.col("ctr", "conversion").round(4), pl.col("revenue", "revenue_per_user").round(2)
    )
    with pl.Config(
        tbl_rows=-1,
        tbl_cols=-1,
        tbl_width_chars=200,
        tbl_formatting="ASCII_MARKDOWN",
        tbl_hide_dataframe_shape=True,
        tbl_hide_column_data_types=True,
    ):
        _print(str(table))
    _print(
        f"events: {result.events_sent} sent, {result.events_accepted} accepted, "
        f"{result.events_duplicates} duplicates, {result.events_rejected} rejected; "
        f"non-2xx answers: {sum(result.non_2xx.values())}"
        + (
            f" ({', '.join(f'{k}: {v}' for k, v in sorted(result.non_2xx.items()))})"
            if result.non_2xx
            else ""
        )
        + f"; 429/503 waited out: {result.retries}; {result.seconds:.1f}s"
    )
    return OK


def _print_evaluation(table: pl.DataFrame) -> None:
    from training.evaluation import to_markdown

    _print(to_markdown(table))


def cmd_pipeline(args: argparse.Namespace) -> int:
    _check_inputs(args)
    with tempfile.TemporaryDirectory(prefix="recsys-") as tmp:
        _materialise_movielens(args, Path(tmp))
        _print(f"running the training job (RECSYS_HOME={get_settings().home_dir()})")
        result = _run("training_job", {"ops": _import_config(args)})
        evaluation, registered = _outputs(result, "model_evaluation", "registered_model")
    _print("\nvalidation metrics @10:")
    _print_evaluation(evaluation)
    verdict = "promoted to champion" if registered["promoted"] else "kept as challenger"
    _print(
        f"\nregistered {registered['model_name']} version {registered['version']}: {verdict} "
        f"({registered['reason']})"
    )
    return OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    _check_inputs(args)
    with tempfile.TemporaryDirectory(prefix="recsys-evaluate-") as tmp:
        _materialise_movielens(args, Path(tmp))
        result = _run(
            "offline_job",
            {"ops": _import_config(args)},
            resources=_scratch_resources(Path(tmp)),
            persistent=False,
        )
        (evaluation,) = _outputs(result, "model_evaluation")
    _print_evaluation(evaluation)
    return OK


def cmd_batch_recommend(args: argparse.Namespace) -> int:
    _check_inputs(args)
    with tempfile.TemporaryDirectory(prefix="recsys-batch-") as tmp:
        _materialise_movielens(args, Path(tmp))
        ops = _import_config(args)
        ops["batch_recommendations"] = {"config": {"k": args.k}}
        result = _run(
            "offline_job", {"ops": ops}, resources=_scratch_resources(Path(tmp)), persistent=False
        )
        (recs,) = _outputs(result, "batch_recommendations")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recs.select("user_id", "item_id", "rank", "score").sort("user_id", "rank").write_csv(out)
    _print(f"wrote {recs.height} recommendations for {recs['user_id'].n_unique()} users to {out}")
    return OK


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.launcher import serve

    return serve(port=args.port, host=args.host, insecure=args.insecure)


def cmd_api_key_create(args: argparse.Namespace) -> int:
    from serving.keys import add_key

    path = _keys_file(args.file)
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    key = add_key(path, args.name, scopes, args.rate_limit)
    # The key alone on stdout (for `KEY=$(recsys api-key create ...)`), the rest on stderr.
    note = f"created API key {args.name!r} ({', '.join(sorted(set(scopes)))}), its hash in {path}"
    print(f"{note}; the key, shown only now:", file=sys.stderr, flush=True)
    print(key, flush=True)
    if get_settings().serving.api_keys_file != path:
        print(f"serve with RECSYS_API_KEYS_FILE={path} to require it", file=sys.stderr)
    return OK


def cmd_api_key_list(args: argparse.Namespace) -> int:
    from serving.keys import read_keys_file

    path = _keys_file(args.file)
    for key in read_keys_file(path):
        limit = f", {key.rate_limit:g}/s" if key.rate_limit else ""
        _print(f"{key.name}: {', '.join(sorted(key.scopes))}{limit} (sha256 {key.sha256[:12]}...)")
    return OK


def _keys_file(given: str | None) -> Path:
    """--file, else RECSYS_API_KEYS_FILE, else $RECSYS_HOME/api-keys.json."""
    config = get_settings()
    found = given or config.serving.api_keys_file
    return Path(found).expanduser() if found else config.home_dir() / "api-keys.json"


def cmd_consume(args: argparse.Namespace) -> int:
    from serving.consumer import consume

    return consume(args)


def cmd_forget_user(args: argparse.Namespace) -> int:
    """Forget one user: the same `forget_user` as DELETE /users/{id}, on this environment's
    event store and Redis."""
    import getpass
    import json

    import redis

    from feature_repo.connection import connect
    from feature_repo.event_store import open_event_store
    from feature_repo.forget import forget_user

    actor = args.actor or f"cli:{getpass.getuser()}"
    config = get_settings()
    home = config.home_dir()
    client = connect(config.redis.url, home)
    with open_event_store(config.store.postgres_url, home) as store:
        try:
            done = forget_user(args.user_id, actor, store, client, config.redis.namespace)
        except redis.RedisError as exc:
            _error(
                f"Redis is unavailable ({exc}): the user is suppressed and their events are "
                "deleted, but not their live features; run the command again"
            )
            return FAILED
    if args.json:
        _print(json.dumps(done.as_dict()))
        return OK
    removed = done.removed
    _print(
        f"forgot user {done.user_id}: {removed['events']} events, "
        f"{removed['user_recommendations']} batch recommendations and {removed['redis_keys']} "
        "Redis keys deleted; suppressed from now on (the next training leaves them out)"
    )
    _print(f"audit record {done.deletion_id} by {done.actor} (user_hash {done.user_hash[:16]}...)")
    return OK


def cmd_up(args: argparse.Namespace) -> int:
    """Dagster UI and MLflow UI side by side on the embedded storage, until Ctrl-C."""
    from orchestration.runner import ensure_dagster_home

    ensure_dagster_home()
    env = dict(os.environ)
    bin_dir = Path(sys.executable).parent
    dagster = shutil.which("dagster", path=str(bin_dir)) or "dagster"
    mlflow = shutil.which("mlflow", path=str(bin_dir)) or "mlflow"
    artifacts = get_settings().mlflow_artifact_root()
    commands = [
        [
            dagster,
            "dev",
            "-m",
            "orchestration.definitions",
            "-h",
            args.host,
            "-p",
            str(args.dagster_port),
        ],
        [
            mlflow,
            "ui",
            "--backend-store-uri",
            get_settings().mlflow_tracking_uri(),
            "--default-artifact-root",
            artifacts,
            "--host",
            args.host,
            "--port",
            str(args.mlflow_port),
        ],
    ]
    procs = [subprocess.Popen(cmd, env=env) for cmd in commands]
    _print(f"Dagster UI: http://{args.host}:{args.dagster_port}")
    _print(f"MLflow UI:  http://{args.host}:{args.mlflow_port}")
    _print("Ctrl-C stops both.")
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    return OK


def cmd_stack(args: argparse.Namespace) -> int:
    """The production topology as local processes (orchestration/stack.py)."""
    from orchestration.stack import Stack, StackError

    stack = Stack.from_settings()
    if args.action == "up":
        try:
            started = stack.up(say=_print, timeout=args.timeout)
        except StackError as exc:
            _error(f"{exc}\n`recsys stack down` stops what did start")
            return FAILED
        _print(f"stack healthy ({len(started)} started): {stack.folder}")
        for row in stack.status():
            _print(f"  {row['process']:<20} {row['url'] or ''}")
        return OK
    if args.action == "down":
        swept = stack.down(grace=args.grace)
        _print("stack stopped" + (f" ({swept} leftover processes killed)" if swept else ""))
        return OK
    if args.action == "env":
        for line in stack.env_lines():
            _print(line)
        return OK
    rows = stack.status()
    for row in rows:
        pid = row["pid"] or "-"
        _print(f"{row['process']:<20} {row['state']:<10} {pid!s:<8} {row['url'] or ''}")
    return OK if all(row["state"] == "healthy" for row in rows) else FAILED


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate a sample shop, train, analyse, then show the live service reacting to events."""
    home = get_settings().home_dir()
    data_dir = home / "demo-data"
    if not (data_dir / "events.csv").exists():
        cmd_generate(
            argparse.Namespace(
                users=args.users, items=args.items, events=args.events, seed=0, out=data_dir
            )
        )
    cmd_pipeline(
        argparse.Namespace(
            events=str(data_dir / "events.csv"),
            catalog=str(data_dir / "catalog.csv"),
            skip_invalid=False,
        )
    )
    for job, what in (("trends_job", "trend analysis"), ("segments_job", "user segments")):
        _print(f"\nrunning the {what} ({job}), pushed to Redis for the service")
        _run(job, {})
    if args.no_serve:
        _print_next(home)
        return OK
    _demo_live_service(data_dir, args.port)
    _print_next(home)
    return OK


def _print_next(home: Path) -> None:
    _print(
        "\nnext:\n"
        "  make up      # Dagster UI on http://127.0.0.1:3000, MLflow UI on http://127.0.0.1:5000\n"
        "  make serve   # the recommendation service on http://127.0.0.1:3001\n"
        f"state lives in {home} (RECSYS_HOME)"
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _post(url: str, body: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    import json
    import urllib.request

    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _demo_live_service(data_dir: Path, port: int | None) -> None:
    """Start the service, ask for a new visitor's recommendations, send a few of their clicks,
    ask again and show what changed; then stop the service."""
    import urllib.error

    events = pl.read_csv(data_dir / "events.csv", infer_schema=False)
    catalog = pl.read_csv(data_dir / "catalog.csv", infer_schema=False)
    # A visitor the model has never seen: the first answer is cold start (trends, popularity);
    # after a few clicks in one category, the live features alone personalise the next one.
    user = "demo-visitor"
    popular = events.group_by("item_id").len().sort("len", descending=True)
    picked = popular.join(catalog, on="item_id")
    new_category = picked["category"][len(picked) // 2]
    picks = picked.filter(pl.col("category") == new_category)["item_id"].head(3).to_list()

    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = get_settings().home_dir() / "demo-service.log"
    _print(f"\nstarting the service on {url} (its log: {log_path}) ...")
    log_file = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestration.cli", "serve", "--port", str(port)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the service exited early; see {log_path}")
            try:
                before = _post(f"{url}/recommend", {"user_id": user, "k": 5})
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError("the service did not answer within 180 s") from None
                time.sleep(1)
        _show_recommendations(
            f"recommendations for {user} (variant {before['variant']}, "
            f"model version {before['model_version']})",
            before,
            catalog,
        )
        now = int(time.time())
        sent = [
            {"user_id": user, "item_id": item, "event_type": kind, "timestamp": now - 60 + n}
            for n, (item, kind) in enumerate((i, k) for i in picks for k in ("view", "click"))
        ]
        answer = _post(f"{url}/events", {"events": sent})
        _print(
            f"\nsent {len(sent)} events: {user} viewed and clicked {', '.join(picks)} "
            f"({new_category}); accepted {answer['accepted']}"
        )
        after = _post(f"{url}/recommend", {"user_id": user, "k": 5})
        _show_recommendations(f"recommendations for {user} right after", after, catalog)
        moved = [i["item_id"] for i in after["items"]]
        was = [i["item_id"] for i in before["items"]]
        changed = len(set(moved) - set(was))
        category_of = dict(zip(catalog["item_id"], catalog["category"], strict=True))
        share = [sum(category_of.get(i) == new_category for i in ids) for ids in (was, moved)]
        _print(
            f"{changed} of {len(moved)} items are new, {share[1]} of them {new_category} "
            f"(before: {share[0]}), without retraining: the live features (recent items, co-view, "
            "embedding neighbours) personalised the answer"
            if changed or moved != was
            else "the ranking did not change: these events carried too little signal"
        )
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log_file.close()
        _print("service stopped")


def _show_recommendations(title: str, body: dict[str, Any], catalog: pl.DataFrame) -> None:
    rows = pl.DataFrame(
        {
            "item_id": [i["item_id"] for i in body["items"]],
            "score": [i["score"] for i in body["items"]],
            "reason": [i["reason"] for i in body["items"]],
        },
        schema={"item_id": pl.String, "score": pl.Float64, "reason": pl.String},
    ).join(catalog.select("item_id", "title", "category"), on="item_id", how="left")
    _print(f"\n{title}:")
    with pl.Config(tbl_rows=len(rows), tbl_hide_dataframe_shape=True, fmt_str_lengths=40):
        _print(str(rows.select("item_id", "title", "category", "score", "reason")))


def cmd_config(args: argparse.Namespace) -> int:
    from config.settings import effective, markdown_table

    if args.markdown:
        print(markdown_table())
        return OK
    rows = effective(get_settings())
    if args.json:
        print(json.dumps({name: value for name, _part, value in rows}, indent=2))
        return OK
    width = max(len(name) for name, _part, _value in rows)
    for name, part, value in rows:
        print(f"{name:<{width}}  {part:<13}  {value}")
    return OK


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, unless the option is required or has none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="write a seeded synthetic shop (events, catalog, truth)")
    p.add_argument("--users", type=int, default=5000, help="number of users")
    p.add_argument("--items", type=int, default=2000, help="number of items in the catalog")
    p.add_argument("--events", type=int, default=300_000, help="number of events")
    p.add_argument("--seed", type=int, default=0, help="random seed: one seed, one data set")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "simulate",
        help="drive a running service with simulated shoppers that follow a generator's truth",
        description="Simulated shoppers (drawn from the truth `recsys generate` wrote) ask POST "
        "/recommend, click, add to cart and buy by the truth's preferences and the positions "
        "shown, and send those events (with request_id and position) to POST /events.",
    )
    p.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:3001")
    p.add_argument("--truth", required=True, help="the generated folder (or its truth/ folder)")
    p.add_argument("--users", type=int, default=100, help="number of shoppers")
    p.add_argument("--new-users", type=int, default=0, help="of them, new users drawn afresh")
    p.add_argument("--seed", type=int, default=0, help="one seed, the same shoppers and draws")
    p.add_argument("--api-key", default=None, help="key with the read and ingest scopes")
    p.add_argument("--concurrency", type=int, default=8, help="shoppers at once")
    from training.simulate import REQUESTS_PER_VISIT

    p.add_argument(
        "--requests-per-user",
        type=int,
        default=REQUESTS_PER_VISIT,
        help=f"recommendations per shopper's visit (default {REQUESTS_PER_VISIT}: several pages)",
    )
    p.add_argument("--k", type=int, default=10, help="items per recommendation")
    p.add_argument(
        "--keep-seen",
        action="store_true",
        help="ask with exclude_seen false: shoppers may be shown items they already saw",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_simulate)

    def add_inputs(p: argparse.ArgumentParser, required: bool) -> None:
        events_help = "events CSV/Parquet, or a MovieLens 100k folder"
        if not required:
            events_help += "; without it, train on what the event store already holds"
        p.add_argument("--events", required=required, help=events_help)
        p.add_argument("--catalog", help="item catalog CSV/Parquet")
        p.add_argument("--skip-invalid", action="store_true", help="drop malformed rows (counted)")

    p = sub.add_parser("pipeline", help="import events, train, evaluate, register (champion gate)")
    add_inputs(p, required=False)
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("evaluate", help="train on a file and print the evaluation table")
    add_inputs(p, required=True)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("batch-recommend", help="train on a file, write top-k per user as CSV")
    add_inputs(p, required=True)
    p.add_argument("--k", type=int, default=10, help="recommendations per user")
    p.add_argument("--out", required=True, help="output CSV: user_id,item_id,rank,score")
    p.set_defaults(func=cmd_batch_recommend)

    p = sub.add_parser("serve", help="start the BentoML recommendation service")
    p.add_argument("--port", type=int, default=3001, help="port the service listens on")
    p.add_argument("--host", default="127.0.0.1", help="address the service listens on")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve beyond loopback without API keys (anyone who reaches it may write and "
        "call admin routes); without it, a non-loopback --host needs RECSYS_API_KEYS_FILE",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("api-key", help="create and list the service's API keys")
    keys = p.add_subparsers(
        dest="action",
        metavar="action",
        required=True,
        help="create: a new key, printed once, its hash stored; list: the keys of the file",
    )
    file_help = "keys file (default: RECSYS_API_KEYS_FILE, else $RECSYS_HOME/api-keys.json)"
    p = keys.add_parser(
        "create", help="create a key: print it once, store its hash", formatter_class=HelpFormatter
    )
    p.add_argument("--name", required=True, help="who uses the key (unique), e.g. shop-frontend")
    p.add_argument("--scopes", required=True, help="comma-separated: read, ingest, admin, metrics")
    p.add_argument("--file", default=None, help=file_help)
    p.add_argument(
        "--rate-limit",
        type=float,
        default=None,
        help="requests per second per scope for this key (default: RECSYS_RATE_LIMITS)",
    )
    p.set_defaults(func=cmd_api_key_create)
    p = keys.add_parser(
        "list",
        help="the keys of the file (names, scopes; never the keys)",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--file", default=None, help=file_help)
    p.set_defaults(func=cmd_api_key_list)

    from serving.consumer import add_arguments as add_consumer_arguments

    p = sub.add_parser(
        "consume",
        help="move events from the Redis stream to the event store",
        description="Move events from the Redis stream to the event store.",
    )
    add_consumer_arguments(p)
    p.set_defaults(func=cmd_consume)

    p = sub.add_parser(
        "forget-user",
        help="delete a user's events, batch lists and live features; suppress and audit",
    )
    p.add_argument("user_id", help="the user_id to forget")
    p.add_argument("--actor", default=None, help="who asks, for the audit (default: cli:<login>)")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(func=cmd_forget_user)

    p = sub.add_parser("up", help="Dagster UI and MLflow UI on the embedded storage")
    p.add_argument("--host", default="127.0.0.1", help="address both UIs listen on")
    p.add_argument("--dagster-port", type=int, default=3000, help="port of the Dagster UI")
    p.add_argument("--mlflow-port", type=int, default=5000, help="port of the MLflow UI")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser(
        "stack",
        help="the production topology (MLflow server, Dagster webserver, daemon and code "
        "location, two service replicas, the consumer) as local processes",
        description="Run docker-compose.yml's platform services as local processes against "
        "this machine's PostgreSQL and Redis (RECSYS_STACK_*). up: start what is not running and "
        "wait until healthy; status: each process and its health (exit 1 unless all healthy); "
        "down: stop all, also what a crash left; env: export lines for other recsys commands. "
        "Pid files and logs: $RECSYS_HOME/stack/.",
    )
    p.add_argument(
        "action",
        choices=("up", "down", "status", "env"),
        metavar="action",
        help="what to do: up, down, status or env",
    )
    p.add_argument(
        "--grace", type=float, default=30.0, help="down: seconds before SIGTERM becomes SIGKILL"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=0.0,
        help="up: seconds each service may take to turn healthy, when longer than its compose "
        "health check's budget (start period + retries x interval)",
    )
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser(
        "config",
        help="check the environment's settings and print the values in use",
        description="Check every RECSYS_* (and REDIS_URL, MLFLOW_TRACKING_URI, DAGSTER_HOME) "
        "setting and print the values in use; passwords in URLs are left out.",
    )
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="print the values as JSON")
    shape.add_argument(
        "--markdown", action="store_true", help="print the README's table of all settings"
    )
    p.set_defaults(func=cmd_config)

    p = sub.add_parser(
        "demo", help="generate a sample shop, train, analyse, show the live service react"
    )
    p.add_argument("--users", type=int, default=3000, help="shoppers in the sample shop")
    p.add_argument("--items", type=int, default=1000, help="items in its catalog")
    p.add_argument("--events", type=int, default=150_000, help="events to generate")
    p.add_argument("--port", type=int, default=None, help="service port (default: a free one)")
    p.add_argument("--no-serve", action="store_true", help="stop after training and the analyses")
    p.set_defaults(func=cmd_demo)

    from orchestration.analytics_cli import add_parsers as add_analytics_parsers
    from orchestration.experiments_cli import add_parsers as add_experiment_parsers

    add_analytics_parsers(sub)
    add_experiment_parsers(sub)
    from orchestration.lineage_cli import add_parsers as add_lineage_parsers

    add_lineage_parsers(sub)
    # Subcommands do not inherit the top parser's formatter: set it on each, in one place.
    for subparser in sub.choices.values():
        subparser.formatter_class = HelpFormatter
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # MLflow's per-file download bars drown the step lines; the steps are the progress shown.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        return int(args.func(args) or OK)
    except DataValidationError as exc:
        _error(str(exc))
        return BAD_INPUT
    except FileNotFoundError as exc:
        _error(str(exc))
        return BAD_INPUT
    except ConnectionError as exc:
        _error(str(exc))
        return FAILED
    except RuntimeError as exc:
        _error(str(exc))
        return FAILED
    except (SettingsError, AuthConfigError, ExperimentError) as exc:
        _error(str(exc))
        return BAD_INPUT
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    finally:
        _release_embedded_redis()


def _release_embedded_redis() -> None:
    """The embedded Redis a command started stops with it, unless a running service or
    consumer on the same RECSYS_HOME still uses it (then the last of them stops it)."""
    if "feature_repo.connection" in sys.modules:
        from feature_repo.connection import release_embedded

        # Only the server of this command's RECSYS_HOME: another embedded server of this
        # process (a caller's, say a test session's) is not the command's to stop.
        try:
            home: Path | None = get_settings().home_dir()
        except SettingsError:
            home = None
        release_embedded(home)


if __name__ == "__main__":
    sys.exit(main())
