"""Online experiments on the real service: the admin routes start and stop them, every user is
served by one arm of their salted hash (a version arm's model is loaded for it), answers name the
variant and experiment, and an interleaving experiment merges two rankers."""

from __future__ import annotations

from starlette.testclient import TestClient

from tests.serving.conftest import Registered, train_hybrid
from training.experiments import assign_one, new_experiment

USERS = [f"u{i}" for i in range(40)]


def _recommend(client: TestClient, user: str) -> dict:
    response = client.post("/recommend", json={"user_id": user, "k": 6})
    assert response.status_code == 200, response.text
    return response.json()


def test_an_ab_experiment_splits_users_by_its_hash_and_stops(
    served_champion: Registered, client: TestClient
) -> None:
    version = served_champion.register(train_hybrid(seed=3), 0.1, promote=False)
    # Before: the champion for everyone (the challenger's default share aside).
    assert _recommend(client, "u1")["experiment"] is None
    started = client.post(
        "/experiments",
        json={"name": "v-test", "control": "champion", "treatments": [f"version:{version}"]},
    )
    assert started.status_code == 200, started.text
    experiment = new_experiment(**{**_definition(started.json())})
    seen = {}
    for user in USERS:
        body = _recommend(client, user)
        assert body["experiment"] == "v-test"
        arm = assign_one(experiment, user)
        assert body["variant"] == arm.name
        seen[arm.name] = body["model_version"]
    assert seen == {"champion": "1", f"v{version}": version}
    listed = client.get("/experiments").json()
    assert [e["name"] for e in listed] == ["v-test"] and listed[0]["status"] == "running"
    # A second experiment of the same name while it runs, an unknown version: refused.
    again = client.post("/experiments", json={"name": "v-test", "treatments": ["popularity"]})
    assert again.status_code == 422 and "already running" in again.json()["error"]
    unknown = client.post("/experiments", json={"name": "x", "treatments": ["version:99"]})
    assert unknown.status_code == 422 and "no version 99" in unknown.json()["error"]
    assert client.get("/experiments/nope").status_code == 404

    stopped = client.post("/experiments/v-test/stop")
    assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
    body = _recommend(client, USERS[0])
    assert body["experiment"] is None and body["variant"] == "champion"


def test_popularity_arm_and_an_interleaving_experiment(
    served_champion: Registered, client: TestClient
) -> None:
    started = client.post(
        "/experiments",
        json={"name": "pop", "control": "champion", "treatments": ["popularity"], "traffic": 1},
    )
    assert started.status_code == 200
    variants = {_recommend(client, u)["variant"] for u in USERS}
    assert variants == {"champion", "popularity"}
    assert {_recommend(client, u)["model_version"] for u in USERS} == {"1", None}
    client.post("/experiments/pop/stop")

    started = client.post(
        "/experiments",
        json={
            "name": "mix",
            "kind": "interleave",
            "control": "champion",
            "treatments": ["popularity"],
        },
    )
    assert started.status_code == 200, started.text
    body = _recommend(client, "u2")
    assert body["variant"] == "interleaved" and body["experiment"] == "mix"
    ids = [i["item_id"] for i in body["items"]]
    assert len(ids) == 6 == len(set(ids))
    # Never cached: a second request interleaves anew (a new request id, new coin flips).
    assert _recommend(client, "u2")["cached"] is False


def _definition(stored: dict) -> dict:
    """new_experiment's arguments that give the stored experiment's assignment."""
    arms = stored["arms"]
    return {
        "name": stored["name"],
        "control": arms[0]["target"],
        "treatments": [a["target"] for a in arms[1:]],
        "now": stored["started_at"],
    }
