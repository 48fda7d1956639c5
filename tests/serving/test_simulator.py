"""`recsys simulate` against `bentoml serve` over a socket: shoppers of a generated shop ask a
model trained on that shop, and the events they send are accepted, naming their request."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import redis

from feature_repo.definitions import Keys
from orchestration.cli import main
from orchestration.simulator import SimulationConfig, SimulationError, simulate
from serving.keys import add_key
from tests.serving.conftest import free_port, register_champion, train_hybrid
from tests.serving.test_service_e2e import bentoml_serve
from training.generate import GeneratedData, generate, write_generated
from training.simulate import REQUESTS_PER_VISIT, ShopperModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shop() -> GeneratedData:
    return generate(n_users=300, n_items=120, n_events=20_000, seed=1)


def _stream_events(client: redis.Redis, namespace: str) -> list[dict]:
    """The events the service put on its stream (entries of other kinds left out)."""
    entries = client.xrange(Keys(namespace).stream)
    return [json.loads(fields["e"]) for _, fields in entries if "e" in fields]


def test_simulated_shoppers_against_the_served_model(
    shop: GeneratedData,
    namespace: str,
    redis_client: redis.Redis,
    recsys_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)  # bentoml serve sets its own
    register_champion(train_hybrid(events=shop.events, catalog=shop.catalog), tmp_path / "reg")
    keys = tmp_path / "keys.json"
    key = add_key(keys, "simulator", ["read", "ingest"], rate_limit=15.0)
    monkeypatch.setenv("RECSYS_API_KEYS_FILE", str(keys))
    data_dir = tmp_path / "shop"
    write_generated(shop, data_dir)
    model = ShopperModel(shop.truth)
    with bentoml_serve(recsys_home, workers=1) as (url, _):
        config = SimulationConfig(url, users=40, seed=3, requests_per_user=2, k=5, concurrency=4)
        with pytest.raises(SimulationError, match="pass --api-key"):
            simulate(model, config)
        config = SimulationConfig(**{**config.__dict__, "api_key": key})
        result = simulate(model, config)
        again = main(
            ["simulate", "--url", url, "--truth", str(data_dir), "--users", "20", "--seed", "4"]
            + ["--k", "5", "--api-key", key, "--json"]
        )
    assert again == 0
    report = json.loads(capsys.readouterr().out)

    answers = result.answers
    assert answers.height == 80 and answers["user_id"].n_unique() == 40
    assert set(answers["variant"]) == {"champion"}
    assert answers["impressions"].sum() == 400
    # The low rate limit made the service answer 429s, which were waited out.
    assert result.retries > 0 and not result.non_2xx
    assert result.events_sent > 0
    assert result.events_accepted == result.events_sent and result.events_rejected == 0
    summary = {r["variant"]: r for r in result.summary.iter_rows(named=True)}
    assert summary["all"]["clicks"] == answers["clicks"].sum() > 0
    assert 0 < summary["champion"]["ctr"] < 1

    events = _stream_events(redis_client, namespace)
    simulated = [e for e in events if e.get("session_id", "").startswith("sim3-")]
    assert len(simulated) == result.events_accepted
    requests = set(answers["request_id"])
    assert all(e["request_id"] in requests for e in simulated)
    assert all(0 <= e["position"] < 5 for e in simulated)
    kinds = {e["event_type"] for e in simulated}
    assert "click" in kinds and kinds <= {"click", "add_to_cart", "purchase"}
    assert sum(e["event_type"] == "click" for e in simulated) == answers["clicks"].sum()
    # The CLI run: 20 shoppers of a visit's answers each (the default), its events accepted too.
    total = next(v for v in report["variants"] if v["variant"] == "all")
    assert total["users"] == 20 and total["requests"] == 20 * REQUESTS_PER_VISIT == 60
    assert report["events"]["accepted"] == report["events"]["sent"]


def test_unreachable_service_is_a_clear_error(
    shop: GeneratedData, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    port = free_port()
    with socket.socket() as sock:  # nothing listens on the port
        sock.bind(("127.0.0.1", port))
        config = SimulationConfig(f"http://127.0.0.1:{port}", users=3)
        with pytest.raises(SimulationError, match="cannot reach the service"):
            simulate(ShopperModel(shop.truth), config)
    write_generated(shop, tmp_path)
    code = main(["simulate", "--url", f"http://127.0.0.1:{port}", "--truth", str(tmp_path)])
    assert code == 1 and "cannot reach the service" in capsys.readouterr().err
    code = main(["simulate", "--url", "http://x", "--truth", str(tmp_path / "none")])
    assert code == 2 and "recsys generate" in capsys.readouterr().err
