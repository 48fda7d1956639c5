"""Request and response bodies of the service, as typed pydantic models (they make the OpenAPI)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    StringConstraints,
)
from typing_extensions import TypedDict

from training.events import (
    MAX_CONTEXT_KEY_LENGTH,
    MAX_CONTEXT_KEYS,
    MAX_CONTEXT_VALUE_LENGTH,
    MAX_ID_LENGTH,
)

# An id of the event contract: 1..256 characters, no control characters (C0, DEL, C1: the
# class of training.events.CONTROL_CHARACTERS), not blank; outer whitespace is stripped. The
# pattern holds for the text as sent (what the OpenAPI says): a control character is refused even
# where stripping would have removed it (`"\fu1"`), as /events refuses it.
ID_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
Id = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN),
    AfterValidator(str.strip),
]
Category = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _request(*examples: dict[str, Any]) -> ConfigDict:
    """A request body's config: unknown fields and loose types (`k: true`, `k: "5"`,
    `exclude_seen: 0`) are 422s rather than guesses, and its examples are in the OpenAPI."""
    return ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": list(examples)})


DEGRADED = Field(
    default=False,
    description="True when a dependency (Redis) was down and the answer comes from a fallback: "
    "the last lists read or the model's training-time popularity and neighbours.",
)


class Filters(BaseModel):
    """Business rules applied after scoring."""

    categories: list[Category] | None = Field(
        default=None, max_length=100, description="Only items of these categories."
    )
    exclude_categories: list[Category] | None = Field(default=None, max_length=100)
    price_min: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    price_max: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    in_stock_only: bool = True
    exclude_item_ids: list[Id] | None = Field(default=None, max_length=1000)

    model_config = _request({"categories": ["shoes"], "price_max": 80.0, "in_stock_only": True})


CatalogField = Literal["title", "category", "brand", "price", "in_stock"]


class RecommendRequest(BaseModel):
    model_config = _request(
        {"user_id": "u42", "k": 10},
        {
            "user_id": "u42",
            "k": 5,
            "exclude_seen": False,
            "context": {"device": "mobile", "page": "home"},
            "filters": {"categories": ["shoes"], "price_max": 80.0},
        },
    )

    user_id: Id
    k: int = Field(default=10, ge=1, le=100)
    context: dict[str, Any] | None = Field(
        default=None, description="Free-form request context (device, page, ...), logged only."
    )
    filters: Filters | None = None
    exclude_seen: bool = Field(
        default=True, description="Leave out items the user has seen or bought."
    )
    fields: list[CatalogField] | None = Field(
        default=None,
        max_length=5,
        description="Catalog fields each item carries (live catalog first, the model's behind).",
    )


class RecommendedItem(BaseModel):
    item_id: str
    score: float
    title: str | None = None
    category: str | None = None
    brand: str | None = None
    price: float | None = None
    in_stock: bool | None = None
    sources: dict[str, float] = Field(
        description="Each candidate generator that proposed the item, with its normalised score."
    )
    reason: str


class Lineage(BaseModel):
    """Where the model behind an answer came from (`recsys lineage VERSION` prints the rest)."""

    model_version: str
    mlflow_run_id: str | None = Field(description="The MLflow run that logged the version.")
    dagster_run_id: str | None = Field(
        description="The Dagster run that trained it; null when it was not trained by Dagster."
    )
    trained_by: str = Field(
        description="`dagster` (the training job), `python` (ModelRegistry.log_bundle called "
        "directly: a script, a test, a benchmark) or `unknown` (registered before lineage was "
        "recorded)."
    )


LINEAGE = Field(default=None, description="The serving model's lineage; null without a model.")


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    model_version: str | None
    lineage: Lineage | None = LINEAGE
    variant: str = Field(
        description="Who answered: `champion`, `challenger` (its share of users), `popularity` "
        "(no model), an experiment arm's name, or `interleaved` (an interleaving experiment)."
    )
    experiment: str | None = Field(
        default=None, description="The online experiment that chose the variant, if any."
    )
    segment: str | None = Field(
        default=None,
        description="The user's segment when its re-ranking rule applied (see /user_profile).",
    )
    request_id: str
    latency_ms: float
    cached: bool = False
    degraded: bool = DEGRADED


class SimilarItemsRequest(BaseModel):
    model_config = _request({"item_id": "i12", "k": 5})

    item_id: Id
    k: int = Field(default=10, ge=1, le=100)


class PopularRequest(BaseModel):
    model_config = _request({"k": 10}, {"k": 5, "category": "shoes"})

    k: int = Field(default=10, ge=1, le=100)
    category: Category | None = None


class ScoredItem(BaseModel):
    item_id: str
    score: float
    reason: str | None = None


class ItemsResponse(BaseModel):
    items: list[ScoredItem]
    model_version: str | None
    lineage: Lineage | None = LINEAGE
    request_id: str
    degraded: bool = DEGRADED


class TrendingRequest(BaseModel):
    model_config = _request({"k": 10}, {"k": 5, "category": "shoes"})

    k: int = Field(default=10, ge=1, le=100)
    category: Category | None = Field(
        default=None, description="Only items of this category (`unknown`: items without one)."
    )


class TrendFields(BaseModel):
    """What the trend analysis says of an item or a category (null when not analysed)."""

    trend_type: Literal["rising", "falling", "stable", "volatile"] | None = None
    strength: float | None = Field(default=None, description="0..1: how strong the trend is.")
    confidence: float | None = Field(default=None, description="0..1: how sure the label is.")
    burst: bool | None = Field(default=None, description="A recent day far above the usual.")
    velocity: float | None = Field(
        default=None, description="log of the recent week's daily rate over the prior week's."
    )
    predicted_direction: Literal["up", "down", "flat"] | None = None


class TrendingItem(TrendFields):
    item_id: str
    score: float = Field(
        description="trend_score: expected weighted events over the forecast horizon. When "
        "`source` is `live`: the item's score on the list its reason names (comparable only "
        "within one reason)."
    )
    category: str | None = Field(
        default=None, description="The item's category; null in a global `live` answer."
    )
    reason: str = Field(
        description="From the trend analysis: `rising this week`, `going viral`, `popular this "
        "week`. Live fallback: `trending now` (2-hour trending list), `popular right now` "
        "(decayed live popularity), `popular` (batch or training-time popularity)."
    )


class CategoryTrend(TrendFields):
    category: str
    trend_score: float | None = None


class TrendingResponse(BaseModel):
    items: list[TrendingItem]
    categories: list[CategoryTrend] = Field(
        description="The top k categories by trend_score, or the requested category."
    )
    source: Literal["trend_analysis", "live", "none"] = Field(
        description="`trend_analysis`: the pushed analysis; `live`: a fallback, the analysis "
        "has no list for this request (none pushed, it expired, or nothing of the category "
        "trended) and live trending and popular items serve, with null trend fields; `none`: "
        "nothing to show."
    )
    analysed_at: float | None = Field(
        default=None, description="End of the analysed window (epoch seconds)."
    )
    lineage: Lineage | None = LINEAGE
    request_id: str
    degraded: bool = DEGRADED


class UserProfileRequest(BaseModel):
    model_config = _request({"user_id": "u42"})

    user_id: Id


class UserProfileResponse(BaseModel):
    user_id: str
    segment: str = Field(description="The behavioural segment, `unknown` if never profiled.")
    known: bool
    r_score: int | None = Field(default=None, description="1-5, 5 = most recent.")
    f_score: int | None = Field(default=None, description="1 without orders, else 2-5.")
    m_score: int | None = Field(default=None, description="1 without spend, else 2-5.")
    rfm: str | None = None
    engagement: float | None = Field(default=None, description="0..1")
    churn_risk: float | None = Field(default=None, description="0..1")
    lifetime_value: float | None = None
    price_percentile: float | None = Field(
        default=None, description="Mean within-category price percentile of the user's items."
    )
    preferences: dict[str, Any] = Field(
        default_factory=dict,
        description="top_categories, top_brands, price_low, price_high, preferred_hour, "
        "daypart, device (when known).",
    )
    updated_at: float | None = Field(default=None, description="When the profile was pushed.")
    ranking_rule: dict[str, Any] | None = Field(
        default=None, description="The re-ranking rule of the segment, if it has one."
    )


# JSON types of an event are strict (a boolean is not a number, a number is not an id); the
# content (ids, type, time, value ranges) is checked per event by training.events, so one bad
# event is rejected with a reason while the rest of the batch goes on.
FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]
ContextKey = Annotated[
    str, StringConstraints(strict=True, min_length=1, max_length=MAX_CONTEXT_KEY_LENGTH)
]
ContextValue = (
    Annotated[str, StringConstraints(strict=True, max_length=MAX_CONTEXT_VALUE_LENGTH)]
    | StrictBool
    | StrictInt
    | FiniteNumber
    | None
)


class RawEvent(TypedDict, total=False):
    """One event as sent. Unknown fields are refused (422 naming them), not dropped."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    user_id: StrictStr | None
    item_id: StrictStr | None
    event_type: StrictStr | None
    timestamp: Annotated[
        StrictStr | StrictInt | FiniteNumber | None,
        Field(description="Epoch seconds, epoch milliseconds or ISO-8601; missing means now."),
    ]
    value: Annotated[
        FiniteNumber | None,
        Field(description="A rating (0..10) or a quantity (above 0, at most 1,000,000)."),
    ]
    session_id: StrictStr | None
    event_id: Annotated[
        StrictStr | None,
        Field(description="Idempotency key, global: a known id (of any user) is a duplicate."),
    ]
    context: Annotated[
        dict[ContextKey, ContextValue] | None,
        Field(
            max_length=MAX_CONTEXT_KEYS,
            description="Flat object (device, page, free keys), at most 1 KB as JSON; stored.",
        ),
    ]
    request_id: Annotated[
        StrictStr | None,
        Field(
            description="The request_id of the answer this event follows (a click on a "
            "recommended item): ties the event to its impression for attribution."
        ),
    ]
    position: Annotated[
        StrictInt | None,
        Field(description="The item's 0-based rank in that answer (0..1,000,000)."),
    ]


