"""The `recsys` command line, run in-process through its `main`."""

import argparse
from pathlib import Path

import polars as pl
import pytest

from orchestration.cli import build_parser, main
from tests.conftest import make_events
from tests.orchestration.conftest import model_versions, pipeline_registry
from training.registry import CHAMPION


def test_generate_writes_data_and_truth(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "gen"
    code = main(
        [
            "generate",
            "--users",
            "200",
            "--items",
            "80",
            "--events",
            "4000",
            "--seed",
            "3",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    for name in ("events.csv", "catalog.csv", "truth_users.csv", "truth_items.csv"):
        assert (out / name).exists()
    for name in ("users.parquet", "items.parquet", "meta.json"):
        assert (out / "truth" / name).exists()
    events = pl.read_csv(out / "events.csv")
    assert {"user_id", "item_id", "event_type", "timestamp"} <= set(events.columns)
    assert "generated" in capsys.readouterr().out


def test_pipeline_registers_a_champion_and_prints_metrics(
    events_csv: Path, catalog_csv: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["pipeline", "--events", str(events_csv), "--catalog", str(catalog_csv)]) == 0
    out = capsys.readouterr().out
    assert "| hybrid |" in out and "ndcg@10" in out
    assert "promoted to champion" in out
    # A second run on the same events stores nothing new and goes through the gate again.
    assert main(["pipeline"]) == 0
    assert "version 2" in capsys.readouterr().out


@pytest.mark.parametrize("users", [1, 3])
def test_pipeline_on_too_few_users_exits_2_and_registers_nothing(
    users: int, champion: str, tmp_path: Path, capsys: pytest.CaptureFixture, redis_env: str
) -> None:
    events = make_events(n_users=users, n_items=20, per_user=6)
    path = tmp_path / "small.csv"
    events.write_csv(path)
    assert main(["pipeline", "--events", str(path)]) == 2
    err = capsys.readouterr().err
    assert "need at least 10 users with at least 2 interactions (distinct items) each" in err
    assert f"found {users} such users among {users} users" in err
    assert model_versions() == [champion]
    assert pipeline_registry().get_version(CHAMPION).version == champion


def test_batch_recommend_writes_k_unseen_items_for_every_user(
    events_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "recs.csv"
    assert (
        main(["batch-recommend", "--events", str(events_csv), "--k", "5", "--out", str(out)]) == 0
    )
    recs = pl.read_csv(out, schema_overrides={"user_id": pl.String, "item_id": pl.String})
    events = pl.read_csv(events_csv)
    assert recs.columns == ["user_id", "item_id", "rank", "score"]
    assert recs["user_id"].n_unique() == events["user_id"].n_unique()
    assert recs.group_by("user_id").len()["len"].max() == 5
    seen = events.select("user_id", "item_id").unique()
    assert recs.join(seen, on=["user_id", "item_id"], how="semi").is_empty()
    first = recs.filter(pl.col("rank") == 1).height
    assert first == events["user_id"].n_unique()


def test_evaluate_prints_table_without_touching_the_registry(
    events_csv: Path, recsys_home: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["evaluate", "--events", str(events_csv)]) == 0
    assert "| popularity |" in capsys.readouterr().out
    assert not (recsys_home / "events").exists(), "evaluate uses a throw-away store"


def test_malformed_file_exits_2_naming_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("user_id,item_id,event_type,timestamp\nu1,i1,view,1\nu2,i2,teleport,2\n")
    assert main(["evaluate", "--events", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "line 3, column event_type" in err and "--skip-invalid" in err


def test_skip_invalid_drops_bad_rows(
    events_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    text = events_csv.read_text() + "u1,i1,teleport,1700000000\n"
    bad = tmp_path / "with-bad-row.csv"
    bad.write_text(text)
    out = tmp_path / "recs.csv"
    args = ["batch-recommend", "--events", str(bad), "--k", "3", "--out", str(out)]
    assert main(args) == 2
    assert main([*args, "--skip-invalid"]) == 0
    assert out.exists()
    assert "skipped 1 invalid event rows" in capsys.readouterr().out


def test_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", "--events", str(tmp_path / "nope.csv")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_batch_recommend_on_movielens(movielens_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "recs.csv"
    assert (
        main(["batch-recommend", "--events", str(movielens_dir), "--k", "10", "--out", str(out)])
        == 0
    )
    recs = pl.read_csv(out, schema_overrides={"user_id": pl.String, "item_id": pl.String})
    assert recs.height == 943 * 10
    ratings = pl.read_csv(
        movielens_dir / "u.data",
        separator="\t",
        has_header=False,
        new_columns=["user_id", "item_id", "rating", "ts"],
        schema_overrides={"user_id": pl.String, "item_id": pl.String},
    )
    assert recs.join(ratings, on=["user_id", "item_id"], how="semi").is_empty()


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _help_of(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_help_of_every_subcommand_explains_each_option_and_its_default(
    command: str, capsys: pytest.CaptureFixture
) -> None:
    shown = _help_of([command, "--help"], capsys)
    options = [a for a in _subcommands()[command]._actions if a.dest != "help"]
    assert options
    for action in options:
        name = action.option_strings[0] if action.option_strings else action.dest
        assert action.help, f"recsys {command} {name} has no help text"
        assert name in shown and " ".join(action.help.split()) in shown
        if not action.required and action.default is not None and action.default is not False:
            assert f"{action.help} (default: {action.default})" in shown, name


def test_consume_help_and_options_are_the_consumers_own(capsys: pytest.CaptureFixture) -> None:
    shown = _help_of(["consume", "--help"], capsys)
    assert "Move events from the Redis stream" in shown
    assert "--batch-size" in shown and "--until-idle" in shown
    # The options reach the consumer's parser (its own bounds check answers, not recsys').
    assert main(["consume", "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err


def test_unknown_option_is_still_an_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["evaluate", "--events", "x.csv", "--bogus"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
