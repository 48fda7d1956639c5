"""What is stored can never block training: a poisoned event store still gives a usable matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from assets.models import MatrixConfig, interaction_matrix, interaction_matrix_not_empty
from feature_repo.event_store import ParquetEventStore
from tests.conftest import make_events
from training.data import empty_catalog


def test_an_event_with_value_1e308_in_the_store_does_not_fail_the_matrix(tmp_path: Path) -> None:
    store = ParquetEventStore(tmp_path / "events")
    clean = make_events(n_users=10, per_user=5)
    store.append(clean)
    # Written straight to the store, around the contract (as a pre-contract /events did).
    poisoned = clean.head(2).with_columns(
        pl.lit("rating").cast(clean["event_type"].dtype).alias("event_type"),
        pl.Series("value", [1e308, -1e308]),
        pl.Series("event_id", ["poison-1", "poison-2"]),
    )
    assert store.append(poisoned) == 2
    output = interaction_matrix(MatrixConfig(), store.read(), empty_catalog())
    matrix = output.value
    assert output.metadata["dropped_invalid_values"].value == 2
    assert np.isfinite(matrix.matrix.data).all() and matrix.nnz > 0
    assert interaction_matrix_not_empty(matrix).passed
