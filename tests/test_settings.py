"""The one settings tree: every variable read and checked there, documented by the README."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from config import SettingsError, get_settings, load_settings
from config.settings import VARIABLES, markdown_table

ROOT = Path(__file__).resolve().parents[1]
CODE = ("config", "training", "feature_repo", "serving", "assets", "orchestration")


def test_the_readme_table_is_the_generated_one() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("-->\n", readme.index("<!-- settings table")) + len("-->\n")
    end = readme.index("\n<!-- end of settings table -->")
    assert readme[start:end] == markdown_table(), "run `recsys config --markdown` into README.md"


def test_no_module_outside_config_reads_a_platform_variable() -> None:
    # A read is environ.get(...), getenv(...) or environ[...] (not assigned) of a tree's name.
    names = "|".join(re.escape(name) for name in VARIABLES)
    read = re.compile(
        rf"(environ\.get\(|getenv\()\s*[\"']({names})[\"']"
        rf"|environ\[[\"']({names})[\"']\](?!\s*=[^=])"
    )
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for package in CODE
        if package != "config"
        for path in (ROOT / package).rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if read.search(line)
    ]
    assert offenders == []


def test_defaults_and_derived_paths(tmp_path: Path) -> None:
    config = load_settings({"RECSYS_HOME": str(tmp_path / "home")})
    assert config.home == tmp_path / "home" and config.home_is_set
    assert config.mlflow_tracking_uri() == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    assert config.mlflow_artifact_root() == (tmp_path / "home" / "mlruns").as_uri()
    assert config.dagster_home() == tmp_path / "home" / "dagster"
    assert config.serving.workers == "cpu_count" and config.redis.namespace == "recsys"
    # Empty values count as unset, as they did for each variable before the tree.
    assert load_settings({"REDIS_URL": "", "RECSYS_CACHE_TTL": " "}).serving.cache_ttl == 60


def test_a_bad_value_is_refused_naming_every_bad_variable() -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(
            {
                "RECSYS_CHALLENGER_SHARE": "2",
                "RECSYS_SERVE_WORKERS": "zero",
                "RECSYS_RATING_RANGE": "5,1",
                "RECSYS_BLEND_WEIGHTS": "[1, 2]",
                "RECSYS_ENV": "staging",
            }
        )
    message = str(raised.value)
    for name in (
        "RECSYS_CHALLENGER_SHARE",
        "RECSYS_SERVE_WORKERS",
        "RECSYS_RATING_RANGE",
        "RECSYS_BLEND_WEIGHTS",
        "RECSYS_ENV",
    ):
        assert name in message
    assert "min must be below max" in message


def test_a_changed_variable_is_seen_and_an_unchanged_one_not_read_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RECSYS_CACHE_TTL", "5")
    first = get_settings()
    assert first.serving.cache_ttl == 5 and get_settings() is first
    monkeypatch.setenv("RECSYS_CACHE_TTL", "7")
    assert get_settings().serving.cache_ttl == 7


def test_recsys_config_prints_values_without_passwords(tmp_path: Path) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "RECSYS_HOME": str(tmp_path),
        "REDIS_URL": "redis://app:s3cret@cache:6379/0",
    }
    shown = subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "config", "--json"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    values = json.loads(shown.stdout)
    assert values["REDIS_URL"] == "redis://app@cache:6379/0" and "s3cret" not in shown.stdout
    assert values["RECSYS_HOME"] == str(tmp_path)
    bad = subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "config"],
        env={**env, "RECSYS_MAX_BODY_BYTES": "big"},
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "RECSYS_MAX_BODY_BYTES" in bad.stderr


def test_the_service_settings_defaults_are_the_trees() -> None:
    from serving.settings import ServingSettings

    assert ServingSettings.from_env(load_settings({}).serving) == ServingSettings()
    tuned = load_settings(
        {"RECSYS_CACHE_TTL": "5", "RECSYS_RATE_LIMITS": '{"read": 0, "ingest": 5}'}
    )
    settings = ServingSettings.from_env(tuned.serving)
    assert settings.cache_ttl == 5 and settings.rate_limits == {"ingest": 5.0}
