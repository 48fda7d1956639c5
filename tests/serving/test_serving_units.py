"""Units of the serving package: blend weights, settings, event checks, launcher command."""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl
import pytest

from serving.launcher import serve_command, serve_env
from serving.models import ModelSet
from serving.settings import DEFAULT_BLEND, ServingSettings, blend_weights
from training.data import validate_events
from training.events import check_batch


def test_blend_defaults_without_a_model() -> None:
    weights = blend_weights(ServingSettings(), None)
    assert weights == DEFAULT_BLEND
    assert (weights["coview"], weights["item2vec"], weights["popularity"]) == (0.4, 0.3, 0.2)
    assert weights["recency"] == 0.1


def test_trained_weights_share_the_blend_with_live_sources() -> None:
    trained = {"als": 0.4, "ease": 0.4, "item2vec": 0.0, "popularity": 0.2}
    weights = blend_weights(ServingSettings(model_share=0.5), trained)
    assert weights["als"] == pytest.approx(0.2) and weights["ease"] == pytest.approx(0.2)
    assert weights["popularity"] == pytest.approx(0.1)
    assert "item2vec" not in weights  # zero weight
    assert "batch" not in weights and "itemitem" not in weights  # superseded by the model
    assert weights["coview"] == 0.4 and weights["recency"] == 0.1
    overridden = blend_weights(ServingSettings(blend_overrides={"coview": 0.9}), trained)
    assert overridden["coview"] == 0.9


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_BLEND_WEIGHTS", '{"coview": 0.7}')
    monkeypatch.setenv("RECSYS_CHALLENGER_SHARE", "0.25")
    settings = ServingSettings.from_env()
    assert settings.blend_overrides == {"coview": 0.7} and settings.challenger_share == 0.25
    monkeypatch.setenv("RECSYS_BLEND_WEIGHTS", "[1, 2]")
    with pytest.raises(ValueError, match="RECSYS_BLEND_WEIGHTS"):
        ServingSettings.from_env()
    monkeypatch.delenv("RECSYS_BLEND_WEIGHTS")
    monkeypatch.setenv("RECSYS_CHALLENGER_SHARE", "2")
    with pytest.raises(ValueError, match="RECSYS_CHALLENGER_SHARE"):
        ServingSettings.from_env()
    monkeypatch.setenv("RECSYS_CHALLENGER_SHARE", "lots")
    with pytest.raises(ValueError, match="RECSYS_CHALLENGER_SHARE.*valid number"):
        ServingSettings.from_env()


def test_event_checks_agree_with_the_contract() -> None:
    now = time.time()
    raw = [
        {"user_id": " u1 ", "item_id": "i1", "event_type": "View", "timestamp": "1700000000"},
        {"user_id": "u1", "item_id": "i1", "event_type": "click", "timestamp": "1700000000123"},
        {
            "user_id": "u1",
            "item_id": "i2",
            "event_type": "view",
            "timestamp": "2024-03-04 05:06:07",
        },
        {"user_id": "u1", "item_id": "i3", "event_type": "view", "timestamp": "2024-03-04"},
        {
            "user_id": "u1",
            "item_id": "i4",
            "event_type": "rating",
            "value": 3.0,
            "session_id": "s1",
            "event_id": "given",
        },
    ]
    checked = check_batch(raw, now)
    assert checked.rejected == []
    frame = checked.events
    assert frame["user_id"].to_list() == ["u1"] * 5
    assert frame["timestamp"].to_list()[:4] == [1700000000, 1700000000, 1709528767, 1709510400]
    assert frame["event_type"].cast(str).to_list()[:2] == ["view", "click"]
    # The same events in a file get the same derived ids, so the store dedupes across paths.
    contract = validate_events(pl.DataFrame(raw[:4]), now=now).frame
    assert frame["event_id"].to_list()[:4] == contract["event_id"].to_list()[:4]
    assert frame["event_id"][4] == "given"


def test_challenger_split_is_stable_and_proportional() -> None:
    class Stub:
        def __init__(self, variant: str) -> None:
            self.variant = variant

    none = ModelSet(Stub("champion"), Stub("challenger"), challenger_share=0.0)
    assert {none.for_user(f"u{i}").variant for i in range(100)} == {"champion"}
    half = ModelSet(Stub("champion"), Stub("challenger"), challenger_share=0.5)
    picks = [half.for_user(f"u{i}").variant for i in range(2000)]
    assert 800 < picks.count("challenger") < 1200
    assert [half.for_user(f"u{i}").variant for i in range(2000)] == picks
    assert ModelSet().for_user("anyone") is None


def test_launcher_command_and_environment(tmp_path: Path) -> None:
    command = serve_command(3456, "0.0.0.0")
    assert "serving.service:RecommendationService" in command
    assert command[command.index("--port") + 1] == "3456"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    env = serve_env({"RECSYS_SERVE_WORKERS": "3", "RECSYS_HOME": "rel/home"})
    assert "services.recsys.workers=3" in env["BENTOML_CONFIG_OPTIONS"]
    assert Path(env["RECSYS_HOME"]).is_absolute()
    # Each RECSYS_HOME has its own BentoML home: a second server does not wipe its metrics.
    assert env["BENTOML_HOME"] == str(Path(env["RECSYS_HOME"]) / "bentoml")
    assert serve_env({"BENTOML_HOME": "/srv/bentoml"})["BENTOML_HOME"] == "/srv/bentoml"
    assert "services.recsys.workers=cpu_count" in serve_env({})["BENTOML_CONFIG_OPTIONS"]
    with pytest.raises(ValueError, match="RECSYS_SERVE_WORKERS"):
        serve_env({"RECSYS_SERVE_WORKERS": "zero"})


def test_a_new_visitor_gets_popular_items_when_the_model_left_popularity_out(
    trained_bundle,
) -> None:
    """A trained blend may give popularity no weight (it lost on validation); a user the model
    has never seen, with no live history, must still get items, not an empty list."""
    import numpy as np

    from feature_repo.types import ScoredItems
    from serving.bundle import ServingModel
    from serving.ranking import LiveFeatures, Ranker, RankingParams

    model = ServingModel(trained_bundle, "1", "champion")
    weights = blend_weights(ServingSettings(), {"als": 0.6, "ease": 0.4, "popularity": 0.0})
    assert "popularity" not in weights
    popular = ScoredItems(np.array(["i3", "i1", "i2"]), np.array([9.0, 5.0, 1.0]))
    ranked = Ranker(RankingParams()).recommend(
        model=model,
        weights=weights,
        user_id="never-seen",
        k=3,
        filters=None,
        exclude_seen=True,
        live=LiveFeatures(popularity=popular),
        now=time.time(),
    )
    assert list(ranked.item_ids) == ["i3", "i1", "i2"]


def test_a_forked_worker_issues_other_request_ids_than_its_parent() -> None:
    import multiprocessing

    from serving.request_ids import new_request_id

    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        child = pool.apply(new_request_id, ("champion", "1"))
    assert child != new_request_id("champion", "1")
