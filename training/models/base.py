"""The one small interface every candidate generator implements (fit, score, recommend, save/load).

The hybrid ranker and the service consume this interface and know no model's internals.
"""

from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import scipy.sparse as sp


def default_params(cls: type) -> dict[str, Any]:
    """The defaults of a model's constructor: the one home of each hyperparameter's default
    (the pipeline's Dagster configs take theirs from here)."""
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _top_k_partition(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(part_scores, order, axis=1)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-k of a dense score matrix, best first: (indices, scores), both (n_rows, k).

    Exact. On wide rows a threshold from a strided sample of each row keeps only the few values
    that can be in the top k (one comparison pass), which is several times faster than a full
    argpartition; rows where the threshold keeps fewer than k values (or far too many, as with
    ties) fall back to argpartition.
    """
    n_rows, n_cols = scores.shape
    k = min(k, n_cols)
    if k <= 0:
        empty = np.empty((n_rows, 0))
        return empty.astype(np.int64), empty.astype(scores.dtype)
    if n_cols < 8192 or k * 64 > n_cols or n_rows == 0:
        return _top_k_partition(scores, k)
    stride = n_cols // 2048
    sample = scores[:, ::stride]
    rank = min(sample.shape[1] - 1, (2 * k) // stride + 2)
    threshold = -np.partition(-sample, rank, axis=1)[:, rank]
    keep = scores >= threshold[:, None]
    counts = keep.sum(axis=1)
    fine = (counts >= k) & (counts <= 64 * k)
    out_idx = np.empty((n_rows, k), dtype=np.int64)
    out_val = np.empty((n_rows, k), dtype=scores.dtype)
    if (~fine).any():
        rows = np.flatnonzero(~fine)
        out_idx[rows], out_val[rows] = _top_k_partition(scores[rows], k)
    if fine.any():
        rows = np.flatnonzero(fine)
        r, c = np.nonzero(keep if len(rows) == n_rows else keep[rows])
        v = scores[rows[r], c]
        order = np.lexsort((-v, r))
        r, c, v = r[order], c[order], v[order]
        starts = np.concatenate(([0], np.cumsum(counts[rows])[:-1]))
        take = (starts[:, None] + np.arange(k)[None, :]).ravel()
        out_idx[rows] = c[take].reshape(len(rows), k)
        out_val[rows] = v[take].reshape(len(rows), k)
    return out_idx, out_val


def mask_seen(scores: np.ndarray, user_items: sp.csr_matrix) -> np.ndarray:
    """Set the scores of items each row already interacted with to -inf, in place."""
    coo = user_items.tocoo()
    scores[coo.row, coo.col] = -np.inf
    return scores


class Recommender(ABC):
    """A candidate generator over a fixed item index.

    `user_items` is always a CSR matrix (rows = users, columns = the model's item index) of
    interaction confidences. `users` gives, per row, the user's row in the training matrix or -1
    for a user the model has not seen, who is then folded in from the row's interactions.
    """

    name: ClassVar[str]

    @abstractmethod
    def fit(self, user_items: sp.csr_matrix, show_progress: bool = False) -> Self:
        """Learn from the user x item confidence matrix."""

    @abstractmethod
    def score(self, user_items: sp.csr_matrix, users: np.ndarray | None = None) -> np.ndarray:
        """Dense scores, shape (n_rows, n_items), float32; higher is better."""

    @abstractmethod
    def similar_items(self, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar items to each item index (excluding itself): (indices, scores)."""

    @abstractmethod
    def _save_arrays(self) -> dict[str, np.ndarray]:
        """The arrays that make up the fitted model."""

    @abstractmethod
    def _load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore the fitted model from `_save_arrays`' output."""

    @property
    @abstractmethod
    def n_items(self) -> int:
        """Size of the item index the model scores."""

    def params(self) -> dict[str, Any]:
        """Hyperparameters, as logged to MLflow and written beside the arrays."""
        return {}

    @classmethod
    def fitter(cls, user_items: sp.csr_matrix) -> Callable[[dict[str, Any]], Recommender]:
        """A function that fits one model per params on `user_items`, as a tuning grid calls it.

        A model that can share work across params overrides it (EASE factorises once for every
        l2); by default each call is an independent fit.
        """
        return lambda params: cls(**params).fit(user_items)

    def recommend(
        self,
        user_items: sp.csr_matrix,
        users: np.ndarray | None = None,
        k: int = 10,
        filter_seen: bool = True,
        batch_size: int = 2048,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item indices and scores per row, best first, in batches of rows."""
        ids, vals = [], []
        for start in range(0, user_items.shape[0], batch_size):
            stop = min(start + batch_size, user_items.shape[0])
            block = user_items[start:stop]
            scores = self.score(block, None if users is None else users[start:stop])
            if filter_seen:
                mask_seen(scores, block)
            i, v = top_k(scores, k)
            ids.append(i)
            vals.append(v)
        if not ids:
            return np.empty((0, k), dtype=np.int64), np.empty((0, k), dtype=np.float32)
        return np.vstack(ids), np.vstack(vals)

    def save(self, path: str | Path) -> Path:
        """Write the fitted model to a folder: `arrays.npz` and `params.json`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.savez(path / "arrays.npz", **self._save_arrays())
        meta = {"name": self.name, "params": self.params()}
        (path / "params.json").write_text(json.dumps(meta, indent=2, default=str))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Read a model written by `save`."""
        path = Path(path)
        meta = json.loads((path / "params.json").read_text())
        model = cls(**meta["params"])
        with np.load(path / "arrays.npz", allow_pickle=False) as arrays:
            model._load_arrays({key: arrays[key] for key in arrays.files})
        return model
