"""Every error is JSON: bad input a 4xx naming the field, oversized bodies a 413, an unavailable
dependency a 503 with Retry-After, a bug a 500 logged once per kind instead of once per request."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from config import get_settings
from feature_repo.experiment_store import UnknownExperiment
from training.experiments import ExperimentError

log = logging.getLogger("recsys.serving")


class DependencyUnavailable(Exception):
    """No source can answer the request while a dependency is down: a 503 with Retry-After."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


class BodySizeLimit:
    """Rejects bodies over the limit by Content-Length, or while streaming when it is absent."""

    def __init__(self, app: ASGIApp, max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes or get_settings().serving.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_large = int(value) > limit
                except ValueError:
                    too_large = False
                if too_large:
                    response = _error(413, f"request body larger than {limit} bytes", None)
                    await response(scope, receive, send)
                    return
                break
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)


def _field(loc: tuple | list) -> str | None:
    """`("body", "events", 3, "user_id")` -> `events[3].user_id`."""
    parts = [p for p in loc if p not in ("body", "path", "query")]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _error(status: int, message: str, field: str | None, detail: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message, "field": field}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    detail = [
        {"field": _field(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type")}
        for e in errors[:20]
    ]
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "invalid JSON")
        return _error(400, f"malformed JSON: {reason}", None)
    field = _field(first.get("loc", ()))
    if field is None and first.get("type") == "missing":
        return _error(400, "a JSON body is required", None)
    if field is None and first.get("type") in ("model_attributes_type", "dict_type"):
        return _error(400, "the body must be a JSON object", None)
    message = f"{field}: {first.get('msg', 'invalid')}" if field else first.get("msg", "invalid")
    return _error(422, message, field, detail)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    response = _error(exc.status_code, str(exc.detail), None)
    # A 405 keeps its Allow header.
    response.headers.update(exc.headers or {})
    return response


async def _experiment_error(request: Request, exc: ExperimentError) -> JSONResponse:
    # A definition the registry or the store refuses (an unknown version, a name already
    # running) is the caller's to fix; an unknown experiment is a 404.
    return _error(404 if isinstance(exc, UnknownExperiment) else 422, str(exc), None)


async def _unavailable(request: Request, exc: DependencyUnavailable) -> JSONResponse:
    response = _error(503, str(exc), None)
    response.headers["Retry-After"] = str(exc.retry_after)
    return response


class CatchAll:
    """A bug answers a JSON 500 and is logged with its traceback once per (route, exception type,
    place); the exception stops here.

    FastAPI's handler for `Exception` re-raises after answering, so the ASGI server logs a second
    traceback per request and drops the keep-alive connection: this middleware runs inside it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.seen: dict[tuple[str, str, str], int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            self._log(scope, exc)
            if not started:
                await _error(500, "internal error; see the service log", None)(scope, receive, send)

    def _log(self, scope: Scope, exc: Exception) -> None:
        route = getattr(scope.get("route"), "path", scope.get("path", "?"))
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"
        key = (route, type(exc).__name__, where)
        count = self.seen.get(key, 0)
        self.seen[key] = count + 1
        if count == 0:
            log.error("unhandled error on %s (logged once per kind)", route, exc_info=exc)


class JSONNotFound:
    """BentoML's outer router answers unknown paths and methods in plain text: make them JSON.

    Installed on the BentoML service (around its router), not on the FastAPI app, which only
    sees the paths it serves.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced: int | None = None

        async def rewritten(message: Message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] in (404, 405):
                headers = dict(message.get("headers", ()))
                if headers.get(b"content-type", b"").startswith(b"text/plain"):
                    replaced = message["status"]
                    allow = headers.get(b"allow")
                    body = _error(replaced, _REASONS[replaced], None)
                    if allow is not None:
                        body.headers["Allow"] = allow.decode()
                    await send(
                        {
                            "type": "http.response.start",
                            "status": replaced,
                            "headers": body.raw_headers,
                        }
                    )
                    await send({"type": "http.response.body", "body": body.body})
                    return
            if replaced is not None:
                return  # the plain-text body, replaced above
            await send(message)

        await self.app(scope, receive, rewritten)


_REASONS = {404: "not found", 405: "method not allowed"}


def install_error_handlers(app: FastAPI) -> None:
    """JSON errors for validation, HTTP errors, unavailable dependencies and bugs; the body size
    limit."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(DependencyUnavailable, _unavailable)
    app.add_exception_handler(ExperimentError, _experiment_error)
    app.add_middleware(BodySizeLimit)
    # Added last, so outermost of the app's own middleware: it also catches BodySizeLimit's.
    app.add_middleware(CatchAll)
