"""The request context around every route, as one pure ASGI middleware (it must not buffer or break
streamed responses): request ids, the body limit, the API key, response counting, and the last line
of defence that turns any exception into a counted 500 with an OpenAI error body while keeping the
connection usable.

- Request id: `req-<24 hex>` in the X-Request-Id header of every response and in the log.
- Body limit: a declared Content-Length above the limit is refused at once; otherwise the body is
  read (chunked or not) and refused as soon as the bytes actually read pass the limit (413).
- API key: every route needs `Authorization: Bearer KEY` (or HTTP Basic with KEY as the password,
  so a browser can open /dashboard and /docs) except the liveness routes (/health, /ping) and, with
  `public_metrics`, /metrics.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from oneiros.server.errors import REQUEST_ID_KEY, error_response

logger = logging.getLogger("oneiros.server")

AUTHORIZED_KEY = "oneiros.authorized"
LIVENESS_PATHS = frozenset({"/health", "/ping"})
BROWSER_PATHS = ("/dashboard", "/docs", "/redoc", "/openapi.json")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class RequestContext:
    def __init__(
        self,
        app: ASGIApp,
        api_key: str | None,
        count: Callable[[str, int], None],
        endpoints: frozenset[str],
        max_body_bytes: int,
        public_metrics: bool = False,
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.count = count  # (endpoint, status) of every response
        self.endpoints = endpoints
        self.max_body_bytes = max_body_bytes
        self.open_paths = LIVENESS_PATHS | ({"/metrics"} if public_metrics else set())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = f"req-{uuid.uuid4().hex[:24]}"
        scope[REQUEST_ID_KEY] = rid
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else "other"
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"
                ]
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
                self.count(endpoint, message["status"])
            await send(message)

        async def refuse(status: int, msg: str, type: str, code: str | None,
                         headers: dict[str, str] | None = None) -> None:
            resp = error_response(rid, status, msg, type, None, code, headers)
            await resp(scope, receive, send_with_id)

        denied = self._denied(scope, path)
        if denied is not None:
            await refuse(401, denied, "authentication_error", "invalid_api_key",
                         {"WWW-Authenticate": self._challenge(path)})
            return
        if scope.get("method") in _BODY_METHODS:
            body = await self._read_body(scope, receive, refuse)
            if body is None:
                return
            receive = _replay(body, receive)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("[%s] internal error", rid)
            if not started:  # answered here, counted, and the connection stays open
                await refuse(500, "internal error: the server failed on this request",
                             "internal_error", "internal_error")

    def _denied(self, scope: Scope, path: str) -> str | None:
        """None when the request may pass, else why not."""
        if self.api_key is None:
            scope[AUTHORIZED_KEY] = True
            return None
        auth = _header(scope, b"authorization") or ""
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() == "basic":
            try:
                token = base64.b64decode(token, validate=True).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                token = ""
        elif scheme.lower() != "bearer":
            token = ""
        ok = bool(token) and hmac.compare_digest(token.encode(), self.api_key.encode())
        scope[AUTHORIZED_KEY] = ok
        if ok or path in self.open_paths:
            return None
        if not auth:
            return "missing API key: send 'Authorization: Bearer <key>'"
        return "incorrect API key provided"

    @staticmethod
    def _challenge(path: str) -> str:
        if path.startswith(BROWSER_PATHS):  # a browser then asks for the key (as the password)
            return 'Basic realm="oneiros", charset="UTF-8"'
        return 'Bearer realm="oneiros"'

    async def _read_body(
        self, scope: Scope, receive: Receive, refuse: Callable[..., Any]
    ) -> bytes | None:
        """The whole body, or None after answering 413/400 (or when the client went away)."""
        limit = self.max_body_bytes
        too_large = f"the request body is larger than the limit of {limit} bytes"
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await refuse(400, "the Content-Length header is not a number",
                             "invalid_request_error", "bad_content_length")
                return None
            if int(declared) > limit:
                await refuse(413, too_large, "invalid_request_error", "request_too_large",
                             {"Connection": "close"})
                return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # counted on the bytes read: a chunked upload stops here
                await refuse(413, too_large, "invalid_request_error", "request_too_large",
                             {"Connection": "close"})
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then the connection's own messages
    (a disconnect, for the streamed responses that listen for one)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None
