"""Readers and validation of the event and catalog contracts."""

from pathlib import Path

import polars as pl
import pytest

from training.data import (
    EVENT_SCHEMA,
    DataValidationError,
    load_catalog,
    load_events,
    read_events,
    read_movielens,
)


def _write(tmp_path: Path, text: str, name: str = "events.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_epoch_and_iso_timestamps_to_canonical_schema(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "user_id,item_id,event_type,timestamp,value\n"
        "u1,i1,view,1700000000,\n"
        "u1,i2,PURCHASE,2023-11-14T22:13:20Z,2\n"
        "u2,i1,rating,2023-11-14 22:13:20,4.5\n",
    )
    events = read_events(path)
    assert dict(events.schema) == EVENT_SCHEMA
    assert events["timestamp"].to_list() == [1700000000] * 3
    assert events["event_type"].cast(pl.String).to_list() == ["view", "purchase", "rating"]
    assert events["value"].to_list() == [None, 2.0, 4.5]
    assert events["event_id"].null_count() == 0


def test_malformed_rows_name_line_column_and_reason(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "user_id,item_id,event_type,timestamp\n"
        "u1,i1,view,1700000000\n"
        ",i2,view,1700000000\n"
        "u3,i3,teleport,1700000000\n"
        "u4,i4,view,yesterday\n",
    )
    with pytest.raises(DataValidationError) as info:
        load_events(path)
    message = str(info.value)
    assert "3 invalid row(s)" in message
    assert "line 3, column user_id: missing" in message
    assert "line 4, column event_type: unknown event_type" in message
    assert "line 5, column timestamp" in message
    assert "--skip-invalid" in message
    assert [p.line for p in info.value.problems] == [3, 4, 5]


def test_skip_invalid_drops_and_counts(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "user_id,item_id,event_type,timestamp\nu1,i1,view,1700000000\nu2,,view,1700000000\n",
    )
    result = load_events(path, skip_invalid=True)
    assert result.frame.height == 1
    assert result.skipped == 1


def test_rejects_control_characters_long_ids_and_rating_without_value(tmp_path: Path) -> None:
    long_id = "x" * 300
    path = _write(
        tmp_path,
        "user_id,item_id,event_type,timestamp,value\n"
        f"{long_id},i1,view,1700000000,\n"
        "u\x01,i1,view,1700000000,\n"
        "u3,i1,rating,1700000000,\n"
        "u4,i1,view,1700000000,abc\n",
    )
    with pytest.raises(DataValidationError) as info:
        load_events(path)
    reasons = {(p.line, p.column) for p in info.value.problems}
    assert {(2, "user_id"), (3, "user_id"), (4, "value"), (5, "value")} <= reasons


def test_missing_required_column_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "user_id,item_id,timestamp\nu1,i1,1\n")
    with pytest.raises(DataValidationError, match="missing column.*event_type"):
        load_events(path)


def test_parquet_events_are_read_like_csv(tmp_path: Path) -> None:
    frame = pl.DataFrame(
        {
            "user_id": [1, 2],
            "item_id": ["a", "b"],
            "event_type": ["view", "click"],
            "timestamp": [1700000000, 1700000100],
        }
    )
    path = tmp_path / "events.parquet"
    frame.write_parquet(path)
    events = read_events(path)
    assert events["user_id"].to_list() == ["1", "2"]


def test_same_content_gets_same_derived_event_id(tmp_path: Path) -> None:
    text = "user_id,item_id,event_type,timestamp\nu1,i1,view,1700000000\n"
    first = read_events(_write(tmp_path, text, "a.csv"))["event_id"][0]
    second = read_events(_write(tmp_path, text, "b.csv"))["event_id"][0]
    assert first == second


def test_catalog_validation(tmp_path: Path) -> None:
    good = _write(
        tmp_path,
        "item_id,title,category,price,in_stock\ni1,A,shoes,9.5,yes\ni2,B,,,0\n",
        "catalog.csv",
    )
    catalog = load_catalog(good).frame
    assert catalog["in_stock"].to_list() == [True, False]
    assert catalog["price"].to_list() == [9.5, None]
    bad = _write(tmp_path, "item_id,price,in_stock\ni1,cheap,maybe\n", "bad.csv")
    with pytest.raises(DataValidationError, match="line 2, column price: not a number"):
        load_catalog(bad)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_events(tmp_path / "nope.csv")


def test_movielens_reader(movielens_dir: Path) -> None:
    events, catalog = read_movielens(movielens_dir)
    assert events.height == 100_000
    assert events["user_id"].n_unique() == 943
    assert set(events["event_type"].cast(pl.String).unique()) == {"rating"}
    assert events["value"].min() == 1.0 and events["value"].max() == 5.0
    assert catalog.height == 1682
    assert catalog.filter(pl.col("item_id") == "1")["title"][0] == "Toy Story (1995)"
