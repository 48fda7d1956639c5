"""Which model, variant and experiment serve a request: decided here and only here, so every
answer and its impression name the same arm."""

from __future__ import annotations

from dataclasses import dataclass

from serving.bundle import ServingModel
from serving.models import ModelSet

# The variant of an answer no trained model made.
POPULARITY = "popularity"


@dataclass(frozen=True)
class Assignment:
    """The arm a request is served by: the model (None: the popularity policy), the variant
    name the answer and its impression carry, and the experiment it belongs to (None: none)."""

    model: ServingModel | None
    variant: str
    experiment: str | None = None


def assign(models: ModelSet, user_id: str | None) -> Assignment:
    """The arm for a user (the challenger for its hash-stable share, else the champion), or,
    for a request without a user (/similar_items, /popular, /trending), the champion's."""
    model = models.for_user(user_id) if user_id is not None else models.champion
    return Assignment(model, model.variant if model is not None else POPULARITY)
