"""More models than the arena holds, on fakes (torch-free tenants, the real planner and controller):
placement at start, idle models going fully off the GPU, the donor rule (coldest idle model first,
then MRU), a model running only once its layer 0 is back, and invariants over random sequences of
arrivals, turns and steps."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oneiros.core import EvictLayer, RestoreLayer, Step
from oneiros.memory.arena import OwnerKind, PageArena
from oneiros.memory.remap import DonorInfo, heat, next_donor, next_to_evict
from tests.factories import make_planning, make_request, make_tenants
from tests.unit.test_arbiter import check, run_step

PAGE = 4096
LAYERS = 4  # per model; 2 pages a layer, 1 resident page: 9 pages a model


def oversubscribed(names: str, models_that_fit: int, extra: int = 2, **planning):
    """Tenants of LAYERS layers each in an arena holding every resident page, the layers of
    `models_that_fit` models and `extra` pages; and their planning components."""
    arena = PageArena(len(names) + models_that_fit * LAYERS * 2 + extra, PAGE)
    tenants = make_tenants(arena, {n: LAYERS for n in names}, oversubscribed=True)
    planning.setdefault("oversubscribed", True)
    return arena, tenants, make_planning(tenants, **planning)


# ---- the pure rules ------------------------------------------------------------------------------
def test_layer_zero_goes_last_and_only_when_allowed():
    assert next_to_evict(4, [1, 2, 3]) is None
    assert next_to_evict(4, [1, 2, 3], keep_first=False) == 0
    assert next_to_evict(4, [0, 1, 2, 3], keep_first=False) is None
    assert next_to_evict(4, [2], keep_first=False) != 0


def test_the_coldest_idle_model_gives_first_then_mru():
    def d(name, last_run, pop):
        return DonorInfo(name, False, last_run, 4, 0, 4, pop)

    hot, cold_old, cold_new = d("hot", 9.0, 50.0), d("old", 1.0, 0.0), d("new", 5.0, 0.5)
    assert heat(0.0) == heat(0.5) < heat(50.0)
    assert next_donor([hot, cold_old, cold_new], "temporal") == "new"  # MRU among the cold
    assert next_donor([hot, cold_old, cold_new], "temporal", "lru") == "old"
    assert next_donor([hot], "temporal") == "hot"  # nothing colder left: the hot one gives


# ---- placement and loading -----------------------------------------------------------------------
def test_what_does_not_fit_starts_off_the_gpu():
    arena, tenants, _ = oversubscribed("abcd", models_that_fit=2)
    assert [len(t.residency.missing_layers) for t in tenants.values()] == [0, 0, 4, 4]
    assert all(t.residency.resident_pages for t in tenants.values())
    assert arena.num_free == 2
    check(tenants)


def test_a_model_off_the_gpu_comes_back_by_taking_an_idle_models_layers():
    arena, tenants, (_, _, controller, planner) = oversubscribed("abc", models_that_fit=1)
    c = tenants["c"]
    assert c.residency.missing_layers == [0, 1, 2, 3]
    c.scheduler.add(make_request(6, max_tokens=3, model="c"))
    step = run_step(planner)
    assert [p.model for p in step.plans] == ["c"]
    restored = [op.layer for op in step.memory if isinstance(op, RestoreLayer) and op.model == "c"]
    assert restored and restored[0] == 0  # layer 0 first: the rest may stream through it
    evicted = {op.model for op in step.memory if isinstance(op, EvictLayer)}
    assert evicted == {"a"}  # the idle model with layers gave them; its cap does not apply
    assert c.residency.missing_layers == []  # no step time measured yet: alpha_max is 0
    check(tenants)


def test_a_model_that_cannot_get_layer_zero_back_waits_and_others_run():
    # a and b both have work and run in turns; c, off the GPU, cannot take their layers (a model
    # with work gives at most what its passes hide: nothing before a step was measured).
    arena, tenants, (_, _, _, planner) = oversubscribed("abc", models_that_fit=2, extra=0)
    for name in "abc":
        tenants[name].scheduler.add(make_request(4, max_tokens=30, model=name))
    ran = []
    for k in range(200):
        step = run_step(planner, float(k))
        for p in step.plans:
            assert tenants[p.model].residency.is_resident(0)
            ran.append(p.model)
        check(tenants)
        if not any(t.scheduler.has_work for t in tenants.values()):
            break
    assert {"a", "b", "c"} <= set(ran)
    assert all(not t.scheduler.has_work for t in tenants.values())


def test_a_hot_idle_model_keeps_its_layers_while_a_cold_one_gives():
    arena, tenants, (store, _, _, planner) = oversubscribed("hcx", models_that_fit=2, extra=1)
    for _ in range(8):
        store.note_arrival("h", 0.0)  # h is popular, c is not; both idle now
    assert tenants["h"].state.popularity == 8.0
    tenants["x"].scheduler.add(make_request(4, max_tokens=2, model="x"))
    run_step(planner, 0.0)
    assert tenants["h"].residency.missing_layers == []
    assert tenants["c"].residency.missing_layers  # the cold one gave (layers)
    assert tenants["x"].residency.is_resident(0)
    check(tenants)


# ---- invariants over random sequences ------------------------------------------------------------
EVENTS = st.lists(
    st.tuples(st.sampled_from("abcd"), st.integers(1, 24), st.integers(1, 12), st.integers(0, 3)),
    min_size=1, max_size=25,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    EVENTS, st.integers(1, 2), st.integers(3, 5), st.sampled_from(["temporal", "spatial"]),
    st.sampled_from([float("inf"), 2 * PAGE / 1e-3]), st.sampled_from(["layers", "whole", "reload"]),
)
def test_random_arrivals_and_turns_keep_every_invariant(events, fit, extra, sharing, h2d, mode):
    """Arrivals on four models in an arena that holds the layers of one or two (and KV pages
    for the longest request, 36 tokens: 3 pages): after every step the accounting is exact, a
    model runs only with its layer 0 resident, a model that gave its layer 0 had no work (whole
    models: a model runs with every layer); every request finishes; once idle, every page is
    free, resident or a layer slab (no KV page and no page lost). Turn reloads (temporal): a
    model waiting for a later turn may give its layer 0 too, never while it runs."""
    whole = mode == "whole"
    arena, tenants, (store, _, _, planner) = oversubscribed(
        "abcd", fit, extra, sharing=sharing, h2d_bytes_per_s=h2d, whole_models=whole,
        turn_reload=mode == "reload" and sharing == "temporal",
    )
    reqs = []
    now = 0.0
    pending = list(events)
    for k in range(3000):
        while pending and pending[0][3] <= k % 4:
            name, prompt, out, _ = pending.pop(0)
            r = make_request(prompt, max_tokens=out, model=name)
            r.arrival_time = now
            store.note_arrival(name, now)
            tenants[name].scheduler.add(r)
            reqs.append(r)
        step = run_step(planner, now)
        for p in step.plans:
            assert tenants[p.model].residency.is_resident(0), p.model
            assert not whole or not tenants[p.model].residency.missing_layers
        for op in step.memory:  # layer 0 goes only when a model has no work (then all of it)
            if isinstance(op, EvictLayer) and op.layer == 0:
                assert not tenants[op.model].scheduler.has_work or op.model not in {
                    p.model for p in step.plans
                }
        check(tenants)
        now += 1e-3
        if not pending and not any(t.scheduler.has_work for t in tenants.values()):
            break
    assert all(r.finished for r in reqs)
    for t in tenants.values():
        t.pool.shrink()
    usage = arena.usage_by_kind()
    kv = sum(arena.owner(p).kind is OwnerKind.KV for p in range(arena.num_pages))
    assert kv == 0, usage
    slabs = sum(LAYERS - len(t.residency.missing_layers) for t in tenants.values())
    assert arena.num_free + len(tenants) + 2 * slabs == arena.num_pages


def test_offload_moves_whole_models_and_runs_only_loaded_ones():
    arena, tenants, (_, _, controller, planner) = oversubscribed(
        "abc", models_that_fit=2, extra=1, whole_models=True
    )
    c = tenants["c"]
    c.scheduler.add(make_request(4, max_tokens=2, model="c"))
    step = run_step(planner)
    assert [p.model for p in step.plans] == ["c"] and c.residency.missing_layers == []
    gave = {op.model for op in step.memory if isinstance(op, EvictLayer)}
    assert len(gave) == 1
    assert tenants[gave.pop()].residency.missing_layers == [0, 1, 2, 3]  # all of it went
    assert controller.prefetch(tenants["a"]) == 0
    check(tenants)


# ---- turn reloads --------------------------------------------------------------------------------
def test_with_turn_reloads_a_model_whose_turn_is_not_next_lends_every_layer():
    arena, tenants, (_, _, controller, _) = oversubscribed(
        "abc", models_that_fit=3, extra=1, turn_reload=True, h2d_bytes_per_s=2 * PAGE / 1e-3
    )
    for t in tenants.values():  # all three have work; a runs, b is next, c ran last before a
        t.state.active = True
        controller.observe_step(t.name, 2.5e-3)  # a pass hides no copy: alpha_max = 0
    tenants["a"].state.running = True
    tenants["c"].state.last_run, tenants["b"].state.last_run = 2.0, 1.0
    controller.next_up = "b"
    step = Step(3.0)
    controller.begin(step)
    freed = controller.take("a", 5 * 2)  # more than one model's layers (4 x 2 pages)
    assert freed == 8  # c gave all it had, layer 0 too; b (next) and a (running) nothing
    assert tenants["c"].residency.missing_layers == [0, 1, 2, 3]
    assert tenants["b"].residency.missing_layers == [] == tenants["a"].residency.missing_layers
    check(tenants)


def test_the_next_model_comes_back_during_the_turn_and_turns_last_long_enough_to_hide_it():
    # Room for two models' layers and some KV: three models with work take turns; the next
    # model's layers are restored during the turn before its own, and a turn lasts (at least)
    # the time those copies take.
    arena, tenants, (_, _, controller, planner) = oversubscribed(
        "abc", models_that_fit=2, extra=6, turn_reload=True, h2d_bytes_per_s=2 * PAGE / 2e-3,
    )  # 2 ms a layer copy, 1 ms a step: a whole model takes 8 steps to come back
    for name in "abc":
        tenants[name].scheduler.add(make_request(4, max_tokens=60, model=name))
    now, runs, cold_starts = 0.0, [], 0
    for _ in range(400):
        step = run_step(planner, now)
        for p in step.plans:
            assert tenants[p.model].residency.is_resident(0)
            if (not runs or runs[-1] != p.model) and any(
                isinstance(op, RestoreLayer) and op.model == p.model for op in step.memory
            ):
                cold_starts += 1  # a turn that began by restoring (the copies not hidden)
            runs.append(p.model)
        check(tenants)
        now += 1e-3
        if not any(t.scheduler.has_work for t in tenants.values()):
            break
    assert not any(t.scheduler.has_work for t in tenants.values())
    turns = [(m, len(list(g))) for m, g in itertools.groupby(runs)]
    assert len(turns) >= 9 and {m for m, _ in turns} == {"a", "b", "c"}
    lengths = sorted(n for _, n in turns)
    assert lengths[len(lengths) // 2] >= 6  # not turn_steps (1): the copies of the next model
    assert cold_starts <= len(turns) // 2  # most turns start with their layers already back


def test_host_tiers_pin_each_model_in_config_order_that_still_fits():
    from oneiros.engine.placement import host_tiers

    sizes = {"a": 10, "b": 30, "c": 5, "d": 20}
    assert host_tiers(sizes, None) == set()
    assert host_tiers(sizes, 40) == {"c", "d"}  # a and b pinned: 40
    assert host_tiers(sizes, 45) == {"d"}
    assert host_tiers(sizes, 9) == {"a", "b", "d"}  # c, smaller, still fits


def test_with_turn_reloads_a_waiting_model_with_requests_running_keeps_layer_zero():
    arena, tenants, (_, _, controller, _) = oversubscribed(
        "abc", models_that_fit=3, extra=1, turn_reload=True, h2d_bytes_per_s=2 * PAGE / 1e-3
    )
    c = tenants["c"]
    c.scheduler.add(make_request(4, max_tokens=8, model="c"))
    c.scheduler.schedule()  # admitted: it holds KV cache
    assert c.scheduler.running
    for t in tenants.values():
        t.state.active = True
    tenants["a"].state.running = True
    controller.next_up = "b"
    step = Step(1.0)
    controller.begin(step)
    controller.take("a", 5 * 2)
    assert c.residency.missing_layers == [1, 2, 3]  # it can still run, streaming through layer 0
    assert controller.runnable(c, strict=False)
    check(tenants)


def test_a_model_that_could_only_stream_runs_after_max_wait_instead_of_starving():
    """b could run only by streaming more layers than its passes hide (the memory to bring them
    back is another model's KV cache), a runs on: b waits for memory at most max_wait_s, then
    runs streaming, turn by turn, instead of waiting for a to finish."""
    arena, tenants, (_, _, controller, planner) = oversubscribed(
        "ab", models_that_fit=2, extra=8, turn_reload=True
    )
    strict_ok = type(controller).runnable
    controller.runnable = lambda t, strict=True: (
        strict_ok(controller, t, strict) and not (strict and t.name == "b")
    )
    planner.tenancy.max_wait_s = 0.005
    tenants["a"].scheduler.add(make_request(4, max_tokens=200, model="a"))
    tenants["b"].scheduler.add(make_request(4, max_tokens=20, model="b"))
    runs = []
    for k in range(400):
        step = run_step(planner, k * 1e-3)
        runs += [p.model for p in step.plans]
        check(tenants)
        if not tenants["b"].scheduler.has_work:
            break
    assert not tenants["b"].scheduler.has_work and tenants["a"].scheduler.has_work
    first = runs.index("b")
    assert 4 <= first <= 8  # a ran meanwhile; b waited about max_wait_s, not until a was done


def test_the_admission_watermark_counts_layers_that_admissions_take_when_loading_on_demand():
    # a runs a request; b is idle with its layers resident, c is off the GPU. Oversubscribed, an
    # admission takes an idle model's layers, so those are memory left for the requests running
    # too: the watermark (vLLM's 1% of the KV cache) must not hold back a request that fits.
    arena, tenants, (_, arbiter, _, planner) = oversubscribed("abc", models_that_fit=3, extra=0)
    a = tenants["a"].scheduler
    a.watermark_blocks = 6 * a.pool.blocks_per_page
    a.add(make_request(40, max_tokens=20, model="a"))
    run_step(planner, 0.0)  # nothing ran anywhere: admitted regardless of the watermark
    assert len(a.running) == 1
    left = arena.num_free * a.pool.blocks_per_page + a.pool.num_reusable
    assert left < a.watermark_blocks  # free pages alone would hold the next admission back
    # b's slabs count, all of them (idle and oversubscribed, it goes fully off the GPU); a's own
    # never do (an admission takes no running model's layer) and c has none left.
    b = tenants["b"].residency
    assert not b.missing_layers
    slabs = len(b.slab_pages) * b.pages_per_layer
    assert arbiter.admission_pages("a") == arbiter.idle_pages("a") + slabs
    a.add(make_request(8, max_tokens=20, model="a"))
    step = run_step(planner, 1e-3)
    assert len(a.running) == 2 and not a.waiting
    assert [len(p.seqs) for p in step.plans] == [2]
    check(tenants)
