"""Numbers that must agree across layers that may not import each other."""

from feature_repo.definitions import EVENT_WEIGHTS
from training.data import EVENT_TYPES
from training.matrix import DEFAULT_EVENT_WEIGHTS


def test_live_features_weigh_events_like_the_trained_models() -> None:
    # feature_repo may import only redis, so it keeps its own copy of the weights.
    assert {k: v for k, v in EVENT_WEIGHTS.items() if k != "rating"} == DEFAULT_EVENT_WEIGHTS
    assert set(EVENT_WEIGHTS) == set(EVENT_TYPES)
