"""One HTTP generation request from admission to its last byte: its choices (n siblings of each
prompt, each its own engine request), admission against the in-flight limit, metrics, aborts when
the client goes away. Written against `EngineClient`, so any ingress can use it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request

from oneiros.core import RequestOutput, SamplingParams
from oneiros.server.engine_client import EngineClient, OutputStream
from oneiros.server.errors import APIError
from oneiros.server.metrics import RequestTracker, ServerMetrics

logger = logging.getLogger("oneiros.server")


class Admission:
    """Counts engine requests between admission and their last byte; refuses beyond max_queue
    (429 with Retry-After)."""

    def __init__(self, max_queue: int | None, retry_after_s: int = 1) -> None:
        self.max_queue = max_queue if max_queue and max_queue > 0 else None
        self.retry_after_s = retry_after_s
        self.count = 0

    def acquire(self, k: int = 1) -> int:
        limit = self.max_queue
        if limit is not None and k > limit:
            raise APIError(
                400, f"this request has {k} choices; the server runs at most {limit} at once",
                "invalid_request_error", "n",
            )
        if limit is not None and self.count + k > limit:
            raise APIError(
                429,
                f"the server is at its limit of {limit} requests in flight; retry later",
                "rate_limit_error",
                None,
                "rate_limit_exceeded",
                {"Retry-After": str(self.retry_after_s)},
            )
        self.count += k
        return k

    def release(self, k: int) -> None:
        self.count -= k


class Generation:
    """The engine requests of one HTTP request (choice k is engine request `<id>-<k>` when there
    are several). `close()` aborts what is unfinished, releases admission and logs; idempotent."""

    def __init__(
        self,
        client: EngineClient,
        admission: Admission,
        metrics: ServerMetrics,
        request_id: str,
        kind: str,
        model: str,
    ) -> None:
        self.client = client
        self.admission = admission
        self.metrics = metrics
        self.rid = request_id
        self.kind = kind  # "completion" | "chat"
        self.model = model  # the engine's model name
        self.created = int(time.time())
        self.t0 = time.perf_counter()
        self.streams: list[OutputStream] = []
        self.finals: list[RequestOutput | None] = []
        self.status = "unfinished"
        self._admitted = 0
        self._closed = False

    async def start(self, requests: list[tuple[list[int], SamplingParams]]) -> None:
        """Admit and queue one engine request per choice (prompt ids, params)."""
        self._admitted = self.admission.acquire(len(requests))
        try:
            for k, (ids, params) in enumerate(requests):
                rid = self.rid if len(requests) == 1 else f"{self.rid}-{k}"
                self.streams.append(await self.client.add_request(ids, params, self.model, rid))
                self.finals.append(None)
        except BaseException as e:
            self.status = f"rejected: {type(e).__name__}"
            self.close()
            raise

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice, output) as the engine produces them, all choices interleaved; raises the first
        error a choice ends with."""
        trackers = [
            RequestTracker(self.metrics, self.model, s.submit_time) for s in self.streams
        ]
        async for k, out in _merge(self.streams):
            trackers[k].observe(out)
            self.finals[k] = out
            yield k, out

    async def collect(self, request: Request) -> list[RequestOutput] | None:
        """Every choice's final output, or None (everything aborted) if the client goes away
        first."""
        async def run() -> None:
            async for _ in self.outputs():
                pass

        work = asyncio.ensure_future(run())
        gone = asyncio.ensure_future(_until_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                self.status = "client disconnected"
                with contextlib.suppress(BaseException):
                    await work
            elif not work.cancelled() and work.exception() is not None:
                self.status = type(work.exception()).__name__
            self.close()
        if work.cancelled():
            return None
        work.result()  # raises the engine's error, if a choice ended with one
        return [f for f in self.finals if f is not None]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in self.streams:
            s.close()
        self.admission.release(self._admitted)
        finals = [f for f in self.finals if f is not None]
        tokens = ""
        if finals:
            tokens = (
                f" prompt_tokens={sum(len(f.prompt_token_ids) for f in finals)}"
                f" completion_tokens={sum(len(f.token_ids) for f in finals)}"
            )
        done = bool(finals) and len(finals) == len(self.streams) and all(f.finished for f in finals)
        how = (
            f"finish={','.join(str(f.finish_reason) for f in finals)}"
            if done else f"ended early ({self.status})"
        )
        logger.info("[%s] %s model=%s choices=%d%s %s %.3fs", self.rid, self.kind, self.model,
                    len(self.streams), tokens, how, time.perf_counter() - self.t0)


async def _merge(streams: list[OutputStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]] = asyncio.Queue()

    async def pump(k: int, s: OutputStream) -> None:
        try:
            async for out in s:
                queue.put_nowait((k, out, None))
            queue.put_nowait((k, None, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((k, None, e))

    tasks = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            k, out, err = await queue.get()
            if err is not None:
                raise err
            if out is None:
                left -= 1
                continue
            yield k, out
    finally:
        for t in tasks:
            t.cancel()


async def _until_disconnect(request: Request) -> None:
    while True:
        msg: Any = await request.receive()
        if msg["type"] == "http.disconnect":
            return
