"""Top-k ranking metrics as plain functions of (recommendations, held_out, k), vectorised.

`recommendations` is an (n_users, >=k) array of item columns, best first, one row per user in
the order of `held_out`'s rows (-1 pads missing slots); `held_out` is a CSR matrix whose non-zeros
are the relevant items. Users with nothing held out are left out of every average.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import scipy.sparse as sp

METRICS = ("precision", "recall", "ndcg", "map", "hit_rate")


def _hits(recommendations: np.ndarray, held_out: sp.csr_matrix, k: int) -> np.ndarray:
    """Boolean (n_users, k): is the item at each rank relevant for that user."""
    recs = np.asarray(recommendations)[:, :k].astype(np.int64)
    n_items = held_out.shape[1]
    coo = held_out.tocoo()
    relevant = np.sort(coo.row.astype(np.int64) * n_items + coo.col)
    rows = np.arange(recs.shape[0], dtype=np.int64)[:, None]
    keys = rows * n_items + np.where(recs >= 0, recs, 0)
    pos = np.searchsorted(relevant, keys)
    pos = np.clip(pos, 0, max(len(relevant) - 1, 0))
    hits = (relevant[pos] == keys) if len(relevant) else np.zeros(keys.shape, dtype=bool)
    return hits & (recs >= 0)


def _evaluable(held_out: sp.csr_matrix) -> np.ndarray:
    return np.diff(held_out.indptr) > 0


def precision_at_k(recommendations: np.ndarray, held_out: sp.csr_matrix, k: int) -> float:
    """Mean share of the top k that is relevant."""
    mask = _evaluable(held_out)
    if not mask.any():
        return 0.0
    return float(_hits(recommendations, held_out, k)[mask].sum(axis=1).mean() / k)


def recall_at_k(recommendations: np.ndarray, held_out: sp.csr_matrix, k: int) -> float:
    """Mean share of each user's relevant items found in the top k."""
    mask = _evaluable(held_out)
    if not mask.any():
        return 0.0
    n_rel = np.diff(held_out.indptr)[mask]
    return float((_hits(recommendations, held_out, k)[mask].sum(axis=1) / n_rel).mean())


def ndcg_at_k(recommendations: np.ndarray, held_out: sp.csr_matrix, k: int) -> float:
    """Mean normalised DCG with binary gains; the ideal ranks min(|relevant|, k) hits first."""
    mask = _evaluable(held_out)
    if not mask.any():
        return 0.0
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (_hits(recommendations, held_out, k)[mask] * discounts).sum(axis=1)
    n_ideal = np.minimum(np.diff(held_out.indptr)[mask], k)
    idcg = np.cumsum(discounts)[n_ideal - 1]
    return float((dcg / idcg).mean())


def map_at_k(recommendations: np.ndarray, held_out: sp.csr_matrix, k: int) -> float:
    """Mean average precision: precision at each hit's rank, over min(|relevant|, k)."""
    mask = _evaluable(held_out)
    if not mask.any():
        return 0.0
    hits = _hits(recommendations, held_out, k)[mask]
    precision_at_rank = np.cumsum(hits, axis=1) / np.arange(1, k + 1)
    n_rel = np.minimum(np.diff(held_out.indptr)[mask], k)
    return float(((precision_at_rank * hits).sum(axis=1) / n_rel).mean())


def hit_rate_at_k(recommendations: np.ndarray, held_out: sp.csr_matrix, k: int) -> float:
    """Share of users with at least one relevant item in the top k."""
    mask = _evaluable(held_out)
    if not mask.any():
        return 0.0
    return float(_hits(recommendations, held_out, k)[mask].any(axis=1).mean())


def catalog_coverage(recommendations: np.ndarray, n_items: int, k: int) -> float:
    """Share of the catalog that appears in at least one user's top k."""
    recs = np.asarray(recommendations)[:, :k]
    if n_items == 0:
        return 0.0
    return float(len(np.unique(recs[recs >= 0])) / n_items)


def novelty(
    recommendations: np.ndarray, item_popularity: np.ndarray, n_users: int, k: int
) -> float:
    """Mean self-information -log2(p(item)) of recommended items (higher = less obvious)."""
    recs = np.asarray(recommendations)[:, :k]
    recs = recs[recs >= 0]
    if recs.size == 0 or n_users == 0:
        return 0.0
    p = np.clip(np.asarray(item_popularity, dtype=np.float64)[recs] / n_users, 1e-12, 1.0)
    return float(-np.log2(p).mean())


def evaluate_all(
    recommendations: np.ndarray,
    held_out: sp.csr_matrix,
    train: sp.csr_matrix,
    k: int = 10,
) -> dict[str, float]:
    """Every metric at k for one model, keyed `ndcg@10` etc."""
    item_users = np.diff(train.tocsc().indptr)
    return {
        f"precision@{k}": precision_at_k(recommendations, held_out, k),
        f"recall@{k}": recall_at_k(recommendations, held_out, k),
        f"ndcg@{k}": ndcg_at_k(recommendations, held_out, k),
        f"map@{k}": map_at_k(recommendations, held_out, k),
        f"hit_rate@{k}": hit_rate_at_k(recommendations, held_out, k),
        f"coverage@{k}": catalog_coverage(recommendations, train.shape[1], k),
        f"novelty@{k}": novelty(recommendations, item_users, train.shape[0], k),
    }


def metrics_table(results: dict[str, dict[str, float]]) -> pl.DataFrame:
    """One row per model, one column per metric."""
    rows = [{"model": name, **values} for name, values in results.items()]
    return pl.DataFrame(rows)


def to_markdown(table: pl.DataFrame, digits: int = 4) -> str:
    """A Markdown table of a metrics frame (for Dagster metadata and the CLI)."""
    cols = table.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for row in table.iter_rows():
        cells = [f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
