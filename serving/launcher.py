"""`recsys serve`: runs `bentoml serve serving.service:RecommendationService` in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from config import load_settings

SERVICE = "serving.service:RecommendationService"
SERVICE_NAME = "recsys"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def serve_command(port: int, host: str) -> list[str]:
    """The `bentoml serve` command line for the service."""
    bentoml = Path(sys.executable).with_name("bentoml")
    program = [str(bentoml)] if bentoml.exists() else [sys.executable, "-m", "bentoml"]
    return [
        *program,
        "serve",
        SERVICE,
        "--port",
        str(port),
        "--host",
        host,
        "--working-dir",
        str(PROJECT_ROOT),
    ]


def serve_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the server: RECSYS_* and REDIS_URL pass through unchanged;
    RECSYS_SERVE_WORKERS (default: one per CPU) becomes BentoML's worker count; BentoML's home
    (its metrics files) is under RECSYS_HOME unless BENTOML_HOME is set."""
    environ = dict(os.environ if base is None else base)
    # Checked here, before any worker starts: a bad value is one message, not one per worker.
    config = load_settings(environ)
    option = f"services.{SERVICE_NAME}.workers={config.serving.workers}"
    existing = environ.get("BENTOML_CONFIG_OPTIONS", "").strip()
    environ["BENTOML_CONFIG_OPTIONS"] = f"{existing} {option}".strip()
    environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    # Make RECSYS_HOME absolute so every worker resolves the same folder whatever its cwd.
    home = config.home
    if config.home_is_set:
        environ["RECSYS_HOME"] = str(home)
    # `bentoml serve` empties $BENTOML_HOME/prometheus_multiproc_dir when it starts: with the
    # shared default (~/bentoml) a second server on the host wipes the first one's metrics.
    environ.setdefault("BENTOML_HOME", str(home / "bentoml"))
    return environ


def check_keys(host: str, insecure: bool = False) -> str:
    """The API keys the service will load (read now, so a bad keys file fails here and not in
    every worker) against the bind policy: the start-up line, or AuthConfigError."""
    from serving.keys import KeyRing, bind_policy
    from serving.settings import ServingSettings

    return bind_policy(host, KeyRing.from_settings(ServingSettings.from_env()), insecure)


def serve(port: int = 3001, host: str = "127.0.0.1", insecure: bool = False) -> int:
    """Run the service until it exits or is stopped; returns the server's exit code.

    Without API keys it serves only on a loopback address, unless `insecure` (AuthConfigError).

    SIGTERM (docker stop, systemd) and SIGINT (Ctrl-C) are passed on to `bentoml serve`, which
    drains in-flight requests and stops its workers; after 30 s it is killed.
    """
    if not 0 < port < 65536:
        raise ValueError(f"port must be between 1 and 65535, got {port}")
    print(f"recsys serve: {check_keys(host, insecure)}", file=sys.stderr, flush=True)
    environ = serve_env()
    config = load_settings(environ)
    if config.redis.url is None:
        # Start the embedded Redis here, so the workers share it and `recsys serve` stops it
        # when it exits (unless a consumer or a pipeline still uses it).
        from feature_repo.connection import connect

        connect(None, config.home_dir())
    process = subprocess.Popen(serve_command(port, host), env=environ)

    def forward(signum: int, _frame: object) -> None:
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            return process.wait()
        except KeyboardInterrupt:
            process.send_signal(signal.SIGINT)
        try:
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
