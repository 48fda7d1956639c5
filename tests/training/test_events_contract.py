"""The one event contract (training.events): the same rules for file import and /events batches,
and event identity (derived ids hash the whole event, stably)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from training.data import DataValidationError, load_events
from training.events import (
    RECORD_SCHEMA,
    EventLimits,
    check_batch,
    check_events,
    frame_from_records,
    with_event_ids,
)

NOW = 1_800_000_000.0


def _csv(tmp_path: Path, header: str, *rows: str) -> Path:
    path = tmp_path / "events.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _problems(path: Path) -> dict[int, tuple[str, str]]:
    with pytest.raises(DataValidationError) as info:
        load_events(path)
    return {p.line: (p.column, p.reason) for p in info.value.problems}


def test_file_import_and_events_share_timestamp_and_value_bounds(tmp_path: Path) -> None:
    rows = [
        ("view", "-5", ""),
        ("view", "99999999999999999999", ""),
        ("view", "1999-12-31T23:59:59Z", ""),
        ("rating", "1700000000", "1e308"),
        ("rating", "1700000000", "-1e308"),
        ("rating", "1700000000", "inf"),
        ("purchase", "1700000000", "0"),
        ("view", "1700000000", "nan"),
    ]
    path = _csv(
        tmp_path,
        "user_id,item_id,event_type,timestamp,value",
        "u,i,view,1700000000,",
        *(f"u,i,{t},{ts},{v}" for t, ts, v in rows),
    )
    with pytest.raises(DataValidationError) as info:
        load_events(path)
    assert "8 invalid row(s) out of 9" in str(info.value)
    # The same events through the /events check get the same verdicts.
    records = [
        {"user_id": "u", "item_id": "i", "event_type": t, "timestamp": ts}
        | ({"value": float(v)} if v else {})
        for t, ts, v in rows
    ]
    checked = check_batch(records, NOW)
    assert [r["index"] for r in checked.rejected] == list(range(8))
    reasons = [r["reason"] for r in checked.rejected]
    assert reasons[0] == reasons[2] == "timestamp: before 2000-01-01"
    assert reasons[1].startswith("timestamp: more than 300 s in the future")
    assert all(r.startswith("value: a rating must be within 0..10") for r in reasons[3:5])
    assert reasons[5] == reasons[7] == "value: not a finite number"
    assert reasons[6].startswith("value: a quantity must be above 0")


def test_file_problems_name_line_column_and_reason(tmp_path: Path) -> None:
    path = _csv(
        tmp_path,
        "user_id,item_id,event_type,timestamp,value",
        "u,i,view,-5,",
        "u,i,rating,1700000000,1e308",
    )
    problems = _problems(path)
    assert problems[2] == ("timestamp", "before 2000-01-01 ('-5')")
    assert problems[3] == ("value", "a rating must be within 0..10 ('1e308')")


def test_a_lowered_earliest_bound_admits_historical_data() -> None:
    raw = pl.DataFrame({"user_id": ["u"], "item_id": ["i"], "event_type": ["view"]}).with_columns(
        pl.lit("881250949").alias("timestamp")
    )
    assert check_events(raw, NOW).bad.to_list() == [True]
    lowered = check_events(raw, NOW, EventLimits(earliest_timestamp=881_250_949))
    assert lowered.bad.to_list() == [False]
    assert lowered.valid()["timestamp"].to_list() == [881_250_949]


def test_context_column_in_a_file(tmp_path: Path) -> None:
    big = json.dumps({f"k{n}": "v" * 200 for n in range(6)})
    path = _csv(
        tmp_path,
        "user_id,item_id,event_type,timestamp,context",
        'u,i,view,1700000000,"{""page"": ""home"", ""device"": ""ios""}"',
        "u,j,view,1700000000,",
        "u,k,view,1700000000,not json",
        'u,l,view,1700000000,"[""device""]"',
        'u,m,view,1700000000,"{""nested"": {""a"": 1}}"',
        '"u",n,view,1700000000,"' + big.replace('"', '""') + '"',
    )
    result = load_events(path, skip_invalid=True, keep_context=True)
    assert result.skipped == 4
    assert result.frame["context"].to_list() == ['{"device":"ios","page":"home"}', None]
    assert "context" not in load_events(path, skip_invalid=True).frame.columns
    reasons = {p.line: p.reason for p in result.problems}
    assert reasons[4].startswith("invalid: not valid JSON")
    assert reasons[5].startswith("invalid: not a JSON object")
    assert reasons[6].startswith("invalid: value of 'nested' is not a string, number")
    assert reasons[7].startswith("larger than 1024 bytes")


def test_lone_surrogates_are_rejected_per_event_not_per_batch() -> None:
    records = [
        {"user_id": "u\ud800", "item_id": "i", "event_type": "view"},
        {"user_id": "u", "item_id": "i", "event_type": "view", "context": {"page": "\udc00"}},
        {"user_id": "u", "item_id": "i", "event_type": "view", "event_id": "fine"},
    ]
    checked = check_batch(records, NOW)
    assert checked.rejected == [
        {"index": 0, "reason": "user_id: not valid Unicode (a lone surrogate)"},
        {"index": 1, "reason": "context: not valid Unicode (a lone surrogate)"},
    ]
    assert checked.events["event_id"].to_list() == ["fine"] and list(checked.indices) == [2]
    assert frame_from_records(records)["_unicode"].to_list() == ["user_id", "context", None]


def test_derived_ids_tell_apart_events_of_one_second_and_are_stable(tmp_path: Path) -> None:
    path = _csv(
        tmp_path,
        "user_id,item_id,event_type,timestamp,value,session_id",
        "u,i,view,1700000000,,",
        "u,i,view,1700000000250,,",  # milliseconds: the same second, 250 ms later
        "u,i,view,2023-11-14T22:13:20.500Z,,",
        "u,i,view,1700000000,,s2",
        "u,i,purchase,1700000000,1,",
        "u,i,purchase,1700000000,2,",
    )
    first = load_events(path).frame
    assert first["timestamp"].unique().to_list() == [1_700_000_000]
    assert first["event_id"].n_unique() == 6
    # Re-importing the same file gives the same ids (the stores dedupe it).
    assert load_events(path).frame["event_id"].to_list() == first["event_id"].to_list()
    # Stable across versions: a known digest of the canonical fields, not polars' hash.
    assert first["event_id"][0] == "h2:" + _blake2b(
        "u\x1fi\x1fview\x1f1700000000000000\x1f\x1f\x1f"
    )
    # The same instant written as seconds or as ISO-8601 is the same event.
    iso = load_events(
        _csv(tmp_path, "user_id,item_id,event_type,timestamp", "u,i,view,2023-11-14T22:13:20Z")
    ).frame
    assert iso["event_id"][0] == first["event_id"][0]


def test_with_event_ids_keeps_given_ids_and_fills_the_others() -> None:
    frame = pl.DataFrame(
        {
            "user_id": ["u", "u"],
            "item_id": ["i", "i"],
            "event_type": ["view", "view"],
            "timestamp": [1_700_000_000, 1_700_000_000],
            "value": [None, None],
            "session_id": [None, None],
            "event_id": ["given", None],
        },
        schema_overrides={"value": pl.Float64, "session_id": pl.String},
    )
    ids = with_event_ids(frame)["event_id"].to_list()
    assert ids[0] == "given" and ids[1].startswith("h2:") and len(ids[1]) == 3 + 32


def _blake2b(text: str) -> str:
    import hashlib

    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def test_configured_bounds_are_the_same_for_the_import_and_the_stored_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RECSYS_RATING_RANGE and friends reach the file import and the training read alike; a
    wider range is not undone by the matrix's own guard."""
    import dagster as dg

    from assets.ingestion import EventImportConfig, raw_events
    from config import get_settings
    from orchestration.environment import resources_for
    from training.matrix import build_interaction_matrix

    monkeypatch.setenv("RECSYS_RATING_RANGE", "0,100")
    monkeypatch.setenv("RECSYS_MAX_QUANTITY", "5")
    limits = get_settings().store.event_limits()
    assert (limits.rating_min, limits.rating_max, limits.max_quantity) == (0.0, 100.0, 5.0)
    store = resources_for("local")["event_store"]
    assert store.limits() == limits
    path = tmp_path / "events.csv"
    pl.DataFrame(
        {
            "user_id": ["u1", "u2", "u3"],
            "item_id": ["a", "b", "c"],
            "event_type": ["rating", "rating", "purchase"],
            "timestamp": ["1700000000"] * 3,
            "value": ["55", "101", "6"],
        }
    ).write_csv(path)
    with pytest.raises(DataValidationError) as bad:
        load_events(path, limits=store.limits())
    assert "2 invalid row(s)" in str(bad.value)
    loaded = load_events(path, skip_invalid=True, limits=store.limits())
    assert loaded.frame["value"].to_list() == [55.0]
    assert build_interaction_matrix(loaded.frame).dropped_events == 0

    # An event stored before the bounds were narrowed is left out of training, and counted.
    with store.open() as opened:
        opened.append(loaded.frame)
    monkeypatch.setenv("RECSYS_RATING_RANGE", "1,5")
    narrowed = resources_for("local")["event_store"]
    with pytest.raises(dg.Failure, match="event store is empty"):
        raw_events(dg.build_asset_context(), EventImportConfig(), narrowed)

    for wrong in ("5", "a,b", "5,1"):
        monkeypatch.setenv("RECSYS_RATING_RANGE", wrong)
        with pytest.raises(ValueError, match="RECSYS_RATING_RANGE"):
            get_settings().store.event_limits()


