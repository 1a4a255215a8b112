"""Continuous batching for one model: which requests run this step, with how many tokens.

Scheduling is by token budget (vLLM v1 style): every live request's computed tokens catch up with its
known tokens, a decode being the case of one new token. Running requests go first, oldest first.
Waiting requests are admitted only in steps without preemption and while blocks and the budget last.

When the pool has no block for a request, the scheduler asks its `Arbiter` (engine/arbiter.py: every
cross-model memory decision) to make room; failing that it preempts its own youngest running request,
or, when that is the request itself and the arbiter says it may wait, leaves it out of this step with
its blocks kept. Preemption:
  - recompute: its blocks are freed; it is prefilled again later with the tokens it already produced;
  - swap: its blocks are copied to host memory (plan.swap_out) and copied back when it resumes
    (plan.swap_in); recompute is the fallback when the host swap space is full. With
    `swap_in_ahead` (policy pie) a resumed request holds its blocks from the step its swap-in is
    issued in and runs from the next one, so that the copy overlaps a step's compute.
Everything the scheduler decides is in the plan it returns; it keeps no counters.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from oneiros.core import (
    InvalidRequestError,
    Request,
    RequestStatus,
    ScheduledSeq,
    StepPlan,
    ensure,
)
from oneiros.memory.kv import KVPool
from oneiros.memory.swap import HostBlockPool

if TYPE_CHECKING:
    from oneiros.engine.arbiter import Arbiter

PREEMPTION_MODES = ("recompute", "swap")


class Scheduler:
    def __init__(
        self,
        model: str,
        pool: KVPool,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        preemption: str = "recompute",
        host_pool: HostBlockPool | None = None,
        arbiter: Arbiter | None = None,
        swap_in_ahead: bool = False,
    ) -> None:
        if preemption not in PREEMPTION_MODES:
            raise ValueError(f"preemption must be one of {PREEMPTION_MODES}, not {preemption!r}")
        if preemption == "swap" and host_pool is None:
            raise ValueError("swap preemption needs a host block pool")
        self.model = model
        self.preemption = preemption
        self.host_pool = host_pool
        self.arbiter = arbiter  # None: this model's own pages and the free ones, nothing else
        # A resumed request's swap-in is issued a step before it runs (its copy overlaps that step).
        self.swap_in_ahead = swap_in_ahead
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished_in_schedule: list[Request] = []

    # ---- intake ---------------------------------------------------------------------------------
    def validate(self, req: Request) -> None:
        n = req.num_prompt_tokens
        if n == 0:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {n} tokens; model {self.model!r} accepts at most "
                f"{self.max_model_len - 1} prompt tokens (context window {self.max_model_len})",
                "prompt",
            )
        capacity = self.max_blocks()
        need = self.pool.blocks_needed(n + 1)
        if need > capacity:
            raise InvalidRequestError(
                f"the prompt needs {need} KV blocks but the memory budget holds at most {capacity} "
                f"for model {self.model!r}",
                "prompt",
            )

    def add(self, req: Request) -> None:
        self.validate(req)
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def max_blocks(self) -> int:
        """Blocks this model could ever hold: its own pages, the free ones and whatever the arbiter
        may take for it (other models' KV pages, parameter pages)."""
        pages = self.pool.num_pages + self.pool.arena.num_free
        if self.arbiter is not None:
            pages += self.arbiter.borrowable_pages(self.model)
        return pages * self.pool.blocks_per_page

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- planning -------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan(self.model)
        budget = self.max_num_batched_tokens
        waited = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._reserve(req, req.num_computed_tokens + n):
                victim = self.running[-1]
                needed = self.pool.blocks_needed(req.num_computed_tokens + n)
                if victim is req and len(self.running) == 1 and needed > self.max_blocks():
                    # Alone, and more than this model could ever hold: it can never grow further.
                    self._finish_for_capacity(req)
                    continue
                if victim is req and self._may_wait(req):
                    waited = True  # it keeps its blocks; a younger request elsewhere gives way
                    i += 1
                    continue
                self.preempt(victim, plan)
                continue  # retry req (or move on, if req itself was the victim)
            plan.seqs.append(ScheduledSeq(req, req.num_computed_tokens, n))
            budget -= n
            i += 1
        if not plan.preempted and not waited:
            self._admit(plan, budget)
        return plan

    def _admit(self, plan: StepPlan, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._reserve(req, req.num_computed_tokens + n):
                break
            self.waiting.popleft()
            ahead = False
            if req.host_block_ids:  # resume a swapped-out request: copy its KV back first
                assert self.host_pool is not None
                plan.swap_in.extend(zip(req.host_block_ids, req.block_ids))
                self.host_pool.free(req.host_block_ids)
                req.host_block_ids = []
                ahead = self.swap_in_ahead
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            if ahead:
                continue  # it runs from the next step on, once its blocks have landed
            plan.seqs.append(ScheduledSeq(req, req.num_computed_tokens, n))
            budget -= n

    def _reserve(self, req: Request, num_tokens: int) -> bool:
        """Make req's block table cover num_tokens tokens. False (and nothing taken) on shortage."""
        missing = self.pool.blocks_needed(num_tokens) - len(req.block_ids)
        if missing <= 0:
            return True
        blocks = self.pool.allocate(missing)
        if blocks is None and self._make_room(missing, req):
            blocks = self.pool.allocate(missing)
        if blocks is None:
            return False
        req.block_ids.extend(blocks)
        return True

    def _make_room(self, blocks: int, req: Request) -> bool:
        return self.arbiter is not None and self.arbiter.make_room(self.model, blocks, req)

    def _may_wait(self, req: Request) -> bool:
        return self.arbiter is not None and self.arbiter.can_wait(self.model, req)

    # ---- state changes --------------------------------------------------------------------------
    def preempt(self, req: Request, plan: StepPlan) -> None:
        """Take req's KV blocks away and requeue it at the front (swap, else recompute); the plan
        records what happened (preempted, swap_out, recomputed_tokens)."""
        self.running.remove(req)
        host = None
        if self.preemption == "swap" and req.block_ids:
            assert self.host_pool is not None
            host = self.host_pool.allocate(len(req.block_ids))
        if host is not None:
            plan.swap_out.extend(zip(req.block_ids, host))
            req.host_block_ids = host
        else:
            plan.recomputed_tokens += req.num_computed_tokens
            req.num_computed_tokens = 0
        self._free_blocks(req)
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        plan.preempted.append(req)
        self.waiting.appendleft(req)

    def finish(self, req: Request, status: RequestStatus) -> None:
        assert status.finished
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._free_blocks(req)
        if req.host_block_ids:
            assert self.host_pool is not None
            self.host_pool.free(req.host_block_ids)
            req.host_block_ids = []
        req.status = status

    def abort(self, request_id: str) -> Request | None:
        for req in [*self.running, *self.waiting]:
            if req.request_id == request_id:
                self.finish(req, RequestStatus.FINISHED_ABORTED)
                return req
        return None

    def _finish_for_capacity(self, req: Request) -> None:
        req.stop_reason = "kv_capacity"
        self.finish(req, RequestStatus.FINISHED_LENGTH)
        self.finished_in_schedule.append(req)

    def _free_blocks(self, req: Request) -> None:
        if req.block_ids:
            self.pool.free(req.block_ids)
            req.block_ids = []

    def check_integrity(self) -> None:
        live = [b for r in self.running for b in r.block_ids]
        ensure(len(live) == len(set(live)), "a KV block is shared by two requests")
        ensure(len(live) == self.pool.num_used, "blocks in use that no request holds")
        ensure(all(not r.block_ids for r in self.waiting), "a waiting request holds blocks")
        if self.host_pool is not None:
            self.host_pool.check_integrity([b for r in self.waiting for b in r.host_block_ids])

