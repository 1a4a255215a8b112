"""Continuous batching for one model: which requests run this step, with how many tokens.

Scheduling is by token budget (vLLM v1 style): every live request's computed tokens catch up with its
known tokens, a decode being the case of one new token. Running requests go first, oldest first.
Waiting requests are admitted only in steps without preemption and while blocks and the budget last,
leaving `watermark_blocks` free while requests run (vLLM V0's watermark: a request admitted into the
last free blocks would only be preempted by the next decode step's growth).

When the pool has no block for a request, the scheduler asks its `Arbiter` (engine/arbiter.py: every
cross-model memory decision) to make room; failing that it preempts its own youngest running request,
or, when that is the request itself and the arbiter says it may wait, leaves it out of this step with
its blocks kept. Preemption:
  - recompute: its blocks are freed; it is prefilled again later with the tokens it already produced;
  - swap: its blocks are copied to host memory (plan.swap_out) and copied back when it resumes
    (plan.swap_in); recompute is the fallback when the host swap space is full. With
    `swap_in_ahead` (policy pie) a resumed request holds its blocks from the step its swap-in is
    issued in and runs from the next one, so that the copy overlaps a step's compute.
With prefix caching (the pool has a `PrefixCache`), a request admitted without computed tokens
starts from its longest cached prefix of full blocks (at least its last token is computed: it
samples from it) and prefills only the rest: its block table points at the cached blocks, one more
reference each, nothing is copied. A block is indexed as soon as a scheduled chunk fills it, so a
request admitted later in the same step (a sibling with the same prompt) already shares it: within
a layer every token's K/V is written before any token attends. With shared blocks, a swap-out
copies only the blocks the request alone references (`host_block_ids` has None for the others); on
resume the request takes its longest cached prefix again, copies back its own blocks after it, and
recomputes from the first block it finds in neither place (a shared block whose memory was reused
while the request was out).
Everything the scheduler decides is in the plan it returns; it keeps no counters.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import TYPE_CHECKING, NamedTuple

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


class _Start(NamedTuple):
    """How an admitted request starts: its computed tokens before admission (to undo), the cached
    blocks it took, and the host blocks to copy back after them."""

    computed: int
    hits: int
    restore: list[int]


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
        # Blocks an admission leaves free while requests run (the builder sets it from
        # kv_watermark and the KV cache's size at start-up).
        self.watermark_blocks = 0
        # Tokens every running request (of every model sharing the memory) must still be able to
        # grow by after an admission (the builder sets it from growth_reserve_tokens).
        self.growth_reserve_tokens = 0
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished_in_schedule: list[Request] = []
        # The last admission attempt stopped for want of KV cache (a request waits for memory,
        # not for the batch budget or its turn): KV demand has not fallen.
        self.short_of_memory = False

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
                    waited = True  # it keeps its blocks until a younger one elsewhere frees some
                    i += 1
                    continue
                self.preempt(victim, plan)
                continue  # retry req (or move on, if req itself was the victim)
            self._schedule(plan, req, n)
            budget -= n
            i += 1
        if not plan.preempted and not waited:
            self._admit(plan, budget)
        return plan

    def _admit(self, plan: StepPlan, budget: int) -> None:
        self.short_of_memory = False
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            start = self._start(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._reserve(req, req.num_computed_tokens + n) or self._below_reserves(req):
                self._undo_start(req, start)
                self.short_of_memory = True
                break
            self.waiting.popleft()
            ahead = self._resume(req, start, plan)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            if ahead:
                continue  # it runs from the next step on, once its blocks have landed
            self._schedule(plan, req, n)
            budget -= n

    def _schedule(self, plan: StepPlan, req: Request, n: int) -> None:
        """Run n tokens of req in this step; index the blocks they fill."""
        start = req.num_computed_tokens
        plan.seqs.append(ScheduledSeq(req, start, n))
        bs = self.pool.block_size
        self._cache_blocks(req, start // bs, (start + n) // bs)

    def _cache_blocks(self, req: Request, first: int, last: int) -> None:
        """Index req's blocks first..last-1 (full once this step ran) in the prefix cache."""
        cache = self.pool.cache
        if cache is None or last <= first:
            return
        bs = self.pool.block_size
        hashes = cache.hashes(req, last)
        for i in range(first, last):
            self.pool.cache_block(
                req.block_ids[i], hashes[i], cache.parent(req, i), req.tokens(i * bs, (i + 1) * bs)
            )

    def _start(self, req: Request) -> _Start:
        """Before admitting a waiting request: take its longest cached prefix (blocks and computed
        tokens) and, for a swapped-out one, the host blocks that extend it."""
        ensure(not req.block_ids, "a waiting request holds blocks")
        computed, table, cache = req.num_computed_tokens, req.host_block_ids, self.pool.cache
        ensure(bool(table) or computed == 0, "a waiting request kept computed tokens without KV")
        bs = self.pool.block_size
        hits: list[int] = []
        if cache is not None:
            # A swapped-out request looks only for its own full blocks: it never skips tokens it
            # had not computed, so every token is computed once, or again after being dropped.
            limit = (req.num_tokens - 1) // bs if not table else computed // bs
            hits = cache.lookup(cache.hashes(req, limit))
            self.pool.acquire(hits)
        h = len(hits)
        restore: list[int] = []
        ready = h * bs
        if table:
            j = h
            while j < len(table) and table[j] is not None:
                j += 1
            restore = [b for b in table[h:j] if b is not None]  # all of them, by the loop
            ready = max(ready, computed if j == len(table) else j * bs)
        req.block_ids = hits
        req.num_computed_tokens = ready
        return _Start(computed, h, restore)

    def _undo_start(self, req: Request, start: _Start) -> None:
        self.pool.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = start.computed

    def _resume(self, req: Request, start: _Start, plan: StepPlan) -> bool:
        """An admission went through: record its cache lookup (a request starting from nothing:
        new, or preempted by recompute), or copy back its host blocks and count the tokens lost
        to evicted shared blocks (True: it runs from the next step on, `swap_in_ahead`)."""
        bs = self.pool.block_size
        if not req.host_block_ids:
            if self.pool.cache is not None:
                plan.prefix_queries += req.num_tokens
                plan.prefix_hits += start.hits * bs
            return False
        assert self.host_pool is not None
        plan.recomputed_tokens += start.computed - req.num_computed_tokens
        first = start.hits
        targets = req.block_ids[first : first + len(start.restore)]
        plan.swap_in.extend(zip(start.restore, targets, strict=True))
        self.host_pool.free([b for b in req.host_block_ids if b is not None])
        req.host_block_ids = []
        if self.swap_in_ahead:
            return True  # its blocks land during this step: no one may read them before the next
        self._cache_blocks(req, first, min(first + len(targets), req.num_computed_tokens // bs))
        return False

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

    def _below_reserves(self, req: Request) -> bool:
        """After an admission took its blocks, while requests run: too little is left, by either
        reserve. The watermark: fewer than `watermark_blocks` of what a further admission could
        draw on (this model's reusable blocks, free arena pages and, memory being shared, other
        models' idle KV pages and layers where admissions take them). The growth reserve: less
        than every running request needs to grow by `growth_reserve_tokens`, of what growth can
        draw on (the same, and the layers remapping gives running requests). With nothing
        running anywhere it admits regardless: no block would ever be freed for the request
        otherwise."""
        if not (self.running or (self.arbiter is not None and self.arbiter.running_anywhere())):
            return False
        pool = self.pool
        if self.watermark_blocks:
            pages = pool.arena.num_free
            if self.arbiter is not None:
                pages += self.arbiter.admission_pages(self.model, req)
            if pool.num_reusable + pages * pool.blocks_per_page < self.watermark_blocks:
                return True
        if self.growth_reserve_tokens:
            have = pool.num_reusable / pool.blocks_per_page + pool.arena.num_free
            tokens = self.growth_reserve_tokens
            if self.arbiter is not None:
                need = self.arbiter.growth_pages(self.model, tokens)
                have += self.arbiter.growth_room(self.model)
            else:
                need = self.growth_blocks(tokens) / pool.blocks_per_page
            return have < need
        return False

    def growth_blocks(self, tokens: int) -> int:
        """Blocks the running requests need to grow by `tokens` tokens each, or to their length
        limit (prompt and max_tokens) when that comes first."""
        return sum(
            max(0, self.pool.blocks_needed(
                min(r.num_tokens + tokens, r.num_prompt_tokens + r.params.max_tokens)
            ) - len(r.block_ids))
            for r in self.running
        )

    def _make_room(self, blocks: int, req: Request) -> bool:
        return self.arbiter is not None and self.arbiter.make_room(self.model, blocks, req)

    def _may_wait(self, req: Request) -> bool:
        return self.arbiter is not None and self.arbiter.can_wait(self.model, req)

    # ---- state changes --------------------------------------------------------------------------
    def preempt(self, req: Request, plan: StepPlan) -> None:
        """Take req's KV blocks away and requeue it at the front (swap, else recompute); the plan
        records what happened (preempted, swap_out, recomputed_tokens)."""
        self.running.remove(req)
        host = self._swap_out(req, plan) if self.preemption == "swap" else None
        if host is not None:
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
            self.host_pool.free([b for b in req.host_block_ids if b is not None])
            req.host_block_ids = []
        req.status = status

    def _swap_out(self, req: Request, plan: StepPlan) -> list[int | None] | None:
        """Copy to host the blocks holding req's computed tokens that it alone references (a
        block shared with running requests stays on the device, in the prefix cache: copied at
        most once, by the last request to leave it). Returns the host table, None when the swap
        space is full (or nothing is computed)."""
        assert self.host_pool is not None
        n = self.pool.blocks_needed(req.num_computed_tokens)
        own = [i for i in range(n) if self.pool.refcount(req.block_ids[i]) == 1]
        host = self.host_pool.allocate(len(own)) if n else None
        if host is None:
            return None
        table: list[int | None] = [None] * n
        for i, h in zip(own, host, strict=True):
            table[i] = h
            plan.swap_out.append((req.block_ids[i], h))
        return table

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

    def renumber_blocks(self, new_of: dict[int, int]) -> None:
        """The pool moved pages (KV compaction): block tables follow (old id -> new id)."""
        for req in self.running:
            req.block_ids[:] = [new_of.get(b, b) for b in req.block_ids]

    def _free_blocks(self, req: Request) -> None:
        if req.block_ids:
            self.pool.free(req.block_ids)
            req.block_ids = []

    def check_integrity(self) -> None:
        refs = Counter(b for r in self.running for b in r.block_ids)
        ensure(
            all(len(set(r.block_ids)) == len(r.block_ids) for r in self.running),
            "a block is twice in one block table",
        )
        ensure(refs == self.pool.references(), "block references differ from the block tables")
        ensure(all(not r.block_ids for r in self.waiting), "a waiting request holds blocks")
        if self.host_pool is not None:
            self.host_pool.check_integrity(
                [b for r in self.waiting for b in r.host_block_ids if b is not None]
            )
