"""Time-decayed popularity: the same ranked list for everyone, the cold-start fallback."""

from __future__ import annotations

from typing import Any, ClassVar, Self

import numpy as np
import scipy.sparse as sp

from training.models.base import Recommender, top_k


class PopularityModel(Recommender):
    """Scores each item by its summed (already time-decayed) confidence, or its user count."""

    name: ClassVar[str] = "popularity"

    def __init__(self, use_confidence: bool = False) -> None:
        self.use_confidence = use_confidence
        self.popularity = np.zeros(0, dtype=np.float32)

    def params(self) -> dict[str, Any]:
        return {"use_confidence": self.use_confidence}

    def fit(self, user_items: sp.csr_matrix, show_progress: bool = False) -> Self:
        csc = user_items.tocsc()
        if self.use_confidence:
            pop = np.asarray(csc.sum(axis=0)).ravel()
        else:
            pop = np.diff(csc.indptr).astype(np.float64)
        self.popularity = pop.astype(np.float32)
        return self

    @property
    def n_items(self) -> int:
        return len(self.popularity)

    def score(self, user_items: sp.csr_matrix, users: np.ndarray | None = None) -> np.ndarray:
        return np.broadcast_to(self.popularity, (user_items.shape[0], self.n_items)).copy()

    def similar_items(self, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = np.broadcast_to(self.popularity, (len(items), self.n_items)).copy()
        scores[np.arange(len(items)), np.asarray(items)] = -np.inf
        return top_k(scores, k)

    def _save_arrays(self) -> dict[str, np.ndarray]:
        return {"popularity": self.popularity}

    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.popularity = arrays["popularity"]
