"""The arbiter and the remapping controller on fakes: torch-free tenants (page accounting, KV pools,
schedulers, metadata) and no model. Every memory decision must show up as data in the step."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from oneiros.core import (
    EvictLayer,
    MoveKV,
    MoveLayer,
    RequestStatus,
    ResizeKV,
    RestoreLayer,
    Step,
    StepPlan,
    StepResult,
)
from oneiros.engine.arbiter import Arbiter
from oneiros.memory.arena import Owner, OwnerKind, PageArena
from oneiros.memory.prefix import chain_hash
from tests.factories import commit, make_planning, make_request, make_tenants

PAGE = 4096  # 4 KV blocks of 4 tokens per page (make_tenants' default block bytes)


def run_step(
    planner, now: float = 0.0, step_s: float = 1e-3, wait_per_layer: float = 0.0
) -> Step:
    """plan -> (no executor: every pass takes step_s, plus `wait_per_layer` x step_s of exposed
    copy time per layer it streams) -> commit each plan -> observe; returns the step
    (reversion planned after it is applied to the accounting already)."""
    step = planner.plan(now)
    results = []
    for plan in step.plans:
        commit(planner.tenants[plan.model].scheduler, plan)
        exposed = wait_per_layer * step_s * len(plan.stream)
        results.append(StepResult([], [], [], elapsed=step_s + exposed, exposed_s=exposed))
    planner.observe(step, results)
    return step


def check(tenants) -> None:
    arena = next(iter(tenants.values())).pool.arena
    arena.check_integrity()
    for t in tenants.values():
        t.pool.check_integrity()
        t.residency.check_integrity()
        t.scheduler.check_integrity()


# ---- idle KV pages first -------------------------------------------------------------------------
def test_idle_kv_pages_of_the_least_recently_run_model_go_first():
    arena = PageArena(3 * 3 + 3, PAGE)  # three models of 1 layer (3 pages each) + 3 free pages
    tenants = make_tenants(arena, {"a": 1, "b": 1, "c": 1})
    store, arbiter, _, _ = make_planning(tenants, remap=False)
    for name in ("b", "c"):
        assert tenants[name].pool.grow(1)  # idle KV pages: no live block
    tenants["b"].state.last_run, tenants["c"].state.last_run = 2.0, 1.0
    arbiter.begin()
    req = make_request(4, model="a")
    assert arbiter.make_room("a", 8, req)  # 2 pages: 1 free, then c's (ran longest ago)
    assert tenants["c"].pool.num_pages == 0 and tenants["b"].pool.num_pages == 1
    blocks = tenants["a"].pool.allocate(8)
    assert blocks is not None
    tenants["a"].pool.free(blocks)
    check(tenants)


def test_a_policy_that_shares_nothing_gives_nothing():
    arena = PageArena(2 * 3 + 2, PAGE)
    tenants = make_tenants(arena, {"a": 1, "b": 1})
    arbiter = Arbiter({n: t.scheduler for n, t in tenants.items()}, None, shares_memory=False)
    tenants["b"].pool.grow(2)
    assert arbiter.borrowable_pages("a") == 0
    assert not arbiter.make_room("a", 4, make_request(4, model="a"))
    assert not arbiter.can_wait("a", make_request(4, model="a"))
    assert tenants["b"].pool.num_pages == 2


# ---- remapping before preemption -----------------------------------------------------------------
def test_remapping_takes_an_inactive_models_layer_before_preempting():
    arena = PageArena(2 * (1 + 4 * 2), PAGE)  # two models of 4 layers, no free page at all
    tenants = make_tenants(arena, {"a": 4, "b": 4})
    _, _, controller, planner = make_planning(tenants)
    a, b = tenants["a"], tenants["b"]
    req = make_request(6, max_tokens=4, model="a")
    a.scheduler.add(req)
    step = run_step(planner)
    assert [p.model for p in step.plans] == ["a"] and step.plans[0].preempted == []
    evicted = [op for op in step.memory if isinstance(op, EvictLayer)]
    # b has no work: it gives first, in its removal order (layer 2 of 4), and the pages it gave
    # became a's KV pages in the same step.
    assert [(op.model, op.layer) for op in evicted] == [("b", 2)]
    assert b.residency.missing_layers == [2]
    grown = [op for op in step.memory if isinstance(op, ResizeKV) and op.grow]
    assert set(grown[0].pages) <= set(evicted[0].pages)
    assert controller.remappable_pages() > 0
    check(tenants)


@pytest.mark.parametrize(("after_s", "backlog"), [(None, False), (1.0, False), (1.0, True)])
def test_a_request_waiting_past_the_bound_is_admitted_with_a_remapped_layer(after_s, backlog):
    """While a request runs, an admission takes no parameter page (a bigger batch, longer
    steps); one that has waited `admit_remap_after_s` since it arrived may (a bound on its TTFT),
    unless more than half as many requests wait as run (a backlog: layers would only grow the
    batch)."""
    arena = PageArena(2 * (1 + 4 * 2), PAGE)  # two models of 4 layers, no free page at all
    tenants = make_tenants(arena, {"a": 4, "b": 4})
    _, _, _, planner = make_planning(tenants, admit_remap_after_s=after_s)
    a, b = tenants["a"], tenants["b"]
    for _ in range(2):
        a.scheduler.add(make_request(3, max_tokens=40, model="a"))
    run_step(planner, now=0.0)  # nothing ran anywhere: admitted with b's layer
    assert len(a.scheduler.running) == 2 and b.residency.missing_layers == [2]
    late = [make_request(40, max_tokens=4, model="a") for _ in range(1 + 2 * backlog)]
    for req in late:  # 10 blocks each: more than the free pages
        req.arrival_time = 0.0
        a.scheduler.add(req)
    step = run_step(planner, now=0.5)
    assert late[0] in a.scheduler.waiting
    assert not any(isinstance(op, EvictLayer) for op in step.memory)
    step = run_step(planner, now=1.5)
    evicted = [(op.model, op.layer) for op in step.memory if isinstance(op, EvictLayer)]
    if after_s is None or backlog:
        assert late[0] in a.scheduler.waiting and evicted == []
    else:
        assert late[0] in a.scheduler.running and evicted and {m for m, _ in evicted} == {"b"}
    assert step.notes["a", "admit_remaps"] == (0 if after_s is None or backlog else 1)
    check(tenants)


def test_the_per_model_cap_keeps_layers_and_preemption_follows():
    arena = PageArena(1 + 3 * 2 + 1, PAGE)  # one model of 3 layers; one free page
    tenants = make_tenants(arena, {"a": 3})
    _, _, controller, planner = make_planning(tenants, max_remap_fraction=0.5)
    a = tenants["a"]
    assert controller.remappable_pages() == 1 * 2  # cap int(0.5 x 3) = 1 layer
    # Each grows to 48 tokens (3 pages); 1 free page + 1 remappable layer (2 pages) hold 3.
    old, young = make_request(8, max_tokens=40, model="a"), make_request(8, max_tokens=40, model="a")
    a.scheduler.add(old)
    a.scheduler.add(young)
    preempted = []
    for k in range(300):
        step = run_step(planner, float(k))
        preempted += [r for p in step.plans + step.idle for r in p.preempted]
        check(tenants)
        assert len(a.residency.missing_layers) <= 1, "the cap was passed"
        if not a.scheduler.has_work:
            break
    assert old.finished and young.finished
    assert young in preempted and old not in preempted  # the youngest goes, never the oldest


# ---- preemption stays within a model --------------------------------------------------------
def test_a_model_preempts_its_own_request_never_another_models():
    """a's request needs a second page while b's younger one holds a page: the arbiter finds
    nothing (no idle KV page, nothing to remap), and a preempts its own youngest, itself, as a
    vLLM scheduler of its own would; b's younger request keeps running. (b's oldest request is
    older than a's, so a's is not the engine's oldest: see the next test.)"""
    arena = PageArena(2 * 3 + 3, PAGE)
    tenants = make_tenants(arena, {"a": 1, "b": 1})
    _, arbiter, _, _ = make_planning(tenants, remap=False)
    a, b = tenants["a"], tenants["b"]
    oldest = make_request(12, model="b")
    old = make_request(16, model="a")  # 4 blocks: one full page; its next token needs a second
    young = make_request(12, model="b")
    for t, r in ((b, oldest), (a, old), (b, young)):
        t.scheduler.add(r)
        commit(t.scheduler, t.scheduler.schedule())  # one page each: the arena is full
    assert arena.num_free == 0 and old.status is young.status is RequestStatus.RUNNING
    arbiter.begin()
    assert not arbiter.make_room("a", 1, old)
    plan = a.scheduler.schedule()
    assert plan.preempted == [old] and old.status is RequestStatus.PREEMPTED
    assert young.status is RequestStatus.RUNNING and young.block_ids
    assert arbiter.take_foreign() == {}
    check(tenants)