class EventsRequest(_Strict):
    events: list[RawEvent] = Field(min_length=1, max_length=1000)


class Rejection(BaseModel):
    index: int
    reason: str


class EventsResponse(BaseModel):
    accepted: int
    duplicates: int
    duplicate_indices: list[int] = Field(
        description="Indices of the events whose event_id was already known (not stored again)."
    )
    rejected: list[Rejection]
    unknown_items: int = Field(
        description="Accepted events whose item the serving model does not know (new items)."
    )


Text = Annotated[str, StringConstraints(strict=True, max_length=MAX_ID_LENGTH)]


class CatalogItem(BaseModel):
    """One item of the catalog contract; an omitted field keeps its stored value (a new item
    without `in_stock` is in stock)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    item_id: Id
    title: Annotated[str, StringConstraints(strict=True, max_length=1000)] | None = None
    category: Text | None = None
    brand: Text | None = None
    price: Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)] | None = None
    in_stock: StrictBool | None = None


class ItemsRequest(BaseModel):
    model_config = _request(
        {
            "items": [
                {"item_id": "i12", "title": "Trail shoe", "category": "shoes", "price": 79.0},
                {"item_id": "i13", "in_stock": False},
            ]
        }
    )

    items: list[CatalogItem] = Field(min_length=1, max_length=1000)


class ItemsWritten(BaseModel):
    written: int = Field(description="Items written to the live catalog.")


class RecentItem(BaseModel):
    item_id: str
    timestamp: int


class UserActivityResponse(BaseModel):
    user_id: str
    recent: list[RecentItem]
    counters: dict[str, float]
    known_to_model: bool


class ForgetUserResponse(BaseModel):
    user_id: str
    deletion_id: str
    user_hash: str
    actor: str
    deleted_at: float
    removed: dict[str, int]
    suppressed: bool


class ErrorResponse(BaseModel):
    error: str
    field: str | None = None
    detail: list[dict[str, Any]] | None = None


# -- online experiments (admin) -----------------------------------------------------------------


class ExperimentStartRequest(BaseModel):
    """An experiment to start: the control and treatments name what serves each arm."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"name": "als-vs-popularity", "control": "champion",
                          "treatments": ["popularity"], "min_users": 500}]
        },
    )  # fmt: skip

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    control: str = Field(
        default="champion", description="champion, challenger, popularity, version:N"
    )
    treatments: list[str] = Field(min_length=1, max_length=8)
    kind: Literal["ab", "interleave"] = "ab"
    shares: list[float] | None = Field(
        default=None, description="A weight per arm (default equal)."
    )
    traffic: float = Field(default=1.0, gt=0, le=1)
    metric: str = Field(
        default="ctr",
        description="The decision metric per user: ctr, conversion, revenue_per_user, clicks, "
        "purchases, add_to_carts, revenue, converted.",
    )
    alpha: float = Field(default=0.05, gt=0, lt=0.5)
    min_users: int = Field(default=200, ge=1)
    min_hours: float = Field(default=1.0, ge=0)
    max_days: float = Field(default=14.0, gt=0)


class ExperimentResponse(BaseModel):
    """An experiment as stored: its arms, status and, once decided, the decision."""

    model_config = ConfigDict(extra="allow")

    name: str
    kind: str
    status: str
    arms: list[dict]
    metric: str
    traffic: float
    started_at: float
    decision: dict | None = None