def test_attribution_fields_in_a_file(tmp_path: Path) -> None:
    path = _csv(
        tmp_path,
        "user_id,item_id,event_type,timestamp,request_id,position",
        "u,i,click,1700000000,r-1,0",
        "u,j,click,1700000000, r-2 ,12",
        "u,k,view,1700000000,,",
        "u,l,click,1700000000,r-3,-1",
        "u,m,click,1700000000,r-3,1.5",
        "u,n,click,1700000000," + "r" * 257 + ",1",
        "u,o,click,1700000000,r\x01,1",
    )
    result = load_events(path, skip_invalid=True, keep_context=True)
    assert result.frame["request_id"].to_list() == ["r-1", "r-2", None]
    assert result.frame["position"].to_list() == [0, 12, None]
    assert result.frame.schema["position"] == pl.Int32
    assert not {"request_id", "position"} & set(load_events(path, skip_invalid=True).frame.columns)
    reasons = {p.line: f"{p.column}: {p.reason}" for p in result.problems}
    assert reasons[5].startswith("position: must be within 0..1000000")
    assert reasons[6].startswith("position: not an integer")
    assert reasons[7].startswith("request_id: longer than 256 characters")
    assert reasons[8].startswith("request_id: contains control characters")


def test_attribution_fields_of_a_json_batch() -> None:
    records = [
        {"user_id": "u", "item_id": "i", "event_type": "click", "request_id": "r1", "position": 3},
        {"user_id": "u", "item_id": "i", "event_type": "click", "position": -2},
        {"user_id": "u", "item_id": "i", "event_type": "click", "position": 2**70},
        {"user_id": "u", "item_id": "j", "event_type": "view"},
    ]
    checked = check_batch(records, NOW)
    assert checked.rejected == [
        {"index": 1, "reason": "position: must be within 0..1000000"},
        {"index": 2, "reason": "position: must be within 0..1000000"},
    ]
    assert checked.events["request_id"].to_list() == ["r1", None]
    assert checked.events["position"].to_list() == [3, None]
    assert dict(checked.events.schema) == RECORD_SCHEMA