def test_the_engines_oldest_request_alone_in_its_model_takes_a_younger_ones_page():
    """The liveness exception: the oldest running request of the engine, alone in its model and
    preempted before, preempts a younger request of a model not yet planned (else two models
    could each lose their request at a block boundary to the other's, forever); the victim's
    preemption is a plan of its own model. Never preempted, it preempts itself, as any other."""
    arena = PageArena(2 * 3 + 2, PAGE)
    tenants = make_tenants(arena, {"a": 1, "b": 1})
    _, arbiter, _, _ = make_planning(tenants, remap=False)
    a, b = tenants["a"], tenants["b"]
    old = make_request(12, model="a")
    young = make_request(12, model="b")
    for t, r in ((a, old), (b, young)):
        t.scheduler.add(r)
        commit(t.scheduler, t.scheduler.schedule())
    assert arena.num_free == 0
    arbiter.begin()
    assert not arbiter.make_room("a", 1, old)
    assert young.status is RequestStatus.RUNNING and not arbiter.take_foreign()
    old.num_preemptions = 1
    assert arbiter.make_room("a", 1, old)
    assert young.status is RequestStatus.PREEMPTED and young.block_ids == []
    foreign = arbiter.take_foreign()
    assert list(foreign) == ["b"] and foreign["b"].preempted == [young]
    assert foreign["b"].recomputed_tokens == 12  # recompute: its computed prompt is lost
    check(tenants)


