"""Orchestration fixtures: a champion already serving, registered without a training run."""

from __future__ import annotations

import mlflow
import pytest

from orchestration.environment import resources_for
from tests.conftest import tiny_bundle
from training.registry import GATE_METRIC, ModelRegistry


def pipeline_registry() -> ModelRegistry:
    """The registry the pipeline writes to in this test's environment."""
    return resources_for("local")["tracking"].registry()


@pytest.fixture
def champion() -> str:
    """Version 1 of the pipeline's registered model, promoted to champion; returns the version.

    Registered straight through the registry, which is several times faster than a training run.
    """
    bundle = tiny_bundle()
    registry = pipeline_registry()
    with registry.start_run("champion-fixture"):
        mlflow.log_metric(GATE_METRIC, 0.3)
        version = registry.log_bundle(bundle)
    assert registry.gate(version, 0.3, margin=0.0).promoted
    return version


def model_versions() -> list[str]:
    """Every version of the pipeline's registered model."""
    registry = pipeline_registry()
    found = registry.client.search_model_versions(f"name='{registry.model_name}'")
    return sorted(str(v.version) for v in found)
