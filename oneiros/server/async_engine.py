"""AsyncLLMEngine: an asyncio front for the (single-threaded) LLMEngine, the in-process client.

One background thread owns the engine and does only engine work: it takes commands (add an already
tokenised request, abort, run a read-only snapshot) between steps and runs steps. Callers that find
the thread stopped run under the same lock, so the engine is never used by two threads at once.

Outputs go back to per-request asyncio queues with `loop.call_soon_threadsafe`. A consumer that goes
away (stream closed, task cancelled, async generator closed) queues an abort, which frees the
request's KV blocks on the engine thread before the next step.

Failures:
- a step whose model pass raises (a real error, or an injected `step`/`copy` fault) ends only the
  requests that step touched (its sequences, and requests it swapped out) with `EngineStepError`;
  their blocks are freed, the weights of a model that was streaming layers are re-copied from their
  host copies, and every other request goes on;
- a failure while the step was planned (before any model ran, e.g. a failed restore) changed no
  request, so the step is retried; after `max_plan_failures` in a row the requests in flight fail;
- if the loop itself dies, every request in flight fails with `EngineDeadError`, `health()` says
  'dead' and the `on_death` callbacks run (the server exits non-zero for its supervisor).
When no request is left, idle KV pages go back to the arena (except under the static policy) and
remapped layers are restored from there.
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

from oneiros.core import (
    InvalidRequestError,
    MoveKV,
    RequestOutput,
    RestoreLayer,
    SamplingParams,
    Step,
    StepResult,
)
from oneiros.engine import faults
from oneiros.engine.backends import Executor
from oneiros.engine.engine import AfterStepFailed, LLMEngine
from oneiros.server.engine_client import (
    EngineClient,
    EngineDeadError,
    EngineError,
    EngineHealth,
    EngineShutdownError,
    EngineStepError,
)
from oneiros.server.metrics import memory_snapshot

__all__ = [
    "AsyncLLMEngine",
    "EngineDeadError",
    "EngineError",
    "EngineShutdownError",
    "EngineStepError",
    "RequestStream",
]

logger = logging.getLogger("oneiros.server.engine")

T = TypeVar("T")


class RequestStream:
    """The consumer side of one request: async-iterate it for RequestOutputs (cumulative, the last
    one has `finished`). Outputs that pile up while the consumer is busy are coalesced to the
    newest, which loses nothing because every RequestOutput carries all tokens so far. `close()`
    aborts the request in the engine if it has not finished; iterating to the end or breaking out
    of an `async with` closes it too."""

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


class StepFailure(Exception):
    """Executing a step raised (its memory actions or its model passes): `step` is what it was
    running, so its requests and models are known."""

    def __init__(self, step: Step, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.step = step
        self.cause = cause

    @property
    def models(self) -> set[str]:
        """Models whose bytes the step may have left half-moved."""
        return {p.model for p in self.step.plans} | {op.model for op in self.step.memory}

    @property
    def kv_moved(self) -> set[str]:
        """Models whose KV pages the step moved: their blocks may not be where the accounting
        says (requests and cached prefixes alike)."""
        return {op.model for op in self.step.memory if isinstance(op, MoveKV)}


class GuardedExecutor(Executor):
    """Wraps the engine's executor on the engine thread: a failure while executing a step comes
    out as a StepFailure that carries the step (which requests and models it touched), and the
    injected `step`, `slow` and `crash` faults fire here, after the step was planned and its
    blocks allocated."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner

    def execute(self, step: Step) -> list[StepResult]:
        try:
            if step.plans:
                faults.maybe("step")
            return self.inner.execute(step)
        except Exception as e:
            raise StepFailure(step, e) from e

    def release(self, request_id: str) -> None:
        self.inner.release(request_id)

    def __getattr__(self, name: str) -> Any:  # runners, graphs: the wrapped executor's own
        return getattr(self.inner, name)