def test_an_older_request_waits_instead_of_preempting_itself_for_a_planned_younger_one():
    """b's older request needs a second page; a's younger one, already planned this step, holds the
    other. Preempting itself would hand its page to the younger request: it keeps its blocks and
    sits the step out."""
    arena = PageArena(2 * 3 + 2, PAGE)
    tenants = make_tenants(arena, {"a": 1, "b": 1})
    _, arbiter, _, _ = make_planning(tenants, remap=False)
    a, b = tenants["a"], tenants["b"]
    old = make_request(16, model="b")
    young = make_request(12, model="a")  # its next token fits its page
    for t, r in ((b, old), (a, young)):
        t.scheduler.add(r)
        commit(t.scheduler, t.scheduler.schedule())
    assert arena.num_free == 0
    arbiter.begin()
    plan_a = a.scheduler.schedule()
    arbiter.planned_model("a")
    assert [s.request for s in plan_a.seqs] == [young]
    plan_b = b.scheduler.schedule()
    assert plan_b.empty and not plan_b.preempted
    assert old.status is RequestStatus.RUNNING and len(old.block_ids) == 4
    check(tenants)


def test_a_waiting_request_never_preempts_a_running_one():
    arena = PageArena(2 * 3 + 1, PAGE)
    tenants = make_tenants(arena, {"a": 1, "b": 1})
    _, arbiter, _, _ = make_planning(tenants, remap=False)
    b = tenants["b"]
    running = make_request(12, model="b")
    b.scheduler.add(running)
    commit(b.scheduler, b.scheduler.schedule())
    arbiter.begin()
    waiting = make_request(4, model="a")
    waiting.arrival_time = running.arrival_time + 1  # any age: it is not running
    assert not arbiter.make_room("a", 1, waiting)
    assert running.status is RequestStatus.RUNNING


def test_two_models_contending_for_two_pages_both_finish():
    """The two-model livelock once found by the swap property test: one request per model and
    step, one token per step, two KV pages of one block; the older request of b and the younger of
    a each hold one page and need the other. Every request must finish."""
    arena = PageArena(2 * 3 + 2, PAGE)
    tenants = make_tenants(
        arena, {"a": 1, "b": 1}, block_bytes=PAGE, block_size=2, max_num_seqs=1,
        max_num_batched_tokens=1,
    )
    _, _, _, planner = make_planning(tenants, remap=False, sharing="spatial")
    a, b = tenants["a"], tenants["b"]
    reqs = [make_request(1, max_tokens=n, model=m) for m, n in (("a", 3), ("a", 2), ("b", 3))]
    reqs.append(make_request(1, max_tokens=3, model="a"))
    for r in reqs:
        r.arrival_time = 0.0  # equal arrivals: creation order decides which is younger
        tenants[r.model].scheduler.add(r)
    for k in range(100):
        run_step(planner, float(k))
        check(tenants)
        if not (a.scheduler.has_work or b.scheduler.has_work):
            break
    assert all(r.finished for r in reqs), "livelock: the requests never finish"


# ---- the remapping controller --------------------------------------------------------------------
def test_donors_inactive_first_most_recently_run_first_and_lru_reverses_it():
    for order, first in (("mru", "c"), ("lru", "b")):
        arena = PageArena(3 * (1 + 4 * 2), PAGE)
        tenants = make_tenants(arena, {"a": 4, "b": 4, "c": 4})
        _, _, controller, _ = make_planning(tenants, donor_order=order)
        tenants["a"].state.active = True
        tenants["b"].state.last_run, tenants["c"].state.last_run = 1.0, 2.0
        step = Step(0.0)
        controller.begin(step)
        assert controller.take("a", 2) == 2
        assert [(op.model, op.layer) for op in step.memory] == [(first, 2)]


