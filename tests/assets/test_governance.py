"""The retention_cleanup asset: old events and expired batch lists deleted, counts reported."""

from __future__ import annotations

import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from assets.governance import retention_cleanup
from assets.resources import EventStoreResource

DAY = 86_400


def _events(now: float) -> pl.DataFrame:
    ages = [400, 400, 200, 10, 1]  # days
    return pl.DataFrame(
        {
            "user_id": [f"u{k}" for k in range(len(ages))],
            "item_id": "i1",
            "event_type": "view",
            "timestamp": [int(now - a * DAY) for a in ages],
            "event_id": [f"e{k}" for k in range(len(ages))],
        }
    )


def _expired_recs(now: float) -> pl.DataFrame:
    utc = pl.Datetime("us", "UTC")
    return pl.DataFrame(
        {
            "user_id": ["u1", "u1", "u2"],
            "item_id": ["a", "b", "a"],
            "rank": [1, 2, 1],
            "score": [2.0, 1.0, 1.0],
            "model_version": "run:x",
            "generated_at": int((now - 2 * DAY) * 1e6),
            "expires_at": [int((now - DAY) * 1e6), int((now - DAY) * 1e6), int((now + DAY) * 1e6)],
        }
    ).with_columns(pl.col("generated_at", "expires_at").cast(pl.Datetime("us")).cast(utc))


@pytest.mark.parametrize("backend", ["parquet", "postgres"])
def test_retention_cleanup_deletes_old_events_and_expired_lists(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("postgres_url") if backend == "postgres" else ""
    now = time.time()
    resource = EventStoreResource(url=url, home=str(tmp_path), retention_days=365)
    with resource.open() as store:
        store.append(_events(now))
        store.replace_recommendations(_expired_recs(now))
        ages = [500, 366, 300]  # days
        store.append_impressions(
            pl.DataFrame(
                {
                    "request_id": [f"r{a}" for a in ages],
                    "user_id": "u1",
                    "timestamp": [now - a * DAY for a in ages],
                    "items": [["i1"]] * len(ages),
                }
            )
        )

    result = dg.materialize([retention_cleanup], resources={"event_store": resource})

    assert result.success
    (materialization,) = result.asset_materializations_for_node("retention_cleanup")
    meta = {k: v.value for k, v in materialization.metadata.items()}
    assert meta["deleted_events"] == 2 and meta["deleted_expired_recommendations"] == 2
    assert meta["retention_days"] == 365 and meta["deleted_impressions"] == 2
    with resource.open() as store:
        assert store.count() == 3
        assert store.read_impressions()["request_id"].to_list() == ["r300"]
        assert store.read_recommendations()["user_id"].to_list() == ["u2"]


def test_retention_is_off_by_default(tmp_path: Path) -> None:
    now = time.time()
    resource = EventStoreResource(home=str(tmp_path))
    with resource.open() as store:
        store.append(_events(now))
    result = dg.materialize([retention_cleanup], resources={"event_store": resource})
    (materialization,) = result.asset_materializations_for_node("retention_cleanup")
    assert materialization.metadata["deleted_events"].value == 0
    with resource.open() as store:
        assert store.count() == 5
