"""Every candidate generator on data whose right answer is known, plus save/load round trips."""

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from training.hybrid import MODEL_CLASSES
from training.models import itemknn
from training.models.als import ALSModel
from training.models.base import Recommender, top_k
from training.models.item2vec import Item2VecModel
from training.models.itemknn import (
    EASEModel,
    GramCholesky,
    GramEigen,
    ItemKNNModel,
    gram_inverse,
)
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


def _direct_ease(x: sp.csr_matrix, l2: float) -> np.ndarray:
    """Steck's closed form with a float64 inverse: the reference the fast paths must match."""
    gram = (x.T @ x).toarray().astype(np.float64) + l2 * np.eye(x.shape[1])
    p = np.linalg.inv(gram)
    b = p / -np.diag(p)
    b[np.diag_indices(x.shape[1])] = 0.0
    return b


def _random_interactions(n_users: int, n_items: int, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    # Popular items (a skewed column distribution) make the Gram matrix ill-conditioned.
    popularity = rng.pareto(1.5, n_items) + 0.05
    p = np.minimum(0.05 * popularity / popularity.mean(), 0.9)
    dense = (rng.random((n_users, n_items)) < p).astype(np.float32)
    return sp.csr_matrix(dense)


@pytest.mark.parametrize(
    ("n_users", "n_items", "solver"),
    [(40, 200, GramEigen), (400, 150, GramCholesky)],
    ids=["eigen (fewer users than items)", "cholesky (more users)"],
)
def test_ease_gram_factorisation_matches_the_direct_inverse(
    n_users: int, n_items: int, solver: type
) -> None:
    x = _random_interactions(n_users, n_items)
    assert isinstance(gram_inverse(x), solver)
    fit = EASEModel.fitter(x)
    for l2 in (1.0, 10.0, 100.0, 1000.0):
        expected = _direct_ease(x, l2)
        np.testing.assert_allclose(fit({"l2": l2}).weights, expected, atol=1e-4)
        # The one-off fit takes the same route.
        np.testing.assert_allclose(EASEModel(l2=l2).fit(x).weights, expected, atol=1e-4)


def test_ease_eigen_inverse_is_the_inverse() -> None:
    x = _random_interactions(30, 120, seed=1)
    gram = (x.T @ x).toarray().astype(np.float64)
    eigen = GramEigen(x)
    assert eigen.vectors.shape[1] <= 30, "at most one eigenpair per user"
    for l2 in (5.0, 500.0):
        product = eigen.inverse(l2).astype(np.float64) @ (gram + l2 * np.eye(120))
        np.testing.assert_allclose(product, np.eye(120), atol=1e-4)


def test_ease_fitter_factorises_once_for_every_l2(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _random_interactions(40, 200)
    made = []
    original = itemknn.gram_inverse
    monkeypatch.setattr(itemknn, "gram_inverse", lambda m: made.append(m) or original(m))
    fit = EASEModel.fitter(x)
    for l2 in (10.0, 100.0, 1000.0):
        fit({"l2": l2})
    assert len(made) == 1
