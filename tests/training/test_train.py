"""Training steps: the minimum data the split needs, and the tuning grid search."""

import polars as pl
import pytest

from training.data import DataValidationError, validate_events
from training.train import (
    MIN_TRAINING_USERS,
    NotEnoughDataError,
    fit_component,
    interactions_from,
    search_grid,
    split_training_data,
)


def _events(items_per_user: list[int]) -> pl.DataFrame:
    """User u{n} viewed items i0..i{k-1}, for k in `items_per_user`."""
    rows = [
        (f"u{user}", f"i{item}", "view", 1_700_000_000 + 60 * item)
        for user, k in enumerate(items_per_user)
        for item in range(k)
    ]
    raw = pl.DataFrame(rows, schema=["user_id", "item_id", "event_type", "timestamp"], orient="row")
    return validate_events(raw).frame


def test_too_few_users_with_two_items_raise_a_message_naming_what_was_found() -> None:
    # Nine users who could be evaluated, and twenty with a single item who cannot.
    events = _events([3] * (MIN_TRAINING_USERS - 1) + [1] * 20)
    with pytest.raises(NotEnoughDataError) as raised:
        split_training_data(events, interactions_from(events), 0.2, seed=0)
    message = str(raised.value)
    assert f"need at least {MIN_TRAINING_USERS} users with at least 2 interactions" in message
    assert (
        f"found {MIN_TRAINING_USERS - 1} such users among {MIN_TRAINING_USERS + 19} users"
        in message
    )
    # The CLI maps it to exit code 2 like any other problem with the input data.
    assert isinstance(raised.value, DataValidationError)


def test_enough_users_split_and_validate() -> None:
    events = _events([5] * MIN_TRAINING_USERS)
    data = split_training_data(events, interactions_from(events), 0.2, seed=0)
    assert data.validation.nnz > 0
    assert data.train.nnz + data.validation.nnz == data.interactions.nnz


def test_min_users_is_configurable() -> None:
    events = _events([4, 4, 4])
    data = split_training_data(events, interactions_from(events), 0.5, seed=0, min_users=3)
    assert data.validation.nnz > 0
    with pytest.raises(NotEnoughDataError, match="need at least 4 users"):
        split_training_data(events, interactions_from(events), 0.5, seed=0, min_users=4)


def test_a_split_that_holds_out_nothing_raises() -> None:
    events = _events([2] * MIN_TRAINING_USERS)
    with pytest.raises(NotEnoughDataError, match="held out no interaction"):
        split_training_data(events, interactions_from(events), 0.001, seed=0)


def test_grid_search_climbs_to_the_peak_without_trying_every_point() -> None:
    grid_spec = {"a": [1, 2, 3, 4, 5], "b": [10, 20, 30, 40]}
    peak = (4, 30)

    def score(params: dict) -> float:
        return -abs(params["a"] - peak[0]) - abs(params["b"] - peak[1]) / 10

    trials = search_grid({"a": 2, "b": 10, "other": "kept"}, grid_spec, score)
    best, _ = max(trials, key=lambda t: t[1])
    assert (best["a"], best["b"]) == peak
    assert trials[0][0] == {"a": 2, "b": 10, "other": "kept"}, "starts from the base params"
    assert len(trials) < 5 * 4
    assert len({(p["a"], p["b"]) for p, _ in trials}) == len(trials), "no point is fit twice"


def test_grid_search_stops_when_validation_stops_improving() -> None:
    tried = []

    def score(params: dict) -> float:
        tried.append(params["l2"])
        return -abs(params["l2"] - 300.0)

    trials = search_grid({"l2": 300.0}, {"l2": [10.0, 100.0, 300.0, 600.0, 1000.0, 3000.0]}, score)
    # The start is best: its two neighbours are tried, nothing further out.
    assert tried == [300.0, 100.0, 600.0]
    assert [p["l2"] for p, _ in trials] == tried


def test_grid_search_starts_mid_axis_when_the_base_is_off_the_grid() -> None:
    trials = search_grid({"l2": 7.0}, {"l2": [1.0, 2.0, 3.0]}, lambda p: p["l2"])
    assert [p["l2"] for p, _ in trials] == [2.0, 1.0, 3.0]


def test_without_a_grid_the_base_params_are_fit_once() -> None:
    trials = search_grid({"x": 1}, None, lambda p: 0.5)
    assert trials == [({"x": 1}, 0.5)]


def test_fit_component_keeps_the_best_validation_model_and_refits_it() -> None:
    events = _events([12] * 40)
    data = split_training_data(events, interactions_from(events), 0.25, seed=0)
    result = fit_component(
        "ease",
        {"l2": 30.0},
        data.train,
        data.validation,
        data.interactions.matrix,
        {"l2": [1.0, 30.0, 1000.0]},
    )
    scores = {t["l2"]: t["validation_ndcg@10"] for t in result.tuning}
    assert result.params["l2"] == max(scores, key=scores.get)
    assert result.validation_ndcg == max(scores.values())
    assert result.validation_model.l2 == result.model.l2 == result.params["l2"]
    assert result.model.n_items == data.interactions.shape[1]


def test_a_steps_thread_share_sets_each_models_own_pool_but_is_no_hyperparameter() -> None:
    from training.train import fit_component

    events = _events([14] * 30)
    data = split_training_data(events, interactions_from(events), 0.2, seed=0)
    full = data.interactions.matrix
    als = fit_component(
        "als", {"factors": 4, "iterations": 2}, data.train, data.validation, full, threads=1
    )
    assert als.model.num_threads == 1 and als.validation_model.num_threads == 1
    assert "num_threads" not in als.params
    item2vec = fit_component(
        "item2vec", {"vector_size": 4, "epochs": 1}, data.train, data.validation, full, threads=1
    )
    assert item2vec.model.workers == 1 and "workers" not in item2vec.params
    # Without a share, the models keep their own defaults (ALS: every core).
    assert (
        fit_component(
            "als", {"factors": 4, "iterations": 2}, data.train, data.validation, full
        ).model.num_threads
        == 0
    )
