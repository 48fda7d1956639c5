"""Each job's asset set, pinned: regrouping assets must not add or drop anything a job runs."""

import pytest

from orchestration.definitions import build_definitions

_INGEST = {"raw_events", "item_catalog"}
_OFFLINE = _INGEST | {
    "als_model",
    "batch_recommendations",
    "hybrid_ranker",
    "interaction_matrix",
    "item2vec_model",
    "item_item_model",
    "item_neighbors",
    "model_evaluation",
    "popularity_model",
    "popularity_snapshot",
    "training_split",
}
JOB_ASSETS = {
    "training_job": _OFFLINE
    | {
        "champion_gate",
        "registered_model",
        "online_features",
        "online_popularity",
        "online_catalog",
    },
    "offline_job": _OFFLINE,
    "ingest_job": _INGEST | {"popularity_snapshot", "online_popularity", "online_catalog"},
    "trends_job": _INGEST | {"trend_analysis", "online_trends"},
    "segments_job": _INGEST | {"user_segments", "online_profiles"},
    "retention_job": {"retention_cleanup"},
}


@pytest.mark.parametrize("job_name", sorted(JOB_ASSETS))
def test_job_runs_exactly_its_assets(job_name: str) -> None:
    job = build_definitions().resolve_job_def(job_name)
    keys = {key.to_user_string() for key in job.asset_layer.selected_asset_keys}
    assert keys == JOB_ASSETS[job_name]
