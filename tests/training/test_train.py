"""Training steps: the minimum data the split needs before anything is trained."""

import polars as pl
import pytest

from training.data import DataValidationError, validate_events
from training.train import (
    MIN_TRAINING_USERS,
    NotEnoughDataError,
    interactions_from,
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
