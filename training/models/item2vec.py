"""Item2Vec (Barkan & Koenigstein 2016): gensim skip-gram over each user's time-ordered sessions."""

from __future__ import annotations

from typing import Any, ClassVar, Self

import numpy as np
import polars as pl
import scipy.sparse as sp
from gensim.models import Word2Vec

from training.models.base import Recommender, top_k


def session_sequences(
    events: pl.DataFrame, item_ids: np.ndarray, session_gap_minutes: float = 30.0
) -> list[list[int]]:
    """Each user's items in time order, cut where the gap exceeds the limit or session_id changes.

    Items are given as their column in `item_ids` (sorted); sequences of one item are dropped.
    """
    index = pl.DataFrame({"item_id": item_ids.astype(str), "col": np.arange(len(item_ids))})
    ordered = (
        events.select("user_id", "item_id", "timestamp", "session_id")
        .join(index, on="item_id")
        .sort("user_id", "timestamp")
    )
    gap = session_gap_minutes * 60.0
    new_session = (
        (pl.col("user_id") != pl.col("user_id").shift(1))
        | ((pl.col("timestamp") - pl.col("timestamp").shift(1)) > gap)
        | (
            pl.col("session_id").is_not_null()
            & (pl.col("session_id") != pl.col("session_id").shift(1))
        )
    ).fill_null(True)
    sessions = (
        ordered.with_columns(new_session.cum_sum().alias("session"))
        .group_by("session", maintain_order=True)
        .agg(pl.col("col"))
        .filter(pl.col("col").list.len() > 1)
    )
    return sessions["col"].to_list()


class Item2VecModel(Recommender):
    """Skip-gram item embeddings; a user is the confidence-weighted mean of their items' vectors."""

    name: ClassVar[str] = "item2vec"

    def __init__(
        self,
        vector_size: int = 64,
        window: int = 5,
        negative: int = 5,
        epochs: int = 10,
        min_count: int = 1,
        sample: float = 1e-3,
        ns_exponent: float = 0.75,
        session_gap_minutes: float = 30.0,
        workers: int = 2,
        seed: int = 0,
        max_token_passes: int = 10_000_000,
    ) -> None:
        self.vector_size = vector_size
        self.window = window
        self.negative = negative
        self.epochs = epochs
        self.min_count = min_count
        self.sample = sample
        self.ns_exponent = ns_exponent
        self.session_gap_minutes = session_gap_minutes
        self.workers = workers
        self.seed = seed
        self.max_token_passes = max_token_passes
        self.vectors = np.zeros((0, vector_size), dtype=np.float32)

    def params(self) -> dict[str, Any]:
        return {
            "vector_size": self.vector_size,
            "window": self.window,
            "negative": self.negative,
            "epochs": self.epochs,
            "min_count": self.min_count,
            "sample": self.sample,
            "ns_exponent": self.ns_exponent,
            "session_gap_minutes": self.session_gap_minutes,
            "workers": self.workers,
            "seed": self.seed,
            "max_token_passes": self.max_token_passes,
        }

    def effective_epochs(self, n_tokens: int) -> int:
        """`epochs`, reduced so epochs x tokens stays within `max_token_passes` (at least 1).

        A large corpus needs fewer passes to converge; a small one keeps every epoch asked for.
        """
        if not self.max_token_passes or n_tokens <= 0:
            return self.epochs
        return max(1, min(self.epochs, self.max_token_passes // n_tokens))

    def word2vec_kwargs(self) -> dict[str, Any]:
        """The gensim Word2Vec arguments this model trains with."""
        return {
            "vector_size": self.vector_size,
            "window": self.window,
            "negative": self.negative,
            "epochs": self.epochs,
            "min_count": self.min_count,
            "sample": self.sample,
            "ns_exponent": self.ns_exponent,
            "workers": self.workers,
            "seed": self.seed,
            "sg": 1,
        }

    def fit(self, user_items: sp.csr_matrix, show_progress: bool = False) -> Self:
        """Without timestamps, each user's items (in column order) form one sequence."""
        sequences = np.split(user_items.indices, user_items.indptr[1:-1])
        return self.fit_sequences(
            [s.tolist() for s in sequences if len(s) > 1], user_items.shape[1]
        )

    def fit_sequences(self, sequences: list[list[int]], n_items: int) -> Self:
        """Train on sequences of item columns; items never seen get a zero vector."""
        self.vectors = np.zeros((n_items, self.vector_size), dtype=np.float32)
        if not sequences:
            return self
        kwargs = self.word2vec_kwargs()
        kwargs["epochs"] = self.effective_epochs(sum(len(s) for s in sequences))
        model = Word2Vec(sentences=sequences, **kwargs)
        keys = np.asarray(model.wv.index_to_key, dtype=np.int64)
        self.vectors[keys] = model.wv.vectors
        return self

    @property
    def n_items(self) -> int:
        return self.vectors.shape[0]

    def _normed(self) -> np.ndarray:
        if (
            getattr(self, "_normed_cache", None) is None
            or self._normed_cache.shape != self.vectors.shape
        ):
            norms = np.linalg.norm(self.vectors, axis=1)
            norms[norms == 0] = 1.0
            self._normed_cache = (self.vectors / norms[:, None]).astype(np.float32)
        return self._normed_cache

    def score(self, user_items: sp.csr_matrix, users: np.ndarray | None = None) -> np.ndarray:
        normed = self._normed()
        weights = user_items.tocsr().astype(np.float32)
        profiles = np.asarray(weights @ normed)
        norms = np.linalg.norm(profiles, axis=1)
        norms[norms == 0] = 1.0
        return (profiles / norms[:, None]) @ normed.T

    def similar_items(self, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        normed = self._normed()
        items = np.asarray(items)
        scores = normed[items] @ normed.T
        scores[np.arange(len(items)), items] = -np.inf
        return top_k(scores, k)

    def _save_arrays(self) -> dict[str, np.ndarray]:
        return {"vectors": self.vectors}

    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.vectors = arrays["vectors"]
        self._normed_cache = None
