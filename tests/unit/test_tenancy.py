"""TenancyPolicy (which models a step offers work to) and MetadataStore (per-model state)."""

from __future__ import annotations

import pytest

from oneiros.engine.tenancy import MetadataStore, TenancyPolicy, TenantCounters


def make_store(names=("a", "b", "c"), active=None) -> MetadataStore:
    store = MetadataStore(list(names))
    for n in active if active is not None else names:
        store.states[n].active = True
    return store


def offer(policy: TenancyPolicy, store: MetadataStore, now: float, streams: bool = False) -> str:
    """What the engine does under temporal sharing when every offered model has work: the first
    model of the order runs (and is recorded as offered)."""
    first = policy.order(store, now, streams=streams)[0]
    policy.ran(store, first, now)
    return first


# ---- construction -------------------------------------------------------------------------------
def test_unknown_sharing_is_rejected():
    with pytest.raises(ValueError, match="temporal or spatial"):
        TenancyPolicy("both")
    assert TenancyPolicy("spatial").spatial and not TenancyPolicy("temporal").spatial


def test_store_starts_with_one_idle_state_per_model():
    store = MetadataStore(["x", "y"])
    assert list(store.states) == ["x", "y"]
    for name, st in store.states.items():
        assert st.name == name and not st.active and st.last_run == 0.0 and st.last_offer == 0.0
        assert st.counters == TenantCounters()
    assert store.states["x"].counters is not store.states["y"].counters
    assert len(store.page_history) == 0


# ---- temporal: round robin -----------------------------------------------------------------------
def test_round_robin_over_active_models():
    store = make_store()
    policy = TenancyPolicy("temporal", max_wait_s=1e9)
    assert policy.order(store, 0.0) == ["a", "b", "c"]
    ran = [offer(policy, store, t * 0.001) for t in range(7)]
    assert ran == ["a", "b", "c", "a", "b", "c", "a"]


def test_round_robin_skips_idle_models_and_resumes_after_the_one_that_ran():
    store = make_store(active=["a", "c"])
    policy = TenancyPolicy("temporal", max_wait_s=1e9)
    assert policy.order(store, 0.0) == ["a", "c"]
    assert [offer(policy, store, t * 0.001) for t in range(4)] == ["a", "c", "a", "c"]
    # b becomes active right after c ran: the rotation continues at a, then b.
    store.states["b"].active = True
    assert policy.order(store, 1.0) == ["a", "b", "c"]
    assert offer(policy, store, 1.0) == "a"
    assert policy.order(store, 1.0) == ["b", "c", "a"]


def test_a_model_that_was_offered_but_had_nothing_to_run_is_passed():
    # The engine offers models in order until one has a non-empty plan; every offered model
    # counts as `ran`, so the rotation moves past all of them.
    store = make_store()
    policy = TenancyPolicy("temporal", max_wait_s=1e9)
    policy.ran(store, "a", 0.0)  # offered, empty plan
    policy.ran(store, "b", 0.0)  # offered, ran
    assert policy.order(store, 0.0) == ["c", "a", "b"]


def test_no_active_model_means_an_empty_order():
    store = make_store(active=[])
    for sharing in ("temporal", "spatial"):
        assert TenancyPolicy(sharing).order(store, 0.0) == []


# ---- temporal: starvation bound -----------------------------------------------------------------
def test_a_model_not_offered_for_max_wait_goes_first():
    store = make_store()
    policy = TenancyPolicy("temporal", max_wait_s=0.5)
    for n in ("a", "b", "c"):
        policy.ran(store, n, 10.0)
    policy.ran(store, "a", 10.3)  # round robin now points at b
    assert policy.order(store, 10.4) == ["b", "c", "a"]  # nobody has waited 0.5 s yet
    # At 10.55 b and c have waited 0.55 s, a only 0.25 s.
    store.states["c"].last_offer = 9.0  # c has waited longest
    assert policy.order(store, 10.55) == ["c", "b", "a"]


def test_starved_models_are_ordered_by_how_long_they_waited():
    store = make_store(names=("a", "b", "c", "d"))
    policy = TenancyPolicy("temporal", max_wait_s=1.0)
    store.states["a"].last_offer = 100.0
    store.states["b"].last_offer = 97.0
    store.states["c"].last_offer = 99.5
    store.states["d"].last_offer = 95.0
    # At 100.2: d (5.2 s) and b (3.2 s) are starved; c (0.7 s) and a (0.2 s) are not.
    assert policy.order(store, 100.2) == ["d", "b", "a", "c"]
    store.states["d"].active = False  # only active models are ever offered
    assert policy.order(store, 100.2) == ["b", "a", "c"]


