"""The arbiter: every cross-model memory decision of a step, in one torch-free place.

Each model's `Scheduler` holds the arbiter and asks it when its KV pool is out of blocks. Memory
comes in this order, cheapest first:
  0. (the pool itself, `KVPool.allocate`, before it asks) its free and unreferenced cached blocks,
     then free arena pages: this model's prefix cache goes before anything of another model;
  1. other models' KV pages that no live request references (free or prefix-cached blocks only;
     the cache entries on them are evicted), the least recently run model's first;
  2. parameter pages, by remapping layers (policy oneiros: the `RemapController` decides whose).
Failing that, the scheduler preempts its own youngest running request: a model preempts its own
requests, as each model's vLLM scheduler did in the paper's system. One exception keeps the engine
live: the oldest running request in the engine, alone in its model and preempted before, may
preempt younger running requests of models not yet planned in the step, the youngest first
(`preempt_others`); otherwise two models could each recompute-preempt their own request at a
block boundary while the other's holds the page, forever. The first time, it preempts itself like
any other request (liveness needs the exception only once a request has lost that contest). The
same preemption frees memory for a model buying back its lent layers (`reclaim_due` in
`engine/remapping.py`), from models out of their turn.
Preempting another model's younger request whenever the asking request is its model's youngest
was tried: in a temporal turn it preempts requests of a model out of its turn, which resume in
their own turn and are preempted again in the next; in the paper's grid it made most of every
policy's preemptions (C1 at 16 req/s: 885 under oneiros against 198 without it) and cost
remapping its TPOT lead.
A request that found no page while a younger request of an already planned model holds pages may
wait (`can_wait`): preempting itself would only hand its pages to a younger request. Under a policy
that does not share memory (static partitions) the arbiter gives nothing.

Nothing here moves bytes: pages change owner in the accounting, and the memory actions go into the
step (`Step.memory`) for the executor to apply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from oneiros.core import Request, RequestStatus, StepPlan

if TYPE_CHECKING:
    from oneiros.engine.remapping import RemapController
    from oneiros.engine.scheduler import Scheduler
    from oneiros.engine.tenancy import MetadataStore


class Arbiter:
    def __init__(
        self,
        schedulers: dict[str, Scheduler],
        store: MetadataStore,
        shares_memory: bool = True,
        remap: RemapController | None = None,
        remap_on_admit: bool = False,
        admit_remap_after_s: float | None = None,
    ) -> None:
        self.schedulers = schedulers
        self.store = store
        self.shares_memory = shares_memory
        self.remap = remap
        self.remap_on_admit = remap_on_admit
        self.admit_remap_after_s = admit_remap_after_s
        self.now = 0.0  # the step being planned
        self.planned: set[str] = set()  # models whose plan for the current step is made
        self.foreign: dict[str, StepPlan] = {}  # preemptions made for another model's request
        # The last step planned nothing while requests waited and none ran (the planner sets it):
        # no page would ever be freed, so admissions may take any model's layers (`make_room`).
        self.stalled = False

    # ---- the step --------------------------------------------------------------------------------
    def begin(self, now: float = 0.0) -> None:
        self.now = now
        self.planned = set()
        self.foreign = {}

    def planned_model(self, model: str) -> None:
        """`model`'s plan for this step is made: its running requests can no longer be preempted
        for another model in this step."""
        self.planned.add(model)

    def take_foreign(self) -> dict[str, StepPlan]:
        """Plans holding this step's preemptions made on behalf of another model, by victim model."""
        out, self.foreign = self.foreign, {}
        return out

    # ---- decisions -------------------------------------------------------------------------------
    def borrowable_pages(self, model: str) -> int:
        """Pages `model` could get beyond its own and the free ones: other models' KV pages and
        the parameter pages remapping could still free (every model at its cap)."""
        if not self.shares_memory:
            return 0
        pages = sum(s.pool.num_pages for n, s in self.schedulers.items() if n != model)
        if self.remap is not None:
            pages += self.remap.remappable_pages(model)
        return pages

    def idle_pages(self, model: str) -> int:
        """Other models' KV pages that no live request references (`make_room` takes them back
        first), or 0 when memory is not shared."""
        if not self.shares_memory:
            return 0
        return sum(s.pool.num_idle_pages for n, s in self.schedulers.items() if n != model)

    def remaps_for(self, req: Request) -> bool:
        """Admitting `req` may remap layers of models not running: with remap_on_admit, or when
        it has waited `admit_remap_after_s` since it arrived while there is no backlog (at most
        half as many requests wait as run, every model together). That bounds a wait behind a
        transient shortage (a long prompt at the head of the queue, a burst); under a backlog
        the layers would only grow the batch (longer steps for every running request), not
        shorten the queue (measured on benchmarks/paper.py's grid: with a gate of as many
        waiting as running, the slow links' TPOT rose up to 21%)."""
        if self.remap_on_admit:
            return True
        after = self.admit_remap_after_s
        if after is None or self.now - req.arrival_time < after:
            return False
        waiting = sum(len(s.waiting) for s in self.schedulers.values())
        return 2 * waiting <= sum(len(s.running) for s in self.schedulers.values())

    def admission_pages(self, model: str, req: Request | None = None) -> int:
        """Pages beyond the free ones that an admission of `model` (of `req`) could still draw
        on: other models' idle KV pages, and the parameter pages `make_room` would take for that
        admission (`remaps_for` it, or layers loaded on demand: oversubscribed weights or turn
        reloads; never a running model's layers). The admission watermark counts these: memory
        that comes from layers is not held back from admissions that take layers anyway."""
        pages = self.idle_pages(model)
        if self.remap is None:
            return pages
        if self.remap_on_admit or (req is not None and self.remaps_for(req)):
            pages += self.remap.takeable_pages(admitting=True)
        elif self.remap.loads_on_demand:
            pages += self.remap.takeable_pages(
                admitting=True, idle_only=not self.remap.turn_reload
            )
        return pages

    def growth_pages(self, model: str, tokens: int) -> float:
        """Pages the running requests need to grow by `tokens` tokens each: every model's, when
        memory is shared (they all grow into it), else `model`'s."""
        names = self.schedulers if self.shares_memory else [model]
        return sum(
            self.schedulers[n].growth_blocks(tokens) / self.schedulers[n].pool.blocks_per_page
            for n in names
        )

    def growth_room(self, model: str) -> int:
        """Pages beyond the free ones and `model`'s own that running requests' growth could draw
        on: other models' idle KV pages and the layers remapping would give a running request
        (every donor down to its cap)."""
        pages = self.idle_pages(model)
        if self.remap is not None:
            pages += self.remap.takeable_pages()
        return pages

    def running_anywhere(self) -> bool:
        """A request of some model is running (its blocks will be freed some day)."""
        return any(s.running for s in self.schedulers.values())

    def make_room(self, requester: str, blocks: int, req: Request) -> bool:
        """Free arena pages for `blocks` more blocks of `requester`'s request `req`. True if any
        page was freed."""
        if not self.shares_memory:
            return False
        pool = self.schedulers[requester].pool
        need = pool.pages_needed(blocks) - pool.arena.num_free
        freed = 0
        for name in reversed(self.store.mru_order()):
            if freed >= need:
                break
            if name != requester:
                freed += len(self.schedulers[name].pool.shrink(need - freed))
        if freed < need and self.remap is not None:
            # A request being admitted takes parameter pages only when `remaps_for` it (with
            # remap_on_admit, or after it waited long), so that admission rarely adds copies to a
            # pass; a running one may take what its model can hide. When nothing runs anywhere no
            # page would ever be freed, so admission may take then too (else the engine would
            # wait forever).
            admitting = req.status is not RequestStatus.RUNNING
            idle = not self.running_anywhere()
            # Stuck: with oversubscribed weights as soon as nothing runs (a model off the device
            # may need another's layers to run at all), else once a whole step found nothing to
            # run (models with work lend down to their fraction cap then: see `_donor`).
            stuck = idle and (self.stalled or self.remap.oversubscribed)
            if not admitting or idle or self.remaps_for(req):
                took = self.remap.take(requester, need - freed, admitting=admitting, stuck=stuck)
                if took and admitting and not idle and not self.remap_on_admit:
                    self.remap.note(requester, "admit_remaps")  # past the bound on its wait
                freed += took
            elif self.remap.loads_on_demand:
                # Oversubscribed, the layers of models without work are the free memory, and with
                # turn reloads those of models whose turn is not next: an admission takes them
                # (no pass of any running model gets a copy more).
                freed += self.remap.take(
                    requester, need - freed, admitting=True, idle_only=not self.remap.turn_reload
                )
        if freed < need and self._oldest_alone(requester, req):
            freed += self.preempt_others(requester, need - freed)
        return freed > 0

    def _oldest_alone(self, requester: str, req: Request) -> bool:
        """`req` runs, alone in its model, has been preempted before, and no running request of
        any model is older."""
        mine = self.schedulers[requester].running
        if req.status is not RequestStatus.RUNNING or not req.num_preemptions or mine != [req]:
            return False
        return all(
            r.age_key > req.age_key
            for name, s in self.schedulers.items() if name != requester for r in s.running
        )

    def can_wait(self, requester: str, req: Request) -> bool:
        """`req`, the youngest running request of `requester`, found no page: may it keep its
        blocks and sit this step out? Yes when a younger running request of a model already
        planned this step holds pages that could not be taken."""
        if not self.shares_memory:
            return False
        return any(
            r.age_key > req.age_key
            for name in self.planned if name != requester
            for r in self.schedulers[name].running
        )

    def preempt_others(self, requester: str, pages: int) -> int:
        """Preempt running requests of models other than `requester` not yet planned in this step,
        youngest first, until `pages` pages are free; returns the pages freed. For the engine's
        oldest running request (`_oldest_alone`), and for a model reclaiming its lent layers."""
        others = [s for n, s in self.schedulers.items() if n != requester and n not in self.planned]
        freed = 0
        while freed < pages:
            candidates = [(r.age_key, k, r) for k, s in enumerate(others) for r in s.running]
            if not candidates:
                break
            _, k, victim = max(candidates, key=lambda c: (c[0], c[1]))
            sched = others[k]
            plan = self.foreign.get(sched.model)
            if plan is None:
                plan = self.foreign[sched.model] = StepPlan(sched.model)
            sched.preempt(victim, plan)
            freed += len(sched.pool.shrink(pages - freed))
        return freed