@pytest.mark.parametrize("cap_waiting", [True, False])
def test_a_model_waiting_for_its_turn_lends_only_what_its_passes_hide(cap_waiting):
    arena = PageArena(2 * (1 + 8 * 2), PAGE)
    tenants = make_tenants(arena, {"a": 8, "b": 8})
    _, _, controller, _ = make_planning(
        tenants, h2d_bytes_per_s=2 * PAGE / 1e-3, cap_waiting=cap_waiting)  # 1 ms a layer
    a, b = tenants["a"], tenants["b"]
    b.state.active, b.state.running = True, False  # b has work and waits for its turn
    controller.observe_step("b", 2.5e-3)  # a pass of 2.5 ms hides 2.5 copies: alpha_max = 0
    assert controller.alpha_max(b) == 0
    step = Step(0.0)
    controller.begin(step)
    freed = controller.take("a", 6 * b.residency.pages_per_layer, exclude="a")
    if cap_waiting:  # nothing to lend: its next turn would start by restoring it
        assert freed == 0 and b.residency.missing_layers == []
        assert step.notes["b", "cap_hits"] > 0  # without the cap b would have lent
    else:  # up to the per-model fraction (0.9 of 8 layers: 7)
        assert len(b.residency.missing_layers) == 6 and step.notes["b", "cap_hits"] == 0
    check(tenants)


def test_prepare_restores_what_streaming_cannot_hide_and_notes_the_reactivation():
    arena = PageArena(2 * (1 + 4 * 2) + 4, PAGE)
    tenants = make_tenants(arena, {"a": 4, "b": 4})
    _, _, controller, _ = make_planning(tenants, h2d_bytes_per_s=2 * PAGE / 1e-3)  # 1 ms a layer
    a = tenants["a"]
    step = Step(0.0)
    controller.begin(step)
    for layer in (2, 1, 3):
        controller._evict(a, layer)
    controller.observe_step("a", 2.5e-3)  # a pass of 2.5 ms hides 2.5 copies: alpha_max = 0
    assert controller.alpha_max(a) == 0
    a.state.reactivating = True
    step = Step(1.0)
    controller.begin(step)
    controller.prepare(a)
    restored = [op.layer for op in step.memory if isinstance(op, RestoreLayer)]
    assert restored[0] == 2  # the most crowded first: 1 and 3 are the even layout for alpha 2
    assert sorted(restored) == [1, 2, 3]
    assert a.residency.missing_layers == []
    assert step.notes["a", "reactivations_restored"] == 1 and not a.state.reactivating
    check(tenants)