def test_starvation_bound_holds_even_when_round_robin_would_skip_a_model():
    """A model's wait between offers never exceeds max_wait_s plus the time the models ahead of it
    take, whatever the round-robin position says: here the engine keeps resetting the round robin
    to a (as if b and c were never offered), yet b and c still get their turn."""
    store = make_store()
    policy = TenancyPolicy("temporal", max_wait_s=0.05)
    offered = {n: [] for n in "abc"}
    now = 0.0
    for _ in range(200):
        now += 0.01
        order = policy.order(store, now)
        first = order[0]
        policy.ran(store, first, now)
        offered[first].append(now)
        policy._next = 0  # adversarial: rotation always points back at a
    for n in "abc":
        times = [0.0, *offered[n], now]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        # max_wait plus one step for each other model that may be starved at the same moment.
        assert max(gaps) <= 0.05 + 3 * 0.01 + 1e-9, (n, max(gaps))


def test_starvation_bound_is_measured_from_the_last_offer():
    store = make_store(names=("a", "b"))
    policy = TenancyPolicy("temporal", max_wait_s=1.0)
    policy.ran(store, "a", 5.0)
    policy.ran(store, "b", 5.0)
    assert policy.order(store, 5.99) == ["a", "b"]  # round robin: b ran last
    store.states["a"].last_offer = 3.0
    policy._next = 1
    assert policy.order(store, 5.0) == ["a", "b"]  # a waited 2 s > 1 s: first despite rotation
    assert policy.order(store, 3.5) == ["b", "a"]  # a waited 0.5 s: rotation decides


