"""The hybrid ranker: blends normalised scores of candidate generators with tuned weights.

It is also the bundle that is registered in MLflow and loaded by the service: components,
weights, id mappings, the training interactions (to exclude seen items) and the catalog.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from training.data import empty_catalog
from training.evaluation import ndcg_at_k
from training.matrix import lookup
from training.models.als import ALSModel
from training.models.base import Recommender, top_k
from training.models.item2vec import Item2VecModel
from training.models.itemknn import EASEModel, ItemKNNModel
from training.models.popularity import PopularityModel

MODEL_CLASSES: dict[str, type[Recommender]] = {
    cls.name: cls for cls in (ALSModel, Item2VecModel, EASEModel, ItemKNNModel, PopularityModel)
}
# Components whose item-item similarities make the item_neighbors lists, best first.
ITEM_ITEM_PREFERENCE = ("ease", "itemknn", "item2vec", "als")


def normalise(scores: np.ndarray) -> np.ndarray:
    """Per-row min-max over finite scores to [0, 1]; -inf (masked) stays -inf."""
    scores = np.asarray(scores, dtype=np.float32)
    finite = np.isfinite(scores)
    lo = np.where(finite, scores, np.inf).min(axis=1, keepdims=True)
    hi = np.where(finite, scores, -np.inf).max(axis=1, keepdims=True)
    span = hi - lo
    span[~np.isfinite(span) | (span <= 0)] = 1.0
    lo[~np.isfinite(lo)] = 0.0
    out = (scores - lo) / span
    out[~finite] = -np.inf
    return out


def _sparse_candidates(
    scores: sp.csr_matrix, seen: sp.csr_matrix, n_cand: int
) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Top candidates and a normalised-score gather for sparse scores (implicit zeros).

    A row's minimum is 0 (items outside every neighbourhood), its maximum is over unseen items.
    """
    scores = scores.tocsr()
    hits = scores.multiply(seen.astype(bool)).tocsr()
    if hits.nnz:
        scores = (scores - hits).tocsr()
        scores.eliminate_zeros()
    n_rows = scores.shape[0]
    row_of = np.repeat(np.arange(n_rows), np.diff(scores.indptr))
    order = np.lexsort((-scores.data, row_of))
    position = np.arange(len(order)) - scores.indptr[row_of[order]]
    pick = position < n_cand
    pool = np.full((n_rows, n_cand), -1, dtype=np.int64)
    pool[row_of[order][pick], position[pick]] = scores.indices[order][pick]
    nnz = np.diff(scores.indptr)
    hi = np.zeros(n_rows, dtype=np.float32)
    lo = np.zeros(n_rows, dtype=np.float32)
    if scores.nnz:
        filled = nnz > 0
        starts = scores.indptr[:-1][filled]
        hi[filled] = np.maximum.reduceat(scores.data, starts)
        # The minimum over unseen items is 0 (an unscored item) unless every unseen item scored.
        n_seen = np.diff(seen.tocsr().indptr)
        full = filled & (nnz + n_seen >= scores.shape[1])
        lo[full] = np.minimum.reduceat(scores.data, starts)[full[filled]]
    span = np.where(hi > lo, hi - lo, 1.0).astype(np.float32)

    def gather(cols: np.ndarray) -> np.ndarray:
        rows = np.repeat(np.arange(n_rows), cols.shape[1])
        values = np.asarray(scores[rows, np.maximum(cols, 0).ravel()]).reshape(cols.shape)
        return (values.astype(np.float32) - lo[:, None]) / span[:, None]

    return pool, gather


def _first_unseen(values: np.ndarray, order: np.ndarray, seen_mask: np.ndarray) -> np.ndarray:
    """Per row, `values` at the first item in `order` the row has not seen."""
    probe = order[:64]
    unseen = ~seen_mask[:, probe]
    found = unseen.any(axis=1)
    out = values[probe[unseen.argmax(axis=1)]]
    if not found.all():
        # Rare: a row saw all 64 probed items; scan its whole order instead.
        for row in np.flatnonzero(~found):
            rest = order[~seen_mask[row, order]]
            out[row] = values[rest[0]] if len(rest) else 0.0
    return out


