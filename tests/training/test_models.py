"""Every candidate generator on data whose right answer is known, plus save/load round trips."""

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from training.hybrid import MODEL_CLASSES
from training.models.als import ALSModel
from training.models.base import Recommender, top_k
from training.models.item2vec import Item2VecModel
from training.models.itemknn import EASEModel, ItemKNNModel
from training.models.popularity import PopularityModel


def checkerboard(n: int = 40, withheld: tuple[int, int] = (0, 0)) -> sp.csr_matrix:
    """implicit's test matrix: user u likes item i when u and i have the same parity."""
    u, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    dense = ((u + i) % 2 == 0).astype(np.float32)
    dense[withheld] = 0.0
    return sp.csr_matrix(dense)


MODELS = [
    ALSModel(factors=8, regularization=0.01, iterations=10, bm25=False, num_threads=1),
    EASEModel(l2=1.0),
    ItemKNNModel(neighbors=20, num_threads=1),
    Item2VecModel(vector_size=8, window=5, epochs=30, workers=1),
]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_withheld_item_comes_back_first(model: Recommender) -> None:
    matrix = checkerboard()
    model.fit(matrix)
    recs, scores = model.recommend(matrix[[0]], np.array([0]), k=5)
    assert recs[0, 0] % 2 == 0, "an item of the user's own parity ranks first"
    assert 0 in recs[0, :20].tolist() or model.name == "item2vec"
    seen = set(matrix[0].indices.tolist())
    assert not seen & set(recs[0].tolist()), "seen items are filtered"
    assert (np.diff(scores[0]) <= 1e-6).all(), "scores are sorted best first"


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.name)
def test_similar_items_share_parity_and_exclude_self(model: Recommender) -> None:
    model.fit(checkerboard())
    idx, _ = model.similar_items(np.array([2, 3]), k=5)
    assert 2 not in idx[0] and 3 not in idx[1]
    assert (idx[0] % 2 == 0).all() and (idx[1] % 2 == 1).all()


@pytest.mark.parametrize("model", [*MODELS, PopularityModel()], ids=lambda m: m.name)
def test_save_load_round_trip_scores_the_same(model: Recommender, tmp_path: Path) -> None:
    matrix = checkerboard()
    model.fit(matrix)
    model.save(tmp_path / model.name)
    loaded = MODEL_CLASSES[model.name].load(tmp_path / model.name)
    users = np.arange(5)
    np.testing.assert_allclose(
        loaded.score(matrix[:5], users), model.score(matrix[:5], users), rtol=1e-5, atol=1e-5
    )


def test_als_folds_in_unknown_users_like_known_ones() -> None:
    matrix = checkerboard()
    model = ALSModel(factors=8, regularization=0.01, iterations=10, num_threads=1).fit(matrix)
    known = model.score(matrix[[0]], np.array([0]))
    folded = model.score(matrix[[0]], np.array([-1]))
    assert np.argmax(known) % 2 == np.argmax(folded) % 2 == 0


def test_popularity_ranks_by_users_per_item() -> None:
    matrix = sp.csr_matrix(np.array([[1, 1, 0], [1, 0, 0], [1, 0, 1]], dtype=np.float32))
    model = PopularityModel().fit(matrix)
    idx, _ = model.recommend(sp.csr_matrix((1, 3), dtype=np.float32), k=3, filter_seen=False)
    assert idx[0, 0] == 0


def test_ease_refuses_catalogs_too_large() -> None:
    with pytest.raises(ValueError, match="item-kNN"):
        EASEModel(max_items=10).fit(sp.csr_matrix((3, 11), dtype=np.float32))


def test_top_k_orders_and_handles_k_larger_than_items() -> None:
    idx, vals = top_k(np.array([[0.1, 0.9, 0.5]]), 5)
    assert idx.tolist() == [[1, 2, 0]]
    assert vals.tolist() == [[0.9, 0.5, 0.1]]
