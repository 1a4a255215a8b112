"""`ClusterClient`: the EngineClient of the ingress, over Ray Serve handles of engine replicas.

The single server's routes, formatting, streaming and errors run unchanged on top of it. A request
goes to a replica holding its model: among those the health poller has not seen fail, the one with
the fewest requests this ingress has in flight there. Each request is one streaming handle call
(`EngineReplica.generate`): its first item says whether the engine accepted it, the rest are its
outputs. Closing the stream cancels the call, which aborts the request on the replica.

Ray's failures become the server's errors: a full replica queue (BackPressureError) is a 429 with
the same body as the server's own limit; a replica that dies or cannot be reached is an
EngineUnavailableError (503), mid-stream too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from oneiros.core import InvalidRequestError, RequestOutput, SamplingParams, UnknownModelError
from oneiros.server.engine_client import (
    EngineClient,
    EngineDeadError,
    EngineError,
    EngineHealth,
    EngineShutdownError,
    EngineStepError,
    EngineUnavailableError,
)
from oneiros.server.errors import APIError
from oneiros.server.metrics import merge_snapshots

logger = logging.getLogger("oneiros.cluster")

# Errors a replica reports by name (the replica catches them; nothing is unpickled as a class).
_ERRORS: dict[str, type[Exception]] = {
    "InvalidRequestError": InvalidRequestError,
    "UnknownModelError": UnknownModelError,
    "EngineStepError": EngineStepError,
    "EngineShutdownError": EngineShutdownError,
    "EngineDeadError": EngineDeadError,
}


def replica_error(kind: str, message: str, param: str | None) -> Exception:
    cls = _ERRORS.get(kind)
    if cls is InvalidRequestError:
        return InvalidRequestError(message, param)
    if cls is not None:
        return cls(message)
    return EngineError(message)


def backpressure(replica: str) -> APIError:
    return APIError(
        429, f"replica {replica} is at its limit of queued requests; retry later",
        "rate_limit_error", None, "rate_limit_exceeded", {"Retry-After": "1"},
    )


@dataclass
class ModelInfo:
    max_model_len: int
    vocab_size: int
    tokenizer: Any | None


class RemoteStream:
    """One request's outputs from a replica (an OutputStream)."""

    def __init__(self, client: ClusterClient, replica: str, gen: Any, request_id: str,
                 submit_time: float) -> None:
        self.client = client
        self.replica = replica
        self.gen = gen
        self.request_id = request_id
        self.submit_time = submit_time
        self.closed = False
        self.finished = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                try:
                    kind, *rest = await self.gen.__anext__()
                except StopAsyncIteration:
                    raise EngineUnavailableError(
                        f"replica {self.replica} ended request {self.request_id} without a result"
                    ) from None
                except Exception as e:  # noqa: BLE001 - Ray's errors: the replica is gone
                    self.client.mark_failed(self.replica, e)
                    raise EngineUnavailableError(
                        f"replica {self.replica} failed while running the request "
                        f"({type(e).__name__}); retry it"
                    ) from None
                if kind == "error":
                    self.finished = True
                    raise replica_error(*rest)
                out: RequestOutput = rest[0]
                if out.finished:
                    self.finished = True
                yield out
        finally:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.client.release(self.replica)
        if not self.finished:
            with contextlib.suppress(Exception):
                self.gen.cancel()  # cancels the replica's generator: the engine aborts it