def blend_candidates(
    components: dict[str, Recommender],
    block: sp.csr_matrix,
    users: np.ndarray | None,
    seen: sp.csr_matrix,
    n_candidates: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Each component's top unseen candidates for a batch of rows, and every component's score.

    Returns (candidates (n_rows, W) item columns with -1 padding, {name: (n_rows, W) scores
    normalised per row to [0, 1], -inf on padding}). Scores are min-max normalised over the row's
    unseen items exactly as `normalise` does on a full masked row, so the batch lists, the
    weight tuning and the service all blend the same numbers. Candidate generation keeps the
    cost at a few passes over each dense score row: nothing else is done on full rows.
    """
    n_rows = block.shape[0]
    n_items = next(iter(components.values())).n_items
    n_cand = max(1, min(n_candidates, n_items))
    seen_mask = np.zeros((n_rows, n_items), dtype=bool)
    coo = seen.tocoo()
    seen_mask[coo.row, coo.col] = True
    gathers = {}
    pools = []
    for name, model in components.items():
        if isinstance(model, PopularityModel):
            pop = model.popularity.astype(np.float32)
            order = np.argsort(-pop, kind="stable")
            top = order[:n_cand]
            # A row's maximum (minimum) over unseen items: its first unseen item from the top
            # (bottom) of the popularity order.
            hi, lo = (_first_unseen(pop, probe, seen_mask) for probe in (order, order[::-1]))
            span = np.where(hi > lo, hi - lo, 1.0).astype(np.float32)
            pools.append(np.broadcast_to(top, (n_rows, len(top))))
            gathers[name] = lambda cols, pop=pop, lo=lo, span=span: (
                (pop[cols] - lo[:, None]) / span[:, None]
            )
            continue
        if isinstance(model, ItemKNNModel):
            pool, gathers[name] = _sparse_candidates(model.score_sparse(block), seen, n_cand)
            pools.append(pool)
            continue
        raw = np.asarray(model.score(block, users), dtype=np.float32)
        raw[seen_mask] = -np.inf
        # As in normalise(): minimum and maximum over the row's unseen items.
        lo = np.min(raw, axis=1, where=~seen_mask, initial=np.inf)
        hi = raw.max(axis=1)
        span = hi - lo
        span[~np.isfinite(span) | (span <= 0)] = 1.0
        lo[~np.isfinite(lo)] = 0.0
        pools.append(top_k(raw, n_cand)[0])
        gathers[name] = lambda cols, raw=raw, lo=lo, span=span: (
            (np.take_along_axis(raw, cols, axis=1) - lo[:, None]) / span[:, None]
        )
    cands = np.sort(np.concatenate(pools, axis=1), axis=1)
    duplicate = np.zeros(cands.shape, dtype=bool)
    duplicate[:, 1:] = cands[:, 1:] == cands[:, :-1]
    padding = cands < 0
    cands = np.maximum(cands, 0)
    invalid = duplicate | padding | np.take_along_axis(seen_mask, cands, axis=1)
    parts = {}
    for name, gather in gathers.items():
        values = np.asarray(gather(cands), dtype=np.float32)
        values[invalid | ~np.isfinite(values)] = -np.inf
        parts[name] = values
    cands = np.where(invalid, -1, cands)
    return cands, parts


class HybridRecommender:
    """Weighted blend of per-row normalised component scores over one item index."""

    def __init__(
        self,
        components: dict[str, Recommender],
        weights: dict[str, float],
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        user_items: sp.csr_matrix,
        catalog: pl.DataFrame | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        unknown = set(weights) - set(components)
        if unknown:
            raise ValueError(f"weights for unknown components: {sorted(unknown)}")
        self.components = components
        self.weights = {name: float(weights.get(name, 0.0)) for name in components}
        self.user_ids = np.asarray(user_ids).astype(str)
        self.item_ids = np.asarray(item_ids).astype(str)
        self.user_items = user_items.tocsr()
        self.catalog = _align_catalog(catalog, self.item_ids)
        self.metadata = metadata or {}

    normalise = staticmethod(normalise)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def user_index(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Row of each user id in the training matrix, -1 for unknown users."""
        return lookup(self.user_ids, ids)

    def item_index(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Column of each item id, -1 for unknown items."""
        return lookup(self.item_ids, ids)

    def _active(self) -> dict[str, Recommender]:
        active = {n: m for n, m in self.components.items() if self.weights.get(n, 0.0) > 0.0}
        if not active:
            # Without any positive weight the ranking falls back to popularity alone.
            fallback = self.components.get("popularity") or next(iter(self.components.values()))
            active = {fallback.name: fallback}
        return active

    def recommend_rows(
        self,
        user_items: sp.csr_matrix,
        users: np.ndarray | None,
        seen: sp.csr_matrix,
        k: int = 10,
        n_candidates: int = 100,
        batch_size: int = 512,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item columns and blended scores per row (-1 / -inf pad), `seen` excluded.

        `progress(rows_done, rows_total)` is called after every batch.
        """
        active = self._active()
        weights = {n: self.weights.get(n, 0.0) or 1.0 for n in active}
        n_rows = user_items.shape[0]

        def one_batch(start: int) -> tuple[np.ndarray, np.ndarray]:
            stop = min(start + batch_size, n_rows)
            block_users = None if users is None else users[start:stop]
            cands, parts = blend_candidates(
                active,
                user_items[start:stop],
                block_users,
                seen[start:stop],
                max(n_candidates, k),
            )
            total = np.zeros(cands.shape, dtype=np.float32)
            for name, values in parts.items():
                total += weights[name] * values
            pos, best = top_k(total, k)
            picked = np.take_along_axis(cands, pos, axis=1)
            picked[~np.isfinite(best)] = -1
            return picked, best

        ids, vals = [], []
        starts = range(0, n_rows, batch_size)
        # NumPy and SciPy release the GIL in the heavy kernels: two batches at a time keep both
        # cores busy; map() keeps the batches in order.
        workers = 2 if len(starts) > 1 else 1
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for start, (picked, best) in zip(starts, pool.map(one_batch, starts), strict=True):
                ids.append(picked)
                vals.append(best)
                if progress is not None:
                    progress(min(start + batch_size, n_rows), n_rows)
        if not ids:
            return np.empty((0, k), dtype=np.int64), np.empty((0, k), dtype=np.float32)
        width = max(i.shape[1] for i in ids)
        ids = [np.pad(i, ((0, 0), (0, width - i.shape[1])), constant_values=-1) for i in ids]
        vals = [np.pad(v, ((0, 0), (0, width - v.shape[1])), constant_values=-np.inf) for v in vals]
        return np.vstack(ids), np.vstack(vals)

    def recommend(
        self,
        user_items: sp.csr_matrix,
        users: np.ndarray | None = None,
        k: int = 10,
        batch_size: int = 512,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item columns and blended scores per row, seen items excluded."""
        return self.recommend_rows(user_items, users, user_items, k, batch_size=batch_size)

    def recommend_ids(
        self,
        user_ids: Sequence[str] | np.ndarray,
        k: int = 10,
        exclude_seen: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> pl.DataFrame:
        """`user_id,item_id,rank,score` for known users (unknown ones get popular items)."""
        user_ids = np.asarray(user_ids).astype(str)
        rows = self.user_index(user_ids)
        known = rows >= 0
        user_items = self.user_items[np.where(known, rows, 0)]
        if not known.all():
            # Unknown users have no history: zero their rows (vstack keeps the order).
            keep = sp.diags(known.astype(np.float32))
            user_items = (keep @ user_items).tocsr()
            user_items.eliminate_zeros()
        seen = user_items if exclude_seen else sp.csr_matrix(user_items.shape, dtype=np.float32)
        idx, scores = self.recommend_rows(user_items, rows, seen, k, progress=progress)
        n_rows, width = idx.shape
        valid = (idx >= 0).ravel()
        return pl.DataFrame(
            {
                "user_id": np.repeat(user_ids, width)[valid],
                "item_id": self.item_ids[np.where(idx >= 0, idx, 0).ravel()][valid],
                "rank": np.tile(np.arange(1, width + 1), n_rows)[valid],
                "score": scores.ravel()[valid].astype(np.float64),
            }
        )

    def similar_items(self, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Neighbours from the best item-item component available."""
        for name in ITEM_ITEM_PREFERENCE:
            if name in self.components:
                return self.components[name].similar_items(np.asarray(items), k)
        return self.components["popularity"].similar_items(np.asarray(items), k)

    def item_neighbors(
        self, k: int = 100, batch_size: int = 1024, component: str | None = None
    ) -> pl.DataFrame:
        """`item_id,neighbor_id,rank,score`: the top-k neighbours of every item.

        From the best item-item component, or from `component` when named.
        """
        similar = self.components[component].similar_items if component else self.similar_items
        frames = []
        for start in range(0, self.n_items, batch_size):
            items = np.arange(start, min(start + batch_size, self.n_items))
            idx, scores = similar(items, k)
            valid = np.isfinite(scores) & (scores > 0)
            width = idx.shape[1]
            frames.append(
                pl.DataFrame(
                    {
                        "item_id": np.repeat(self.item_ids[items], width)[valid.ravel()],
                        "neighbor_id": self.item_ids[idx.ravel()][valid.ravel()],
                        "rank": np.tile(np.arange(1, width + 1), len(items))[valid.ravel()],
                        "score": scores.ravel()[valid.ravel()].astype(np.float64),
                    }
                )
            )
        if not frames:
            return pl.DataFrame(
                schema={
                    "item_id": pl.String,
                    "neighbor_id": pl.String,
                    "rank": pl.Int64,
                    "score": pl.Float64,
                }
            )
        return pl.concat(frames)

    def save(self, path: str | Path) -> Path:
        """Write the bundle to a folder (components in sub-folders, ids, interactions, catalog)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for name, model in self.components.items():
            model.save(path / "components" / name)
        np.save(path / "user_ids.npy", self.user_ids.astype(str), allow_pickle=False)
        np.save(path / "item_ids.npy", self.item_ids.astype(str), allow_pickle=False)
        sp.save_npz(path / "user_items.npz", self.user_items)
        self.catalog.write_parquet(path / "catalog.parquet")
        meta = {
            "components": list(self.components),
            "weights": self.weights,
            "metadata": self.metadata,
        }
        (path / "bundle.json").write_text(json.dumps(meta, indent=2, default=str))
        return path

    @classmethod
    def load(cls, path: str | Path) -> HybridRecommender:
        """Read a bundle written by `save`."""
        path = Path(path)
        meta = json.loads((path / "bundle.json").read_text())
        components = {
            name: MODEL_CLASSES[name].load(path / "components" / name)
            for name in meta["components"]
        }
        return cls(
            components=components,
            weights=meta["weights"],
            user_ids=np.load(path / "user_ids.npy", allow_pickle=False),
            item_ids=np.load(path / "item_ids.npy", allow_pickle=False),
            user_items=sp.load_npz(path / "user_items.npz").tocsr(),
            catalog=pl.read_parquet(path / "catalog.parquet"),
            metadata=meta.get("metadata", {}),
        )


def _align_catalog(catalog: pl.DataFrame | None, item_ids: np.ndarray) -> pl.DataFrame:
    """The catalog in item-index order, with a row (nulls, in stock) for items it lacks;
    `in_catalog` says which items it has (the serving gate on unknown items reads it)."""
    base = empty_catalog() if catalog is None else catalog
    base = base.unique("item_id", keep="last").with_columns(pl.lit(True).alias("in_catalog"))
    frame = pl.DataFrame({"item_id": item_ids.astype(str)}).join(base, on="item_id", how="left")
    return frame.with_columns(
        pl.col("in_stock").fill_null(True), pl.col("in_catalog").fill_null(False)
    )


def candidate_scores(
    components: dict[str, Recommender],
    train: sp.csr_matrix,
    users: np.ndarray,
    n_candidates: int = 100,
    batch_size: int = 512,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`blend_candidates` over the given users' training rows, stacked (for weight tuning)."""
    cands, parts = [], {name: [] for name in components}
    for start in range(0, len(users), batch_size):
        block_users = users[start : start + batch_size]
        block = train[block_users]
        c, p = blend_candidates(components, block, block_users, block, n_candidates)
        cands.append(c)
        for name in components:
            parts[name].append(p[name])
    return np.vstack(cands), {name: np.vstack(v) for name, v in parts.items()}


def tune_weights(
    components: dict[str, Recommender],
    train: sp.csr_matrix,
    validation: sp.csr_matrix,
    k: int = 10,
    n_candidates: int = 100,
    max_users: int = 3000,
    n_random: int = 60,
    seed: int = 0,
) -> tuple[dict[str, float], float]:
    """Blend weights that maximise validation nDCG@k: random simplex search, then refinement.

    Uses only the training part and its validation split (never the final test data).
    """
    rng = np.random.default_rng(seed)
    users = np.flatnonzero(np.diff(validation.indptr) > 0)
    if len(users) > max_users:
        users = np.sort(rng.choice(users, max_users, replace=False))
    names = list(components)
    cands, scores = candidate_scores(components, train, users, n_candidates)
    held = validation[users]
    stacked = np.stack([np.where(np.isfinite(scores[n]), scores[n], 0.0) for n in names])
    invalid = cands < 0

    def evaluate(w: np.ndarray) -> float:
        blended = np.tensordot(w, stacked, axes=1)
        blended[invalid] = -np.inf
        pos, _ = top_k(blended, k)
        recs = np.take_along_axis(cands, pos, axis=1)
        return ndcg_at_k(recs, held, k)

    trials = [np.eye(len(names))[i] for i in range(len(names))]
    trials.append(np.full(len(names), 1.0 / len(names)))
    trials.extend(rng.dirichlet(np.ones(len(names)), size=n_random))
    best_w, best = trials[0], -1.0
    for w in trials:
        value = evaluate(w)
        if value > best:
            best_w, best = w, value
    step = 0.1
    while step >= 0.0125:
        improved = False
        for i in range(len(names)):
            for delta in (step, -step):
                w = best_w.copy()
                w[i] = max(0.0, w[i] + delta)
                if w.sum() <= 0:
                    continue
                w = w / w.sum()
                value = evaluate(w)
                if value > best + 1e-6:
                    best_w, best, improved = w, value, True
        if not improved:
            step /= 2
    return {name: float(round(w, 4)) for name, w in zip(names, best_w, strict=True)}, best
