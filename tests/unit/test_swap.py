"""Swap preemption: the host block pool, and schedulers of two models swapping KV on one arena.

The random test runs the schedulers the way the engine does (temporal: one model per step, the first
in round robin with something to run; spatial: every model each step, all plans scheduled before any
runs) with a simulated executor that moves *labels* instead of tensors: every KV slot written by a
forward pass holds (request, position, token), swap-outs copy device blocks to host blocks before
swap-ins copy back, in the executor's order. Before a sequence runs, every token it attends to must
be found, with the right label, in the blocks of its block table: a swap pairing that is wrong, a
host block used twice or a device block handed to someone else before its swap-out copied it all
show up as a wrong label.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from oneiros.core import InvalidRequestError, Request, RequestStatus, StepPlan
from oneiros.engine.arbiter import Arbiter
from oneiros.engine.scheduler import Scheduler
from oneiros.engine.tenancy import MetadataStore
from oneiros.memory.arena import Owner, PageArena
from oneiros.memory.swap import HostBlockPool
from tests.factories import commit, make_request, make_scheduler, step


# ---- HostBlockPool -------------------------------------------------------------------------------
def test_host_pool_hands_out_lowest_blocks_first():
    pool = HostBlockPool("m", 6, 1024)
    assert pool.num_free == 6 and pool.block_bytes == 1024 and pool.model == "m"
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]
    assert pool.num_free == 1
    pool.check_integrity([0, 1, 2, 3, 4])


def test_host_pool_shortage_returns_none_and_changes_nothing():
    pool = HostBlockPool("m", 3, 1024)
    a = pool.allocate(2)
    assert pool.allocate(2) is None
    assert pool.num_free == 1
    pool.check_integrity(a)
    assert pool.allocate(1) == [2]
    assert pool.allocate(1) is None
    assert pool.allocate(0) == []


def test_empty_host_pool():
    pool = HostBlockPool("m", 0, 1024)
    assert pool.num_free == 0
    assert pool.allocate(1) is None
    assert pool.allocate(0) == []
    pool.check_integrity([])


def test_host_pool_free_and_reuse():
    pool = HostBlockPool("m", 4, 1024)
    a, b = pool.allocate(2), pool.allocate(2)
    pool.free(a)
    assert pool.num_free == 2
    pool.check_integrity(b)
    again = pool.allocate(2)
    assert sorted(again) == sorted(a)
    pool.free(again + b)
    assert pool.num_free == 4
    pool.check_integrity([])


def test_host_pool_double_free_is_refused_and_changes_nothing():
    pool = HostBlockPool("m", 4, 1024)
    a = pool.allocate(3)
    pool.free([a[0]])
    with pytest.raises(ValueError, match="freed twice"):
        pool.free([a[0]])
    with pytest.raises(ValueError, match="freed twice"):
        pool.free([a[1], a[1]])  # twice in one call
    with pytest.raises(ValueError, match="freed twice"):
        pool.free([a[1], a[0]])  # one good, one already free: all or nothing
    assert pool.num_free == 2
    pool.check_integrity(a[1:])


def test_host_pool_refuses_blocks_outside_the_space():
    pool = HostBlockPool("m", 2, 1024)
    pool.allocate(2)
    for bad in ([2], [-1], [100]):
        with pytest.raises(ValueError, match="outside the swap space"):
            pool.free(bad)
    assert pool.num_free == 0
    pool.check_integrity([0, 1])


def test_host_pool_integrity_catches_leaks_and_inventions():
    pool = HostBlockPool("m", 3, 1024)
    held = pool.allocate(2)
    with pytest.raises(AssertionError, match="leaked"):
        pool.check_integrity(held[:1])  # a block nobody holds and not free: leaked
    with pytest.raises(AssertionError, match="leaked"):
        pool.check_integrity(held + [2])  # a held block that is also free
    pool.check_integrity(held)


# ---- one scheduler, swap preemption --------------------------------------------------------------
def _swap_scheduler(host_blocks: int, **kw) -> Scheduler:
    kw.setdefault("block_bytes", 1024)
    return make_scheduler(
        preemption="swap", host_pool=HostBlockPool("default", host_blocks, kw["block_bytes"]), **kw
    )


def test_swap_preemption_needs_a_host_pool():
    with pytest.raises(ValueError, match="host block pool"):
        make_scheduler(preemption="swap")
    with pytest.raises(ValueError, match="preemption must be"):
        make_scheduler(preemption="discard")


def test_swap_out_keeps_computed_tokens_and_swap_in_restores_them():
    # One page of 4 blocks x 2 tokens; two requests of 3 prompt tokens each fill it.
    sched = _swap_scheduler(8, num_pages=1, block_size=2, max_num_seqs=2)
    old, young = make_request(3, max_tokens=6), make_request(3, max_tokens=6)
    sched.add(old)
    sched.add(young)
    step(sched)
    step(sched)  # 4 tokens each: 2 blocks each, the pool is full
    young_blocks = list(young.block_ids)
    computed = young.num_computed_tokens
    plan = sched.schedule()  # old needs a 3rd block: young is swapped out
    assert plan.preempted == [young]
    assert plan.swap_out == list(zip(young_blocks, young.host_block_ids, strict=True))
    assert young.host_block_ids == [0, 1] and young.block_ids == []
    assert young.num_computed_tokens == computed  # nothing to recompute
    assert young.status is RequestStatus.PREEMPTED and list(sched.waiting) == [young]
    assert len(plan.swap_out) == 2 and plan.recomputed_tokens == 0
    assert len(plan.preempted) == 1 and sched.host_pool.num_free == 6
    sched.check_integrity()
    commit(sched, plan)
    # Run old to the end; young comes back with a swap-in of exactly its host blocks.
    while True:
        plan = sched.schedule()
        sched.check_integrity()
        if plan.swap_in:
            break
        commit(sched, plan)
    assert old.finished
    assert plan.swap_in == list(zip([0, 1], young.block_ids, strict=False))
    s = next(s for s in plan.seqs if s.request is young)
    assert s.start == computed and s.num_new_tokens == young.num_tokens - computed
    commit(sched, plan)
    assert young.host_block_ids == [] and sched.host_pool.num_free == 8
    assert len(plan.swap_in) == 2  # every block swapped out came back
    while sched.has_work:
        step(sched)
        sched.check_integrity()
    assert old.status is young.status is RequestStatus.FINISHED_LENGTH
    assert len(young.output_token_ids) == 6 and sched.pool.num_used == 0


def test_swap_falls_back_to_recompute_when_the_host_pool_is_full():
    sched = _swap_scheduler(1, num_pages=1, block_size=2, max_num_seqs=2)
    old, young = make_request(3, max_tokens=6), make_request(3, max_tokens=6)
    sched.add(old)
    sched.add(young)
    step(sched)
    step(sched)
    plan = sched.schedule()
    assert plan.preempted == [young]
    assert plan.swap_out == [] and young.host_block_ids == []  # 2 blocks, 1 host block: recompute
    assert young.num_computed_tokens == 0
    assert plan.recomputed_tokens == 4 and plan.swap_out == []
    assert sched.host_pool.num_free == 1
    sched.check_integrity()


def test_aborting_a_swapped_out_request_frees_its_host_blocks():
    sched = _swap_scheduler(8, num_pages=1, block_size=2, max_num_seqs=2)
    old, young = make_request(3, max_tokens=6), make_request(3, max_tokens=6)
    sched.add(old)
    sched.add(young)
    while not young.host_block_ids:
        step(sched)
    assert sched.host_pool.num_free == 6
    assert sched.abort(young.request_id) is young
    assert young.host_block_ids == [] and sched.host_pool.num_free == 8
    assert young.status is RequestStatus.FINISHED_ABORTED
    sched.check_integrity()


def test_scheduler_integrity_checks_the_host_pool():
    sched = _swap_scheduler(4, num_pages=1, block_size=2, max_num_seqs=2)
    leaked = sched.host_pool.allocate(1)
    with pytest.raises(AssertionError, match="host blocks leaked"):
        sched.check_integrity()
    sched.host_pool.free(leaked)
    sched.check_integrity()


# ---- two models, random arrivals and aborts ------------------------------------------------------
class SimKV:
    """Labels instead of tensors. Device slots are keyed by the arena's global block id (page x
    blocks_per_page + slot, the same geometry for both models) so that a page that changes owner
    keeps what was written in it; host slots are keyed by (model, host block)."""

    def __init__(self, block_size: int) -> None:
        self.bs = block_size
        self.dev: dict[tuple[int, int], tuple] = {}
        self.host: dict[tuple[str, int, int], tuple] = {}

    def execute(self, sched: Scheduler, plan: StepPlan) -> None:
        bs = self.bs
        for d, h in plan.swap_out:  # swap-outs first, as the executor does
            for k in range(bs):
                self.host[(plan.model, h, k)] = self.dev.get((d, k))
        for h, d in plan.swap_in:
            for k in range(bs):
                self.dev[(d, k)] = self.host.get((plan.model, h, k))
        for s in plan.seqs:
            r = s.request
            toks = r.all_token_ids
            for j in range(s.start):  # everything this sequence attends to besides its new tokens
                got = self.dev.get((r.block_ids[j // bs], j % bs))
                assert got == (r.request_id, j, toks[j]), (
                    f"{plan.model}: {r.request_id} position {j} reads {got}"
                )
            for j in range(s.start, s.context_len):
                self.dev[(r.block_ids[j // bs], j % bs)] = (r.request_id, j, toks[j])


def check_all(scheds: list[Scheduler]) -> None:
    scheds[0].pool.arena.check_integrity()
    for s in scheds:
        s.check_integrity()  # host pool included
        s.pool.check_integrity()


request_spec = st.tuples(
    st.integers(0, 1),  # model
    st.one_of(st.integers(1, 6), st.integers(1, 6), st.integers(0, 30)),  # prompt length
    st.integers(1, 12),  # max_tokens
    st.one_of(st.just(0), st.integers(0, 15)),  # arrival step
    st.one_of(st.none(), st.none(), st.none(), st.integers(0, 40)),  # abort at step
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(request_spec, min_size=1, max_size=12),
    num_pages=st.integers(1, 5),
    blocks_per_page=st.sampled_from([1, 2, 4]),
    block_size=st.sampled_from([1, 2, 4]),
    host_blocks=st.tuples(st.integers(0, 12), st.integers(0, 12)),
    max_num_seqs=st.integers(1, 4),
    budget=st.integers(1, 16),
    spatial=st.booleans(),
)
# Regression: the older request of b and the younger of a each held one of the two pages and
# needed the other; b, planned after a, could not take a's and preempted itself, a did the same
# when its turn came, and neither ever finished (recompute lost their progress every time).
@example(
    specs=[(0, 1, 3, 0, None), (0, 1, 2, 0, None), (1, 1, 3, 0, None), (0, 1, 3, 0, None)],
    num_pages=2, blocks_per_page=1, block_size=2, host_blocks=(0, 0), max_num_seqs=1, budget=1,
    spatial=True,
)
def test_two_models_swapping_on_one_arena(
    specs, num_pages, blocks_per_page, block_size, host_blocks, max_num_seqs, budget, spatial
):
    arena = PageArena(num_pages + 1, 4096)
    arena.alloc_run(1, Owner.slab("w", 0))  # a weight page no pool can take
    block_bytes = 4096 // blocks_per_page
    scheds = [
        make_scheduler(
            arena=arena,
            model=m,
            block_bytes=block_bytes,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=64,
            preemption="swap",
            host_pool=HostBlockPool(m, hb, block_bytes),
        )
        for m, hb in zip(("a", "b"), host_blocks, strict=True)
    ]
    a, b = scheds
    # The engine's arbiter: idle KV pages of the other model; a model preempts its own requests,
    # but the engine's oldest request, alone in its model and preempted before, may preempt a
    # younger one of a model not yet planned in this step; an older request that finds nothing
    # may wait.
    arbiter = Arbiter({"a": a, "b": b}, MetadataStore(["a", "b"]))
    a.arbiter = b.arbiter = arbiter
    capacity = num_pages * blocks_per_page
    assert a.max_blocks() == b.max_blocks() == capacity

    kv = SimKV(block_size)
    reqs = [(make_request(p, max_tokens=mt, model="ab"[m]), m, t, ab) for m, p, mt, t, ab in specs]
    accepted: list[Request] = []
    # host block -> request holding it, per model: the ground truth the plans must agree with
    host_owner: list[dict[int, Request]] = [{}, {}]
    rr = 0  # round robin position (temporal)
    idle_steps = 0  # consecutive steps with work but no plan (a model may free pages for the next)
    for stepno in range(2000):
        for req, m, t, _ in reqs:
            if t == stepno:
                n = req.num_prompt_tokens
                try:
                    scheds[m].add(req)
                    accepted.append(req)
                except InvalidRequestError:
                    event("rejected")
                    assert n == 0 or n >= 64 or -(-(n + 1) // block_size) > capacity
        for req, m, _, ab in reqs:
            if ab == stepno and req in accepted and not req.finished:
                held = list(req.host_block_ids)
                free_before = scheds[m].host_pool.num_free
                assert scheds[m].abort(req.request_id) is req
                event("abort")
                assert req.host_block_ids == [] and req.block_ids == []
                assert scheds[m].host_pool.num_free == free_before + len(held)
                for h in held:
                    assert host_owner[m].pop(h) is req
        check_all(scheds)
        if stepno > 15 and all(r.finished for r in accepted):
            break

        # Schedule: spatial, every model; temporal, the first with a non-empty plan in round robin.
        order = [(rr + k) % 2 for k in range(2)]
        arbiter.begin()
        foreign = arbiter.foreign  # this step's preemptions made for the other model, by victim
        seen: set[int] = set()  # foreign victims already checked
        plans: list[tuple[int, StepPlan]] = []
        for m in order:
            sched = scheds[m]
            if not sched.has_work:
                continue
            rr = (m + 1) % 2
            before_blocks = {id(r): list(r.block_ids) for r in sched.running}
            before_host = {id(r): list(r.host_block_ids) for r in sched.waiting}
            free_host = sched.host_pool.num_free
            plan = sched.schedule()
            check_all(scheds)
            for fm, f in foreign.items():  # the other model's requests this one preempted
                k = "ab".index(fm)
                fresh = [r for r in f.preempted if id(r) not in seen]
                seen.update(id(r) for r in fresh)
                for r in fresh:
                    assert r.block_ids == [] and r.status is RequestStatus.PREEMPTED
                    for h in r.host_block_ids:
                        assert h not in host_owner[k], f"host block {h} used twice"
                        host_owner[k][h] = r
                assert {h for r in fresh for h in r.host_block_ids} <= {h for _, h in f.swap_out}
            for r in sched.finished_in_schedule:
                assert r.stop_reason == "kv_capacity"
                assert sched.pool.blocks_needed(r.num_tokens) > capacity
                event("finished for capacity")
            sched.finished_in_schedule.clear()

            # swap_out: exactly the preempted requests that got host blocks, block for block.
            expect_out = []
            for r in plan.preempted:
                assert r.block_ids == [] and r.status is RequestStatus.PREEMPTED
                if r.host_block_ids:
                    event("swap out")
                    old = before_blocks[id(r)]
                    assert len(r.host_block_ids) == len(old) == sched.pool.blocks_needed(
                        r.num_computed_tokens
                    )
                    expect_out += list(zip(old, r.host_block_ids, strict=True))
                    for h in r.host_block_ids:
                        assert h not in host_owner[m], f"host block {h} used twice"
                        host_owner[m][h] = r
                else:
                    event("swap fell back to recompute")
                    assert r.num_computed_tokens == 0
            assert plan.swap_out == expect_out

            # swap_in: only blocks that were swapped out, back to the same request, in order.
            expect_in = []
            for s in plan.seqs:
                r = s.request
                if before_host.get(id(r)):
                    event("swap in")
                    held = before_host[id(r)]
                    assert s.start == r.num_computed_tokens
                    assert len(held) == sched.pool.blocks_needed(s.start)
                    expect_in += list(zip(held, r.block_ids, strict=False))  # may have grown
                    for h in held:
                        assert host_owner[m].pop(h) is r, f"swap-in of host block {h} not r's"
                    assert r.host_block_ids == []
            assert plan.swap_in == expect_in
            assert not {h for h, _ in plan.swap_in} & {h for _, h in plan.swap_out}
            assert sched.host_pool.num_free == free_host - len(plan.swap_out) + len(plan.swap_in)
            held_now = {h for r in sched.waiting for h in r.host_block_ids}
            assert held_now == set(host_owner[m]), "host blocks held != blocks swapped out"

            arbiter.planned_model(sched.model)
            if not plan.empty:
                plans.append((m, plan))
                if not spatial:
                    break
        if spatial and len(plans) > 1:
            event("two models in one step")
        for fm, f in arbiter.take_foreign().items():  # swap-outs made for the other model first
            for _ in f.preempted:
                event("preempted for another model")
            if f.swap_out:
                kv.execute(scheds["ab".index(fm)], f)
        if not plans:
            idle_steps += any(s.has_work for s in scheds)
            assert idle_steps < 3, "stalled with work left"
            continue
        idle_steps = 0
        for m, plan in plans:  # run in order, after every model was scheduled
            kv.execute(scheds[m], plan)
            commit(scheds[m], plan)
        check_all(scheds)
    else:
        pytest.fail("requests did not finish in 2000 steps")

    for s in scheds:
        assert s.pool.num_used == 0 and not s.running and not s.waiting
        assert s.host_pool.num_free == s.host_pool.num_blocks
    assert host_owner == [{}, {}]
    for r in accepted:
        assert r.finished and r.block_ids == [] and r.host_block_ids == []
        if r.status is RequestStatus.FINISHED_LENGTH and r.stop_reason is None:
            assert len(r.output_token_ids) == r.params.max_tokens or r.num_tokens >= 64
