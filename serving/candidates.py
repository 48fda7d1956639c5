"""Stage 1 of ranking a request: every id string mapped to an integer candidate id at once, the
model's scores over all items, and the pool of candidates the sources propose."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from feature_repo.types import ScoredItems

if TYPE_CHECKING:
    from serving.bundle import ServingModel
    from serving.ranking import LiveFeatures

_NO_IDS = np.empty(0, dtype=str)
_NO_INT = np.empty(0, dtype=np.int64)
_NO_FLOAT = np.empty(0, dtype=np.float64)


def _row(n: int, columns: np.ndarray, values: np.ndarray, unique: bool = False) -> sp.csr_matrix:
    """A 1 x n CSR row; duplicate columns are summed unless the caller knows there are none."""
    if len(columns) and not unique:
        columns, inverse = np.unique(columns, return_inverse=True)
        values = np.bincount(inverse, weights=values)
    indptr = np.array([0, len(columns)], dtype=np.int32)
    return sp.csr_matrix(
        (values.astype(np.float32), columns.astype(np.int32), indptr), shape=(1, n)
    )


class CandidateIds:
    """Maps item id strings to candidate ids: model columns, then per-request ids for the rest."""

    def __init__(self, model: ServingModel | None, arrays: list[np.ndarray]) -> None:
        self.n_model = model.n_items if model is not None else 0
        self.model = model
        sizes = [len(a) for a in arrays]
        flat = np.concatenate([np.asarray(a, dtype=str) for a in arrays]) if arrays else _NO_IDS
        idx = model.item_index(flat) if model is not None else np.full(len(flat), -1)
        unknown = idx < 0
        self.extra, inverse = np.unique(flat[unknown], return_inverse=True)
        idx[unknown] = self.n_model + inverse
        bounds = np.cumsum([0, *sizes]).tolist()
        self.parts = [idx[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def names(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty(len(ids), dtype=object)
        known = ids < self.n_model
        if self.model is not None:
            out[known] = self.model.item_ids[ids[known]]
        out[~known] = self.extra[ids[~known] - self.n_model]
        return out


@dataclass(frozen=True)
class Candidates:
    """The pool (sorted candidate ids) and what scoring needs of stage 1: each source's ids and,
    for the model's components, their scores over all items and which items each proposed."""

    ids: CandidateIds
    pool: np.ndarray
    recent_idx: np.ndarray
    excluded_idx: np.ndarray
    seen: np.ndarray
    flat_lists: dict[str, ScoredItems]
    flat_idx: dict[str, np.ndarray]
    # Per anchor, for each anchored source: (score name, the lists, their candidate ids).
    anchored: list[tuple[str, list[ScoredItems], list[np.ndarray]]]
    dense: dict[str, np.ndarray]
    proposed_dense: dict[str, np.ndarray]