# ---- temporal: turns -----------------------------------------------------------------------------
def test_a_turn_lasts_turn_steps_then_passes_in_rotation():
    store = make_store()
    policy = TenancyPolicy("temporal", max_wait_s=1e9, turn_steps=3)
    ran = [offer(policy, store, t * 0.001) for t in range(10)]
    assert ran == ["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["a"]
    assert policy.turn == "a" and policy.steps_left(store) == 2 and policy.next_up(store) == "b"


def test_the_turn_passes_at_once_when_its_holder_has_nothing_to_run():
    store = make_store()
    policy = TenancyPolicy("temporal", max_wait_s=1e9, turn_steps=5)
    assert offer(policy, store, 0.0) == "a"
    store.states["a"].active = False  # its last request finished
    assert policy.order(store, 0.001) == ["b", "c"]
    assert offer(policy, store, 0.001) == "b" and policy.turn_used == 1
    assert policy.next_up(store) == "c"


def test_a_starving_model_cuts_a_long_turn():
    store = make_store(names=("a", "b"))
    policy = TenancyPolicy("temporal", max_wait_s=0.5, turn_steps=100)
    store.states["b"].last_offer = 0.0
    assert offer(policy, store, 0.1) == "a"
    assert offer(policy, store, 0.2) == "a"  # b waited 0.2 s: a's turn goes on
    assert offer(policy, store, 0.7) == "b"  # b waited 0.7 s > max_wait_s: it goes first


def test_a_turn_ends_at_its_time_limit_whichever_comes_first():
    """turn_max_s bounds a turn in time as turn_steps does in steps, at the pace of its steps so
    far: with 30 ms steps a 100 ms limit ends an 8-step turn after 3 steps (a fourth would end at
    120 ms); with 10 ms steps the step count ends it; a step longer than the limit is a turn of
    its own. steps_left counts at the same pace."""
    def turn(step_s: float, steps: int) -> list[str]:
        store = make_store()
        policy = TenancyPolicy("temporal", max_wait_s=1e9, turn_steps=8, turn_max_s=0.1)
        return [offer(policy, store, t * step_s) for t in range(steps)]

    assert turn(0.03, 4) == ["a"] * 3 + ["b"]
    assert turn(0.01, 9) == ["a"] * 8 + ["b"]
    assert turn(0.25, 3) == ["a", "b", "c"]
    store = make_store()
    policy = TenancyPolicy("temporal", max_wait_s=1e9, turn_steps=8, turn_max_s=0.1)
    offer(policy, store, 0.0)
    assert policy.steps_left(store) == 7  # no pace yet: the step count
    offer(policy, store, 0.02)
    assert policy.steps_left(store) == 3  # steps from 40, 60 and 80 ms end by 100 ms
    with pytest.raises(ValueError, match="turn_max_s"):
        TenancyPolicy("temporal", turn_max_s=0.0)


def test_a_turn_that_streams_lent_layers_is_not_cut_by_time():
    """A holder that streams lent layers in its passes keeps its turn for turn_steps steps
    however long they take (cutting it would pay the copies again for fewer tokens); steps_left
    counts steps only then. A model starved past max_wait_s still goes first."""
    store = make_store()
    policy = TenancyPolicy("temporal", max_wait_s=1e9, turn_steps=4, turn_max_s=0.1)
    assert [offer(policy, store, t * 0.03, streams=True) for t in range(5)] == ["a"] * 4 + ["b"]
    store = make_store()
    policy = TenancyPolicy("temporal", max_wait_s=1e9, turn_steps=8, turn_max_s=0.1)
    offer(policy, store, 0.0)
    offer(policy, store, 0.05)
    assert policy.steps_left(store) == 0  # a step from 100 ms would end past the limit
    assert policy.steps_left(store, streams=True) == 6
    policy = TenancyPolicy("temporal", max_wait_s=0.5, turn_steps=100, turn_max_s=0.1)
    store = make_store()
    policy.ran(store, "a", 0.0)
    assert policy.order(store, 0.6, streams=True)[0] == "b"  # b and c starved: b goes first


def test_turns_do_not_apply_to_spatial_sharing():
    store = make_store()
    policy = TenancyPolicy("spatial", max_wait_s=1e9, turn_steps=4)
    policy.ran(store, "a", 0.0)
    assert sorted(policy.order(store, 0.001)) == ["a", "b", "c"]


def test_turn_steps_must_be_positive():
    with pytest.raises(ValueError, match="turn_steps"):
        TenancyPolicy("temporal", turn_steps=0)


# ---- spatial ------------------------------------------------------------------------------------
def test_spatial_returns_every_active_model():
    store = make_store(names=("a", "b", "c", "d"), active=["a", "c", "d"])
    policy = TenancyPolicy("spatial", max_wait_s=1e9)
    assert sorted(policy.order(store, 0.0)) == ["a", "c", "d"]
    for n in policy.order(store, 0.0):
        policy.ran(store, n, 0.0)
    assert sorted(policy.order(store, 0.0)) == ["a", "c", "d"]
    store.states["b"].active = True
    assert sorted(policy.order(store, 0.0)) == ["a", "b", "c", "d"]
    store.states["a"].active = False
    assert sorted(policy.order(store, 0.0)) == ["b", "c", "d"]


def test_ran_records_the_offer_time():
    store = make_store()
    policy = TenancyPolicy("temporal")
    policy.ran(store, "b", 42.0)
    assert store.states["b"].last_offer == 42.0
    assert store.states["a"].last_offer == store.states["c"].last_offer == 0.0
    assert store.states["b"].last_run == 0.0  # last_run is the engine's (it ran a step)


# ---- MetadataStore.mru_order ------------------------------------------------------------------
def test_mru_order_most_recent_first():
    store = MetadataStore(["a", "b", "c"])
    store.states["a"].last_run = 5.0
    store.states["b"].last_run = 9.0
    store.states["c"].last_run = 7.0
    assert store.mru_order() == ["b", "c", "a"]
    store.states["a"].last_run = 10.0
    assert store.mru_order() == ["a", "b", "c"]


def test_mru_order_puts_models_that_never_ran_last_in_declaration_order():
    store = MetadataStore(["a", "b", "c", "d"])
    assert store.mru_order() == ["a", "b", "c", "d"]  # stable sort: ties keep declaration order
    store.states["c"].last_run = 1.0
    assert store.mru_order() == ["c", "a", "b", "d"]
    # The engine takes idle KV pages least recently run first: reversed(mru_order()).
    assert list(reversed(store.mru_order()))[0] == "d"


def test_mru_order_ignores_activity_and_offers():
    store = MetadataStore(["a", "b"])
    store.states["a"].last_run = 1.0
    store.states["b"].last_run = 2.0
    store.states["b"].active = False
    store.states["a"].last_offer = 100.0
    assert store.mru_order() == ["b", "a"]


def test_page_history_is_bounded():
    store = MetadataStore(["a"], history=3)
    for t in range(5):
        store.page_history.append((float(t), {"free": t}))
    assert [t for t, _ in store.page_history] == [2.0, 3.0, 4.0]


# ---- turn reloads --------------------------------------------------------------------------------
def test_turn_reloads_hold_a_turn_for_its_minimum_and_while_the_next_model_loads():
    store = make_store()
    policy = TenancyPolicy("temporal", max_wait_s=0.5, turn_steps=2)
    policy.turn_min_steps = 5  # the steps that hide a reload
    ran = [offer(policy, store, k * 1.0) for k in range(6)]  # everyone starves after 0.5 s
    assert ran == ["a"] * 5 + ["b"]  # the minimum holds against starving models
    policy.turn_min_steps = 0
    assert policy.order(store, 6.0)[0] == "c"  # starving since 0 s: it cuts b's turn short
    assert policy.order(store, 6.0, hold=True)[0] == "b"  # unless the next model's copies fly


def test_with_turn_reloads_a_request_kept_from_its_first_token_goes_first():
    store = make_store()
    policy = TenancyPolicy("temporal", max_wait_s=1.0, turn_steps=1)
    policy.fresh_first = True
    for n, t in (("a", 0.1), ("b", 0.2), ("c", 0.3)):
        store.states[n].last_offer = t
    store.states["c"].first_waiting = 5.0  # c's oldest request arrived at 5 s, no token yet
    assert policy.order(store, 5.5)[0] == "a"  # waited 0.5 s: rotation and starvation decide
    assert policy.order(store, 6.0)[0] == "c"  # waited max_wait_s: it goes first
    policy.fresh_first = False
    assert policy.order(store, 6.0)[0] == "a"
