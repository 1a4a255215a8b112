"""Scheduler without tensors: steps are simulated by hand (schedule -> pretend commit)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from oneiros.core import InvalidRequestError, RequestStatus
from oneiros.engine.arbiter import Arbiter
from oneiros.engine.scheduler import Scheduler
from oneiros.engine.tenancy import MetadataStore
from oneiros.memory.arena import Owner, PageArena
from tests.factories import SimStats, commit, make_request, make_scheduler, step


def check_all(sched: Scheduler) -> None:
    sched.check_integrity()
    sched.pool.check_integrity()
    sched.pool.arena.check_integrity()


def run_until_done(sched: Scheduler, max_steps: int = 2000) -> SimStats:
    stats = SimStats()
    while sched.has_work:
        assert stats.steps < max_steps, "the scheduler did not drain its requests"
        step(sched, stats)
        check_all(sched)
    return stats


# ---- validate / add -----------------------------------------------------------------------------
def test_validate_rejects_an_empty_prompt():
    sched = make_scheduler()
    with pytest.raises(InvalidRequestError, match="empty") as e:
        sched.add(make_request(prompt_token_ids=[]))
    assert e.value.param == "prompt"
    assert not sched.has_work


def test_validate_rejects_prompts_over_the_context_window():
    sched = make_scheduler(num_pages=64, max_model_len=32)
    with pytest.raises(InvalidRequestError, match="context window 32") as e:
        sched.add(make_request(32))
    assert e.value.param == "prompt"
    assert "32 tokens" in str(e.value)
    with pytest.raises(InvalidRequestError):
        sched.add(make_request(100))
    sched.add(make_request(31))  # one slot left for the first output token
    assert len(sched.waiting) == 1


def test_validate_rejects_prompts_that_can_never_fit():
    # 2 pages x 4 blocks x 4 tokens = 32 tokens of KV; a prompt needs room for itself + 1 token.
    sched = make_scheduler(num_pages=2, block_bytes=1024, block_size=4, max_model_len=1000)
    assert sched.max_blocks() == 8
    sched.add(make_request(31))  # 32 tokens -> 8 blocks: fits exactly
    with pytest.raises(InvalidRequestError, match="KV blocks") as e:
        sched.add(make_request(32))  # 33 tokens -> 9 blocks
    assert e.value.param == "prompt"
    assert "9" in str(e.value) and "8" in str(e.value)
    assert len(sched.waiting) == 1


def test_validate_counts_pages_other_owners_hold():
    arena = PageArena(4, 4096)
    arena.alloc(3, Owner.slab("w", 0))
    sched = make_scheduler(arena=arena, block_bytes=1024, block_size=4)
    assert sched.max_blocks() == 4
    with pytest.raises(InvalidRequestError, match="KV blocks"):
        sched.add(make_request(16))
    sched.add(make_request(15))


# ---- basic flow ---------------------------------------------------------------------------------
def test_chunked_prefill_then_decode():
    sched = make_scheduler(num_pages=8, max_num_batched_tokens=4, block_size=4)
    req = make_request(10, max_tokens=3)
    sched.add(req)
    chunks = []
    while sched.has_work:
        plan = sched.schedule()
        assert len(plan.seqs) == 1
        s = plan.seqs[0]
        chunks.append((s.start, s.num_new_tokens, s.samples))  # before commit appends a token
        commit(sched, plan)
        check_all(sched)
    assert chunks == [(0, 4, False), (4, 4, False), (8, 2, True), (10, 1, True), (11, 1, True)]
    assert req.status is RequestStatus.FINISHED_LENGTH
    assert len(req.output_token_ids) == 3
    assert req.block_ids == [] and sched.pool.num_used == 0


def test_budget_and_max_num_seqs_are_respected():
    sched = make_scheduler(num_pages=64, max_num_seqs=3, max_num_batched_tokens=10)
    reqs = [make_request(7, max_tokens=5) for _ in range(8)]
    for r in reqs:
        sched.add(r)
    while sched.has_work:
        plan, _ = step(sched)
        check_all(sched)
        assert plan.num_tokens <= 10
        assert len(plan.seqs) <= 3 and len(sched.running) <= 3
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in reqs)
    assert all(len(r.output_token_ids) == 5 for r in reqs)


def test_running_requests_go_first_and_admission_is_fifo():
    sched = make_scheduler(num_pages=64, max_num_seqs=2, max_num_batched_tokens=100)
    a, b, c = (make_request(4, max_tokens=3) for _ in range(3))
    for r in (a, b, c):
        sched.add(r)
    plan, _ = step(sched)
    assert [s.request for s in plan.seqs] == [a, b]
    assert list(sched.waiting) == [c] and not sched.short_of_memory  # c waits for a slot
    plan, _ = step(sched)
    assert [s.request for s in plan.seqs] == [a, b]
    assert all(s.num_new_tokens == 1 for s in plan.seqs)


def test_admission_leaves_the_watermark_free_while_requests_run():
    # 4 pages x 4 blocks of 4 tokens = 16 blocks; the watermark keeps 3 of them free.
    sched = make_scheduler(num_pages=4, max_num_batched_tokens=256)
    sched.watermark_blocks = 3
    first, second = make_request(4 * 7 - 1, max_tokens=2), make_request(4 * 7 - 1, max_tokens=2)
    sched.add(first)
    sched.add(second)
    plan, _ = step(sched)
    # Nothing ran before: the first takes its 7 blocks; the second would leave 2 < 3 free.
    assert [s.request for s in plan.seqs] == [first] and list(sched.waiting) == [second]
    assert not second.block_ids and second.num_computed_tokens == 0
    assert sched.short_of_memory  # the second waits for KV cache
    check_all(sched)
    run_until_done(sched)
    assert not sched.short_of_memory
    assert second.status is RequestStatus.FINISHED_LENGTH and sched.pool.num_used == 0


@pytest.mark.parametrize(
    "reserve, first_max, admitted", [(0, 20, True), (8, 20, True), (12, 20, False), (12, 2, True)]
)
def test_admission_leaves_room_for_the_running_requests_to_grow(reserve, first_max, admitted):
    # 16 blocks of 4 tokens. The first takes 9 blocks (35 tokens), the second 5: 2 are left.
    # The first grows by 8 tokens into 2 more blocks (43 tokens: 11), by 12 into 3 (47: 12);
    # with max_tokens 2 it never needs more than 1 (37 tokens: 10).
    sched = make_scheduler(num_pages=4, max_num_batched_tokens=256)
    sched.growth_reserve_tokens = reserve
    first = make_request(4 * 9 - 1, max_tokens=first_max)
    second = make_request(4 * 5 - 1, max_tokens=2)
    sched.add(first)
    sched.add(second)
    plan, _ = step(sched)
    ran = [s.request for s in plan.seqs]
    assert ran == ([first, second] if admitted else [first])
    assert bool(second.block_ids) == admitted and list(sched.waiting) == ([] if admitted else [second])
    check_all(sched)
    run_until_done(sched)
    assert second.status is RequestStatus.FINISHED_LENGTH and sched.pool.num_used == 0


def test_without_running_requests_the_watermark_does_not_block_admission():
    sched = make_scheduler(num_pages=4, max_num_batched_tokens=256)
    sched.watermark_blocks = 3
    big = make_request(4 * 15 - 1, max_tokens=1)  # 15 of 16 blocks: below the watermark
    sched.add(big)
    plan, _ = step(sched)
    assert [s.request for s in plan.seqs] == [big]  # else it would wait forever
    check_all(sched)


# ---- preemption ---------------------------------------------------------------------------------
def test_preemption_frees_blocks_and_requeues_the_youngest_at_the_front():
    # One page of 4 blocks x 2 tokens = 8 tokens of KV for everybody.
    sched = make_scheduler(
        num_pages=1, block_bytes=1024, block_size=2, max_num_seqs=2, max_num_batched_tokens=64
    )
    old = make_request(3, max_tokens=6)
    young = make_request(3, max_tokens=6)
    later = make_request(2, max_tokens=1)
    for r in (old, young, later):
        sched.add(r)
    plan, _ = step(sched)  # old and young admitted: 2 blocks each, the pool is full
    assert [s.request for s in plan.seqs] == [old, young]
    assert sched.pool.num_used == 4 and list(sched.waiting) == [later]
    plan, _ = step(sched)  # 4th token fits in the 2nd blocks
    assert plan.preempted == []
    young_blocks = list(young.block_ids)
    young_out = list(young.output_token_ids)
    plan = sched.schedule()  # old needs a 3rd block: young goes
    assert plan.preempted == [young]
    assert [s.request for s in plan.seqs] == [old]
    assert young.block_ids == [] and young.num_computed_tokens == 0
    assert young.status is RequestStatus.PREEMPTED and young.num_preemptions == 1
    assert plan.recomputed_tokens == 4 and plan.swap_out == []  # its prompt + 1 token
    assert list(sched.waiting) == [young, later]  # in front of the request that waited before it
    assert young.output_token_ids == young_out  # its tokens are kept, to be prefilled again
    assert sched.pool.num_used == len(old.block_ids) == 3
    assert set(old.block_ids) & set(young_blocks)  # the freed blocks were reused
    check_all(sched)
    sched.finished_in_schedule.clear()
    commit(sched, plan)
    run_until_done(sched)
    assert old.status is young.status is later.status is RequestStatus.FINISHED_LENGTH
    assert len(young.output_token_ids) == 6
    assert sched.pool.num_used == 0


def test_readmitted_request_prefills_prompt_and_outputs():
    sched = make_scheduler(num_pages=1, block_bytes=1024, block_size=2, max_num_seqs=2)
    old, young = make_request(3, max_tokens=6), make_request(3, max_tokens=6)
    sched.add(old)
    sched.add(young)
    while young.num_preemptions == 0:
        step(sched)
    n = young.num_tokens
    while True:
        plan = sched.schedule()
        seqs = [s for s in plan.seqs if s.request is young]
        if seqs:
            break
        commit(sched, plan)
    assert seqs[0].start == 0 and seqs[0].num_new_tokens == n and seqs[0].samples
    assert len(young.block_ids) == sched.pool.blocks_needed(n)


def test_a_request_that_outgrows_the_pool_alone_is_finished_for_capacity():
    sched = make_scheduler(num_pages=1, block_bytes=2048, block_size=2, max_model_len=100)
    req = make_request(3, max_tokens=50)  # the pool holds 4 tokens
    sched.add(req)
    stats = run_until_done(sched)
    assert stats.finished == [req]
    assert req.status is RequestStatus.FINISHED_LENGTH and req.stop_reason == "kv_capacity"
    assert req.num_tokens == 5  # tokens 0..3 computed, the 5th sampled, no room to compute it
    assert req.block_ids == [] and sched.pool.num_used == 0
    assert sched.finished_in_schedule == []


# ---- abort --------------------------------------------------------------------------------------
def test_abort_frees_blocks():
    sched = make_scheduler(num_pages=8, max_num_seqs=1)
    run, wait = make_request(9, max_tokens=10), make_request(5)
    sched.add(run)
    sched.add(wait)
    step(sched)
    assert run.block_ids and sched.pool.num_used == len(run.block_ids)
    assert sched.abort(run.request_id) is run
    assert run.status is RequestStatus.FINISHED_ABORTED and run.status.finish_reason == "abort"
    assert run.block_ids == [] and sched.pool.num_used == 0
    assert run not in sched.running
    check_all(sched)
    assert sched.abort(wait.request_id) is wait
    assert wait.status is RequestStatus.FINISHED_ABORTED and not sched.has_work
    assert sched.abort(wait.request_id) is None
    assert sched.abort("no-such-request") is None
    check_all(sched)


# ---- random mixes -------------------------------------------------------------------------------
request_spec = st.tuples(
    # prompt length: mostly short; 0 and long ones must be rejected
    st.one_of(st.integers(1, 8), st.integers(1, 8), st.integers(0, 40)),
    st.integers(1, 20),  # max_tokens
    st.one_of(st.just(0), st.integers(0, 12)),  # arrival step
    st.one_of(st.none(), st.none(), st.integers(0, 30)),  # abort at step
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(request_spec, min_size=1, max_size=10),
    num_pages=st.integers(1, 3),
    blocks_per_page=st.integers(1, 4),
    block_size=st.sampled_from([1, 2, 4]),
    weight_pages=st.integers(0, 2),
    max_num_seqs=st.integers(1, 5),
    budget=st.integers(1, 24),
    max_model_len=st.integers(2, 64),
)
def test_random_request_mixes(
    specs, num_pages, blocks_per_page, block_size, weight_pages, max_num_seqs, budget,
    max_model_len,
):
    arena = PageArena(num_pages + weight_pages, 4096)
    arena.alloc_run(weight_pages, Owner.slab("default", 0))  # pages the pool can never get
    sched = make_scheduler(
        arena=arena,
        block_bytes=4096 // blocks_per_page,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
    )
    capacity = sched.max_blocks()
    assert capacity == num_pages * blocks_per_page
    reqs = [(make_request(p, max_tokens=m), t, a) for p, m, t, a in specs]
    accepted = []
    finished: set[int] = set()
    for stepno in range(3000):
        for req, t, _ in reqs:
            if t == stepno:
                n = req.num_prompt_tokens
                bad = n == 0 or n >= max_model_len or -(-(n + 1) // block_size) > capacity
                if bad:
                    event("rejected")
                    with pytest.raises(InvalidRequestError):
                        sched.add(req)
                    assert req not in sched.waiting
                else:
                    sched.add(req)
                    accepted.append(req)
        for req, _, a in reqs:
            if a == stepno and req in accepted and not req.finished:
                had = len(req.block_ids)
                used = sched.pool.num_used
                assert sched.abort(req.request_id) is req
                event("abort")
                assert sched.pool.num_used == used - had
                finished.add(id(req))
        if not sched.has_work and stepno > 12:
            break
        old_running = list(sched.running)
        old_waiting = list(sched.waiting)
        plan = sched.schedule()
        check_all(sched)

        # Budget, batch size, no request twice, blocks cover what runs.
        assert plan.num_tokens <= budget
        assert len(plan.seqs) <= max_num_seqs and len(sched.running) <= max_num_seqs
        assert len({id(s.request) for s in plan.seqs}) == len(plan.seqs)
        for s in plan.seqs:
            r = s.request
            assert s.num_new_tokens >= 1 and s.start == r.num_computed_tokens
            assert s.context_len <= r.num_tokens
            assert r.status is RequestStatus.RUNNING and r in sched.running
            assert len(r.block_ids) == sched.pool.blocks_needed(s.context_len)

        # Preemption: the youngest running requests, blocks freed, requeued at the front.
        k = len(plan.preempted)
        if k:
            event("preemption")
            assert plan.preempted == old_running[::-1][:k]
            assert list(sched.waiting)[:k] == plan.preempted[::-1]
            for r in plan.preempted:
                assert r.block_ids == [] and r.num_computed_tokens == 0
                assert r.status is RequestStatus.PREEMPTED and r not in sched.running
            assert all(s.request in old_running for s in plan.seqs), "admitted while preempting"
        else:
            admitted = [s.request for s in plan.seqs if s.request not in old_running]
            assert admitted == old_waiting[: len(admitted)], "admission is not FIFO"

        # Requests given up for capacity really could not fit even alone.
        for r in sched.finished_in_schedule:
            event("finished for KV capacity")
            assert r.stop_reason == "kv_capacity" and r.block_ids == []
            assert sched.pool.blocks_needed(r.num_tokens) > capacity
            finished.add(id(r))
        if plan.empty:
            assert sched.finished_in_schedule or not sched.has_work, "stalled with work left"
        sched.finished_in_schedule.clear()

        for r in commit(sched, plan):
            assert r.block_ids == [] and r not in sched.running
            finished.add(id(r))
        check_all(sched)
    else:
        pytest.fail("requests did not finish in 3000 steps")

    assert sched.pool.num_used == 0 and not sched.running and not sched.waiting
    for r in accepted:
        assert r.finished and id(r) in finished and r.block_ids == []
        assert len(r.output_token_ids) <= r.params.max_tokens
        if r.status is RequestStatus.FINISHED_LENGTH and r.stop_reason is None:
            assert len(r.output_token_ids) == r.params.max_tokens or r.num_tokens >= max_model_len


# ---- several models on one arena ---------------------------------------------------------------
def _two_models(make_room: bool):
    """Two schedulers on a 2-page arena; with `make_room`, sharing pages through the engine's
    arbiter (idle KV pages of the other model)."""
    arena = PageArena(2, 4096)
    a = make_scheduler(arena=arena, model="a", block_bytes=4096, block_size=4)
    b = make_scheduler(arena=arena, model="b", block_bytes=4096, block_size=4)
    if make_room:
        a.arbiter = b.arbiter = Arbiter({"a": a, "b": b}, MetadataStore(["a", "b"]))
    return arena, a, b


def _round_robin(scheds, max_steps=50):
    for _ in range(max_steps):  # the engine's round-robin over models with work
        live = [s for s in scheds if s.has_work]
        if not live:
            return
        for s in live:
            step(s)
            check_all(s)


def test_idle_kv_pages_of_another_model_are_taken_back():
    arena, a, b = _two_models(make_room=True)
    a.add(make_request(7, max_tokens=1, model="a"))  # two blocks = the whole arena
    other = make_request(2, max_tokens=1, model="b")
    b.add(other)  # accepted: both pages are free right now
    step(a)
    assert a.pool.num_pages == 2 and a.pool.num_used == 0 and arena.num_free == 0
    _round_robin([a, b])
    assert other.status is RequestStatus.FINISHED_LENGTH and len(other.output_token_ids) == 1
    assert b.pool.num_pages == 1 and a.pool.num_pages + arena.num_free == 1


def test_validate_counts_idle_kv_pages_of_other_models():
    _, a, b = _two_models(make_room=True)
    a.add(make_request(7, max_tokens=1, model="a"))
    _round_robin([a])
    assert a.pool.num_pages == 2 and a.pool.num_used == 0  # idle, but holding the whole arena
    req = make_request(2, max_tokens=1, model="b")
    b.add(req)  # raises: "the prompt needs 1 KV blocks but the memory budget holds at most 0"
    _round_robin([a, b])
    assert req.finished
