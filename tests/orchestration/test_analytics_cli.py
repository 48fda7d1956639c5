"""`recsys trends` and `recsys segments`: CSV output, same results as the assets, bad input."""

import argparse
import json
from pathlib import Path

import polars as pl
import pytest

from assets.analytics import SegmentAssetConfig, TrendAssetConfig
from orchestration.analytics_cli import add_parsers, csv_ready
from training.data import DataValidationError, read_catalog, read_events
from training.generate import GeneratedData, generate, write_generated
from training.segments import compute_segments
from training.trends import compute_trends


@pytest.fixture(scope="module")
def shop() -> GeneratedData:
    return generate(300, 120, 12_000, seed=4)


@pytest.fixture
def shop_files(shop: GeneratedData, tmp_path: Path) -> dict[str, Path]:
    return write_generated(shop, tmp_path / "shop")


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="recsys")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_trends_writes_one_row_per_item_as_the_asset_computes_it(
    shop_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, categories_out = tmp_path / "out" / "trends.csv", tmp_path / "out" / "categories.csv"
    code = _run(
        "trends",
        "--events",
        str(shop_files["events"]),
        "--catalog",
        str(shop_files["catalog"]),
        "--out",
        str(out),
        "--categories-out",
        str(categories_out),
    )
    assert code == 0
    table = pl.read_csv(out)
    assert table.columns[:2] == ["item_id", "category"]
    assert {"trend_type", "strength", "confidence", "velocity", "forecast", "burst"} <= set(
        table.columns
    )
    catalog = read_catalog(shop_files["catalog"])
    assert table.height == table["item_id"].n_unique() == catalog.height
    expected = compute_trends(
        read_events(shop_files["events"]), catalog, TrendAssetConfig().to_trend_config()
    ).items
    assert table["item_id"].to_list() == expected["item_id"].to_list()
    assert table["trend_type"].to_list() == expected["trend_type"].to_list()
    assert table["strength"].to_numpy() == pytest.approx(expected["strength"].to_numpy())
    categories = pl.read_csv(categories_out)
    assert set(categories["category"]) == set(catalog["category"])
    assert f"wrote {catalog.height} items" in capsys.readouterr().out


def test_segments_writes_one_row_per_user_with_lists_as_json(
    shop_files: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "segments.csv"
    args = ["segments", "--events", str(shop_files["events"])]
    assert _run(*args, "--catalog", str(shop_files["catalog"]), "--out", str(out)) == 0
    table = pl.read_csv(out)
    events = read_events(shop_files["events"])
    assert table.height == table["user_id"].n_unique() == events["user_id"].n_unique()
    assert table.columns[:2] == ["user_id", "segment"]
    assert {"rfm", "engagement", "churn_risk", "lifetime_value", "top_categories"} <= set(
        table.columns
    )
    expected = compute_segments(
        events, read_catalog(shop_files["catalog"]), SegmentAssetConfig().to_segment_config()
    ).users
    assert table["segment"].to_list() == expected["segment"].to_list()
    first = json.loads(table["top_categories"][0])
    assert first == expected["top_categories"][0].to_list()

    # Without a catalog there are no categories: the list column is empty, not "null" text.
    bare = tmp_path / "bare.csv"
    assert _run(*args, "--out", str(bare)) == 0
    assert pl.read_csv(bare)["top_categories"].null_count() == table.height


def test_malformed_events_raise_a_validation_error_unless_skipped(
    shop: GeneratedData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "events.csv"
    broken = shop.events.with_columns(pl.col("timestamp").cast(pl.String)).with_columns(
        pl.when(pl.int_range(pl.len()) == 3)
        .then(pl.lit("yesterday"))
        .otherwise(pl.col("timestamp"))
        .alias("timestamp")
    )
    broken.write_csv(path)
    out = tmp_path / "t.csv"
    for command in ("trends", "segments"):
        with pytest.raises(DataValidationError, match="line 5, column timestamp"):
            _run(command, "--events", str(path), "--out", str(out))
    assert _run("trends", "--events", str(path), "--skip-invalid", "--out", str(out)) == 0
    assert "(1 invalid rows skipped)" in capsys.readouterr().out
    header_only = tmp_path / "empty.csv"
    header_only.write_text("user_id,item_id,event_type,timestamp\n")
    with pytest.raises(DataValidationError, match="no valid events"):
        _run("segments", "--events", str(header_only), "--out", str(out))


def test_recsys_main_exits_2_on_a_malformed_file(tmp_path: Path) -> None:
    from orchestration import cli

    actions = cli.build_parser()._actions
    commands = {c for a in actions if isinstance(a, argparse._SubParsersAction) for c in a.choices}
    if "trends" not in commands:
        pytest.skip("orchestration/cli.py does not call analytics_cli.add_parsers yet")
    path = tmp_path / "events.csv"
    path.write_text("user_id,item_id,event_type,timestamp\nu1,i1,teleport,1700000000\n")
    for command in ("trends", "segments"):
        assert cli.main([command, "--events", str(path), "--out", str(tmp_path / "o.csv")]) == 2
    missing = str(tmp_path / "nope.csv")
    assert cli.main(["trends", "--events", missing, "--out", str(tmp_path / "o.csv")]) == 2


def test_csv_ready_encodes_lists_and_structs_only() -> None:
    frame = pl.DataFrame(
        {
            "a": [1, 2],
            "tags": [["x", "y"], None],
            "s": [{"k": 1}, {"k": 2}],
        }
    )
    flat = csv_ready(frame)
    assert flat["a"].to_list() == [1, 2]
    assert flat["tags"].to_list() == ['["x", "y"]', None]
    assert [json.loads(v) for v in flat["s"]] == [{"k": 1}, {"k": 2}]
