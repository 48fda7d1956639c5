"""The hybrid ranker: weight tuning, seen-item exclusion, unknown users, bundle round trip."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tests.conftest import make_catalog, make_events
from training.hybrid import HybridRecommender, normalise
from training.train import (
    blend,
    evaluate_models,
    fit_component,
    interactions_from,
    sequences_for,
    split_training_data,
)


@pytest.fixture(scope="module")
def trained() -> tuple:
    events = make_events(n_users=80, n_items=40, per_user=15)
    interactions = interactions_from(events)
    data = split_training_data(events, interactions, 0.2, seed=0)
    full = interactions.matrix
    results = {
        "als": fit_component(
            "als",
            {"factors": 8, "regularization": 1.0, "num_threads": 1},
            data.train,
            data.validation,
            full,
        ),
        "ease": fit_component(
            "ease", {"l2": 10.0}, data.train, data.validation, full, grid_spec={"l2": [1.0, 10.0]}
        ),
        "item2vec": fit_component(
            "item2vec",
            {"vector_size": 8, "epochs": 5, "workers": 1},
            data.train,
            data.validation,
            full,
            train_sequences=sequences_for(data.train_events, interactions.item_ids, 30),
            full_sequences=sequences_for(events, interactions.item_ids, 30),
        ),
        "popularity": fit_component("popularity", {}, data.train, data.validation, full),
    }
    final, on_validation, score = blend(results, data, make_catalog())
    return events, data, results, final, on_validation, score


def test_grid_search_records_every_trial(trained: tuple) -> None:
    results = trained[2]
    assert len(results["ease"].tuning) == 2
    assert results["ease"].params["l2"] in (1.0, 10.0)


def test_weights_form_a_simplex_and_hybrid_beats_popularity(trained: tuple) -> None:
    _, data, results, final, on_validation, _ = trained
    assert sum(final.weights.values()) == pytest.approx(1.0, abs=1e-3)
    assert all(w >= 0 for w in final.weights.values())
    table = evaluate_models(
        {"popularity": results["popularity"].validation_model, "hybrid": on_validation},
        data.train,
        data.validation,
    )
    ndcg = dict(zip(table["model"], table["ndcg@10"], strict=True))
    assert ndcg["hybrid"] > ndcg["popularity"]


def test_recommend_ids_excludes_seen_and_serves_unknown_users(trained: tuple) -> None:
    events, _, _, final, _, _ = trained
    recs = final.recommend_ids(["u1", "u2", "stranger"], k=5)
    seen = events.select("user_id", "item_id").unique()
    assert recs.join(seen, on=["user_id", "item_id"], how="semi").is_empty()
    assert recs.filter(pl.col("user_id") == "stranger").height == 5
    assert recs.group_by("user_id").agg(pl.col("rank").max())["rank"].to_list() == [5, 5, 5]
    u1 = recs.filter(pl.col("user_id") == "u1")
    assert u1["score"].is_sorted(descending=True)


def test_bundle_round_trip(trained: tuple, tmp_path: Path) -> None:
    final = trained[3]
    final.save(tmp_path / "bundle")
    loaded = HybridRecommender.load(tmp_path / "bundle")
    assert loaded.weights == final.weights
    assert loaded.catalog["category"].to_list() == final.catalog["category"].to_list()
    a = final.recommend_ids(["u3"], k=5)
    b = loaded.recommend_ids(["u3"], k=5)
    assert a["item_id"].to_list() == b["item_id"].to_list()


def test_item_neighbors_table(trained: tuple) -> None:
    table = trained[3].item_neighbors(k=5)
    assert set(table.columns) == {"item_id", "neighbor_id", "rank", "score"}
    assert table.filter(pl.col("item_id") == pl.col("neighbor_id")).is_empty()
    assert table.group_by("item_id").len()["len"].max() <= 5


def test_normalise_maps_rows_to_unit_interval_and_keeps_masks() -> None:
    out = normalise(np.array([[1.0, 3.0, -np.inf], [2.0, 2.0, 2.0]]))
    assert out[0].tolist() == [0.0, 1.0, -np.inf]
    assert out[1].tolist() == [0.0, 0.0, 0.0]


def test_sparse_item_knn_candidates_match_dense_blending() -> None:
    """The sparse item-kNN path and the fast top-k give the dense formula's exact ranking."""
    from training.models.base import mask_seen, top_k
    from training.models.itemknn import ItemKNNModel
    from training.models.popularity import PopularityModel

    events = make_events(n_users=120, n_items=40, per_user=10, seed=3)
    interactions = interactions_from(events)
    matrix = interactions.matrix
    knn = ItemKNNModel(neighbors=10, num_threads=1).fit(matrix)
    pop = PopularityModel().fit(matrix)
    weights = {"itemknn": 0.7, "popularity": 0.3}
    hybrid = HybridRecommender(
        {"itemknn": knn, "popularity": pop},
        weights,
        interactions.user_ids,
        interactions.item_ids,
        matrix,
    )
    users = np.arange(matrix.shape[0])
    top_item = int(np.argmax(pop.popularity))
    assert matrix[:, top_item].nnz > 0, "some users have seen the most popular item"
    got_idx, got = hybrid.recommend(matrix, users, k=5)

    dense = np.zeros(matrix.shape, dtype=np.float32)
    for name, model in (("itemknn", knn), ("popularity", pop)):
        raw = model.score(matrix, users)
        mask_seen(raw, matrix)
        dense += weights[name] * normalise(raw)
    _, want = top_k(dense, 5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.isfinite(got).all() and (got_idx >= 0).all()
