"""The sparse user x item interaction matrix (event weights, time decay) and its per-user split."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import scipy.sparse as sp

from training.events import DEFAULT_EVENT_WEIGHTS, EventLimits, value_is_safe, value_is_valid

log = logging.getLogger("recsys.training")


@dataclass
class InteractionMatrix:
    """Confidences per (user, item), with the id <-> row/column mappings."""

    matrix: sp.csr_matrix
    user_ids: np.ndarray
    item_ids: np.ndarray
    params: dict = field(default_factory=dict)
    # Events left out because their value breaks the contract (see usable_events).
    dropped_events: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.matrix.shape

    @property
    def nnz(self) -> int:
        return int(self.matrix.nnz)

    def user_index(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Row of each user id, -1 for unknown ids."""
        return lookup(self.user_ids, ids)

    def item_index(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Column of each item id, -1 for unknown ids."""
        return lookup(self.item_ids, ids)

    def with_matrix(self, matrix: sp.csr_matrix) -> InteractionMatrix:
        """The same mappings over another matrix of the same shape (e.g. a split)."""
        return InteractionMatrix(
            matrix.tocsr(), self.user_ids, self.item_ids, self.params, self.dropped_events
        )


def lookup(sorted_ids: np.ndarray, ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Positions of `ids` in the sorted id array, -1 where absent (vectorised binary search)."""
    # A string array (what serving passes on the request path) needs no copy through object.
    if isinstance(ids, np.ndarray) and ids.dtype.kind == "U":
        query = ids
    else:
        query = np.asarray(ids, dtype=object).astype(str)
    if len(sorted_ids) == 0 or len(query) == 0:
        return np.full(len(query), -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(sorted_ids, query), len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == query, pos, -1).astype(np.int64)


def usable_events(
    events: pl.DataFrame, limits: EventLimits | None = None
) -> tuple[pl.DataFrame, int]:
    """The events whose value keeps to the contract, and how many others were left out.

    The contract keeps bad values out at the door, but a store may hold events from before it
    or written around it (a rating of 1e308 overflows every sum it enters): they are dropped,
    counted and logged, so that what is stored can never block training. With `limits`, the
    configured bounds (the import does this); without, only what no configuration admits (the
    matrix and popularity do this, so a configured rating range of 0..100 is not undone here).
    """
    if "value" not in events.columns or events.is_empty():
        return events, 0
    value = pl.col("value")
    rule = (
        value_is_safe(value)
        if limits is None
        else value_is_valid(pl.col("event_type"), value, limits)
    )
    keep = events.select(rule.alias("k"))["k"]
    dropped = int((~keep).sum())
    if dropped:
        log.warning("left out %d event(s) whose value is non-finite or out of range", dropped)
        events = events.filter(keep)
    return events, dropped


def weighted_events(
    events: pl.DataFrame,
    event_weights: dict[str, float] | None = None,
    half_life_days: float | None = None,
    now: int | None = None,
) -> pl.DataFrame:
    """Per-event confidence: the event type's weight (a rating's value), decayed with age."""
    weights = {**DEFAULT_EVENT_WEIGHTS, **(event_weights or {})}
    base = (
        pl.when(pl.col("event_type") == "rating")
        .then(pl.col("value").fill_null(1.0))
        .otherwise(
            pl.col("event_type")
            .cast(pl.String)
            .replace_strict(weights, default=1.0, return_dtype=pl.Float64)
        )
    )
    if half_life_days:
        reference = now if now is not None else events["timestamp"].max()
        age_days = ((pl.lit(reference) - pl.col("timestamp")).clip(lower_bound=0)) / 86400.0
        base = base * (0.5 ** (age_days / half_life_days))
    return events.select("user_id", "item_id", "timestamp", base.alias("confidence"))


def build_interaction_matrix(
    events: pl.DataFrame,
    event_weights: dict[str, float] | None = None,
    half_life_days: float | None = None,
    now: int | None = None,
    item_ids: Sequence[str] | None = None,
) -> InteractionMatrix:
    """Sum confidences per (user, item) into a CSR matrix with sorted id mappings.

    `item_ids` fixes the item universe (e.g. the catalog) so items with no events still get a
    column; events on items outside it are kept and extend the universe.
    """
    if events.is_empty():
        raise ValueError("no events: the interaction matrix would be empty")
    events, dropped = usable_events(events)
    if events.is_empty():
        raise ValueError(f"no usable events: all {dropped} have a non-finite or out-of-range value")
    weighted = weighted_events(events, event_weights, half_life_days, now)
    pairs = weighted.group_by("user_id", "item_id").agg(pl.col("confidence").sum())
    users = pairs["user_id"].unique().sort()
    items = pairs["item_id"].unique()
    if item_ids is not None and len(item_ids):
        items = pl.concat([items, pl.Series("item_id", list(item_ids), dtype=pl.String)])
    items = items.unique().sort()
    user_codes = pl.DataFrame({"user_id": users, "u": np.arange(len(users), dtype=np.int32)})
    item_codes = pl.DataFrame({"item_id": items, "i": np.arange(len(items), dtype=np.int32)})
    coded = pairs.join(user_codes, on="user_id").join(item_codes, on="item_id")
    matrix = sp.csr_matrix(
        (
            coded["confidence"].to_numpy().astype(np.float32),
            (coded["u"].to_numpy(), coded["i"].to_numpy()),
        ),
        shape=(len(users), len(items)),
    )
    matrix.sum_duplicates()
    matrix.sort_indices()
    params = {
        "event_weights": {**DEFAULT_EVENT_WEIGHTS, **(event_weights or {})},
        "half_life_days": half_life_days,
    }
    return InteractionMatrix(
        matrix, users.to_numpy().astype(object), items.to_numpy().astype(object), params, dropped
    )


def split_per_user(
    matrix: sp.csr_matrix, holdout_fraction: float = 0.2, seed: int = 0, min_train: int = 1
) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Random per-user split: about `holdout_fraction` of each user's items are held out.

    Every user keeps at least `min_train` interactions in the training part, so a user with a
    single interaction is never evaluated.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    coo = matrix.tocoo()
    rng = np.random.default_rng(seed)
    keys = rng.random(coo.nnz)
    order = np.lexsort((keys, coo.row))
    rows = coo.row[order]
    counts = np.bincount(rows, minlength=matrix.shape[0])
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    position = np.arange(coo.nnz) - starts[rows]
    n_holdout = np.floor(counts * holdout_fraction + rng.random(len(counts))).astype(np.int64)
    n_holdout = np.minimum(n_holdout, np.maximum(counts - min_train, 0))
    held = position < n_holdout[rows]
    cols, data = coo.col[order], coo.data[order]
    shape = matrix.shape
    train = sp.csr_matrix((data[~held], (rows[~held], cols[~held])), shape=shape)
    test = sp.csr_matrix((data[held], (rows[held], cols[held])), shape=shape)
    return train, test


def decayed_popularity(
    events: pl.DataFrame,
    half_life_days: float = 7.0,
    now: int | None = None,
    event_weights: dict[str, float] | None = None,
) -> pl.DataFrame:
    """`item_id, score, events`: weighted event counts decayed by age, most popular first."""
    if events.is_empty():
        return pl.DataFrame(schema={"item_id": pl.String, "score": pl.Float64, "events": pl.UInt32})
    events, _ = usable_events(events)
    weighted = weighted_events(events, event_weights, half_life_days, now)
    return (
        weighted.group_by("item_id")
        .agg(pl.col("confidence").sum().alias("score"), pl.len().alias("events"))
        .sort("score", "item_id", descending=[True, False])
    )
