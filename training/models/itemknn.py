"""Item-item models: EASE (closed form, small catalogs) and sparse cosine item-kNN (any size)."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Self

import numpy as np
import scipy.sparse as sp
from implicit.nearest_neighbours import CosineRecommender
from implicit.utils import ParameterWarning

from training.models.base import Recommender, top_k


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

    def fit(self, user_items: sp.csr_matrix, show_progress: bool = False) -> Self:
        n_items = user_items.shape[1]
        if n_items > self.max_items:
            raise ValueError(
                f"EASE needs a dense {n_items}x{n_items} matrix; use item-kNN above "
                f"{self.max_items} items"
            )
        x = self._input(user_items)
        gram = (x.T @ x).toarray().astype(np.float64)
        gram[np.diag_indices(n_items)] += self.l2
        p = np.linalg.inv(gram)
        b = p / (-np.diag(p))
        b[np.diag_indices(n_items)] = 0.0
        self.weights = b.astype(np.float32)
        return self

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