class ClusterClient(EngineClient):
    """An EngineClient over engine replicas (name -> Ray Serve DeploymentHandle)."""

    def __init__(
        self,
        handles: dict[str, Any],
        holders: dict[str, list[str]],
        models: dict[str, ModelInfo],
        poll_s: float = 1.0,
        deployments: dict[str, str] | None = None,
        app_name: str = "oneiros",
    ) -> None:
        self.handles = handles
        self.deployments = deployments or {r: f"engine-{r}" for r in handles}
        self.app_name = app_name
        self.holders = holders  # model -> replicas holding it, in placement order
        self.models = models
        self.poll_s = poll_s
        self.in_flight = dict.fromkeys(handles, 0)
        self.states: dict[str, str] = dict.fromkeys(handles, "starting")
        self.errors: dict[str, str | None] = dict.fromkeys(handles)
        self._turns: dict[str, int] = {}  # model -> requests routed (ties go round)
        self._accepting = False
        self._poller: asyncio.Task[None] | None = None

    @classmethod
    async def connect(
        cls,
        handles: dict[str, Any],
        order: list[str] | None = None,
        poll_s: float = 1.0,
        app_name: str = "oneiros",
    ) -> ClusterClient:
        """Ask every replica what it serves (waits for them to start); models listed in `order`
        first."""
        infos = await asyncio.gather(*(h.info.remote() for h in handles.values()))
        holders: dict[str, list[str]] = {}
        models: dict[str, ModelInfo] = {}
        for name, info in zip(handles, infos, strict=True):
            for model, (max_len, vocab, tok) in info.items():
                holders.setdefault(model, []).append(name)
                models.setdefault(model, ModelInfo(max_len, vocab, tok))
        rank = {m: k for k, m in enumerate(order or [])}
        models = dict(sorted(models.items(), key=lambda kv: rank.get(kv[0], len(rank))))
        client = cls(handles, holders, models, poll_s, app_name=app_name)
        client.states = dict.fromkeys(handles, "ok")
        return client

    # ---- models ---------------------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        return list(self.models)

    def max_model_len(self, model: str) -> int:
        return self.models[model].max_model_len

    def vocab_size(self, model: str) -> int:
        return self.models[model].vocab_size

    def tokenizer(self, model: str) -> Any | None:
        import copy

        tok = self.models[model].tokenizer
        return copy.deepcopy(tok) if tok is not None else None

    # ---- routing --------------------------------------------------------------------------------
    def route(self, model: str) -> str:
        """The replica for a request of `model`: the least loaded that is up (any, if none is: its
        restart may be on the way, and the handle waits for it); ties in turn."""
        held = self.holders.get(model)
        if not held:
            raise UnknownModelError(f"the model {model!r} does not exist")
        up = [r for r in held if self.states[r] == "ok"] or held
        turn = self._turns.get(model, 0)
        self._turns[model] = turn + 1
        n = len(held)
        return min(up, key=lambda r: (self.in_flight[r], (held.index(r) - turn) % n))

    def release(self, replica: str) -> None:
        self.in_flight[replica] -= 1

    def mark_failed(self, replica: str, e: BaseException) -> None:
        self.states[replica] = "unavailable"
        first = str(e).splitlines()[0][:200] if str(e) else ""
        self.errors[replica] = f"{type(e).__name__}: {first}"

    async def add_request(
        self,
        prompt: list[int],
        params: SamplingParams,
        model: str,
        request_id: str | None = None,
    ) -> RemoteStream:
        from ray.serve.exceptions import BackPressureError

        if not self._accepting:
            raise EngineShutdownError("the server is shutting down and accepts no new requests")
        replica = self.route(model)
        rid = request_id or f"req-{time.monotonic_ns()}"
        gen = self.handles[replica].options(stream=True).generate.remote(prompt, params, model,
                                                                        rid)
        self.in_flight[replica] += 1
        stream = RemoteStream(self, replica, gen, rid, time.perf_counter())
        try:
            kind, *rest = await gen.__anext__()
        except BackPressureError:
            stream.finished = True
            stream.close()
            raise backpressure(replica) from None
        except BaseException as e:
            stream.close()
            if isinstance(e, (asyncio.CancelledError, KeyboardInterrupt)):
                raise
            self.mark_failed(replica, e)
            raise EngineUnavailableError(
                f"replica {replica} could not take the request ({type(e).__name__}); retry it"
            ) from None
        if kind == "error":
            stream.finished = True
            stream.close()
            raise replica_error(*rest)
        # The replica's clock: its outputs' token_times are on it (same machine: same clock).
        stream.submit_time = rest[0]
        return stream

    def abort_nowait(self, request_id: str) -> None:
        """Aborts go through the stream (closing it cancels the call on the replica)."""

    # ---- health and state -----------------------------------------------------------------------
    @property
    def is_accepting(self) -> bool:
        return self._accepting

    def health(self) -> EngineHealth:
        if not self._accepting:
            state = "draining" if self._poller else "starting"
            return EngineHealth(state, replicas=self.replicas())
        down = [m for m, held in self.holders.items()
                if not any(self.states[r] == "ok" for r in held)]
        error = None
        if down:
            error = f"no replica is up for {', '.join(down)}"
        return EngineHealth("ok" if not down else "unavailable", error, replicas=self.replicas())

    def replicas(self) -> dict[str, dict[str, Any]]:
        return {
            r: {"state": self.states[r], "models": [m for m, h in self.holders.items() if r in h],
                "in_flight": self.in_flight[r], "error": self.errors[r]}
            for r in self.handles
        }

    async def _poll_once(self) -> None:
        """Each replica's state as Ray Serve's controller sees it (no call to the replica, so a
        replica busy with its full share of requests still reads as up)."""
        try:
            states = await asyncio.to_thread(self.replica_states)
        except Exception as e:  # noqa: BLE001 - the controller is unreachable: keep the last
            logger.warning("cannot read replica states: %s", type(e).__name__)
            return
        for name, (state, detail) in states.items():
            if name in self.states:
                self.states[name] = state
                self.errors[name] = detail

    def replica_states(self) -> dict[str, tuple[str, str | None]]:
        """replica -> ('ok' | 'starting' | 'unavailable', Ray Serve's detail)."""
        from ray import serve

        app = serve.status().applications.get(self.app_name)
        out: dict[str, tuple[str, str | None]] = {}
        for name, dep_name in self.deployments.items():
            dep = app.deployments.get(dep_name) if app is not None else None
            if dep is None:
                out[name] = ("unavailable", "not deployed")
                continue
            counts = {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}
            detail = ", ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items()) if v)
            if counts.get("RUNNING", 0):
                out[name] = ("ok", None if detail == "running 1" else detail)
            elif counts.get("STARTING", 0) or counts.get("RECOVERING", 0):
                out[name] = ("starting", detail or None)
            else:
                out[name] = ("unavailable", f"{getattr(dep.status, 'value', dep.status)}: "
                             f"{dep.message or detail}")
        return out

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self._poll_once()

    async def _gather(self, method: str) -> dict[str, Any]:
        async def one(h: Any) -> Any:
            try:
                return await asyncio.wait_for(getattr(h, method).remote(), 10)
            except Exception as e:  # noqa: BLE001 - reported per replica
                return {"error": f"{type(e).__name__}"}

        values = await asyncio.gather(*(one(h) for h in self.handles.values()))
        return dict(zip(self.handles, values, strict=True))

    async def memory_snapshot(self) -> dict[str, Any]:
        return merge_snapshots(await self._gather("memory_snapshot"))

    async def check_integrity(self) -> str:
        results = await self._gather("check_integrity")
        bad = {r: v for r, v in results.items() if v != "ok"}
        return "ok" if not bad else "failed: " + "; ".join(f"{r}: {v}" for r, v in bad.items())

    def start(self) -> None:
        self._accepting = True
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_event_loop().create_task(self._poll())

    def begin_shutdown(self) -> None:
        self._accepting = False

    async def shutdown(self, timeout: float = 30.0) -> int:
        self._accepting = False
        if self._poller is not None:
            self._poller.cancel()
        return 0
