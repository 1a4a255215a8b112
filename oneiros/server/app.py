"""The OpenAI-compatible HTTP server.

    build_app(engine, api_key, max_queue) -> FastAPI      (tests, embedding)
    serve(config, host, port, api_key, max_queue)         (`oneiros serve`: runs until SIGTERM/SIGINT)

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health, GET /metrics,
GET /v1/memory. Errors always have the OpenAI shape {"error": {"message", "type", "param", "code"}}:
400 bad input, 401 bad API key, 404 unknown model or route, 429 queue full, 503 shutting down, 500
only for engine failures. Every response carries an X-Request-Id header; log lines carry the same id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Any

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from oneiros.core import InvalidRequestError, RequestOutput, UnknownModelError
from oneiros.server.async_engine import (
    AsyncLLMEngine,
    EngineError,
    EngineShutdownError,
    RequestStream,
)
from oneiros.server.metrics import RequestTracker, ServerMetrics, memory_snapshot
from oneiros.server.protocol import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger("oneiros.server")

REQUEST_ID_KEY = "oneiros.request_id"
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_BODY_BYTES = 32 << 20  # a declared Content-Length above this is refused (413)
_ENDPOINTS = {
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/memory",
    "/health",
    "/metrics",
}


# ---- errors -------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(
    request_id: str | None,
    status: int,
    message: str,
    type: str,
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    logger.info("[%s] -> %d %s: %s", request_id or "-", status, type, message)
    headers = {"X-Request-Id": request_id} if request_id else None
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def _rid(request: Request) -> str:
    return request.scope.get(REQUEST_ID_KEY) or "-"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = list(exc.errors())
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return f"the request body is not valid JSON: {ctx.get('error', first.get('msg'))}", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msgs = []
    for e in errors[:3]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        msgs.append(f"{where}: {e.get('msg')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "invalid request: " + "; ".join(msgs) + more, param


# ---- middleware: request ids, API key, response counting ---------------------------------------
class _RequestContext:
    """Pure ASGI middleware (it must not buffer or break streaming): assigns the request id, adds the
    X-Request-Id header, checks the API key on /v1/*, counts responses by endpoint and status."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: ServerMetrics) -> None:
        self.app = app
        self.api_key = api_key
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = f"req-{uuid.uuid4().hex[:24]}"
        scope[REQUEST_ID_KEY] = rid
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "other"
        client_rid = _header(scope, b"x-request-id")
        if client_rid:
            logger.debug("[%s] client request id %r", rid, client_rid[:128])

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"
                ]
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
                self.metrics.http.labels(endpoint, str(message["status"])).inc()
            await send(message)

        length = _header(scope, b"content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > MAX_BODY_BYTES):
            resp = _error_response(
                rid,
                413,
                f"the request body is larger than {MAX_BODY_BYTES} bytes",
                "invalid_request_error",
                None,
                "request_too_large",
            )
            await resp(scope, receive, send_with_id)
            return
        if self.api_key is not None and path.startswith("/v1"):
            auth = _header(scope, b"authorization") or ""
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.api_key.encode()
            ):
                msg = (
                    "missing API key: send 'Authorization: Bearer <key>'"
                    if not auth
                    else "incorrect API key provided"
                )
                resp = _error_response(
                    rid, 401, msg, "authentication_error", None, "invalid_api_key"
                )
                await resp(scope, receive, send_with_id)
                return
        await self.app(scope, receive, send_with_id)


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


# ---- streaming ----------------------------------------------------------------------------------
class _SSEResponse(StreamingResponse):
    """A StreamingResponse that always watches for the client going away (and then cancels the body)
    and always runs `on_close` at the end, even when the body never started."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def run_stream() -> None:
                    with contextlib.suppress(OSError):  # the client went away mid-send
                        await self.stream_response(send)
                    tg.cancel_scope.cancel()

                tg.start_soon(run_stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                self._on_close()


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could be the start of a stop string: streamed text
    holds it back until the next tokens show whether the stop string completes."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


# ---- admission ----------------------------------------------------------------------------------
class _Admission:
    """Counts requests between admission and their last byte; refuses beyond max_queue (429)."""

    def __init__(self, max_queue: int | None) -> None:
        self.max_queue = max_queue if max_queue and max_queue > 0 else None
        self.count = 0

    def acquire(self) -> _Ticket:
        if self.max_queue is not None and self.count >= self.max_queue:
            raise APIError(
                429,
                f"the server is at its limit of {self.max_queue} requests in flight; retry later",
                "rate_limit_error",
                None,
                "rate_limit_exceeded",
            )
        self.count += 1
        return _Ticket(self)


class _Ticket:
    def __init__(self, adm: _Admission) -> None:
        self.adm = adm
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.adm.count -= 1


# ---- the app ------------------------------------------------------------------------------------
class _Ctx:
    """What one generation request carries from admission to its last byte."""

    def __init__(self, request: Request, kind: str, model: str) -> None:
        self.rid = _rid(request)
        self.kind = kind  # "completion" | "chat"
        self.model = model
        self.created = int(time.time())
        self.t0 = time.perf_counter()
        self.ticket: _Ticket | None = None
        self.stream: RequestStream | None = None
        self.final: RequestOutput | None = None
        self.status = "unfinished"
        self._closed = False

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.rid.removeprefix("req-")

    def close(self) -> None:
        """Abort the engine request if unfinished, release admission, log. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.stream is not None:
            self.stream.close()
        if self.ticket is not None:
            self.ticket.release()
        f = self.final
        tokens = (
            f" prompt_tokens={len(f.prompt_token_ids)} completion_tokens={len(f.token_ids)}"
            if f
            else ""
        )
        if f is not None and f.finished:
            logger.info(
                "[%s] %s model=%s%s finish=%s %.3fs",
                self.rid,
                self.kind,
                self.model,
                tokens,
                f.finish_reason,
                time.perf_counter() - self.t0,
            )
        else:
            logger.info(
                "[%s] %s model=%s%s ended early (%s) after %.3fs",
                self.rid,
                self.kind,
                self.model,
                tokens,
                self.status,
                time.perf_counter() - self.t0,
            )


def build_app(
    engine: AsyncLLMEngine, api_key: str | None = None, max_queue: int | None = 256
) -> FastAPI:
    """The FastAPI app over a running (or, at startup, started) AsyncLLMEngine. Several apps may share
    one engine. The app starts the engine on startup and leaves stopping it to its owner (`serve`)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield

    app = FastAPI(title="oneiros", version="0.1.0", lifespan=lifespan)
    metrics = ServerMetrics()
    admission = _Admission(max_queue)
    tokenizers = engine.tokenizers
    started = int(time.time())
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.admission = admission
    app.add_middleware(_RequestContext, api_key=api_key, metrics=metrics)

    # ---- error handlers ----
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(
            _rid(request), exc.status, exc.message, exc.type, exc.param, exc.code
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = _validation_message(exc)
        return _error_response(_rid(request), 400, msg, "invalid_request_error", param, None)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request: Request, exc: InvalidRequestError) -> JSONResponse:
        return _error_response(
            _rid(request), 400, str(exc), "invalid_request_error", exc.param, None
        )

    @app.exception_handler(UnknownModelError)
    async def _unknown_model(request: Request, exc: UnknownModelError) -> JSONResponse:
        return _error_response(
            _rid(request), 404, str(exc), "invalid_request_error", "model", "model_not_found"
        )

    @app.exception_handler(EngineShutdownError)
    async def _shutting_down(request: Request, exc: EngineShutdownError) -> JSONResponse:
        return _error_response(
            _rid(request), 503, str(exc), "service_unavailable", None, "server_shutting_down"
        )

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return _error_response(_rid(request), 500, str(exc), "internal_error", None, "engine_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(_rid(request), exc.status_code, str(exc.detail), kind, None, None)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("[%s] internal error", _rid(request))
        # This handler runs outside the request-id middleware, so it sets the header itself.
        return _error_response(
            _rid(request),
            500,
            f"internal error: {type(exc).__name__}",
            "internal_error",
            None,
            None,
        )

    # ---- helpers ----
    def check_available() -> None:
        if not engine.is_accepting:
            raise EngineShutdownError("the server is shutting down and accepts no new requests")

    def resolve_model(name: str | None) -> str:
        if name is None:
            if len(engine.model_names) == 1:
                return engine.model_names[0]
            raise InvalidRequestError(
                f"this server serves several models ({', '.join(engine.model_names)}): name one",
                "model",
            )
        if name not in engine.model_names:
            raise UnknownModelError(
                f"the model {name!r} does not exist (served: {', '.join(engine.model_names)})"
            )
        return name

    def usage(out: RequestOutput) -> dict[str, int]:
        p, c = len(out.prompt_token_ids), len(out.token_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def token_str(model: str, tok: int) -> str:
        t = tokenizers.get(model)
        return t.decode([tok]) if t is not None else f"<{tok}>"

    def completion_logprobs(
        ctx: _Ctx, out: RequestOutput, start: int, offset: int
    ) -> dict[str, Any]:
        toks = [token_str(ctx.model, t) for t in out.token_ids[start:]]
        tops = []
        for d in out.top_logprobs[start:]:
            tops.append({token_str(ctx.model, t): lp for t, lp in d.items()})
        offsets = []
        for s in toks:
            offsets.append(offset)
            offset += len(s)
        return {
            "tokens": toks,
            "token_logprobs": list(out.logprobs[start:]),
            "top_logprobs": tops if out.top_logprobs else None,
            "text_offset": offsets,
        }

    def chat_logprobs(ctx: _Ctx, out: RequestOutput, start: int) -> dict[str, Any]:
        content = []
        for k in range(start, len(out.token_ids)):
            s = token_str(ctx.model, out.token_ids[k])
            top = out.top_logprobs[k] if k < len(out.top_logprobs) else {}
            content.append(
                {
                    "token": s,
                    "logprob": out.logprobs[k],
                    "bytes": list(s.encode()),
                    "top_logprobs": [
                        {
                            "token": (ts := token_str(ctx.model, t)),
                            "logprob": lp,
                            "bytes": list(ts.encode()),
                        }
                        for t, lp in top.items()
                    ],
                }
            )
        return {"content": content, "refusal": None}

    async def start_request(request: Request, ctx: _Ctx, **kw: Any) -> None:
        ctx.ticket = admission.acquire()
        try:
            ctx.stream = await engine.add_request(request_id=ctx.rid, **kw)
        except BaseException as e:
            ctx.status = f"rejected: {type(e).__name__}"
            ctx.close()
            raise

    async def collect(ctx: _Ctx) -> RequestOutput:
        assert ctx.stream is not None
        tracker = RequestTracker(metrics, ctx.model, ctx.stream.submit_time)
        async for out in ctx.stream:
            tracker.observe(out)
            ctx.final = out
        assert ctx.final is not None
        return ctx.final

    async def until_disconnect(request: Request) -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    async def run_unary(request: Request, ctx: _Ctx) -> RequestOutput | None:
        """Collect the whole output, or abort (and return None) if the client goes away first."""
        work = asyncio.ensure_future(collect(ctx))
        gone = asyncio.ensure_future(until_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                ctx.status = "client disconnected"
                with contextlib.suppress(BaseException):
                    await work
            elif not work.cancelled() and work.exception() is not None:
                ctx.status = type(work.exception()).__name__
            ctx.close()
        return work.result() if not work.cancelled() else None

    def stream_response(
        ctx: _Ctx, stops: tuple[str, ...], want_logprobs: bool, include_usage: bool
    ) -> _SSEResponse:
        chat = ctx.kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choice: dict[str, Any]) -> dict[str, Any]:
            c = {
                "id": ctx.response_id,
                "object": obj,
                "created": ctx.created,
                "model": ctx.model,
                "choices": [{"index": 0, **choice}],
            }
            if chat:
                c["system_fingerprint"] = None
            if include_usage:
                c["usage"] = None
            return c

        async def body() -> AsyncIterator[str]:
            assert ctx.stream is not None
            tracker = RequestTracker(metrics, ctx.model, ctx.stream.submit_time)
            sent_text, sent_tokens = "", 0
            try:
                if chat:
                    yield _sse(
                        chunk(
                            {
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        )
                    )
                async for out in ctx.stream:
                    tracker.observe(out)
                    ctx.final = out
                    text = out.text
                    if not out.finished:
                        text = text[: len(text) - _holdback(text, stops)]
                    delta = text[len(sent_text) :] if len(text) > len(sent_text) else ""
                    sent_text = text if len(text) > len(sent_text) else sent_text
                    lp = None
                    if want_logprobs and len(out.token_ids) > sent_tokens:
                        lp = (
                            chat_logprobs(ctx, out, sent_tokens)
                            if chat
                            else completion_logprobs(
                                ctx, out, sent_tokens, len(sent_text) - len(delta)
                            )
                        )
                    sent_tokens = len(out.token_ids)
                    finish = out.finish_reason if out.finished else None
                    if chat:
                        if delta or lp:
                            yield _sse(
                                chunk(
                                    {
                                        "delta": {"content": delta},
                                        "logprobs": lp,
                                        "finish_reason": None,
                                    }
                                )
                            )
                        if finish:
                            yield _sse(
                                chunk({"delta": {}, "logprobs": None, "finish_reason": finish})
                            )
                    elif delta or lp or finish:
                        yield _sse(chunk({"text": delta, "logprobs": lp, "finish_reason": finish}))
                if include_usage and ctx.final is not None:
                    u = {
                        "id": ctx.response_id,
                        "object": obj,
                        "created": ctx.created,
                        "model": ctx.model,
                        "choices": [],
                        "usage": usage(ctx.final),
                    }
                    yield _sse(u)
                yield "data: [DONE]\n\n"
            except EngineShutdownError as e:
                ctx.status = "aborted by shutdown"
                yield _sse(error_body(str(e), "service_unavailable", None, "server_shutting_down"))
                yield "data: [DONE]\n\n"
            except EngineError as e:
                ctx.status = "engine error"
                yield _sse(error_body(str(e), "internal_error", None, "engine_error"))
                yield "data: [DONE]\n\n"
            except (asyncio.CancelledError, GeneratorExit):
                ctx.status = "client disconnected"
                raise
            except Exception as e:
                logger.exception("[%s] stream failed", ctx.rid)
                ctx.status = "internal error"
                yield _sse(error_body(f"internal error: {type(e).__name__}", "internal_error"))
                yield "data: [DONE]\n\n"

        return _SSEResponse(body(), on_close=ctx.close)

    # ---- routes ----
    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.is_accepting:
            raise EngineShutdownError("the server is shutting down")
        return JSONResponse(
            {
                "status": "ok",
                "models": engine.model_names,
                "in_flight": admission.count,
                "engine_step_errors": engine.num_step_errors,
            }
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": n,
                    "object": "model",
                    "created": started,
                    "owned_by": "oneiros",
                    "max_model_len": engine.max_model_len[n],
                }
                for n in engine.model_names
            ],
        }

    @app.get("/v1/memory")
    async def memory(check: bool = False) -> dict[str, Any]:
        snap = await engine.call(memory_snapshot)
        if check:

            def integrity(e: Any) -> str:
                try:
                    e.check_integrity()
                    return "ok"
                except AssertionError as err:
                    return f"failed: {err}"

            snap["integrity"] = await engine.call(integrity)
        snap["in_flight"] = admission.count
        return snap

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.engine.in_flight = admission.count
        metrics.engine.step_errors = engine.num_step_errors
        with contextlib.suppress(Exception):
            metrics.engine.snapshot = await asyncio.wait_for(engine.call(memory_snapshot), 30)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_available()
        model = resolve_model(body.model)
        body.check_supported()
        prompt = body.single_prompt()
        max_tokens = (
            body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
        )
        params = body.sampling_params(max_tokens, body.logprobs)
        ctx = _Ctx(request, "completion", model)
        await start_request(request, ctx, prompt=prompt, params=params, model=model)
        if body.stream:
            return stream_response(ctx, params.stop, body.logprobs is not None, body.include_usage)
        out = await run_unary(request, ctx)
        if out is None:
            return Response(status_code=499)
        return JSONResponse(
            {
                "id": ctx.response_id,
                "object": "text_completion",
                "created": ctx.created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "text": out.text,
                        "finish_reason": out.finish_reason,
                        "logprobs": completion_logprobs(ctx, out, 0, 0)
                        if body.logprobs is not None
                        else None,
                    }
                ],
                "usage": usage(out),
                "system_fingerprint": None,
            }
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_available()
        model = resolve_model(body.model)
        body.check_supported()
        requested = body.requested_max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        # Without a limit, max_tokens becomes the room the prompt leaves (set on the engine thread).
        params = body.sampling_params(requested if requested is not None else 1, logprobs)
        ctx = _Ctx(request, "chat", model)
        await start_request(
            request,
            ctx,
            messages=body.template_messages(),
            params=params,
            model=model,
            fill_max_tokens=requested is None,
        )
        if body.stream:
            return stream_response(ctx, params.stop, bool(body.logprobs), body.include_usage)
        out = await run_unary(request, ctx)
        if out is None:
            return Response(status_code=499)
        return JSONResponse(
            {
                "id": ctx.response_id,
                "object": "chat.completion",
                "created": ctx.created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": out.text, "refusal": None},
                        "logprobs": chat_logprobs(ctx, out, 0) if body.logprobs else None,
                        "finish_reason": out.finish_reason,
                    }
                ],
                "usage": usage(out),
                "system_fingerprint": None,
            }
        )

    return app


# ---- serve ----------------------------------------------------------------------------------------
class _GracefulServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the engine (503 for new requests, requests in
    flight finish up to drain_timeout, then the rest are aborted) before uvicorn shuts down; a second
    signal exits at once. The signal is not re-raised afterwards: serve() returns normally."""

    def __init__(
        self, config: uvicorn.Config, engine: AsyncLLMEngine, drain_timeout: float
    ) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the loop's thread between bytecodes: only hand work to the loop from here.
        if self.draining or self.loop is None:
            logger.warning("signal %s again: exiting now", signal.Signals(sig).name)
            self.should_exit = True
            self.force_exit = True
            self.engine.begin_shutdown()
            return
        self.draining = True
        logger.info(
            "signal %s: draining (at most %.0fs); new requests get 503",
            signal.Signals(sig).name,
            self.drain_timeout,
        )
        self.engine.begin_shutdown()
        self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            aborted = await self.engine.shutdown(self.drain_timeout)
            logger.info("engine drained (%d request(s) aborted)", aborted)
        finally:
            self.should_exit = True


def serve(
    config: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_queue: int = 256,
    *,
    drain_timeout: float = 30.0,
    log_level: str = "info",
) -> None:
    """Load the engine for `config` (an EngineConfig), serve it over HTTP until SIGTERM/SIGINT, drain
    (up to `drain_timeout` seconds) and return. `max_queue` <= 0 means no limit on requests in flight."""
    from oneiros.engine.engine import LLMEngine

    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=getattr(logging, log_level.upper(), logging.INFO),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    logger.info("loading models %s", ", ".join(f"{k}={v}" for k, v in config.models.items()))
    engine = AsyncLLMEngine(LLMEngine(config))
    app = build_app(engine, api_key, max_queue)
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=5,
        access_log=True,
    )
    server = _GracefulServer(uv_config, engine, drain_timeout)
    try:
        server.run()
    finally:
        if engine.is_running:
            asyncio.run(engine.shutdown(0))
        close = getattr(engine.engine, "close", None)  # e.g. the step trace file
        if close is not None:
            close()
