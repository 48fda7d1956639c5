"""Training fixtures: a real MLflow registry of this test's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.registry import ModelRegistry


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "test-model",
        (tmp_path / "mlruns").as_uri(),
        cache_dir=tmp_path / "cache",
    )
