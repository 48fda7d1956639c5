"""The HTTP face of the recommendation service: the FastAPI app BentoML mounts, its error
handlers, OpenAPI metadata and the routes, each a few lines over the worker's service instance."""

from __future__ import annotations

import functools
import importlib.metadata
import json
from typing import TYPE_CHECKING, Annotated

import anyio
import bentoml
from fastapi import Body, FastAPI, Query, Request
from fastapi import Path as PathParam
from starlette.responses import Response

from serving.auth import document_security
from serving.errors import install_error_handlers
from serving.schemas import (
    ID_PATTERN,
    ErrorResponse,
    EventsRequest,
    EventsResponse,
    ExperimentResponse,
    ExperimentStartRequest,
    ForgetUserResponse,
    ItemsRequest,
    ItemsResponse,
    ItemsWritten,
    PopularRequest,
    RecommendRequest,
    RecommendResponse,
    SimilarItemsRequest,
    TrendingRequest,
    TrendingResponse,
    UserActivityResponse,
    UserProfileRequest,
    UserProfileResponse,
)
from training.events import MAX_ID_LENGTH

if TYPE_CHECKING:
    from serving.service import RecommendationService

ERRORS = {
    400: {"model": ErrorResponse, "description": "Malformed JSON"},
    401: {
        "model": ErrorResponse,
        "description": "No API key, or an unknown one (when the service has keys)",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    },
    403: {"model": ErrorResponse, "description": "The API key lacks the scope the route needs"},
    413: {"model": ErrorResponse, "description": "Body larger than the limit"},
    422: {"model": ErrorResponse, "description": "A field is invalid; `field` names it"},
    429: {
        "model": ErrorResponse,
        "description": "Rate limit of the API key or the client address exceeded",
        "headers": {
            "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}
        },
    },
    503: {
        "model": ErrorResponse,
        "description": "A dependency (Redis) is down and no fallback can answer; retry later",
        "headers": {
            "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}
        },
    },
}
# A URL whose path segment no route takes (e.g. a user id with a newline) is not the route's.
PATH_ERRORS = {
    **ERRORS,
    404: {"model": ErrorResponse, "description": "No route takes this path"},
}

# The endpoints are a FastAPI app mounted with `@bentoml.asgi_app`; each route calls the worker's
# service instance. BentoML adds /healthz, /readyz, /metrics and the OpenAPI document.
TITLE = "recsys-platform recommendation service"
DESCRIPTION = (
    "Real-time recommendations over the registry's champion model blended with live features, "
    "and event ingestion. Errors are JSON `{error, field}`; while Redis is down, answers that "
    "have a fallback come with `degraded: true`, the others are 503 with `Retry-After`."
)
app = FastAPI(
    title=TITLE,
    description=DESCRIPTION,
    version=importlib.metadata.version("recsys-platform"),
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)
install_error_handlers(app)


def json_response(payload: object, status: int = 200) -> Response:
    """`payload` as compact JSON."""
    return Response(
        json.dumps(payload, separators=(",", ":")), status, media_type="application/json"
    )


# -- HTTP routes: module-level functions (no per-request dependency injection) over the one
# service instance of this worker --------------------------------------------------------------


# In the route rather than on EventsRequest, which its own branch rewrites.
EVENTS_EXAMPLE = {
    "events": [
        {"user_id": "u42", "item_id": "i12", "event_type": "view", "timestamp": 1767323045},
        {
            "user_id": "u42",
            "item_id": "i12",
            "event_type": "purchase",
            "timestamp": "2026-01-02T03:05:00Z",
            "value": 1,
            "event_id": "order-981-1",
        },
    ]
}


@app.get("/docs.json", include_in_schema=False)
async def openapi_document() -> Response:
    """BentoML's OpenAPI document (our routes and its /healthz, /readyz, /metrics) with this
    project's title, description and version instead of BentoML's boilerplate."""
    return json_response(_openapi())


@functools.cache
def _openapi() -> dict:
    # Imported here: the service module imports this one to mount the app.
    from serving.service import RecommendationService

    spec = RecommendationService.openapi_spec.asdict()
    spec["info"] = {"title": TITLE, "description": DESCRIPTION, "version": app.version}
    # BentoML says 3.0.2, but the schemas FastAPI and pydantic write are OpenAPI 3.1 (JSON Schema
    # 2020-12: `type: null`, `examples` lists), so validators read them right.
    spec["openapi"] = "3.1.0"
    document_security(spec)
    return spec


# A user id in a URL path: the rules of `Id` in a request body.
PathUserId = Annotated[str, PathParam(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN)]


def _service() -> RecommendationService:
    return bentoml.get_current_service()


@app.post(
    "/recommend",
    response_model=RecommendResponse,
    responses=ERRORS,
    summary="Top-k items for a user, with per-source scores and a reason per item",
)
async def recommend(body: RecommendRequest) -> Response:
    # On the event loop: a request takes about a millisecond, mostly numpy with short Redis
    # round trips; in worker threads it would queue on the GIL for longer than that.
    return Response(_service().recommend_json(body), media_type="application/json")


@app.post(
    "/similar_items",
    response_model=ItemsResponse,
    responses=ERRORS,
    summary="Items similar to one item",
)
async def similar_items(body: SimilarItemsRequest) -> Response:
    return _service().similar_items(body)


