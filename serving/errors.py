"""Bad input becomes a 4xx JSON error naming the field; oversized bodies a 413, never a 5xx."""

from __future__ import annotations

import logging
import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("recsys.serving")
DEFAULT_MAX_BODY_BYTES = 1_048_576


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


class BodySizeLimit:
    """Rejects bodies over the limit by Content-Length, or while streaming when it is absent."""

    def __init__(self, app: ASGIApp, max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes or int(
            os.environ.get("RECSYS_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)
        )

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
    return _error(exc.status_code, str(exc.detail), None)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return _error(500, "internal error; see the service log", None)


def install_error_handlers(app: FastAPI) -> None:
    """JSON errors for validation, HTTP and unexpected failures; the body size limit."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(BodySizeLimit)
