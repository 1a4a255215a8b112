"""LLMEngine: several models ("tenants") in one arena of pages; a step is plan -> execute -> commit.

    step    = planner.plan(now)             tenancy, schedulers, arbiter, remapping: a Step of data
    results = executor.execute(step)        memory actions applied, forward passes run (or priced)
    outputs = committer.commit(...)         tokens appended, stop rules, outputs, counters

Under remapping the planner then folds measured step times into the controller and may plan a
reversion (memory actions only), executed at once. See docs/structure.md for who owns what.
"""

from __future__ import annotations

from typing import Any

from oneiros.config import EngineConfig
from oneiros.core import (
    EvictLayer,
    InvalidRequestError,
    Request,
    RequestOutput,
    RestoreLayer,
    SamplingParams,
    Step,
    UnknownModelError,
    ensure,
)
from oneiros.engine.builder import build
from oneiros.engine.commit import Committer
from oneiros.engine.tenant import Tenant
from oneiros.engine.trace import StepTrace


class AfterStepFailed(Exception):
    """The step ran and committed `outputs`; planning or executing the memory-only step after it
    (reversion) raised `cause`. The outputs are the caller's to deliver: requests may have
    finished in them."""

    def __init__(self, outputs: list[RequestOutput], cause: Exception) -> None:
        super().__init__(f"after the step: {type(cause).__name__}: {cause}")
        self.outputs = outputs
        self.cause = cause


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        parts = build(config)
        self.policy = parts.policy
        self.backend = parts.backend
        self.clock = parts.backend.clock
        self.device = parts.backend.device
        self.dtype = parts.dtype
        self.arena = parts.arena
        self.tenants: dict[str, Tenant] = parts.tenants
        self.weights = parts.weights
        self.storage = parts.storage
        self.store = parts.store
        self.planner = parts.planner
        self.remapper = parts.planner.remap
        self.executor = parts.executor
        self.oversubscribed = parts.oversubscribed  # some models started off the GPU
        self.committer = Committer(self.tenants)
        self._requests: dict[str, tuple[Tenant, Request]] = {}
        self._idle_reverted = False  # revert_idle ran since the last step
        self._trace = StepTrace(config.trace_steps) if config.trace_steps else None
        self._record_pages(self.clock.now())

    # ---- requests -------------------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        return list(self.tenants)

    def tenant(self, model: str | None) -> Tenant:
        if model is None:
            if len(self.tenants) == 1:
                return next(iter(self.tenants.values()))
            raise InvalidRequestError(
                f"this engine serves several models ({', '.join(self.tenants)}): name one", "model"
            )
        if model not in self.tenants:
            raise UnknownModelError(
                f"model {model!r} is not served here (served: {', '.join(self.tenants)})"
            )
        return self.tenants[model]

    def encode(
        self,
        model: str | None,
        prompt: str | list[int] | None = None,
        messages: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        t = self.tenant(model)
        if messages is not None:
            if t.tokenizer is None:
                raise InvalidRequestError(f"model {t.name!r} has no tokenizer", "messages")
            return t.tokenizer.encode_chat(messages)
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty", "prompt")
            if t.tokenizer is None:
                raise InvalidRequestError(
                    f"model {t.name!r} has no tokenizer: pass token ids instead of text", "prompt"
                )
            return t.tokenizer.encode(prompt)
        if prompt is None:
            raise InvalidRequestError("a prompt is required", "prompt")
        ids = list(prompt)
        vocab = t.vocab_size
        if any(not isinstance(i, int) or not 0 <= i < vocab for i in ids):
            raise InvalidRequestError(f"token ids must be integers in [0, {vocab})", "prompt")
        return ids

    def add_request(
        self,
        prompt: str | list[int] | None = None,
        params: SamplingParams | None = None,
        model: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> Request:
        """Queue a request. `arrival_time` (engine clock) defaults to now; a benchmark passes the
        scheduled arrival so that TTFT counts from it."""
        t = self.tenant(model)
        params = params or SamplingParams()
        if params.stop and t.tokenizer is None:
            raise InvalidRequestError(f"model {t.name!r} has no tokenizer for stop strings", "stop")
        req = Request(self.encode(t.name, prompt, messages), params, t.name)
        req.arrival_time = self.clock.now() if arrival_time is None else arrival_time
        if request_id is not None:
            if request_id in self._requests:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            req.request_id = request_id
        t.scheduler.add(req)
        self.store.note_arrival(t.name, req.arrival_time)
        self._requests[req.request_id] = (t, req)
        return req

    def abort(self, request_id: str) -> bool:
        self.committer.texts.pop(request_id, None)
        entry = self._requests.pop(request_id, None)
        if entry is None:
            return False
        t, _ = entry
        t.scheduler.abort(request_id)
        self.executor.release(request_id)
        return True

    def has_unfinished(self) -> bool:
        return any(t.scheduler.has_work for t in self.tenants.values())

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self._idle_reverted = False
        step = self.planner.plan(self.clock.now())
        results = self.executor.execute(step)
        outputs = self._commit(step, results)
        try:
            after = self.planner.observe(step, results) if step.plans else None
            if after is not None:
                self._commit(after, self.executor.execute(after))
        except Exception as e:
            raise AfterStepFailed(outputs, e) from e
        if step.plans:
            self._record_pages(self.clock.now())
        if self._trace is not None and (step.plans or step.idle):
            self._trace.write(step, self.clock.now(), results, self.tenants, self.arena, after)
        return outputs

    def _commit(self, step: Step, results: list) -> list[RequestOutput]:
        return self._forget_finished(self.committer.commit(step, results, self.clock.now()))

    def finished_in_planning(self, step: Step) -> list[RequestOutput]:
        """The final outputs of the requests that planning `step` finished (out of KV capacity),
        for a step that failed to run: those requests are over whatever became of the step."""
        return self._forget_finished(
            [self.committer.finish(self.tenants[r.model], r) for r in step.finished]
        )

    def _forget_finished(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        for out in outputs:
            if out.finished:
                self._requests.pop(out.request_id, None)
                self.executor.release(out.request_id)
        return outputs

    def _apply(self, step: Step) -> None:
        """Execute and commit a step of memory actions only."""
        self._commit(step, self.executor.execute(step))

    def revert_idle(self) -> int:
        """With no request anywhere, restore every remapped layer that memory allows (once per
        idle period: a failed restore is not retried in a loop). Returns the layers restored."""
        if self._idle_reverted or self.has_unfinished():
            return 0
        self._idle_reverted = True
        step = self.planner.revert_idle(self.clock.now())
        if step is None:
            return 0
        self._apply(step)
        return sum(isinstance(op, RestoreLayer) for op in step.memory)

    # ---- residency by hand (tests, benchmarks) -------------------------------------------------
    def evict_layers(self, model: str, layers: list[int]) -> int:
        """Remap these layers of `model` now; returns the pages freed."""
        t, step = self.tenant(model), Step(self.clock.now())
        for i in layers:
            step.memory.append(EvictLayer(t.name, i, tuple(t.residency.evict(i))))
        self._apply(step)
        return sum(len(op.pages) for op in step.memory)

    def restore_layers(self, model: str, layers: list[int]) -> bool:
        """Give these non-resident layers of `model` their slabs back now (False: no room for
        one of them; those before it are restored)."""
        t, step = self.tenant(model), Step(self.clock.now())
        ok = True
        for i in layers:
            pages = t.residency.restore(i)
            if pages is None:
                ok = False
                break
            step.memory.append(RestoreLayer(t.name, i, tuple(pages)))
        self._apply(step)
        return ok

    # ---- housekeeping ---------------------------------------------------------------------------
    def _record_pages(self, now: float) -> None:
        self.store.page_history.append((now, self.arena.usage_by_kind()))

    def close(self) -> None:
        if self._trace is not None:
            self._trace.close()
            self._trace = None

    def check_integrity(self) -> None:
        ensure(
            self.committer.texts.keys() <= self._requests.keys(),
            "a detokeniser outlived its request",
        )
        self.arena.check_integrity()
        for t in self.tenants.values():
            t.pool.check_integrity()
            t.residency.check_integrity()
            t.scheduler.check_integrity()
