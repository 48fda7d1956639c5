"""Implicit-feedback ALS (benfred/implicit) behind the Recommender interface."""

from __future__ import annotations

from typing import Any, ClassVar, Self

import numpy as np
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

from training.models.base import Recommender, top_k


class ALSModel(Recommender):
    """Matrix factorisation of confidences (Hu, Koren, Volinsky 2008), optionally BM25-weighted."""

    name: ClassVar[str] = "als"

    def __init__(
        self,
        factors: int = 64,
        # implicit's default is 0.01 for raw counts; BM25-weighted confidences (k1=100) are
        # larger, and 20 is the middle of the pipeline's tuning grid (5, 20, 50).
        regularization: float = 20.0,
        alpha: float = 1.0,
        iterations: int = 15,
        bm25: bool = True,
        bm25_k1: float = 100.0,
        bm25_b: float = 0.8,
        random_state: int = 0,
        num_threads: int = 0,
    ) -> None:
        self.factors = factors
        self.regularization = regularization
        self.alpha = alpha
        self.iterations = iterations
        self.bm25 = bm25
        self.bm25_k1 = bm25_k1
        self.bm25_b = bm25_b
        self.random_state = random_state
        self.num_threads = num_threads
        self._model = self._new_model()

    def _new_model(self) -> AlternatingLeastSquares:
        # implicit checks the BLAS thread pool on construction; fits run with one BLAS thread.
        with threadpool_limits(1, "blas"):
            return self._construct()

    def _construct(self) -> AlternatingLeastSquares:
        return AlternatingLeastSquares(
            factors=self.factors,
            regularization=self.regularization,
            alpha=self.alpha,
            iterations=self.iterations,
            random_state=self.random_state,
            num_threads=self.num_threads,
        )

    def params(self) -> dict[str, Any]:
        return {
            "factors": self.factors,
            "regularization": self.regularization,
            "alpha": self.alpha,
            "iterations": self.iterations,
            "bm25": self.bm25,
            "bm25_k1": self.bm25_k1,
            "bm25_b": self.bm25_b,
            "random_state": self.random_state,
            "num_threads": self.num_threads,
        }

    def _weight(self, user_items: sp.csr_matrix) -> sp.csr_matrix:
        """The confidence transform used in training and fold-in alike."""
        if not self.bm25:
            return user_items.astype(np.float32).tocsr()
        # BM25 needs the item document frequencies of the training data, kept after fit.
        weighted = user_items.astype(np.float32).tocsr(copy=True)
        if weighted.nnz == 0:
            return weighted
        lengths = np.asarray(weighted.sum(axis=1)).ravel()
        length_norm = (1.0 - self.bm25_b) + self.bm25_b * lengths / max(self._avg_len, 1e-9)
        row_of = np.repeat(np.arange(weighted.shape[0]), np.diff(weighted.indptr))
        tf = weighted.data
        weighted.data = (
            tf * (self.bm25_k1 + 1.0) / (self.bm25_k1 * length_norm[row_of] + tf)
        ) * self._idf[weighted.indices]
        return weighted

    def fit(self, user_items: sp.csr_matrix, show_progress: bool = False) -> Self:
        user_items = user_items.tocsr().astype(np.float32)
        if self.bm25:
            # The same BM25 formula as implicit.nearest_neighbours.bm25_weight, but with the
            # document frequencies kept so that fold-in weighs new users exactly as training did.
            df = np.bincount(user_items.indices, minlength=user_items.shape[1])
            self._idf = (np.log(user_items.shape[0]) - np.log1p(df)).astype(np.float32)
            self._avg_len = float(np.asarray(user_items.sum(axis=1)).mean())
        else:
            self._idf = np.ones(user_items.shape[1], dtype=np.float32)
            self._avg_len = 1.0
        weighted = self._weight(user_items)
        self._model = self._new_model()
        # implicit warns that a multi-threaded BLAS slows ALS; one BLAS thread is its advice.
        with threadpool_limits(1, "blas"):
            self._model.fit(weighted, show_progress=show_progress)
        return self

    @property
    def n_items(self) -> int:
        return int(self._model.item_factors.shape[0])

    @property
    def user_factors(self) -> np.ndarray:
        return self._model.user_factors

    @property
    def item_factors(self) -> np.ndarray:
        return self._model.item_factors

    def fold_in(self, user_items: sp.csr_matrix) -> np.ndarray:
        """Factors for users the model has not seen, solved from their interactions."""
        rows = np.arange(user_items.shape[0])
        return np.asarray(self._model.recalculate_user(rows, self._weight(user_items)))

    def score(self, user_items: sp.csr_matrix, users: np.ndarray | None = None) -> np.ndarray:
        n = user_items.shape[0]
        factors = np.empty((n, self.user_factors.shape[1]), dtype=np.float32)
        known = np.zeros(n, dtype=bool) if users is None else np.asarray(users) >= 0
        if known.any():
            factors[known] = self.user_factors[np.asarray(users)[known]]
        if (~known).any():
            factors[~known] = self.fold_in(user_items[np.flatnonzero(~known)])
        return factors @ self.item_factors.T

    def similar_items(self, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        factors = self.item_factors
        norms = np.linalg.norm(factors, axis=1)
        norms[norms == 0] = 1.0
        normed = factors / norms[:, None]
        scores = normed[np.asarray(items)] @ normed.T
        scores[np.arange(len(items)), np.asarray(items)] = -np.inf
        return top_k(scores, k)

    def _save_arrays(self) -> dict[str, np.ndarray]:
        return {
            "user_factors": np.asarray(self.user_factors),
            "item_factors": np.asarray(self.item_factors),
            "idf": self._idf,
            "avg_len": np.array([self._avg_len]),
        }

    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self._model = self._new_model()
        self._model.user_factors = arrays["user_factors"].astype(np.float32)
        self._model.item_factors = arrays["item_factors"].astype(np.float32)
        self._idf = arrays["idf"]
        self._avg_len = float(arrays["avg_len"][0])
