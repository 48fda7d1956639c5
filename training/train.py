"""Training steps the assets call: fit a component (with a small tuning grid), blend, evaluate.

Tuning only ever sees the training data: hyperparameters and blend weights are chosen on a
validation split carved out of it, and the chosen models are then refit on all of it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from training.data import DataValidationError
from training.evaluation import evaluate_all, metrics_table, ndcg_at_k
from training.hybrid import MODEL_CLASSES, HybridRecommender, tune_weights
from training.matrix import InteractionMatrix, build_interaction_matrix, split_per_user
from training.models.base import Recommender
from training.models.item2vec import Item2VecModel, session_sequences

log = logging.getLogger(__name__)

# The split keeps at least one of a user's items for training and holds out part of the rest, so
# only a user with two or more distinct items can be evaluated. Below ten such users, validation
# nDCG@10, on which tuning, the blend and the champion gate all decide, is noise.
MIN_INTERACTIONS_PER_USER = 2
MIN_TRAINING_USERS = 10


class NotEnoughDataError(DataValidationError):
    """The events are valid but too few to train and evaluate a model on."""


@dataclass
class ComponentResult:
    """A component refit on all training data, with what tuning chose and measured."""

    name: str
    model: Recommender
    validation_model: Recommender
    params: dict[str, Any]
    validation_ndcg: float
    tuning: list[dict[str, Any]] = field(default_factory=list)
    fit_seconds: float = 0.0


def search_grid(
    params: dict[str, Any],
    grid_spec: dict[str, Iterable[Any]] | None,
    evaluate: Callable[[dict[str, Any]], float],
) -> list[tuple[dict[str, Any], float]]:
    """Hill-climb over the grid, stopping as soon as validation stops improving.

    Starts from the base `params` where each lies on its axis (else the axis's middle value),
    scores the neighbours one step along each axis (axes are taken in the order given, so list
    them sorted), moves to the best neighbour while it beats the current point, and stops at a
    point no neighbour beats. On a grid whose score has one peak per axis this finds the best
    point that the exhaustive search would, with fewer fits. Returns (params, score) per trial.
    """
    if not grid_spec:
        only = dict(params)
        return [(only, evaluate(only))]
    axes = {key: list(values) for key, values in grid_spec.items()}
    keys = list(axes)

    def at(position: tuple[int, ...]) -> dict[str, Any]:
        return {**params, **{key: axes[key][i] for key, i in zip(keys, position, strict=True)}}

    scores: dict[tuple[int, ...], float] = {}
    trials: list[tuple[dict[str, Any], float]] = []

    def score(position: tuple[int, ...]) -> float:
        if position not in scores:
            candidate = at(position)
            scores[position] = evaluate(candidate)
            trials.append((candidate, scores[position]))
        return scores[position]

    current = tuple(
        axes[key].index(params[key]) if params.get(key) in axes[key] else len(axes[key]) // 2
        for key in keys
    )
    score(current)
    while True:
        neighbours = [
            current[:axis] + (current[axis] + step,) + current[axis + 1 :]
            for axis, key in enumerate(keys)
            for step in (-1, 1)
            if 0 <= current[axis] + step < len(axes[key])
        ]
        best = max(neighbours, key=score, default=current)
        if score(best) <= score(current):
            return trials
        current = best


# The constructor argument of each model's own thread pool: set from a step's thread share, not
# a hyperparameter (it is neither tuned nor part of the chosen params).
_THREAD_PARAMS = {"als": "num_threads", "itemknn": "num_threads", "item2vec": "workers"}


def _fitter(
    name: str, matrix: sp.csr_matrix, sequences: list[list[int]] | None, threads: int = 0
) -> Callable[[dict[str, Any]], Recommender]:
    """Fits `name` on `matrix` (Item2Vec on the time-ordered `sequences` when given), with the
    model's own thread pool set to `threads` (0: its default)."""
    cls = MODEL_CLASSES[name]
    knob = _THREAD_PARAMS.get(name)

    def threaded(params: dict[str, Any]) -> dict[str, Any]:
        return {**params, knob: threads} if threads and knob else params

    if issubclass(cls, Item2VecModel) and sequences is not None:
        return lambda params: Item2VecModel(**threaded(params)).fit_sequences(
            sequences, matrix.shape[1]
        )
    fit = cls.fitter(matrix)
    return lambda params: fit(threaded(params))


def evaluation_users(held_out: sp.csr_matrix, max_users: int | None, seed: int = 0) -> np.ndarray:
    """Users with held-out items; a fixed seeded sample of them above `max_users`.

    Every model is scored on the same users, so a sample keeps comparisons fair while bounding
    the cost on large data.
    """
    users = np.flatnonzero(np.diff(held_out.indptr) > 0)
    if max_users and len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    return users


def validation_ndcg(
    model: Recommender,
    train: sp.csr_matrix,
    validation: sp.csr_matrix,
    k: int = 10,
    max_users: int | None = 20_000,
) -> float:
    """nDCG@k of a model fit on `train` against the held-out `validation` interactions."""
    users = evaluation_users(validation, max_users)
    recs, _ = model.recommend(train[users], users, k=k)
    return ndcg_at_k(recs, validation[users], k)


def fit_component(
    name: str,
    params: dict[str, Any],
    train: sp.csr_matrix,
    validation: sp.csr_matrix,
    full: sp.csr_matrix,
    grid_spec: dict[str, Iterable[Any]] | None = None,
    train_sequences: list[list[int]] | None = None,
    full_sequences: list[list[int]] | None = None,
    threads: int = 0,
) -> ComponentResult:
    """Pick params on (train, validation) from the grid (`search_grid`), refit them on `full`.

    `threads` (0: no limit) caps the native thread pools (BLAS, OpenMP) of the whole step and
    sets the model's own thread count (ALS, item-kNN, Item2Vec workers).
    """
    with threadpool_limits(threads or None):
        return _fit_component(
            name,
            params,
            train,
            validation,
            full,
            grid_spec,
            train_sequences,
            full_sequences,
            threads,
        )


def _fit_component(
    name: str,
    params: dict[str, Any],
    train: sp.csr_matrix,
    validation: sp.csr_matrix,
    full: sp.csr_matrix,
    grid_spec: dict[str, Iterable[Any]] | None,
    train_sequences: list[list[int]] | None,
    full_sequences: list[list[int]] | None,
    threads: int,
) -> ComponentResult:
    fit = _fitter(name, train, train_sequences, threads)
    best: tuple[float, dict[str, Any], Recommender] | None = None

    def evaluate(candidate: dict[str, Any]) -> float:
        nonlocal best
        model = fit(candidate)
        score = validation_ndcg(model, train, validation)
        log.info("%s %s: validation nDCG@10 %.4f", name, candidate, score)
        if best is None or score > best[0]:
            best = (score, candidate, model)
        return score

    trials = search_grid(params, grid_spec, evaluate)
    assert best is not None
    started = time.perf_counter()
    final = _fitter(name, full, full_sequences, threads)(best[1])
    return ComponentResult(
        name=name,
        model=final,
        validation_model=best[2],
        params=best[1],
        validation_ndcg=best[0],
        tuning=[{**candidate, "validation_ndcg@10": score} for candidate, score in trials],
        fit_seconds=time.perf_counter() - started,
    )


@dataclass
class SplitData:
    """The training matrix and the train/validation split carved from it."""

    interactions: InteractionMatrix
    train: sp.csr_matrix
    validation: sp.csr_matrix
    train_events: pl.DataFrame
    events: pl.DataFrame


def require_enough_data(
    interactions: InteractionMatrix, min_users: int = MIN_TRAINING_USERS
) -> None:
    """Raise `NotEnoughDataError` unless `min_users` users have enough items to be evaluated."""
    per_user = np.diff(interactions.matrix.indptr)
    eligible = int((per_user >= MIN_INTERACTIONS_PER_USER).sum())
    if eligible < min_users:
        n_users, n_items = interactions.shape
        raise NotEnoughDataError(
            f"not enough data to train on: need at least {min_users} users with at least "
            f"{MIN_INTERACTIONS_PER_USER} interactions (distinct items) each; found {eligible} "
            f"such users among {n_users} users, {n_items} items and {interactions.nnz} "
            "user-item interactions. Import more events."
        )


def split_training_data(
    events: pl.DataFrame,
    interactions: InteractionMatrix,
    holdout_fraction: float,
    seed: int,
    min_users: int = MIN_TRAINING_USERS,
) -> SplitData:
    """Per-user random validation split; `train_events` are the events of the train part.

    Raises `NotEnoughDataError` before splitting when fewer than `min_users` users could be
    evaluated, and after it when the split held out nothing to validate on.
    """
    require_enough_data(interactions, min_users)
    train, validation = split_per_user(interactions.matrix, holdout_fraction, seed)
    if validation.nnz == 0:
        raise NotEnoughDataError(
            f"not enough data to validate on: the split (holdout_fraction {holdout_fraction}, "
            f"seed {seed}) held out no interaction of the {interactions.shape[0]} users. "
            "Import more events or raise holdout_fraction."
        )
    coo = train.tocoo()
    pairs = pl.DataFrame(
        {
            "user_id": interactions.user_ids[coo.row].astype(str),
            "item_id": interactions.item_ids[coo.col].astype(str),
        }
    )
    train_events = events.join(pairs, on=["user_id", "item_id"], how="semi")
    return SplitData(interactions, train, validation, train_events, events)


def sequences_for(
    events: pl.DataFrame, item_ids: np.ndarray, gap_minutes: float
) -> list[list[int]]:
    """Item2Vec sequences for a set of events (see `session_sequences`)."""
    return session_sequences(events, item_ids, gap_minutes)


def blend(
    results: dict[str, ComponentResult],
    data: SplitData,
    catalog: pl.DataFrame | None,
    seed: int = 0,
    fixed_weights: dict[str, float] | None = None,
) -> tuple[HybridRecommender, HybridRecommender, float]:
    """Tune blend weights on validation; return (final hybrid, validation hybrid, val nDCG@10)."""
    validation_models = {name: r.validation_model for name, r in results.items()}
    if fixed_weights:
        weights, score = dict(fixed_weights), float("nan")
    else:
        # A generator joins the blend only where it beats popularity on validation: one that
        # loses to it adds noise that the weight search then overfits to.
        floor = results["popularity"].validation_ndcg if "popularity" in results else 0.0
        eligible = {
            name: model
            for name, model in validation_models.items()
            if name == "popularity" or results[name].validation_ndcg > floor
        }
        weights, score = tune_weights(eligible, data.train, data.validation, seed=seed)
    ids = (data.interactions.user_ids, data.interactions.item_ids)
    metadata = {
        "params": {name: r.params for name, r in results.items()},
        "validation_ndcg@10": {name: r.validation_ndcg for name, r in results.items()},
    }
    final = HybridRecommender(
        {name: r.model for name, r in results.items()},
        weights,
        *ids,
        data.interactions.matrix,
        catalog,
        metadata=metadata,
    )
    on_validation = HybridRecommender(validation_models, weights, *ids, data.train, catalog)
    return final, on_validation, score


def evaluate_models(
    models: dict[str, Recommender | HybridRecommender],
    train: sp.csr_matrix,
    held_out: sp.csr_matrix,
    k: int = 10,
    max_users: int | None = 20_000,
) -> pl.DataFrame:
    """Every metric at k for every model on the same split (and users): one row per model."""
    users = evaluation_users(held_out, max_users)
    results = {}
    for name, model in models.items():
        recs, _ = model.recommend(train[users], users, k=k)
        results[name] = evaluate_all(recs, held_out[users], train, k)
    return metrics_table(results)


def interactions_from(
    events: pl.DataFrame,
    event_weights: dict[str, float] | None = None,
    half_life_days: float | None = None,
    binary_ratings: bool = False,
    catalog: pl.DataFrame | None = None,
) -> InteractionMatrix:
    """The interaction matrix with the configured weights (ratings as 1 when `binary_ratings`)."""
    if binary_ratings:
        events = events.with_columns(
            pl.when(pl.col("event_type") == "rating")
            .then(pl.lit(1.0))
            .otherwise(pl.col("value"))
            .alias("value")
        )
    item_ids = None if catalog is None or catalog.is_empty() else catalog["item_id"].to_list()
    return build_interaction_matrix(events, event_weights, half_life_days, item_ids=item_ids)