def pool_candidates(
    model: ServingModel | None,
    weights: dict[str, float],
    user_id: str,
    live: LiveFeatures,
    excluded: np.ndarray,
    exclude_seen: bool,
    recent_w: np.ndarray,
    n_anchor: int,
    per_source: int,
) -> Candidates | None:
    """The candidates of one request, or None when no source proposes any."""
    # Every id string of the request mapped at once; lists are [recent, exclusions,
    # popularity, trending, trend, batch, coview per anchor..., neighbours per anchor...].
    coview = live.coview[:n_anchor]
    use_neighbors = (
        model is None or weights.get("item2vec", 0) <= 0 or ("item2vec" not in model.components)
    )
    neighbors = live.neighbors[:n_anchor] if use_neighbors else []
    use_item_item = (
        model is None or model.item_item is None or (weights.get(model.item_item, 0) <= 0)
    )
    item_item = live.item_item[:n_anchor] if use_item_item else []
    flat_lists = {
        "popularity": live.popularity,
        "trending": live.trending,
        "trend": live.trend,
        "batch": live.candidates,
    }
    ids = CandidateIds(
        model,
        [live.recent.ids, excluded]
        + [s.ids for s in flat_lists.values()]
        + [s.ids for s in coview]
        + [s.ids for s in neighbors]
        + [s.ids for s in item_item],
    )
    recent_idx, excluded_idx, *rest = ids.parts
    n_flat = len(flat_lists)
    flat_idx = dict(zip(flat_lists, rest[:n_flat], strict=True))
    coview_idx = rest[n_flat : n_flat + len(coview)]
    neighbor_idx = rest[n_flat + len(coview) : n_flat + len(coview) + len(neighbors)]
    item_item_idx = rest[n_flat + len(coview) + len(neighbors) :]

    dense: dict[str, np.ndarray] = {}
    seen = recent_idx
    if model is not None:
        dense, seen = model_scores(model, weights, user_id, recent_idx, recent_w, exclude_seen)

    parts = [top(s, per_source) for s in dense.values()]
    proposed_dense = dict(zip(dense, parts, strict=True))
    parts += [flat_idx[n] for n in flat_lists if weights.get(n, 0) > 0]
    parts += coview_idx + neighbor_idx + item_item_idx
    pool = np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)
    if not len(pool):
        return None
    return Candidates(
        ids=ids,
        pool=pool,
        recent_idx=recent_idx,
        excluded_idx=excluded_idx,
        seen=seen,
        flat_lists=flat_lists,
        flat_idx=flat_idx,
        anchored=[
            ("coview", coview, coview_idx),
            ("item2vec", neighbors, neighbor_idx),
            ("itemitem", item_item, item_item_idx),
        ],
        dense=dense,
        proposed_dense=proposed_dense,
    )


def model_scores(
    model: ServingModel,
    weights: dict[str, float],
    user_id: str,
    recent_idx: np.ndarray,
    recent_w: np.ndarray,
    exclude_seen: bool,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-row min-max normalised scores of each weighted component over all items, and
    the columns the user has seen (training history and live items)."""
    n = model.n_items
    user = model.user_index(user_id)
    hist_cols, hist_vals = model.user_row(user) if user >= 0 else (_NO_INT, _NO_FLOAT)
    known = recent_idx < n
    live_cols, live_vals = recent_idx[known], recent_w[known]
    # Training columns are unique, and so are the live ones (members of a sorted set).
    seen = np.union1d(hist_cols, live_cols).astype(np.int64)
    rows: dict[str, sp.csr_matrix] = {}

    def row(kind: str) -> sp.csr_matrix:
        """The user's live, training or combined (summed) row, built on first use: a CSR
        row costs more than most of the scoring."""
        if kind not in rows:
            if kind == "live" or (kind == "both" and not len(hist_cols)):
                rows[kind] = _row(n, live_cols, live_vals, unique=True)
            elif kind == "train" or not len(live_cols):
                rows[kind] = _row(n, hist_cols, hist_vals, unique=True)
            else:
                values = np.zeros(len(seen))
                values[np.searchsorted(seen, hist_cols)] += hist_vals
                values[np.searchsorted(seen, live_cols)] += live_vals
                rows[kind] = _row(n, seen, values, unique=True)
        return rows[kind]

    out: dict[str, np.ndarray] = {}
    for name, component in model.components.items():
        if weights.get(name, 0.0) <= 0 or name == "popularity":
            continue
        if name == "als":
            if user >= 0:
                raw = component.score(row("train"), np.array([user]))
            elif len(live_cols):
                raw = component.score(row("live"), np.array([-1]))  # fold-in from live items
            else:
                continue
        elif name == "item2vec":
            if not len(seen):
                continue
            raw = component.score(row("live" if len(live_cols) else "train"))
        else:
            if not len(seen):
                continue
            raw = component.score(row("both"))
        raw = np.array(raw, dtype=np.float32)
        if exclude_seen:
            raw[0, seen] = -np.inf
        out[name] = model.bundle.normalise(raw)[0].astype(np.float64)
    return out, seen


def top(values: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest finite values (unordered); scores are finite or -inf."""
    n = min(n, len(values))
    if n <= 0:
        return _NO_INT
    top = np.argpartition(-values, n - 1)[:n]
    return top[np.isfinite(values[top])]
