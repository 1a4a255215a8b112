"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}} for every status the server
returns, and the FastAPI exception handlers that produce them.

400 bad input (the field in `param`), 401 bad API key, 404 unknown model or route, 405 wrong method
(with `Allow`), 413 body too large, 429 too many requests in flight (with `Retry-After`), 500 an
engine failure, 503 shutting down, the engine is dead, or (in a cluster) the replica that held
the request is unavailable.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from oneiros.core import InvalidRequestError, UnknownModelError
from oneiros.server.engine_client import (
    EngineDeadError,
    EngineError,
    EngineShutdownError,
    EngineUnavailableError,
)

logger = logging.getLogger("oneiros.server")

REQUEST_ID_KEY = "oneiros.request_id"


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers


class ErrorJSON(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote what the client sent, and text
    that is not valid Unicode (a lone surrogate) must still come out as valid UTF-8."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    request_id: str | None,
    status: int,
    message: str,
    type: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> ErrorJSON:
    logger.info("[%s] -> %d %s: %s", request_id or "-", status, type, ascii(message)[1:-1])
    h = dict(headers or {})
    if request_id:
        h["X-Request-Id"] = request_id
    return ErrorJSON(error_body(message, type, param, code), status_code=status, headers=h)


def request_id(request: Request) -> str:
    return request.scope.get(REQUEST_ID_KEY) or "-"


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """(message, param) of pydantic's errors: the first error's top-level field is the param."""
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return f"the request body is not valid JSON: {ctx.get('error', first.get('msg'))}", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    msgs = []
    for e in errors[:3]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        if e.get("type") == "extra_forbidden":
            msgs.append(f"{where}: unrecognized or unsupported request field")
        elif e.get("type") == "model_attributes_type":
            msgs.append(f"{where}: the request body must be a JSON object")
        else:
            msgs.append(f"{where}: {e.get('msg')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "invalid request: " + "; ".join(msgs) + more, param


# What an engine error becomes, on a response and in a stream: (class, status, type, code,
# response headers), the subclasses before EngineError.
ENGINE_ERRORS: tuple[tuple[type[EngineError], int, str, str, dict[str, str] | None], ...] = (
    (EngineShutdownError, 503, "service_unavailable", "server_shutting_down", None),
    (EngineDeadError, 503, "service_unavailable", "engine_dead", None),
    (EngineUnavailableError, 503, "service_unavailable", "engine_unavailable",
     {"Retry-After": "1"}),
    (EngineError, 500, "internal_error", "engine_error", None),
)


def install_handlers(app: FastAPI) -> None:
    """Every exception a route can raise -> its OpenAI-style error response."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> ErrorJSON:
        return error_response(
            request_id(request), exc.status, exc.message, exc.type, exc.param, exc.code,
            exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> ErrorJSON:
        msg, param = validation_message(list(exc.errors()))
        return error_response(request_id(request), 400, msg, "invalid_request_error", param)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request: Request, exc: InvalidRequestError) -> ErrorJSON:
        return error_response(
            request_id(request), 400, str(exc), "invalid_request_error", exc.param
        )

    @app.exception_handler(UnknownModelError)
    async def _unknown_model(request: Request, exc: UnknownModelError) -> ErrorJSON:
        return error_response(
            request_id(request), 404, str(exc), "invalid_request_error", "model", "model_not_found"
        )

    for cls, status, kind, code, headers in ENGINE_ERRORS:
        app.add_exception_handler(cls, _engine_handler(status, kind, code, headers))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> ErrorJSON:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return error_response(
            request_id(request), exc.status_code, str(exc.detail), kind, None, None,
            dict(exc.headers or {}),  # 405 carries Allow
        )


def _engine_handler(status: int, kind: str, code: str, headers: dict[str, str] | None) -> Any:
    async def handle(request: Request, exc: Exception) -> ErrorJSON:
        return error_response(request_id(request), status, str(exc), kind, None, code, headers)

    return handle


def stream_error(exc: BaseException) -> dict:
    """The SSE error event for an exception that ended a stream."""
    for cls, _, kind, code, _ in ENGINE_ERRORS:
        if isinstance(exc, cls):
            return error_body(str(exc), kind, None, code)
    return error_body(f"internal error: {type(exc).__name__}", "internal_error")
