"""Item-item models: EASE (closed form, small catalogs) and sparse cosine item-kNN (any size)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, Self

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
from implicit.nearest_neighbours import CosineRecommender
from implicit.utils import ParameterWarning

from training.models.base import Recommender, top_k

# Measured on the 2-core machine (OpenBLAS): a symmetric eigendecomposition costs about 25
# Cholesky inversions of the same size. The eigen route factorises the users x users side once
# for the whole l2 grid, so it wins while users are at most a third of the items; above that one
# Cholesky inversion per l2 value is cheaper.
THIN_USER_RATIO = 1 / 3


class GramInverse(Protocol):
    """(X^T X + l2 I)^-1 for any l2, from one factorisation of the data X."""

    def inverse(self, l2: float) -> np.ndarray:
        """The dense float32 n_items x n_items inverse at `l2` (a new array the caller owns)."""
        ...


class GramEigen:
    """The eigendecomposition G = X^T X = V diag(lam) V^T, computed on the small side.

    The nonzero eigenpairs of X^T X (items x items) are those of X X^T (users x users):
    X X^T = U diag(lam) U^T gives V = X^T U diag(lam)^-1/2. Then for every l2
    (G + l2 I)^-1 = I/l2 - V diag(lam / (l2 (lam + l2))) V^T, one matrix product per value.
    """

    def __init__(self, x: sp.csr_matrix) -> None:
        x = x.astype(np.float64)
        small = (x @ x.T).toarray()
        lam, u = np.linalg.eigh(small)
        # Eigenvalues at rounding level are zeros of a rank-deficient Gram; their vectors are noise.
        keep = lam > max(float(lam.max(initial=0.0)), 1.0) * 1e-9
        self.values = lam[keep]
        self.vectors = (np.asarray(x.T @ u[:, keep]) / np.sqrt(self.values)).astype(np.float32)
        self.n_items = x.shape[1]

    def inverse(self, l2: float) -> np.ndarray:
        shrink = (self.values / (l2 * (self.values + l2))).astype(np.float32)
        p = (self.vectors * -shrink) @ self.vectors.T
        p[np.diag_indices(self.n_items)] += np.float32(1.0 / l2)
        return p


class GramCholesky:
    """The dense Gram matrix, inverted per l2 value through a float32 Cholesky factorisation."""

    def __init__(self, x: sp.csr_matrix) -> None:
        self.gram = (x.T @ x).toarray().astype(np.float32)

    def inverse(self, l2: float) -> np.ndarray:
        n = self.gram.shape[0]
        a = self.gram.copy()
        a[np.diag_indices(n)] += np.float32(l2)
        try:
            factor = sla.cho_factor(a, lower=True, overwrite_a=True, check_finite=False)
        except np.linalg.LinAlgError as exc:
            raise np.linalg.LinAlgError(
                f"EASE: the Gram matrix + {l2} I is not positive definite; raise l2"
            ) from exc
        # Solving against the identity beats LAPACK's potri, which OpenBLAS runs on one thread.
        return sla.cho_solve(
            factor, np.eye(n, dtype=np.float32), overwrite_b=True, check_finite=False
        )


def gram_inverse(x: sp.csr_matrix) -> GramInverse:
    """The cheaper factorisation of X's Gram matrix for this shape (see THIN_USER_RATIO)."""
    n_users, n_items = x.shape
    if n_users <= THIN_USER_RATIO * n_items:
        return GramEigen(x)
    return GramCholesky(x)


def ease_weights(p: np.ndarray) -> np.ndarray:
    """EASE's B = I - P diagMat(1/diag(P)) with a zero diagonal, computed in place of P."""
    p /= -np.diag(p).copy()
    p[np.diag_indices(p.shape[0])] = 0.0
    return p


