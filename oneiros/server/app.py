"""The OpenAI-compatible HTTP server: the app assembled from its parts, and `serve()`.

    build_app(client, api_key, max_queue, ...) -> FastAPI  (tests, embedding)
    serve(config, host, port, ...) -> exit code            (`oneiros serve`: until SIGTERM/SIGINT)

The parts: `routes` (handlers over a `ServerState`), `formatting` (OpenAI bodies), `streaming`
(SSE), `generation` (admission and a request's choices), `preprocess` (tokenisation off the engine
thread), `errors`, `middleware` (request ids, body limit, API key, counting), `openapi` (the
document), `dashboard`. All of them talk to an `EngineClient`, never to an engine directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

import oneiros
from oneiros.server import dashboard
from oneiros.server.async_engine import AsyncLLMEngine
from oneiros.server.engine_client import EngineClient
from oneiros.server.errors import error_body, install_handlers
from oneiros.server.middleware import RequestContext
from oneiros.server.openapi import install_openapi
from oneiros.server.routes import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    MAX_BODY_BYTES,
    ServerSettings,
    ServerState,
    build_router,
    endpoints,
)

__all__ = [
    "DEFAULT_COMPLETION_MAX_TOKENS",
    "MAX_BODY_BYTES",
    "H11JSONErrors",
    "ServerSettings",
    "build_app",
    "serve",
]

logger = logging.getLogger("oneiros.server")


def build_app(
    engine: EngineClient,
    api_key: str | None = None,
    max_queue: int | None = 256,
    settings: ServerSettings | None = None,
) -> FastAPI:
    """The FastAPI app over an EngineClient (started on app startup; stopping it is left to its
    owner, `serve`). Several apps may share one client. `settings` overrides api_key/max_queue."""
    settings = settings or ServerSettings(api_key=api_key, max_queue=max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield

    app = FastAPI(title="oneiros", version=oneiros.__version__, lifespan=lifespan)
    state = ServerState(engine, settings)
    app.state.engine = engine
    app.state.server = state
    app.state.metrics = state.metrics
    app.state.admission = state.admission
    router = build_router(state)
    app.include_router(router)
    app.include_router(dashboard.build_router(state))
    install_handlers(app)
    install_openapi(app, state)
    app.add_middleware(
        RequestContext,
        api_key=settings.api_key,
        count=lambda endpoint, status: state.metrics.http.labels(endpoint, str(status)).inc(),
        endpoints=endpoints(router, ("/dashboard", "/v1/dashboard")),
        max_body_bytes=settings.max_body_bytes,
        public_metrics=settings.public_metrics,
    )
    return app


class H11JSONErrors(H11Protocol):
    """uvicorn's h11 protocol, but a request it cannot parse (a malformed Content-Length, say) is
    answered with an OpenAI error body in JSON instead of plain text."""

    def send_400_response(self, msg: str) -> None:
        import json

        import h11

        body = json.dumps(
            error_body(f"malformed HTTP request: {msg}", "invalid_request_error", None,
                       "bad_request")
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()


# ---- serve --------------------------------------------------------------------------------------
class _GracefulServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT drains the engine (503 for new requests, requests
    in flight finish up to drain_timeout, then the rest are aborted) before uvicorn shuts down; a
    second signal exits at once. If the engine dies, the server stops after `death_grace_s`
    (during which /health reports it) and `exit_code` becomes 1."""

    def __init__(
        self,
        config: uvicorn.Config,
        engine: AsyncLLMEngine,
        drain_timeout: float,
        death_grace_s: float = 1.0,
    ) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout
        self.death_grace_s = death_grace_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False
        self.exit_code = 0
        self._drain_task: asyncio.Task[None] | None = None
        engine.on_death.append(self._engine_died)

    async def serve(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def _engine_died(self, reason: str) -> None:  # on the engine's thread
        self.exit_code = 1
        logger.critical("the engine died (%s): exiting with status 1 in %.1fs", reason,
                        self.death_grace_s)
        if self.loop is not None:
            self.loop.call_soon_threadsafe(
                self.loop.call_later, self.death_grace_s, self._exit_now
            )
        else:
            self.should_exit = True

    def _exit_now(self) -> None:
        self.should_exit = True

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
    settings: ServerSettings | None = None,
    faults: str | None = None,
) -> int:
    """Load the engine for `config` (an EngineConfig), serve it over HTTP until SIGTERM/SIGINT,
    drain (up to `drain_timeout` seconds) and return the exit status: 0, or 1 when the engine died.
    `max_queue` <= 0 means no limit on requests in flight. `faults`: a fault-injection spec (see
    oneiros.engine.faults; default: the ONEIROS_FAULTS environment variable)."""
    from oneiros.engine import faults as fault_injection
    from oneiros.engine.engine import LLMEngine

    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=getattr(logging, log_level.upper(), logging.INFO),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    fault_injection.parse(faults if faults is not None else os.environ.get("ONEIROS_FAULTS", ""))
    logger.info("loading models %s", ", ".join(f"{k}={v}" for k, v in config.models.items()))
    engine = AsyncLLMEngine(LLMEngine(config))
    plan = fault_injection.configure(faults)  # after loading: faults are for serving
    if plan is not None:
        logger.warning("fault injection is on: %s (seed %d)", plan.spec, plan.seed)
    settings = settings or ServerSettings(api_key=api_key, max_queue=max_queue)
    app = build_app(engine, settings=settings)
    uv_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        timeout_graceful_shutdown=5,
        access_log=True,
        http=H11JSONErrors,
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
    return server.exit_code