class AsyncLLMEngine(EngineClient):
    def __init__(
        self, engine: LLMEngine, idle_poll_s: float = 1.0, max_plan_failures: int = 3
    ) -> None:
        self.engine = engine
        if not isinstance(engine.executor, GuardedExecutor):
            engine.executor = GuardedExecutor(engine.executor)
        self._model_names: list[str] = list(engine.model_names)
        self._max_len: dict[str, int] = {n: t.max_model_len for n, t in engine.tenants.items()}
        self._vocab: dict[str, int] = {n: t.vocab_size for n, t in engine.tenants.items()}
        # The loaded Hugging Face tokenizers; callers get copies of their own (`tokenizer`), so
        # none is shared with the engine thread.
        self._hf: dict[str, Any] = {
            n: t.tokenizer.hf if t.tokenizer is not None else None
            for n, t in engine.tenants.items()
        }
        self._hf_lock = threading.Lock()
        self._idle_poll_s = idle_poll_s
        self.max_plan_failures = max_plan_failures
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
        self._idle_released = False  # idle memory given back since the last step
        self._plan_failures = 0  # planning failures in a row
        self.num_steps = 0
        self.num_step_errors = 0
        self.last_step_error: str | None = None
        self.dead: str | None = None  # why the loop died, once it has
        self.on_death: list[Callable[[str], None]] = []

    @classmethod
    def from_config(cls, config: Any) -> AsyncLLMEngine:
        return cls(LLMEngine(config))

    # ---- EngineClient: models and tokenizers ----------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        return list(self._model_names)

    def max_model_len(self, model: str) -> int:  # type: ignore[override]
        return self._max_len[model]

    def vocab_size(self, model: str) -> int:
        return self._vocab[model]

    def tokenizer(self, model: str) -> Any | None:
        hf = self._hf.get(model)
        if hf is None:
            return None
        with self._hf_lock:  # deepcopy reads the original, which nothing else writes
            return copy.deepcopy(hf)

    # ---- lifecycle ------------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._alive

    @property
    def is_accepting(self) -> bool:
        return self._accepting and self.is_running

    def health(self) -> EngineHealth:
        if self.dead is not None:
            state = "dead"
        elif not self.is_accepting:
            state = "draining" if self._thread is not None else "starting"
        else:
            state = "ok"
        return EngineHealth(
            state, self.dead, self.num_steps, self.num_step_errors, self.last_step_error
        )

    @property
    def num_in_flight(self) -> int:
        with self._live_lock:
            return len(self._live)

    def start(self) -> None:
        """Start (or restart, after shutdown) the engine thread and admit requests. Idempotent. A
        dead engine stays dead (its state cannot be trusted)."""
        if self.dead is not None:
            return
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
        """Stop admitting (new requests get EngineShutdownError), wait up to `timeout` seconds for
        the requests in flight to finish, abort the rest, stop the engine thread. Returns how many
        were aborted. Callable from any event loop; idempotent."""
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
    async def add_request(  # type: ignore[override]
        self,
        prompt: str | list[int] | None = None,
        params: SamplingParams | None = None,
        model: str | None = None,
        request_id: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        fill_max_tokens: bool = False,
    ) -> RequestStream:
        """Queue a request and wait until the engine accepted it (errors in the request raise here,
        before any output). The server sends token ids it tokenised itself; text and `messages`
        are still accepted for library callers (they are then tokenised on the engine thread).

        The prompt plus `params.max_tokens` must fit the model's context window
        (InvalidRequestError on `max_tokens` otherwise); with `fill_max_tokens`, max_tokens becomes
        whatever room the prompt leaves (the OpenAI default for chat)."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine is dead ({self.dead}); nothing can be served")
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
            prompt, params, model, request_id, messages=messages, fill_max_tokens=fill_max_tokens
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

    # ---- snapshots ------------------------------------------------------------------------------
    async def memory_snapshot(self) -> dict[str, Any]:
        return await self.call(memory_snapshot)

    async def check_integrity(self) -> str:
        def check(e: LLMEngine) -> str:
            try:
                e.check_integrity()
                return "ok"
            except AssertionError as err:
                return f"failed: {err}"

        return await self.call(check)

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
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - the loop is dead; say so and fail everyone
            self._die(f"{type(e).__name__}: {e}")
            return
        with self._state_lock:
            self._alive = False  # from here on nothing more is queued; handle what already was
        with self._lock:
            self._process_commands(stopped=True)
        logger.info("engine thread stopped")

    def _loop(self) -> None:
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
                        return
                    busy = self._step_once()
                except Exception:
                    logger.exception("engine loop error; failing %d request(s)", len(self._streams))
                    self._fail_all(EngineStepError("internal engine loop error"))
            if not busy:
                self._wake.wait(self._idle_poll_s)

    def _die(self, reason: str) -> None:
        logger.critical("the engine loop died (%s); failing %d request(s)", reason,
                        len(self._streams))
        self.dead = reason
        self._accepting = False
        with self._state_lock:
            self._alive = False
        error = EngineDeadError(f"the engine stopped while running this request: {reason}")
        for stream in list(self._streams.values()):
            stream._push(EngineDeadError(str(error)))
        self._streams.clear()
        while True:  # commands queued before the thread was marked dead
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                cmd[1].accepted.set_exception(EngineDeadError(str(error)))
            elif cmd[0] == "call":
                cmd[2].set_exception(EngineDeadError(str(error)))
        for callback in list(self.on_death):
            try:
                callback(reason)
            except Exception:
                logger.exception("an on_death callback failed")

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
            params = fit_max_tokens(
                a.params, len(ids), t.max_model_len, a.fill_max_tokens,
                "messages" if a.messages is not None else "prompt",
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
        if not self.engine.has_unfinished():
            self._release_idle()
            return False
        try:
            outputs = self.engine.step()
        except AfterStepFailed as e:  # the step ran: its outputs go out before the recovery
            self._deliver(e.outputs)
            self._failed(e.cause)
            return True
        except Exception as e:
            self._failed(e)
            return True
        self._deliver(outputs)
        return True

    def _failed(self, e: Exception) -> None:
        if isinstance(e, StepFailure):
            self._step_failed(e)
        else:  # raised while planning (a failed restore, say)
            self._plan_failed(e)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """A step ran and committed `outputs`: each goes to its stream."""
        self.num_steps += 1
        self._plan_failures = 0
        self._idle_released = False
        self._send(outputs)

    def _send(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted by its consumer in the meantime
            if out.finished:
                del self._streams[out.request_id]
            stream._push(out)

    def _release_idle(self) -> None:
        """No request anywhere: KV pages without a live or cached block go back to the arena
        (their pools grow again on demand; the static policy keeps its fixed shares), then
        remapped layers are restored from the free pages (evicting cached blocks only when a
        layer needs their pages). Once per idle period: the prefix cache outlives idle time."""
        if self._idle_released:
            return
        self._idle_released = True
        e = self.engine
        try:
            if not e.policy.partitions_kv:
                for t in e.tenants.values():
                    t.pool.shrink(evict=False)
            e.revert_idle()
        except StepFailure as f:  # a restore failed: put the bytes back as the accounting says
            self.num_step_errors += 1
            self.last_step_error = f"idle restore: {f}"
            logger.warning("restoring idle layers failed (%s); serving goes on", f)
            for model in f.kv_moved:  # its cached prefixes may not be on those pages
                e.tenants[model].pool.shrink()
            for model in f.models:
                self._repair(model)
        except Exception as err:
            self.num_step_errors += 1
            self.last_step_error = f"idle restore: {type(err).__name__}: {err}"
            logger.warning("giving idle memory back failed (%s); serving goes on",
                           self.last_step_error)

    def _step_failed(self, f: StepFailure) -> None:
        """End the requests the failed step touched, repair what the failed pass may have left
        behind, and let every other request go on."""
        self.num_step_errors += 1
        self.last_step_error = str(f)
        plans = f.step.plans
        touched = {s.request.request_id for p in plans for s in p.seqs}
        # A request the step swapped out has no KV copy on the host yet: it cannot resume.
        touched |= {r.request_id for p in plans for r in p.preempted if r.host_block_ids}
        # KV pages the step moved may not hold their blocks: every request of that model ends,
        # and its pool is emptied below (cached prefix blocks on those pages go with it).
        for model in f.kv_moved:
            touched |= {r.request_id for r in self.engine.tenants[model].scheduler.running}
        logger.error("engine step failed (%s); ending %d request(s) it ran", f, len(touched))
        self._send(self.engine.finished_in_planning(f.step))  # over before the step ran
        error = f"the engine failed while running this request: {f}"
        for rid in touched:
            stream = self._streams.pop(rid, None)
            try:
                self.engine.abort(rid)
            except Exception:
                logger.exception("abort of %s failed", rid)
            if stream is not None:
                stream._push(EngineStepError(error))
        for model in f.kv_moved:
            self.engine.tenants[model].pool.shrink()
        for model in f.models:
            self._repair(model)
        self._check()

    def _repair(self, model: str) -> None:
        """After a failed step: the bytes may not match the accounting (a layer action cut short,
        a streamed pass that left borrowed slabs holding other layers' weights). Every layer the
        residency says is resident is copied again from its exact host copy into its pages (which
        also drops copy-stream state and captured graphs); the others lose their views."""
        runner = getattr(self.engine.executor, "runners", {}).get(model)
        if runner is None:  # an executor without bytes (the simulator): nothing to repair
            return
        residency = self.engine.tenants[model].residency
        with faults.suspended():
            for layer, pages in enumerate(residency.slab_pages):
                if pages is not None:
                    runner.apply(RestoreLayer(model, layer, tuple(pages)))
                else:
                    runner.weights.unbind(layer)

    def _plan_failed(self, e: Exception) -> None:
        """The step failed before any model ran: no request changed, so the next step retries.
        A failure that keeps coming back ends the requests in flight (they could never finish)."""
        self.num_step_errors += 1
        self._plan_failures += 1
        self.last_step_error = f"{type(e).__name__}: {e}"
        if self._plan_failures < self.max_plan_failures:
            logger.warning("planning a step failed (%s); retrying", self.last_step_error)
            return
        logger.error("planning failed %d times in a row (%s); failing %d request(s)",
                     self._plan_failures, self.last_step_error, len(self._streams))
        self._plan_failures = 0
        self._fail_all(
            EngineStepError(
                f"the engine failed while running this request: {self.last_step_error}"
            )
        )

    def _fail_all(self, error: EngineError) -> None:
        for rid, stream in list(self._streams.items()):
            try:
                self.engine.abort(rid)
            except Exception:
                logger.exception("abort of %s failed", rid)
            stream._push(type(error)(str(error)))
        self._streams.clear()
        if isinstance(error, EngineStepError):
            self._check()

    def _check(self) -> None:
        try:
            self.engine.check_integrity()
        except Exception:
            logger.exception("engine state is inconsistent after a failed step")


def fit_max_tokens(
    params: SamplingParams, prompt_len: int, limit: int, fill: bool, field: str = "prompt"
) -> SamplingParams:
    """Check that a prompt of `prompt_len` tokens plus the completion fits a context window of
    `limit` tokens; with `fill`, max_tokens becomes the room the prompt leaves."""
    if prompt_len >= limit:
        raise InvalidRequestError(
            f"the prompt has {prompt_len} tokens but the model has a context window of {limit} "
            f"tokens (at most {limit - 1} prompt tokens)",
            field,
        )
    if fill:
        return dataclasses.replace(params, max_tokens=limit - prompt_len)
    if prompt_len + params.max_tokens > limit:
        raise InvalidRequestError(
            f"this model's maximum context length is {limit} tokens, but "
            f"{prompt_len + params.max_tokens} were requested ({prompt_len} in the prompt, "
            f"{params.max_tokens} in the completion): lower max_tokens to at most "
            f"{limit - prompt_len}",
            "max_tokens",
        )
    return params
