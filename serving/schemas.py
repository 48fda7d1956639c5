"""Request and response bodies of the service, as typed pydantic models (they make the OpenAPI)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from typing_extensions import TypedDict

from training.data import MAX_ID_LENGTH

# An id of the event contract: 1..256 characters, no control characters, no outer whitespace.
Id = Annotated[
    str,
    StringConstraints(
        strip_whitespace=True,
        min_length=1,
        max_length=MAX_ID_LENGTH,
        pattern=r"^[^\x00-\x1f\x7f]+$",
    ),
]
Category = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Filters(_Strict):
    """Business rules applied after scoring."""

    categories: list[Category] | None = Field(
        default=None, max_length=100, description="Only items of these categories."
    )
    exclude_categories: list[Category] | None = Field(default=None, max_length=100)
    price_min: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    price_max: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    in_stock_only: bool = True
    exclude_item_ids: list[Id] | None = Field(default=None, max_length=1000)


class RecommendRequest(_Strict):
    user_id: Id
    k: int = Field(default=10, ge=1, le=100)
    context: dict[str, Any] | None = Field(
        default=None, description="Free-form request context (device, page, ...), logged only."
    )
    filters: Filters | None = None
    exclude_seen: bool = Field(
        default=True, description="Leave out items the user has seen or bought."
    )


class RecommendedItem(BaseModel):
    item_id: str
    score: float
    sources: dict[str, float] = Field(
        description="Each candidate generator that proposed the item, with its normalised score."
    )
    reason: str


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    model_version: str | None
    variant: Literal["champion", "challenger", "popularity"]
    request_id: str
    latency_ms: float
    cached: bool = False


class SimilarItemsRequest(_Strict):
    item_id: Id
    k: int = Field(default=10, ge=1, le=100)


class PopularRequest(_Strict):
    k: int = Field(default=10, ge=1, le=100)
    category: Category | None = None


class ScoredItem(BaseModel):
    item_id: str
    score: float
    reason: str | None = None


class ItemsResponse(BaseModel):
    items: list[ScoredItem]
    model_version: str | None
    request_id: str


class RawEvent(TypedDict, total=False):
    """One event as sent; its content is checked per event (bad ones are listed as rejected)."""

    __pydantic_config__ = ConfigDict(coerce_numbers_to_str=True)  # type: ignore[misc]

    user_id: str | None
    item_id: str | None
    event_type: str | None
    timestamp: str | None
    value: Annotated[float, Field(allow_inf_nan=False)] | None
    session_id: str | None
    event_id: str | None


class EventsRequest(_Strict):
    events: list[RawEvent] = Field(min_length=1, max_length=1000)


class Rejection(BaseModel):
    index: int
    reason: str


class EventsResponse(BaseModel):
    accepted: int
    duplicates: int
    rejected: list[Rejection]
    unknown_items: int = Field(
        description="Accepted events whose item the serving model does not know (new items)."
    )


class RecentItem(BaseModel):
    item_id: str
    timestamp: int


class UserActivityResponse(BaseModel):
    user_id: str
    recent: list[RecentItem]
    counters: dict[str, float]
    known_to_model: bool


class ErrorResponse(BaseModel):
    error: str
    field: str | None = None
    detail: list[dict[str, Any]] | None = None