class EASEModel(Recommender):
    """Embarrassingly Shallow Autoencoder (Steck 2019): B = I - P diagMat(1/diag(P)).

    Dense n_items x n_items, so it is used only up to `max_items` items.
    """

    name: ClassVar[str] = "ease"

    # Steck's reference code uses 500 for catalogs of ~20k items; the pipeline tunes l2 on a grid
    # (100, 300, 600, 1000) and starts from 300, which suits the smaller catalogs of one shop.
    def __init__(self, l2: float = 300.0, binarize: bool = True, max_items: int = 12_000) -> None:
        self.l2 = l2
        self.binarize = binarize
        self.max_items = max_items
        self.weights = np.zeros((0, 0), dtype=np.float32)

    def params(self) -> dict[str, Any]:
        return {"l2": self.l2, "binarize": self.binarize, "max_items": self.max_items}

    def _input(self, user_items: sp.csr_matrix) -> sp.csr_matrix:
        x = user_items.tocsr().astype(np.float32)
        if self.binarize:
            x = x.copy()
            x.data[:] = 1.0
        return x

    def _check_size(self, n_items: int) -> None:
        if n_items > self.max_items:
            raise ValueError(
                f"EASE needs a dense {n_items}x{n_items} matrix; use item-kNN above "
                f"{self.max_items} items"
            )

    def fit(self, user_items: sp.csr_matrix, show_progress: bool = False) -> Self:
        self._check_size(user_items.shape[1])
        return self.fit_gram(gram_inverse(self._input(user_items)))

    def fit_gram(self, gram: GramInverse) -> Self:
        """Weights from a factorisation of the (transformed) data's Gram matrix."""
        self.weights = ease_weights(gram.inverse(self.l2))
        return self

    @classmethod
    def fitter(cls, user_items: sp.csr_matrix) -> Callable[[dict[str, Any]], EASEModel]:
        """One factorisation of the Gram matrix serves every l2 value tried on `user_items`."""
        grams: dict[bool, GramInverse] = {}

        def fit(params: dict[str, Any]) -> EASEModel:
            model = cls(**params)
            model._check_size(user_items.shape[1])
            if model.binarize not in grams:
                grams[model.binarize] = gram_inverse(model._input(user_items))
            return model.fit_gram(grams[model.binarize])

        return fit

    @property
    def n_items(self) -> int:
        return self.weights.shape[0]

    def score(self, user_items: sp.csr_matrix, users: np.ndarray | None = None) -> np.ndarray:
        return np.asarray(self._input(user_items) @ self.weights)

    def similar_items(self, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        items = np.asarray(items)
        scores = self.weights[items].copy()
        scores[np.arange(len(items)), items] = -np.inf
        return top_k(scores, k)

    def _save_arrays(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights}

    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.weights = arrays["weights"]


class ItemKNNModel(Recommender):
    """Cosine item-item neighbourhoods (implicit's CosineRecommender), top `neighbors` per item."""

    name: ClassVar[str] = "itemknn"

    def __init__(self, neighbors: int = 100, binarize: bool = True, num_threads: int = 0) -> None:
        self.neighbors = neighbors
        self.binarize = binarize
        self.num_threads = num_threads
        self.similarity = sp.csr_matrix((0, 0), dtype=np.float32)

    def params(self) -> dict[str, Any]:
        return {
            "neighbors": self.neighbors,
            "binarize": self.binarize,
            "num_threads": self.num_threads,
        }

    def _input(self, user_items: sp.csr_matrix) -> sp.csr_matrix:
        x = user_items.tocsr().astype(np.float32)
        if self.binarize:
            x = x.copy()
            x.data[:] = 1.0
        return x

    def fit(self, user_items: sp.csr_matrix, show_progress: bool = False) -> Self:
        model = CosineRecommender(K=self.neighbors + 1, num_threads=self.num_threads)
        with warnings.catch_warnings():
            # implicit transposes to COO internally and then warns about its own conversion.
            warnings.simplefilter("ignore", ParameterWarning)
            model.fit(self._input(user_items), show_progress=show_progress)
        sim = model.similarity.tocsr().astype(np.float32)
        sim.setdiag(0.0)
        sim.eliminate_zeros()
        self.similarity = sim
        return self

    @property
    def n_items(self) -> int:
        return self.similarity.shape[0]

    def score_sparse(self, user_items: sp.csr_matrix) -> sp.csr_matrix:
        """Scores as a sparse matrix: only items in the neighbourhoods of the user's items."""
        return (self._input(user_items) @ self.similarity).tocsr().astype(np.float32)

    def score(self, user_items: sp.csr_matrix, users: np.ndarray | None = None) -> np.ndarray:
        return np.asarray(self.score_sparse(user_items).toarray(), dtype=np.float32)

    def similar_items(self, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.similarity[np.asarray(items)].toarray()
        rows[rows == 0] = -np.inf
        rows[np.arange(len(items)), np.asarray(items)] = -np.inf
        return top_k(rows, k)

    def _save_arrays(self) -> dict[str, np.ndarray]:
        sim = self.similarity
        return {
            "data": sim.data,
            "indices": sim.indices,
            "indptr": sim.indptr,
            "shape": np.array(sim.shape),
        }

    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        shape = tuple(int(v) for v in arrays["shape"])
        self.similarity = sp.csr_matrix(
            (arrays["data"], arrays["indices"], arrays["indptr"]), shape=shape
        )