@app.post(
    "/popular",
    response_model=ItemsResponse,
    responses=ERRORS,
    summary="The most popular items now, optionally of one category",
)
async def popular(body: PopularRequest) -> Response:
    return _service().popular(body)


@app.post(
    "/events",
    response_model=EventsResponse,
    responses=ERRORS,
    summary="Ingest 1 to 1,000 events; each accepted one is in the durable stream",
)
async def events(body: Annotated[EventsRequest, Body(examples=[EVENTS_EXAMPLE])]) -> Response:
    # Validation and the Redis script take milliseconds: off the event loop.
    return await anyio.to_thread.run_sync(_service().ingest_events, body)


@app.post(
    "/items",
    response_model=ItemsWritten,
    responses=ERRORS,
    summary="Add or update 1 to 1,000 catalog items; ranking uses them from the next request",
)
async def items(body: ItemsRequest) -> Response:
    return await anyio.to_thread.run_sync(_service().write_items, body)


@app.get(
    "/users/{user_id}/activity",
    response_model=UserActivityResponse,
    responses=PATH_ERRORS,
    summary="A user's recent items and event counters",
)
async def user_activity(
    user_id: PathUserId,
    n: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Response:
    return _service().user_activity(user_id, n)


@app.post(
    "/trending",
    response_model=TrendingResponse,
    responses=ERRORS,
    summary="Trending items (global or of one category) with their trend, and trending categories",
    description=(
        "From the latest trend analysis (`source: trend_analysis`). Where it has no list for the "
        "request (no analysis pushed yet, it expired, or nothing of the category trended), a "
        "fallback (`source: live`, trend fields null): the live 2-hour trending list, then "
        "decayed live popularity, then batch or training-time popularity, restricted to the "
        "category when one is given (an item's category comes from the serving model's "
        "catalog, so a category needs a model; `unknown`: items without one). Each item's "
        "`reason` names its list."
    ),
)
async def trending(body: TrendingRequest) -> Response:
    return _service().trending(body)


@app.post(
    "/user_profile",
    response_model=UserProfileResponse,
    responses=ERRORS,
    summary="A user's segment, RFM scores, engagement, churn risk, lifetime value, preferences",
)
async def user_profile(body: UserProfileRequest) -> Response:
    return _service().user_profile(body.user_id)


@app.get(
    "/users/{user_id}/profile",
    response_model=UserProfileResponse,
    responses=PATH_ERRORS,
    summary="The same as POST /user_profile",
)
async def user_profile_by_path(
    user_id: PathUserId,
) -> Response:
    return _service().user_profile(user_id)


@app.delete(
    "/users/{user_id}",
    response_model=ForgetUserResponse,
    responses=PATH_ERRORS,
    summary="Forget a user: events, batch lists and live features deleted, suppressed, audited",
    description=(
        "Deletes the user's events from the event store and batch recommendations, and their "
        "Redis keys (recent items, counters, profile, cached answers, batch candidates) at once; "
        "adds them to the suppression list so late events are dropped and the next training "
        "leaves them out; writes a `deletion_audit` record. Idempotent. Admin scope."
    ),
)
async def forget_user(user_id: PathUserId, request: Request) -> Response:
    return await anyio.to_thread.run_sync(_service().forget_user, user_id, _actor(request))


def _actor(request: Request) -> str:
    """Who asked, for the audit: the API key's name when the auth layer set one, else the
    client's address."""
    name = getattr(request.state, "api_key", None)
    if name:
        return f"api-key:{name}"
    client = request.client.host if request.client else "unknown"
    return f"http:{client}"


# -- online experiments (admin) -----------------------------------------------------------------

ExperimentName = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


@app.get(
    "/experiments",
    response_model=list[ExperimentResponse],
    responses=PATH_ERRORS,
    summary="Every online experiment, oldest first (admin)",
)
async def list_experiments() -> Response:
    return await anyio.to_thread.run_sync(_service().list_experiments)


@app.post(
    "/experiments",
    response_model=ExperimentResponse,
    responses=ERRORS,
    summary="Start an online experiment (admin); the service's workers pick it up within seconds",
    description=(
        "Arms name what serves them: `champion`, `challenger`, `popularity` or `version:N`. "
        "Users are assigned by a salted hash of their id, so a user sees one arm. The hourly "
        "`experiment_report` asset analyses it and its sensor promotes or rolls back."
    ),
)
async def start_experiment(body: ExperimentStartRequest) -> Response:
    return await anyio.to_thread.run_sync(_service().start_experiment, body)


@app.get(
    "/experiments/{name}",
    response_model=ExperimentResponse,
    responses=PATH_ERRORS,
    summary="One experiment (admin)",
)
async def get_experiment(name: ExperimentName) -> Response:
    return await anyio.to_thread.run_sync(_service().get_experiment, name)


@app.post(
    "/experiments/{name}/stop",
    response_model=ExperimentResponse,
    responses=PATH_ERRORS,
    summary="Stop an experiment (admin): its users see the champion again",
)
async def stop_experiment(name: ExperimentName) -> Response:
    return await anyio.to_thread.run_sync(_service().stop_experiment, name)
