"""The production topology as one table of services: docker-compose.yml declares them as
containers, `recsys stack` runs them as local processes on this machine's PostgreSQL and Redis.

`SERVICES` is the one description: each service's command, whether it gets the platform's shared
environment (`PLATFORM_ENV`, compose's `x-recsys-env`), its health check and what it waits for.
A `Target` says where the services run: `COMPOSE` (service names as hosts, container ports and
paths, every setting at its documented default) or `Target.local(...)`. tests/test_stack.py
renders the table for `COMPOSE` and checks docker-compose.yml says the same; `up` renders it for
the machine and starts what is not running yet, waiting on each health check in dependency order.

State under `$RECSYS_HOME/stack/`: `<service>.pid`, `logs/<service>.log`, the generated Dagster
instance (`dagster_home/dagster.yaml`, `workspace.yaml`, from docker/'s), MLflow's artifacts.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from config import get_settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DOCKER_DIR = PROJECT_ROOT / "docker"
# Every process of a stack carries this variable (its value: the stack's folder), and so do the
# workers and runs they start: `down` finds them all by it, also those a crashed parent left.
MARKER = "RECSYS_STACK"
DATABASES = ("dagster", "mlflow", "events")


@dataclass(frozen=True)
class HealthCheck:
    """A compose health check: `test` is a command (CMD form) with {placeholders}."""

    test: tuple[str, ...]
    interval: int
    timeout: int
    retries: int
    start_period: int = 0


def http_check(path: str, interval: int, timeout: int, retries: int, start: int) -> HealthCheck:
    """GET a path of the service's own port with the image's Python (no curl in slim images)."""
    probe = (
        "import urllib.request; "
        f"urllib.request.urlopen('http://127.0.0.1:{{port}}{path}', timeout=5)"
    )
    return HealthCheck(("python", "-c", probe), interval, timeout, retries, start)


@dataclass(frozen=True)
class Service:
    """One platform service: its command and health check with {placeholders} (see `values`)."""

    name: str
    command: tuple[str, ...]
    depends_on: tuple[str, ...]
    health: HealthCheck | None = None
    platform_env: bool = True
    # How many processes `recsys stack` runs, each on a port of its own (compose runs one; more
    # go behind a load balancer there).
    replicas: int = 1
    # In compose this service's /data is its container's own (no recsys-data volume), so each
    # local process gets a RECSYS_HOME of its own too: two replicas never race on one model cache.
    private_home: bool = False


# The machine's servers: compose runs them as services, `recsys stack` connects to them.
EXTERNAL = ("postgres", "redis")

# Compose's x-recsys-env: name -> value with {placeholders}. A variable in SETTINGS is passed
# through from the environment with that default (compose: `${NAME:-default}`).
PLATFORM_ENV: dict[str, str] = {
    "RECSYS_ENV": "docker",
    "RECSYS_HOME": "{home}",
    "DAGSTER_HOME": "{dagster_home}",
    "RECSYS_POSTGRES_URL": "{postgres}/{db_events}",
    "RECSYS_DAGSTER_POSTGRES_URL": "{postgres_psycopg2}/{db_dagster}",
    "MLFLOW_TRACKING_URI": "http://{host_mlflow}:{port_mlflow}",
    "REDIS_URL": "{redis_url}",
    "RECSYS_REDIS_NAMESPACE": "{RECSYS_REDIS_NAMESPACE}",
    "RECSYS_MODEL_NAME": "{RECSYS_MODEL_NAME}",
    "RECSYS_RETRAIN_MIN_EVENTS": "{RECSYS_RETRAIN_MIN_EVENTS}",
    "RECSYS_RETENTION_DAYS": "{RECSYS_RETENTION_DAYS}",
    "RECSYS_RETRY_MAX_RETRIES": "{RECSYS_RETRY_MAX_RETRIES}",
    "RECSYS_RETRY_DELAY_SECONDS": "{RECSYS_RETRY_DELAY_SECONDS}",
    "RECSYS_ALERT_WEBHOOK_URL": "{RECSYS_ALERT_WEBHOOK_URL}",
    "RECSYS_DAGSTER_UI_URL": "{RECSYS_DAGSTER_UI_URL}",
}
# Deployment knobs with the stack's defaults, which differ from config/settings.py's embedded
# ones on purpose: live shop data leaves the store after a year (daily_retention), and the
# sensor retrains after 10,000 new events either way.
SETTINGS: dict[str, str] = {
    "RECSYS_REDIS_NAMESPACE": "recsys",
    "RECSYS_MODEL_NAME": "recsys-hybrid",
    "RECSYS_RETRAIN_MIN_EVENTS": "10000",
    "RECSYS_RETENTION_DAYS": "365",
    "RECSYS_RETRY_MAX_RETRIES": "3",
    "RECSYS_RETRY_DELAY_SECONDS": "5",
    "RECSYS_ALERT_WEBHOOK_URL": "",
    "RECSYS_DAGSTER_UI_URL": "http://127.0.0.1:{port_dagster-webserver}",
    "MLFLOW_ALLOWED_HOSTS": "{host_mlflow}:{port_mlflow},localhost:*,127.0.0.1:*",
    # Uvicorn restarts a worker that misses its 5 s health ping: on a starved host (a busy CI
    # machine) 1 avoids a restart loop while the workers import.
    "MLFLOW_WORKERS": "2",
}

SERVICES: tuple[Service, ...] = (
    Service(
        "mlflow",
        (
            "mlflow",
            "server",
            "--backend-store-uri",
            "{postgres_psycopg2}/{db_mlflow}",
            "--artifacts-destination",
            "{mlflow_artifacts}",
            "--serve-artifacts",
            "--host",
            "{listen}",
            "--port",
            "{port}",
            "--workers",
            "{MLFLOW_WORKERS}",
            "--allowed-hosts",
            "{MLFLOW_ALLOWED_HOSTS}",
        ),
        depends_on=("postgres",),
        health=http_check("/health", interval=10, timeout=8, retries=6, start=60),
        platform_env=False,
    ),
    Service(
        "dagster-code",
        (
            "dagster",
            "code-server",
            "start",
            "--host",
            "{listen}",
            "--port",
            "{port}",
            "--module-name",
            "orchestration.definitions",
            "--attribute",
            "defs",
            "--location-name",
            "recsys",
        ),
        depends_on=("postgres", "redis", "mlflow"),
        health=HealthCheck(
            ("dagster", "api", "grpc-health-check", "--port", "{port}"), 10, 10, 6, 90
        ),
    ),
    Service(
        "dagster-webserver",
        (
            "dagster-webserver",
            "--host",
            "{listen}",
            "--port",
            "{port}",
            "--workspace",
            "{dagster_home}/workspace.yaml",
        ),
        depends_on=("postgres", "dagster-code"),
        health=http_check("/server_info", interval=10, timeout=8, retries=6, start=60),
    ),
    Service(
        "dagster-daemon",
        ("dagster-daemon", "run", "--workspace", "{dagster_home}/workspace.yaml"),
        depends_on=("postgres", "dagster-code"),
        health=HealthCheck(("dagster-daemon", "liveness-check"), 30, 20, 5, 90),
    ),
    Service(
        "recommender",
        ("recsys", "serve", "--host", "{listen}", "--port", "{port}"),
        depends_on=("redis", "mlflow"),
        health=http_check("/readyz", interval=10, timeout=8, retries=6, start=90),
        replicas=2,
        private_home=True,
    ),
    Service("consumer", ("recsys", "consume"), depends_on=("postgres", "redis")),
)
SERVICE_NAMES = tuple(s.name for s in SERVICES)
REPLICA_NAMES = "abcdefghij"


def by_name(name: str) -> Service:
    return next(s for s in SERVICES if s.name == name)


@dataclass(frozen=True)
class Target:
    """Where the services run and what they connect to."""

    listen: str
    postgres: str  # the server's URL without a database: postgresql://user:pass@host:port
    databases: Mapping[str, str]
    redis_url: str
    home: str
    dagster_home: str
    dagster_logs: str
    mlflow_artifacts: str
    hosts: Mapping[str, str]
    ports: Mapping[str, int]  # a replicated service: its first replica's port
    settings: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def local(
        cls,
        folder: Path,
        postgres_url: str,
        redis_url: str,
        prefix: str,
        base_port: int,
        home: Path,
        environ: Mapping[str, str],
    ) -> Target:
        """The machine: loopback, ports from `base_port` on, databases `<prefix>_<name>`."""
        ports, port = {}, base_port
        for service in SERVICES:
            if "{port}" not in service.command:
                continue
            ports[service.name] = port
            port += service.replicas
        return cls(
            listen="127.0.0.1",
            postgres=server_url(postgres_url),
            databases={name: f"{prefix}_{name}" for name in DATABASES},
            redis_url=redis_url,
            home=str(home),
            dagster_home=str(folder / "dagster_home"),
            dagster_logs=str(folder / "logs" / "compute"),
            mlflow_artifacts=str(folder / "mlflow-artifacts"),
            hosts={name: "127.0.0.1" for name in (*SERVICE_NAMES, *EXTERNAL)},
            ports=ports,
            settings={k: environ[k] for k in SETTINGS if environ.get(k, "").strip()},
        )

    def values(self, service: Service | None = None, replica: int = 0) -> dict[str, str]:
        """The {placeholders} of commands, checks and the platform environment."""
        values = {
            "listen": self.listen,
            "postgres": self.postgres,
            "postgres_psycopg2": psycopg2_url(self.postgres),
            "redis_url": self.redis_url,
            "home": self.home,
            "dagster_home": self.dagster_home,
            "mlflow_artifacts": self.mlflow_artifacts,
            **{f"db_{name}": db for name, db in self.databases.items()},
            **{f"host_{name}": host for name, host in self.hosts.items()},
            **{f"port_{name}": str(port) for name, port in self.ports.items()},
        }
        for name, default in SETTINGS.items():
            values[name] = self.settings.get(name, default.format(**values))
        if service is not None and service.name in self.ports:
            values["port"] = str(self.ports[service.name] + replica)
        return values


def render(template: str | tuple[str, ...], values: Mapping[str, str]) -> Any:
    if isinstance(template, tuple):
        return [part.format(**values) for part in template]
    return template.format(**values)


def platform_environment(target: Target) -> dict[str, str]:
    values = target.values()
    return {name: render(value, values) for name, value in PLATFORM_ENV.items()}


# The containers' paths (docker/Dockerfile, the volumes of docker-compose.yml).
COMPOSE = Target(
    listen="0.0.0.0",
    postgres="postgresql://recsys:recsys@postgres:5432",
    databases={name: name for name in DATABASES},
    redis_url="redis://redis:6379/0",
    home="/data",
    dagster_home="/opt/dagster/dagster_home",
    dagster_logs="/opt/dagster/logs",
    mlflow_artifacts="/mlflow-artifacts",
    hosts={name: name for name in (*SERVICE_NAMES, *EXTERNAL)},
    ports={"mlflow": 5000, "dagster-code": 4000, "dagster-webserver": 3000, "recommender": 3000},
)


def server_url(url: str) -> str:
    """A PostgreSQL URL without its database (and query): where other databases are made."""
    base = url.split("?", 1)[0]
    scheme, rest = base.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


def psycopg2_url(url: str) -> str:
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, under which dagster-postgres fails
    # to store events (docker-compose.yml says the same): Dagster and MLflow name psycopg2.
    return "postgresql+psycopg2://" + url.split("://", 1)[1]


# What the stack expects of its servers' durability (README, "Durability"): compose's Redis runs
# with these options; `up` reads the machine's servers and says what a crash of theirs would lose.
REDIS_DURABILITY = {"appendonly": "yes", "appendfsync": "everysec"}
POSTGRES_DURABILITY = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
_REDIS_LOSS = {
    ("appendonly", "no"): "a restart of Redis loses every accepted event the consumer has not "
    "stored yet, and all real-time features",
    ("appendfsync", "no"): "a crash of the Redis host loses up to about 30 s of accepted events "
    "(the kernel's write-back)",
    ("appendfsync", "always"): "nothing acknowledged is lost; every write waits for an fsync",
}
_POSTGRES_LOSS = {
    "fsync": "a crash of the PostgreSQL host can corrupt the database",
    "synchronous_commit": "a crash of the PostgreSQL host loses up to 3 x wal_writer_delay of "
    "committed batches the consumer already acknowledged: lost events",
    "full_page_writes": "a crash during a page write can leave torn pages",
}


def durability_warnings(redis_config: Mapping[str, str], pg_config: Mapping[str, str]) -> list[str]:
    """What the servers' settings would lose on a crash, where they differ from the stack's."""
    found = []
    for name, wanted in REDIS_DURABILITY.items():
        value = redis_config.get(name, "")
        if value != wanted:
            loss = _REDIS_LOSS.get((name, value), "see the README's Durability section")
            found.append(f"Redis {name} is {value!r}, the stack expects {wanted!r}: {loss}")
    for name, wanted in POSTGRES_DURABILITY.items():
        value = pg_config.get(name, "")
        if value != wanted:
            found.append(
                f"PostgreSQL {name} is {value!r}, the stack expects {wanted!r}: "
                f"{_POSTGRES_LOSS[name]}"
            )
    return found


# --- the local processes ------------------------------------------------------------------------


@dataclass(frozen=True)
class Process:
    """One process of the stack: a service, or one replica of it."""

    service: Service
    replica: int = 0

    @property
    def name(self) -> str:
        if self.service.replicas == 1:
            return self.service.name
        return f"{self.service.name}-{REPLICA_NAMES[self.replica]}"


def processes() -> list[Process]:
    """Every process in start order (SERVICES is in dependency order; a test checks it)."""
    return [Process(s, i) for s in SERVICES for i in range(s.replicas)]


class StackError(RuntimeError):
    """The stack cannot start: a server is unreachable or a service failed its health check."""


@dataclass(frozen=True)
class Stack:
    """The local stack of one RECSYS_HOME."""

    folder: Path
    target: Target

    @classmethod
    def from_settings(cls, environ: Mapping[str, str] | None = None) -> Stack:
        config = get_settings()
        environ = os.environ if environ is None else environ
        folder = config.home / "stack"
        stack = config.stack
        target = Target.local(
            folder,
            stack.postgres_url,
            stack.redis_url,
            stack.prefix,
            stack.base_port,
            config.home,
            environ,
        )
        return cls(folder, target)

    # -- paths and rendering ----------------------------------------------------------------

    def pid_file(self, process: Process) -> Path:
        return self.folder / f"{process.name}.pid"

    def log_file(self, process: Process) -> Path:
        return self.folder / "logs" / f"{process.name}.log"

    def url(self, name: str, replica: int = 0) -> str:
        return f"http://127.0.0.1:{self.target.ports[name] + replica}"

    def replica_urls(self) -> list[str]:
        service = by_name("recommender")
        return [self.url(service.name, i) for i in range(service.replicas)]

    def command(self, process: Process) -> list[str]:
        argv = render(process.service.command, self.target.values(process.service, process.replica))
        return [_executable(argv[0]), *argv[1:]]

    def environment(
        self, process: Process, base: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        if process.service.platform_env:
            env.update(platform_environment(self.target))
        if process.service.private_home:
            home = self.folder / process.name
            env["RECSYS_HOME"] = str(home)
            # `bentoml serve` empties its metrics folder on start: one per replica.
            env["BENTOML_HOME"] = str(home / "bentoml")
        if process.service.name == "consumer":
            # One consumer name per process, stable across restarts (it resumes its pending
            # entries); a container's hostname plays this part in compose.
            env.setdefault("RECSYS_CONSUMER_NAME", f"consumer-{process.name}")
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # bentoml serve sets its own
        env[MARKER] = str(self.folder)
        return env

    def health_command(self, process: Process) -> list[str] | None:
        check = process.service.health
        if check is None:
            return None
        argv = render(check.test, self.target.values(process.service, process.replica))
        return [_executable(argv[0]), *argv[1:]]

    def dagster_environment(self) -> dict[str, str]:
        return self.environment(Process(by_name("dagster-daemon")))

    # -- state ---------------------------------------------------------------------------------

    def running(self, process: Process) -> int | None:
        """The pid of the process if its pid file names one that is still the one started."""
        import psutil

        try:
            pid, started = json.loads(self.pid_file(process).read_text())
            found = psutil.Process(int(pid))
            if abs(found.create_time() - float(started)) < 1 and found.status() != "zombie":
                return int(pid)
        except (OSError, ValueError, psutil.Error):
            pass
        return None

    def healthy(self, process: Process) -> bool:
        """The service's compose health check, run from here.

        An HTTP or gRPC check runs in this process (the same URL or call as the rendered
        command): on a busy host, starting a Python CLI per probe can take longer than the
        check's timeout. Any other check runs as its command, with a timeout of at least 60 s.
        """
        argv = self.health_command(process)
        check = process.service.health
        if argv is None or check is None:
            return self.running(process) is not None
        url = _probe_url(argv)
        if url is not None:
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    return 200 <= answer.status < 300
            except (OSError, ValueError):
                return False
        if argv[1:4] == ["api", "grpc-health-check", "--port"]:
            from dagster._grpc.client import DagsterGrpcClient

            try:
                client = DagsterGrpcClient(port=int(argv[4]), host="127.0.0.1")
                # The client prints a refused connection; not being up yet is not news.
                with contextlib.redirect_stdout(io.StringIO()):
                    return client.health_check_query() == "SERVING"
            except Exception:  # noqa: BLE001 - any gRPC failure means not healthy yet
                return False
        try:
            done = subprocess.run(
                argv,
                env=self.environment(process),
                capture_output=True,
                timeout=max(check.timeout, 60),
            )
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    # -- up --------------------------------------------------------------------------------------

    def prepare(self) -> list[str]:
        """Reach the servers, create the databases, write the Dagster instance files; returns
        what the servers' durability settings would lose on a crash (durability_warnings)."""
        import psycopg
        import redis

        (self.folder / "logs").mkdir(parents=True, exist_ok=True)
        admin = get_settings().stack.postgres_url
        try:
            with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
                have = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
                for name in self.target.databases.values():
                    if name not in have:
                        conn.execute(f'CREATE DATABASE "{name}"')
                pg_config = {
                    name: str(conn.execute(f"SHOW {name}").fetchone()[0])
                    for name in POSTGRES_DURABILITY
                }
        except psycopg.Error as exc:
            raise StackError(
                f"PostgreSQL at RECSYS_STACK_POSTGRES_URL ({_redact(admin)}) is unusable: {exc}"
            ) from exc
        try:
            client = redis.Redis.from_url(self.target.redis_url, socket_timeout=5)
            client.ping()
            redis_config = {k: str(client.config_get(k).get(k, "")) for k in REDIS_DURABILITY}
        except redis.RedisError as exc:
            raise StackError(
                f"Redis at RECSYS_STACK_REDIS_URL ({_redact(self.target.redis_url)}) does not "
                f"answer: {exc}"
            ) from exc
        home = Path(self.target.dagster_home)
        home.mkdir(parents=True, exist_ok=True)
        (home / "dagster.yaml").write_text(yaml.safe_dump(self.dagster_instance(), sort_keys=False))
        (home / "workspace.yaml").write_text(yaml.safe_dump(self.workspace(), sort_keys=False))
        Path(self.target.mlflow_artifacts).mkdir(parents=True, exist_ok=True)
        return durability_warnings(redis_config, pg_config)

    def dagster_instance(self) -> dict[str, Any]:
        """docker/dagster.yaml with the containers' paths moved to this stack's folders."""
        config = yaml.safe_load((DOCKER_DIR / "dagster.yaml").read_text())
        moves = {
            COMPOSE.dagster_logs: self.target.dagster_logs,
            COMPOSE.home: self.target.home,
            COMPOSE.dagster_home: self.target.dagster_home,
        }
        return _move_paths(config, moves)

    def workspace(self) -> dict[str, Any]:
        """docker/workspace.yaml pointing at the local code location."""
        config = yaml.safe_load((DOCKER_DIR / "workspace.yaml").read_text())
        for entry in config["load_from"]:
            server = entry["grpc_server"]
            server["host"] = self.target.hosts["dagster-code"]
            server["port"] = self.target.ports["dagster-code"]
        return config

    def up(self, wait: bool = True, say: Any = print, timeout: float = 0.0) -> list[str]:
        """Start every process that is not running; returns those started.

        A process starts once everything it depends on is healthy, as compose's
        `service_healthy` has it, so independent ones start side by side (the replicas and the
        consumer beside the Dagster processes). Each has compose's budget for its check, or
        `timeout` seconds if longer, from its start.
        """
        for warning in self.prepare():
            say(f"warning: {warning}")
        started: list[str] = []
        pending = [p for p in processes() if self.running(p) is None]
        healthy: set[str] = {p.name for p in processes() if p not in pending}
        deadlines = {p.name: time.monotonic() + self._budget(p, timeout) for p in processes()}

        def ready(service: str) -> bool:
            return all(p.name in healthy for p in processes() if p.service.name == service)

        while True:
            for process in list(pending):
                if all(d in EXTERNAL or ready(d) for d in process.service.depends_on):
                    self.start(process)
                    deadlines[process.name] = time.monotonic() + self._budget(process, timeout)
                    pending.remove(process)
                    started.append(process.name)
                    say(f"started {process.name} (log: {self.log_file(process)})")
            waiting = [p for p in processes() if p.name not in healthy and p not in pending]
            for process in waiting:
                if self.healthy(process):
                    healthy.add(process.name)
                    continue
                if self.running(process) is None:
                    raise StackError(f"{process.name} exited:\n{self.log_tail(process)}")
                if time.monotonic() > deadlines[process.name]:
                    raise StackError(f"{process.name} is not healthy:\n{self.log_tail(process)}")
            if not pending and (not wait or len(healthy) == len(processes())):
                return started
            time.sleep(1)

    @staticmethod
    def _budget(process: Process, timeout: float) -> float:
        # Compose's budget: the start period, then `retries` failed checks `interval` apart.
        check = process.service.health
        if check is None:
            return timeout
        return max(check.start_period + check.retries * check.interval, timeout)

    def start(self, process: Process) -> None:
        import psutil

        if process.service.name == "dagster-code":
            self.migrate_dagster()
        log = self.log_file(process)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            child = subprocess.Popen(
                self.command(process),
                env=self.environment(process),
                cwd=PROJECT_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        started = psutil.Process(child.pid).create_time()
        self.pid_file(process).write_text(json.dumps([child.pid, started]))

    def migrate_dagster(self) -> None:
        """Create Dagster's tables once, before three processes would race to."""
        argv = [_executable("dagster"), "instance", "migrate"]
        env = self.dagster_environment()
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise StackError(f"`dagster instance migrate` failed: {done.stderr[-2000:]}")

    def wait_healthy(self, process: Process, timeout: float = 0.0) -> None:
        """Until the process passes its health check (StackError if it exits or runs late)."""
        if process.service.health is None:
            return
        deadline = time.monotonic() + self._budget(process, timeout)
        while not self.healthy(process):
            if self.running(process) is None:
                raise StackError(f"{process.name} exited:\n{self.log_tail(process)}")
            if time.monotonic() > deadline:
                raise StackError(f"{process.name} is not healthy:\n{self.log_tail(process)}")
            time.sleep(1)

    def log_tail(self, process: Process, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file(process).read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- status and down -------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        rows = []
        for process in processes():
            pid = self.running(process)
            rows.append(
                {
                    "process": process.name,
                    "pid": pid,
                    "state": "stopped"
                    if pid is None
                    else ("healthy" if self.healthy(process) else "unhealthy"),
                    "url": self.url(process.service.name, process.replica)
                    if process.service.name in self.target.ports
                    else None,
                    "log": str(self.log_file(process)),
                }
            )
        return rows

    def marked(self) -> Iterator[Any]:
        """Every live process that carries this stack's marker (workers, runs, orphans)."""
        import psutil

        for found in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error):
                if found.pid != os.getpid() and found.environ().get(MARKER) == str(self.folder):
                    yield found

    def stop(self, process: Process, grace: float = 30.0, sig: int = signal.SIGTERM) -> None:
        """Stop one process and what it started (SIGTERM, then SIGKILL after `grace`)."""
        import psutil

        pid = self.running(process)
        if pid is None:
            self.pid_file(process).unlink(missing_ok=True)
            return
        main = psutil.Process(pid)
        family = [main, *main.children(recursive=True)]
        for member in family:
            with contextlib.suppress(psutil.Error):
                member.send_signal(sig)
        _, alive = psutil.wait_procs(family, timeout=grace)
        for member in alive:
            with contextlib.suppress(psutil.Error):
                member.kill()
        psutil.wait_procs(alive, timeout=10)
        self.pid_file(process).unlink(missing_ok=True)

    def kill(self, process: Process) -> None:
        """SIGKILL a process and its children, like a crash (its pid file stays)."""
        import psutil

        pid = self.running(process)
        if pid is None:
            return
        main = psutil.Process(pid)
        family = [main, *main.children(recursive=True)]
        for member in family:
            with contextlib.suppress(psutil.Error):
                member.kill()
        psutil.wait_procs(family, timeout=10)

    def down(self, grace: float = 30.0) -> int:
        """Stop every process in reverse start order, then any marked one left (orphans of a
        crash); returns how many processes the sweep had to kill."""
        import psutil

        for process in reversed(processes()):
            self.stop(process, grace)
        left = list(self.marked())
        for found in left:
            with contextlib.suppress(psutil.Error):
                found.terminate()
        _, alive = psutil.wait_procs(left, timeout=min(grace, 10))
        for found in alive:
            with contextlib.suppress(psutil.Error):
                found.kill()
        return len(left)

    def env_lines(self) -> list[str]:
        """`export` lines that point a shell's `recsys` commands at this stack."""
        env = platform_environment(self.target)
        return [f"export {name}={_quote(value)}" for name, value in env.items()]


def _move_paths(value: Any, moves: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        return {key: _move_paths(item, moves) for key, item in value.items()}
    if isinstance(value, list):
        return [_move_paths(item, moves) for item in value]
    if isinstance(value, str):
        for old, new in moves.items():
            if value == old or value.startswith(old.rstrip("/") + "/"):
                return new + value[len(old) :]
    return value


def _probe_url(argv: list[str]) -> str | None:
    """The URL an http_check's `python -c` probe opens, if `argv` is one."""
    if len(argv) == 3 and argv[1] == "-c":
        found = re.search(r"urlopen\('([^']+)'", argv[2])
        return found.group(1) if found else None
    return None


def _executable(name: str) -> str:
    """A console script of this interpreter's environment (the venv), else the name itself."""
    if name == "python":
        return sys.executable
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name


def _quote(value: str) -> str:
    import shlex

    return shlex.quote(value)


def _redact(url: str) -> str:
    from config.settings import redact_url

    return redact_url(url)
