"""Numbers that must agree across layers."""

from feature_repo.definitions import EVENT_WEIGHTS
from training.events import DEFAULT_EVENT_WEIGHTS, EVENT_TYPES


def test_live_features_weigh_every_event_type_like_the_trained_models() -> None:
    # One table (training/events.py); the live features add the rating, which weighs its value.
    assert set(EVENT_WEIGHTS) == set(EVENT_TYPES)
    assert EVENT_WEIGHTS == {**DEFAULT_EVENT_WEIGHTS, "rating": 1.0}