def _split_free_pages():
    """Two free pages, each alone between live KV pages (held by a running request of "a", with
    a cached block of its prefix on page 4): no slab fits, even after slab compaction."""
    arena = PageArena(1 + 5 * 2, PAGE)  # 0-1 layer 4, 2-3 layer 3, 4-5 layer 2, ..., 10 resident
    tenants = make_tenants(arena, {"a": 5}, prefix_caching=True)
    # No reversion reserve: a restore may use every free page (the running request would
    # otherwise keep them for its KV cache).
    _, _, controller, _ = make_planning(
        tenants, h2d_bytes_per_s=2 * PAGE / 1e-3, revert_reserve=0.0
    )
    a = tenants["a"]
    controller.begin(Step(0.0))
    controller._evict(a, 3)
    controller._evict(a, 2)
    blocks = a.pool.allocate(16)  # the pool grows onto pages 2..5, all of them live
    assert blocks is not None and sorted(a.pool._pages) == [2, 3, 4, 5]
    bpp = a.pool.blocks_per_page
    a.pool.free([x for x in blocks if x // bpp in (3, 5)])
    a.pool.shrink()
    kept = [x for x in blocks if x // bpp in (2, 4)]
    req = make_request(len(kept) * 4, model="a")
    req.block_ids = kept
    req.status = RequestStatus.RUNNING
    a.scheduler.running.append(req)
    a.pool.cache_block(kept[-1], chain_hash(b"p", [1, 2, 3, 4]), b"p", [1, 2, 3, 4])
    assert sorted(p for p in range(arena.num_pages) if arena.owner(p).kind is OwnerKind.FREE) == [
        3, 5
    ]
    controller.observe_step("a", 1e-4)  # streaming hides nothing: restore if at all possible
    return arena, tenants, controller, req


def test_kv_pages_move_so_a_slab_fits_and_block_tables_follow():
    arena, tenants, controller, req = _split_free_pages()
    a = tenants["a"]
    before = list(req.block_ids)
    step = Step(1.0)
    controller.begin(step)
    controller.prepare(a)
    moves = [op for op in step.memory if isinstance(op, MoveKV)]
    assert moves == [MoveKV("a", (4,), (3,))]  # the highest window holding one KV page: 4-5
    restore = next(op for op in step.memory if isinstance(op, RestoreLayer))
    assert step.memory.index(moves[0]) < step.memory.index(restore)
    assert restore.pages == (4, 5)
    bpp = a.pool.blocks_per_page
    assert req.block_ids == [b if b // bpp != 4 else b - bpp for b in before]
    # The prefix-cache index follows its block.
    assert a.pool.cache.lookup([chain_hash(b"p", [1, 2, 3, 4])]) == [req.block_ids[-1]]
    assert step.notes["a", "restore_failures"] == 0
    check(tenants)


def test_a_failed_restore_is_noted_and_backs_off():
    """KV pages may not move once the step holds a swap: the restore fails and backs off."""
    arena, tenants, controller, req = _split_free_pages()
    a = tenants["a"]
    step = Step(1.0)
    controller.begin(step)
    controller.kv_moves_ok = False
    controller.prepare(a)
    assert step.notes["a", "restore_failures"] == 1
    assert not any(isinstance(op, (RestoreLayer, MoveLayer, MoveKV)) for op in step.memory)
    again = Step(2.0)
    controller.begin(again)
    controller.prepare(a)  # backing off: no second attempt at once
    assert again.notes["a", "restore_failures"] == 0
    check(tenants)


def test_compaction_moves_slabs_so_free_pages_join():
    arena = PageArena(1 + 3 * 2 + 1, PAGE)
    tenants = make_tenants(arena, {"a": 3})
    _, _, controller, _ = make_planning(tenants)
    a = tenants["a"]
    step = Step(0.0)
    controller.begin(step)
    controller._evict(a, 1)  # slab pages in the middle go free: 1 + 2 free pages, not contiguous
    free = [p for p in range(arena.num_pages) if arena.owner(p).kind is OwnerKind.FREE]
    assert len(free) == 3 and free != list(range(free[0], free[0] + 3))
    assert controller._compact(3)
    moves = [op for op in step.memory if isinstance(op, MoveLayer)]
    assert moves and all(arena.owner(op.pages[0]) == Owner.slab("a", op.layer) for op in moves)
    assert max(length for _, length in arena.runs()) >= 3
    check(tenants)


def reversions(hold_steps: int, short_of_memory: list[bool]) -> list[list[int]]:
    """One model of 4 layers with layer 2 remapped and free pages for it: the layers reversion
    restores after each step, the model's last admission short of KV cache or not."""
    arena = PageArena(1 + 4 * 2 + 4, PAGE)
    tenants = make_tenants(arena, {"a": 4})
    _, _, controller, _ = make_planning(tenants, revert_hold_steps=hold_steps)
    controller.begin(Step(0.0))
    controller._evict(tenants["a"], 2)
    restored = []
    for k, short in enumerate(short_of_memory):
        tenants["a"].scheduler.short_of_memory = short
        after = Step(float(k))
        controller.begin(after)
        controller.after_step(["a"], step_s=1e-3)
        restored.append([op.layer for op in after.memory if isinstance(op, RestoreLayer)])
    return restored


def test_reversion_waits_for_the_hysteresis_then_restores():
    assert reversions(3, [False] * 4) == [[], [], [2], []]


def test_reversion_holds_while_a_request_waits_for_kv_cache():
    """Memory free for the whole hold, but the last admission stopped for want of KV cache:
    demand has not fallen, nothing is restored; once no request waits for memory it is."""
    assert reversions(1, [True, True, False]) == [[], [], [2]]


@pytest.mark.parametrize("reserve", [0, 8])
@pytest.mark.parametrize("sharing", ["temporal", "spatial"])
def test_planning_random_bursts_keeps_every_invariant(sharing, reserve):
    """Bursts on three models over a tight arena, planned step after step with remapping (and
    with or without the growth reserve): the accounting stays exact, every request finishes."""
    import random

    arena = PageArena(3 * (1 + 4 * 2) + 2, PAGE)
    tenants = make_tenants(arena, {"a": 4, "b": 4, "c": 4}, preemption="swap")
    _, _, _, planner = make_planning(tenants, sharing=sharing)
    for t in tenants.values():
        t.scheduler.growth_reserve_tokens = reserve
    rng = random.Random(7)
    reqs = []
    for k in range(400):
        if k < 150 and rng.random() < 0.3:
            name = rng.choice("abc")
            r = make_request(rng.randint(1, 30), max_tokens=rng.randint(1, 20), model=name)
            r.arrival_time = float(k)
            tenants[name].scheduler.add(r)
            reqs.append(r)
        step = run_step(planner, float(k))
        for op in step.memory:
            assert isinstance(op, (EvictLayer, RestoreLayer, MoveLayer, MoveKV, ResizeKV))
        check(tenants)
        if k > 150 and not any(t.scheduler.has_work for t in tenants.values()):
            break
    assert all(r.finished for r in reqs)


# ---- the growth reserve ----------------------------------------------------------------------------
@pytest.mark.parametrize("remap", [False, True])
def test_the_growth_reserve_counts_other_models_requests_and_the_layers_they_could_take(remap):
    # a, b and c (4 layers of 2 pages each) share an arena with 3 free pages (4 blocks of 4
    # tokens each). b runs a 15-token request (one page). a's 27-token request takes the other
    # two (7 of their 8 blocks): b's request, to grow by 8 tokens, then needs 2 more blocks and
    # finds 1. With remapping, c (no work) could give 3 layers (6 pages, the fraction cap) to
    # that growth, and so could a until it runs (then it lends what its passes hide: nothing
    # yet): a's request is admitted; without remapping, it waits for memory.
    arena = PageArena(3 * (1 + 4 * 2) + 3, PAGE)
    tenants = make_tenants(arena, {"a": 4, "b": 4, "c": 4})
    _, arbiter, _, planner = make_planning(tenants, remap=remap)
    for t in tenants.values():
        t.scheduler.growth_reserve_tokens = 8
    a, b = tenants["a"].scheduler, tenants["b"].scheduler
    b.add(make_request(15, max_tokens=30, model="b"))
    run_step(planner, 0.0)
    assert len(b.running) == 1 and arena.num_free == 2
    assert arbiter.growth_pages("a", 8) == pytest.approx(2 / 4)
    assert arbiter.growth_room("a") == (12 if remap else 0)
    a.add(make_request(27, max_tokens=30, model="a"))
    step = run_step(planner, 1.0)
    assert [p.model for p in step.plans] == (["a"] if remap else ["b"])  # b runs meanwhile
    assert (len(a.running), len(a.waiting)) == ((1, 0) if remap else (0, 1))
    check(tenants)


def test_kv_pages_stay_put_once_a_step_plans_a_swap():
    """Spatial: the first model's plan swaps blocks out, so a later model's prepare may not move
    KV pages in the same step (the swap names blocks by their pages); the next step may."""
    arena = PageArena(2 * (1 + 2 * 2) + 4, PAGE)
    tenants = make_tenants(arena, {"a": 2, "b": 2})
    _, _, controller, planner = make_planning(tenants, sharing="spatial")
    for name in tenants:
        tenants[name].scheduler.add(make_request(4, model=name))
    tenants["a"].scheduler.schedule = lambda: StepPlan("a", swap_out=[(0, 0)])
    seen = {}
    prepare = controller.prepare

    def spy(t):
        seen[t.name] = controller.kv_moves_ok
        prepare(t)

    controller.prepare = spy
    tenants["a"].residency.evict(1)  # only models with missing layers are prepared
    tenants["b"].residency.evict(1)
    planner.plan(0.0)
    assert seen == {"a": True, "b": False}
    planner.plan(1.0)
    assert seen["a"] is True


@pytest.mark.parametrize("reserve", [0.0, 0.25])
def test_a_restore_before_a_pass_leaves_the_reversion_reserve_to_the_kv_cache(reserve):
    """A model about to run restores the layer its passes cannot hide from free pages only beyond
    the reversion reserve (a share of the KV pages in use, kept for running requests as reversion
    and prefetches keep it); short of that it takes the layer of a model without work."""
    arena = PageArena(2 * (1 + 3 * 2) + 1, PAGE)
    tenants = make_tenants(arena, {"a": 3, "b": 3})
    _, _, controller, _ = make_planning(
        tenants, h2d_bytes_per_s=2 * PAGE / 1e-3, revert_reserve=reserve
    )
    a, b = tenants["a"], tenants["b"]
    controller.begin(Step(0.0))
    controller._evict(a, 1)
    req = make_request(4, model="a")
    req.block_ids = a.pool.allocate(4)  # one KV page in use, two pages free: one slab's worth
    req.status = RequestStatus.RUNNING
    a.scheduler.running.append(req)
    assert arena.num_free == a.residency.pages_per_layer
    controller.observe_step("a", 1e-4)  # streaming hides nothing: restore if at all possible
    a.state.active = a.state.running = True
    step = Step(1.0)
    controller.begin(step)
    controller.prepare(a)
    evicted = [(op.model, op.layer) for op in step.memory if isinstance(op, EvictLayer)]
    restored = [(op.model, op.layer) for op in step.memory if isinstance(op, RestoreLayer)]
    assert restored == [("a", 1)]
    assert evicted == ([] if reserve == 0 else [("b", 2)])
    assert arena.num_free == (0 if reserve == 0 else b.residency.pages_per_layer)
    check(tenants)


# ---- turns ---------------------------------------------------------------------------------------
def test_a_turn_is_cut_by_time_unless_its_model_streams_lent_layers():
    """turn_max_s ends b's turns after two 1 ms steps (a third would end past 2.5 ms); a has a
    layer lent, streamed in every pass, and keeps its turns for turn_steps steps."""
    arena = PageArena(2 * (1 + 2 * 2) + 8, PAGE)
    tenants = make_tenants(arena, {"a": 2, "b": 2})
    _, _, _, planner = make_planning(tenants, remap=False)
    planner.tenancy.turn_steps, planner.tenancy.turn_max_s = 4, 0.0025
    tenants["a"].residency.evict(1)
    for name in tenants:
        tenants[name].scheduler.add(make_request(4, max_tokens=100, model=name))
    runs = []
    for k in range(12):
        step = run_step(planner, k * 1e-3)
        runs += [p.model for p in step.plans]
        assert all(p.stream == ((1,) if p.model == "a" else ()) for p in step.plans)
    assert runs == ["a"] * 4 + ["b"] * 2 + ["a"] * 4 + ["b"] * 2


# ---- reclaiming lent layers (rent or buy) --------------------------------------------------------
def test_a_model_streaming_lent_layers_buys_them_back_once_streaming_cost_as_much():
    """a lent 3 layers whose memory b's running request holds as KV cache; passes that wait
    within the target share build no rent; then each of a's 1 ms passes waits 5 ms for streamed
    copies. Bringing the layers back costs 3 copies a layer (1 ms each): once a has paid that,
    with most of its passes' time waiting, b's youngest request is preempted for the pages and
    the layers come back in the memory step after the step; until then a rents."""
    layer_s = 1e-3
    arena = PageArena(2 * (1 + 4 * 2) + 2, PAGE)  # two models of 4 layers, 2 pages for a's KV
    tenants = make_tenants(arena, {"a": 4, "b": 4}, max_num_batched_tokens=256)
    _, arbiter, controller, _ = make_planning(
        tenants, h2d_bytes_per_s=tenants["a"].residency.layer_bytes / layer_s
    )
    for layer in (1, 2, 3):
        tenants["a"].residency.evict(layer)
    b = tenants["b"].scheduler
    b.add(make_request(6 * 16, model="b"))  # its KV cache fills the 6 pages a lent
    arbiter.begin()
    plan = b.schedule()
    commit(b, plan)
    assert b.running and arena.num_free == 2
    tenants["a"].scheduler.add(make_request(8, model="a"))
    a = tenants["a"]
    over = 3 - controller.alpha_max(a)
    assert over > 0
    for _ in range(1000):  # passes that wait no more than the target share build no rent
        controller.observe_step("a", 1e-3, True, exposed_s=1e-5)
    assert controller.reclaim_due(a) is None
    paid = 0.0
    for _ in range(50):
        arbiter.begin()
        step = Step(0.0)
        controller.begin(step)
        need = controller.reclaim_due(a)
        if need is not None:
            break
        controller.observe_step("a", 1e-3, True, exposed_s=5e-3)
        paid += 5e-3
    assert paid >= 3 * over * layer_s  # it rented until it had paid the price
    assert need == over * 2 - 2 and step.notes["a", "reclaims"] == 1
    assert arbiter.preempt_others("a", need) >= need and not b.running
    after = Step(0.0)
    controller.begin(after)
    controller.after_step(["a", "b"], 1e-3)
    assert len(a.residency.missing_layers) == 3 - over
    assert sum(isinstance(op, RestoreLayer) for op in after.memory) == over
    assert controller.reclaim_due(a) is None  # paid for: renting starts over
    check(tenants)


def slow_link_bursts(
    seed: int, wait_per_layer: float, models: str = "ab", sharing: str = "temporal",
    reserve: int = 0, arrivals: int = 200, **planning,
):
    """Bursts over an arena whose KV cache runs short (two slabs of 4 layers a model, 2 pages
    over), planned step after step with remapping over a link that copies a layer in 1 ms, turns
    of 4 steps: each pass takes 1 ms plus `wait_per_layer` ms of exposed copy time per layer it
    streams. Arrivals over the first `arrivals` steps, then steps until no work is left (at
    most 10,000 in all). Checks the accounting after every step; returns (requests, buys)."""
    import random

    layer_s = 1e-3
    arena = PageArena(len(models) * (1 + 4 * 2) + 2, PAGE)
    tenants = make_tenants(arena, dict.fromkeys(models, 4), preemption="swap")
    layer_bytes = tenants[models[0]].residency.layer_bytes
    _, _, _, planner = make_planning(
        tenants, sharing=sharing, h2d_bytes_per_s=layer_bytes / layer_s, **planning
    )
    planner.tenancy.turn_steps = 4
    for t in tenants.values():
        t.scheduler.growth_reserve_tokens = reserve
    rng = random.Random(seed)
    reqs, buys, now = [], 0, 0.0
    for k in range(10_000):
        if k < arrivals and rng.random() < 0.2:
            name = rng.choice(models)
            r = make_request(rng.randint(1, 40), max_tokens=rng.randint(1, 40), model=name)
            r.arrival_time = now
            tenants[name].scheduler.add(r)
            reqs.append(r)
        step = run_step(planner, now, layer_s, wait_per_layer)
        buys += sum(v for (_, what), v in step.notes.items() if what == "reclaims")
        now += layer_s * (1 + wait_per_layer * max((len(p.stream) for p in step.plans), default=0))
        check(tenants)
        if k > arrivals and not any(t.scheduler.has_work for t in tenants.values()):
            break
    return reqs, buys


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**31), st.sampled_from([0.0, 0.5, 4.0]), st.sampled_from(["ab", "abc"]),
    st.sampled_from(["temporal", "spatial"]), st.sampled_from([0, 8]),
    st.sampled_from([{}, {"revert": False}, {"cap_waiting": False}, {"prefetch_distance": 1},
                     {"admit_remap_after_s": 0.0}, {"donor_order": "lru"},
                     {"turn_reload": True}, {"whole_models": True}]),
)
def test_random_bursts_over_a_slow_link_keep_every_invariant_and_finish(
    seed, wait_per_layer, models, sharing, reserve, options
):
    """Over a link slow enough that running models lend little or nothing, with passes waiting
    for streamed lent layers or not (and buying them back or not), every option of the
    remapping controller and the offload baseline (whole models): the page accounting stays
    exact after every step and every request finishes (once a step finds nothing to run while
    requests wait, an admission may take any model's layers down to the fraction cap, or
    another model whole: before that, two models each waiting for more KV cache than was free
    lent nothing to each other and waited forever)."""
    assume(sharing == "temporal" or not options.get("turn_reload"))
    reqs, buys = slow_link_bursts(seed, wait_per_layer, models, sharing, reserve, **options)
    assert all(r.finished for r in reqs)
    assert wait_per_layer > 0 or buys == 0  # nothing waited: nothing to buy


def test_random_bursts_whose_passes_wait_for_copies_buy_layers_back():
    """The property above exercises buying back: on these seeds the passes that wait buy."""
    assert sum(slow_link_bursts(seed, 4.0)[1] for seed in range(5)) > 0


def test_a_step_that_finds_nothing_to_run_lets_the_next_take_layers_of_models_with_work():
    """Two models with work over a slow link (a pass hides no copy), nothing running, and each
    head request needs 3 pages where 2 are free: the first step plans nothing (a model with
    work lends only what its passes hide), the next takes a layer of a model with work for an
    admission and runs it."""
    arena = PageArena(2 * (1 + 4 * 2) + 2, PAGE)
    tenants = make_tenants(arena, {"a": 4, "b": 4})
    _, arbiter, _, planner = make_planning(
        tenants, h2d_bytes_per_s=tenants["a"].residency.layer_bytes / 1e-3
    )
    for name in "ab":
        tenants[name].scheduler.add(make_request(40, max_tokens=4, model=name))
    first = run_step(planner, 0.0)
    assert not first.plans and not first.memory
    second = run_step(planner, 1e-3)
    assert [len(p.seqs) for p in second.plans] == [1]
    assert any(isinstance(op, EvictLayer) for op in second.memory)
    assert arbiter.stalled  # this step came after a stall
    run_step(planner, 2e-3)
    assert not arbiter.stalled  # the last one ran something
    check(tenants)
