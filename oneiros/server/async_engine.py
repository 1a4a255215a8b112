"""AsyncLLMEngine: an asyncio front for the (single-threaded) LLMEngine.

One background thread owns the engine. Every engine call - add_request, abort, step, and the read-only
snapshots the server takes for /metrics and /v1/memory - runs on that thread, between steps, taken from
a command queue; the thread holds `_lock` while it touches the engine, and callers that find the thread
stopped run under the same lock, so the engine is never used by two threads at once.

Outputs go back to per-request asyncio queues with `loop.call_soon_threadsafe`. A consumer that goes away
(stream closed, task cancelled, async generator closed) queues an abort, which frees the request's KV
blocks on the engine thread before the next step. An exception in a step fails every request in flight
with `EngineStepError` and the loop keeps serving. Shutdown stops admission, lets requests in flight
finish up to a timeout and aborts the rest with `EngineShutdownError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from oneiros.core import InvalidRequestError, RequestOutput, SamplingParams
from oneiros.engine.engine import LLMEngine

logger = logging.getLogger("oneiros.server.engine")

T = TypeVar("T")


class EngineError(RuntimeError):
    """A request in flight could not be completed by the engine (not the caller's fault)."""


class EngineStepError(EngineError):
    """An engine step raised; every request in flight in that step was failed with this."""


class EngineShutdownError(EngineError):
    """The engine is shutting down: it admits nothing new, or it aborted this request on the way out."""


class RequestStream:
    """The consumer side of one request: async-iterate it for RequestOutputs (cumulative, the last one
    has `finished`). Outputs that pile up while the consumer is busy are coalesced to the newest, which
    loses nothing because every RequestOutput carries all tokens so far. `close()` aborts the request
    in the engine if it has not finished; iterating to the end or breaking out of an `async with`
    closes it too."""

    def __init__(
        self, engine: AsyncLLMEngine, request_id: str, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.engine = engine
        self.request_id = request_id
        self.loop = loop
        self.prompt_token_ids: list[int] = []
        self.max_tokens: int | None = None
        self.finished = False
        self.closed = False
        self.submit_time = time.perf_counter()  # same clock as RequestOutput.token_times
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    # Called on the engine thread.
    def _push(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            pass

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self.closed:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
            while (
                not isinstance(item, BaseException)
                and not item.finished
                and not self._queue.empty()
            ):
                item = self._queue.get_nowait()
        except BaseException:
            self.close()  # cancelled while waiting: the request must not run on without a consumer
            raise
        if isinstance(item, BaseException):
            self.finished = True
            self.engine._forget(self)
            raise item
        if item.finished:
            self.finished = True
            self.engine._forget(self)
        return item

    def close(self) -> None:
        """Abort the request if it is still running. Idempotent; safe from any code on the loop."""
        if self.closed:
            return
        self.closed = True
        if not self.finished:
            self.engine.abort_nowait(self.request_id)
        self.engine._forget(self)

    async def __aenter__(self) -> RequestStream:  # noqa: PYI034
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


@dataclasses.dataclass
class _Add:
    stream: RequestStream
    prompt: str | list[int] | None
    messages: list[dict[str, Any]] | None
    params: SamplingParams
    model: str | None
    fill_max_tokens: bool
    accepted: concurrent.futures.Future[None]


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, idle_poll_s: float = 1.0) -> None:
        self.engine = engine
        self.model_names: list[str] = list(engine.model_names)
        self.max_model_len: dict[str, int] = {n: t.max_model_len for n, t in engine.tenants.items()}
        # Private copies of the Hugging Face tokenizers for the event loop's own decoding (token
        # strings of logprobs), so it never shares a tokenizer object with the engine thread.
        self.tokenizers: dict[str, Any] = {
            n: copy.deepcopy(t.tokenizer.hf) if t.tokenizer is not None else None
            for n, t in engine.tenants.items()
        }
        self._idle_poll_s = idle_poll_s
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._alive = False  # guarded by _state_lock: whether the thread still takes commands
        self._state_lock = threading.Lock()
        self._stop = False
        self._accepting = False
        # Engine thread only: request id -> stream that receives its outputs.
        self._streams: dict[str, RequestStream] = {}
        # Consumer side: streams not yet finished or closed (for shutdown and admission accounting).
        self._live: set[RequestStream] = set()
        self._live_lock = threading.Lock()
        self.num_steps = 0
        self.num_step_errors = 0
        self.last_step_error: str | None = None

    @classmethod
    def from_config(cls, config: Any) -> AsyncLLMEngine:
        return cls(LLMEngine(config))

    # ---- lifecycle ------------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._alive

    @property
    def is_accepting(self) -> bool:
        return self._accepting and self.is_running

    @property
    def num_in_flight(self) -> int:
        with self._live_lock:
            return len(self._live)

    def start(self) -> None:
        """Start (or restart, after shutdown) the engine thread and admit requests. Idempotent."""
        if self.is_running:
            self._accepting = True
            return
        if self._thread is not None:
            self._thread.join()  # a previous thread on its way out
        self._stop = False
        with self._state_lock:
            self._alive = True
        self._thread = threading.Thread(target=self._run, name="oneiros-engine", daemon=True)
        self._thread.start()
        self._accepting = True

    async def shutdown(self, timeout: float = 30.0) -> int:
        """Stop admitting (new requests get EngineShutdownError), wait up to `timeout` seconds for the
        requests in flight to finish, abort the rest, stop the engine thread. Returns how many were
        aborted. Callable from any event loop; idempotent."""
        self._accepting = False
        deadline = time.monotonic() + max(0.0, timeout)
        while self.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        aborted = self.num_in_flight
        if aborted:
            logger.warning("shutdown: aborting %d request(s) still in flight", aborted)
        thread = self._thread
        if self._submit(("stop",)) and thread is not None:
            await asyncio.to_thread(thread.join)
        return aborted

    def begin_shutdown(self) -> None:
        """Stop admitting new requests without waiting (the /health endpoint turns 503)."""
        self._accepting = False

    # ---- requests -------------------------------------------------------------------------------
    async def add_request(
        self,
        prompt: str | list[int] | None = None,
        params: SamplingParams | None = None,
        model: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        request_id: str | None = None,
        fill_max_tokens: bool = False,
    ) -> RequestStream:
        """Queue a request and wait until the engine accepted it (so errors in the request - unknown
        model, empty prompt, beyond the context window - raise here, before any output).

        The prompt plus `params.max_tokens` must fit the model's context window
        (InvalidRequestError on `max_tokens` otherwise); with `fill_max_tokens`, max_tokens becomes
        whatever room the prompt leaves (the OpenAI default for chat)."""
        if not self.is_accepting:
            raise EngineShutdownError(
                "the server is shutting down" if self._thread else "engine not started"
            )
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, request_id or f"req-{uuid.uuid4().hex}", loop)
        accepted: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._live_lock:
            self._live.add(stream)
        add = _Add(
            stream, prompt, messages, params or SamplingParams(), model, fill_max_tokens, accepted
        )
        if not self._submit(("add", add)):
            accepted.set_exception(EngineShutdownError("the server is shutting down"))
        try:
            await asyncio.wrap_future(accepted)
        except asyncio.CancelledError:
            stream.close()  # the abort is queued after the add, so it finds the request
            raise
        except BaseException:
            stream.closed = True
            self._forget(stream)
            raise
        return stream

    async def generate(
        self,
        prompt: str | list[int] | None = None,
        params: SamplingParams | None = None,
        model: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        request_id: str | None = None,
        fill_max_tokens: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        """Yield RequestOutputs for one request until it finishes. Closing the generator early (or
        cancelling the task that iterates it) aborts the request and frees its KV blocks."""
        stream = await self.add_request(
            prompt, params, model, messages, request_id, fill_max_tokens
        )
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort_nowait(self, request_id: str) -> None:
        """Queue an abort; the engine thread applies it before its next step."""
        self._submit(("abort", request_id))

    async def abort(self, request_id: str) -> bool:
        return await self.call(lambda e: e.abort(request_id))

    # ---- running code on the engine thread ------------------------------------------------------
    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run fn(engine) on the engine thread between steps and return its result."""
        return await asyncio.wrap_future(self._call_future(fn))

    def call_sync(self, fn: Callable[[LLMEngine], T], timeout: float | None = 60.0) -> T:
        """Blocking variant of `call`, for threads that are not the engine's (tests, tools)."""
        return self._call_future(fn).result(timeout)

    def _call_future(self, fn: Callable[[LLMEngine], T]) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        if not self._submit(("call", fn, fut)):
            with self._lock:  # no engine thread: run here, the lock keeps out any other caller
                try:
                    fut.set_result(fn(self.engine))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)
        return fut

    # ---- internals ------------------------------------------------------------------------------
    def _submit(self, cmd: tuple[Any, ...]) -> bool:
        """Queue a command for the engine thread; False (nothing queued) if there is none."""
        with self._state_lock:
            if not self._alive:
                return False
            self._commands.put(cmd)
        self._wake.set()
        return True

    def _forget(self, stream: RequestStream) -> None:
        with self._live_lock:
            self._live.discard(stream)

    def _run(self) -> None:
        logger.info("engine thread started")
        while True:
            self._wake.clear()
            busy = True
            with self._lock:
                try:
                    self._process_commands()
                    if self._stop:
                        self._fail_all(
                            EngineShutdownError("the server shut down before this request finished")
                        )
                        break
                    busy = self._step_once()
                except Exception:
                    logger.exception("engine loop error; failing %d request(s)", len(self._streams))
                    self._fail_all(EngineStepError("internal engine loop error"))
            if not busy:
                self._wake.wait(self._idle_poll_s)
        with self._state_lock:
            self._alive = False  # from here on nothing more is queued; handle what already was
        with self._lock:
            self._process_commands(stopped=True)
        logger.info("engine thread stopped")

    def _process_commands(self, stopped: bool = False) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            kind = cmd[0]
            if kind == "add":
                if stopped:
                    cmd[1].accepted.set_exception(
                        EngineShutdownError("the server is shutting down")
                    )
                else:
                    self._add(cmd[1])
            elif kind == "abort" and not stopped:
                self._streams.pop(cmd[1], None)
                try:
                    self.engine.abort(cmd[1])
                except Exception:
                    logger.exception("abort of %s failed", cmd[1])
            elif kind == "call":
                fn, fut = cmd[1], cmd[2]
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(self.engine))
                    except BaseException as e:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(e)
            elif kind == "stop":
                self._stop = True

    def _add(self, a: _Add) -> None:
        rid = a.stream.request_id
        try:
            t = self.engine.tenant(a.model)
            ids = self.engine.encode(t.name, a.prompt, a.messages)
            n, limit = len(ids), t.max_model_len
            if n >= limit:
                raise InvalidRequestError(
                    f"the prompt has {n} tokens but model {t.name!r} has a context window of {limit} "
                    f"tokens (at most {limit - 1} prompt tokens)",
                    "messages" if a.messages is not None else "prompt",
                )
            params = a.params
            if a.fill_max_tokens:
                params = dataclasses.replace(params, max_tokens=limit - n)
            elif n + params.max_tokens > limit:
                raise InvalidRequestError(
                    f"this model's maximum context length is {limit} tokens, but {n + params.max_tokens} "
                    f"were requested ({n} in the prompt, {params.max_tokens} in the completion): "
                    f"lower max_tokens to at most {limit - n}",
                    "max_tokens",
                )
            req = self.engine.add_request(ids, params, t.name, request_id=rid)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            a.accepted.set_exception(e)
            return
        a.stream.prompt_token_ids = list(req.prompt_token_ids)
        a.stream.max_tokens = params.max_tokens
        self._streams[rid] = a.stream
        a.accepted.set_result(None)

    def _step_once(self) -> bool:
        """One engine step if there is work. Returns whether there was work."""
        try:
            if not self.engine.has_unfinished():
                self.engine.revert_idle()  # no demand at all: parameters get their memory back
                return False
            outputs = self.engine.step()
            self.num_steps += 1
        except Exception as e:
            self.num_step_errors += 1
            self.last_step_error = f"{type(e).__name__}: {e}"
            logger.exception(
                "engine step failed; failing %d request(s) in flight", len(self._streams)
            )
            self._fail_all(
                EngineStepError(
                    f"the engine failed while running this request: {self.last_step_error}"
                )
            )
            return True
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted by its consumer in the meantime
            if out.finished:
                del self._streams[out.request_id]
            stream._push(out)
        return True

    def _fail_all(self, error: EngineError) -> None:
        for rid, stream in list(self._streams.items()):
            try:
                self.engine.abort(rid)
            except Exception:
                logger.exception("abort of %s failed", rid)
            stream._push(type(error)(str(error)))
        self._streams.clear()
        if isinstance(error, EngineStepError):
            try:
                self.engine.check_integrity()
            except Exception:
                logger.exception("engine state is inconsistent after a failed step")
