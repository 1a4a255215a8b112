"""The remapping controller's pure decisions (`memory/remap.py`) and the memory they act on.

Part one tests each decision on its own: the even layout and the next layer to remap or restore,
alpha_max (the replayed pass plan), caps, donor choice (not running first, MRU; spatial spreading),
hysteresis, the revert rule and the restore priority. Part two is a stateful test over two real (tiny, random) models in a small arena: layers
are remapped (`ModelWeights.evict_layer`) and restored (`restore_layer`) while KV pools allocate,
free, shrink and preempt, and after every step each page has one owner, each pool is consistent and
each layer is either resident in its own slab, holding its own bytes, or listed missing.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from oneiros.memory.arena import Owner, OwnerKind, PageArena
from oneiros.memory.kv import KVPool
from oneiros.memory.remap import (
    DonorInfo,
    Hysteresis,
    alpha_cap,
    even_layers,
    max_alpha,
    next_donor,
    next_to_evict,
    next_to_restore,
    rebalance,
    restore_priority,
    should_revert,
)
from oneiros.memory.passplan import exposed_fraction
from oneiros.memory.storage import DeviceArena
from oneiros.core import EvictLayer, RestoreLayer
from oneiros.memory.weights import ModelWeights, make_residency, weight_pages
from oneiros.models.loader import resolve
from oneiros.models.registry import build_model
from tests.helpers import same_bytes


def donor(name: str, active: bool = False, last_run: float = 0.0, n: int = 8, missing: int = 0,
          cap: int | None = None) -> DonorInfo:
    return DonorInfo(name, active, last_run, n, missing, alpha_cap(n, 0.9) if cap is None else cap)


# ---- which layers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1])
def test_a_model_without_a_second_layer_has_nothing_to_remap(n):
    assert even_layers(n, 0) == [] and even_layers(n, 3) == []
    assert next_to_evict(n, []) is None


def test_even_layers_known_values():
    assert even_layers(40, 1) == [20]
    assert even_layers(40, 2) == [13, 27]
    assert even_layers(40, 3) == [10, 20, 30]
    assert even_layers(10, 9) == list(range(1, 10))  # everything but layer 0
    assert even_layers(4, 7) == [1, 2, 3]  # alpha is capped at n - 1


@pytest.mark.parametrize("n", range(2, 90))
def test_even_layers_are_distinct_never_layer_zero_and_exactly_spread(n):
    for alpha in range(n):
        layers = even_layers(n, alpha)
        assert len(layers) == len(set(layers)) == alpha
        assert all(1 <= x < n for x in layers) and layers == sorted(layers)
        gaps = [b - a for a, b in zip([0, *layers], [*layers, n])]
        assert max(gaps) - min(gaps) <= 1  # as even as whole layers allow


@pytest.mark.parametrize("n", [4, 12, 30, 40, 48, 80])
def test_remapping_one_layer_at_a_time_keeps_the_layout_spread(n):
    """Layers taken one by one (`next_to_evict`) are a nested set that stays close to the even
    layout of every alpha: no gap is more than twice the even one (plus a layer)."""
    missing: list[int] = []
    for alpha in range(1, n):
        layer = next_to_evict(n, missing)
        assert layer is not None and layer not in missing and layer != 0
        missing.append(layer)
        layers = sorted(missing)
        gaps = [b - a for a, b in zip([0, *layers], [*layers, n])]
        assert max(gaps) <= 2 * n / (alpha + 1) + 1
    assert next_to_evict(n, missing) is None  # only layer 0 is left
    # Coming back one by one undoes it: every missing layer returns, layer 0 never left.
    for _ in range(n - 1):
        layer = next_to_restore(n, missing)
        assert layer in missing
        missing.remove(layer)
    assert missing == [] and next_to_restore(n, missing) is None


def test_rebalance_moves_a_misplaced_layer_only_when_it_pays():
    n, missing = 40, [1, 2, 3]  # bunched at the start: the copies cannot hide
    step, copy = 0.02, 0.002
    move = rebalance(n, missing, 2, step, copy, horizon_passes=64)
    assert move is not None
    out, into = move
    assert out in missing and into not in missing and into != 0
    better = sorted([x for x in missing if x != out] + [into])
    assert exposed_fraction(n, tuple(better), 2, step, copy) < exposed_fraction(
        n, tuple(missing), 2, step, copy
    )
    # Too short a horizon: the move's one copy is not paid back.
    assert rebalance(n, missing, 2, step, copy, horizon_passes=0) is None
    # Already even: nothing to move.
    assert rebalance(n, even_layers(n, 3), 2, step, copy, horizon_passes=64) is None


# ---- alpha_max: the replayed pass --------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.floats(1e-4, 1.0), st.floats(1e-3, 1.0), st.integers(2, 80), st.sampled_from([1, 2]))
def test_max_alpha_leaves_at_most_the_target_exposed(copy_s, step_s, n, distance):
    a = max_alpha(n, distance, step_s, copy_s, 0.02)
    assert 0 <= a <= n - 1
    # The search runs at step/copy rounded down to a 1% grid (cached): exactly there, alpha's layout
    # exposes at most the target and one more layer more than it...
    q = math.exp(math.floor(math.log(step_s / copy_s) * 100) / 100)
    if a:
        assert exposed_fraction(n, tuple(even_layers(n, a)), distance, q, 1.0) <= 0.02 + 1e-9
        # ...and at the true ratio (no smaller than the grid's) it exposes no more.
        frac = exposed_fraction(n, tuple(even_layers(n, a)), distance, step_s, copy_s)
        assert frac <= 0.02 + 1e-9
    if a < n - 1 and q > 0:
        assert exposed_fraction(n, tuple(even_layers(n, a + 1)), distance, q, 1.0) > 0.02


def test_max_alpha_examples():
    assert max_alpha(40, 2, 0.0, 0.01, 0.02) == 0  # not measured yet: nothing to hide under
    assert max_alpha(40, 2, 0.02, 0.0, 0.02) == 39  # free copies: everything but layer 0
    assert max_alpha(40, 2, 0.01, 0.02, 0.02) == 0  # one copy already exceeds the pass
    assert max_alpha(1, 2, 1.0, 0.01, 0.02) == 0  # a one-layer model has nothing to stream
    # The paper's aggregate rule would allow 8 (8 copies of 2.5 ms in a 20 ms pass); the replay,
    # counting the copies back into borrowed slabs and when each can start, allows fewer.
    assert 0 < max_alpha(40, 2, 0.020, 0.0025, 0.02) < 8


def test_max_alpha_grows_with_compute_and_double_buffering_helps_large_alpha():
    prev = -1
    for step in [0.002 * k for k in range(1, 60)]:
        a = max_alpha(40, 2, step, 0.001, 0.02)
        assert a >= prev
        prev = a
    assert max_alpha(40, 2, 0.04, 0.001, 0.02) > max_alpha(40, 1, 0.04, 0.001, 0.02)


# ---- caps ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n,fraction,cap",
    [(30, 0.9, 27), (4, 0.9, 3), (4, 0.5, 2), (4, 0.0, 0), (1, 0.9, 0), (2, 0.9, 1), (12, 0.99, 11),
     (30, 0.25, 7), (0, 0.9, 0)],
)
def test_alpha_cap(n, fraction, cap):
    assert alpha_cap(n, fraction) == cap


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 200), st.floats(0.0, 0.999))
def test_alpha_cap_keeps_layer_zero_and_respects_the_fraction(n, fraction):
    cap = alpha_cap(n, fraction)
    assert 0 <= cap <= max(0, n - 1)
    assert cap <= fraction * n + 1e-9
    assert cap >= min(n - 1, math.floor(fraction * n)) - 1  # float rounding may cost one layer


# ---- donor choice -------------------------------------------------------------------------------
def test_inactive_models_go_first_most_recently_used_first():
    donors = [
        donor("busy", active=True, last_run=9.0),
        donor("old", last_run=1.0),
        donor("recent", last_run=5.0),
    ]
    assert next_donor(donors, "temporal") == "recent"
    assert next_donor(donors, "spatial") == "recent"


def test_a_donor_at_its_cap_is_skipped():
    donors = [
        donor("recent", last_run=5.0, missing=7, cap=7),
        donor("old", last_run=1.0, missing=3, cap=7),
        donor("busy", active=True, last_run=9.0),
    ]
    assert next_donor(donors, "temporal") == "old"
    donors[1] = donor("old", last_run=1.0, missing=7, cap=7)
    # Every inactive model is at its cap: now the active ones.
    assert next_donor(donors, "temporal") == "busy"


def test_no_donor_when_everyone_is_at_the_cap():
    donors = [
        donor("a", missing=3, cap=3),
        donor("b", active=True, missing=2, cap=2),
        donor("c", active=True, cap=0),  # alpha_max 0: not measured yet, or copies too slow
    ]
    assert next_donor(donors, "temporal") is None
    assert next_donor(donors, "spatial") is None
    assert next_donor([], "temporal") is None


def test_temporal_sharing_takes_from_the_most_recently_run_active_model():
    donors = [
        donor("a", active=True, last_run=3.0, missing=4, cap=6),
        donor("b", active=True, last_run=8.0, missing=0, cap=6),
        donor("c", active=True, last_run=5.0, missing=0, cap=6),
    ]
    assert next_donor(donors, "temporal") == "b"


def test_spatial_sharing_spreads_over_active_models():
    """Spatial: the active model with the smallest used share of its cap; most recent on ties."""
    donors = [
        donor("a", active=True, last_run=3.0, missing=1, cap=2),  # 50%
        donor("b", active=True, last_run=8.0, missing=3, cap=6),  # 50%
        donor("c", active=True, last_run=5.0, missing=1, cap=6),  # 17%
    ]
    assert next_donor(donors, "spatial") == "c"
    donors[2] = donor("c", active=True, last_run=5.0, missing=3, cap=6)  # now all 50%
    assert next_donor(donors, "spatial") == "b"


def test_spatial_sharing_evens_out_alpha_over_repeated_takes():
    """Taking layers one by one under spatial sharing keeps every model's share within one layer."""
    caps = {"a": 9, "b": 9, "c": 9}
    missing = dict.fromkeys(caps, 0)
    runs = {"a": 1.0, "b": 2.0, "c": 3.0}
    order = []
    while True:
        ds = [
            donor(n, active=True, last_run=runs[n], missing=missing[n], cap=caps[n]) for n in caps
        ]
        name = next_donor(ds, "spatial")
        if name is None:
            break
        order.append(name)
        missing[name] += 1
        assert max(missing.values()) - min(missing.values()) <= 1
    assert missing == caps
    assert order[:3] == ["c", "b", "a"]  # most recent first on ties


def test_temporal_sharing_empties_one_model_before_the_next():
    caps = {"a": 3, "b": 3}
    missing = dict.fromkeys(caps, 0)
    runs = {"a": 1.0, "b": 2.0}
    order = []
    while (name := next_donor(
        [donor(n, active=True, last_run=runs[n], missing=missing[n], cap=caps[n]) for n in caps],
        "temporal",
    )) is not None:
        order.append(name)
        missing[name] += 1
    assert order == ["b"] * 3 + ["a"] * 3


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.floats(0, 100), st.integers(0, 10), st.integers(0, 10)),
        min_size=1, max_size=6,
    ),
    st.sampled_from(["temporal", "spatial"]),
)
def test_next_donor_properties(specs, sharing):
    donors = [
        DonorInfo(f"m{k}", active, last, 12, min(missing, cap), cap)
        for k, (active, last, missing, cap) in enumerate(specs)
    ]
    name = next_donor(donors, sharing)
    open_ = [d for d in donors if d.num_missing < d.alpha_cap]
    if not open_:
        assert name is None
        return
    chosen = next(d for d in donors if d.name == name)
    assert chosen.num_missing < chosen.alpha_cap
    inactive = [d for d in open_ if not d.active]
    if inactive:
        assert not chosen.active
        assert chosen.last_run == max(d.last_run for d in inactive)
    elif sharing == "temporal":
        assert chosen.last_run == max(d.last_run for d in open_)
    else:
        assert chosen.num_missing / chosen.alpha_cap == min(
            d.num_missing / d.alpha_cap for d in open_
        )


# ---- hysteresis and the revert rule -------------------------------------------------------------
def test_hysteresis_needs_consecutive_steps():
    h = Hysteresis(3)
    assert [h.update(x) for x in [True, True, False, True, True, True, True]] == [
        False, False, False, False, False, True, True
    ]
    h.streak = 0  # the controller resets it after a restore
    assert not h.update(True)


def test_hysteresis_of_one_step_reacts_at_once():
    h = Hysteresis(1)
    assert h.update(True) and not h.update(False) and h.update(True)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10), st.lists(st.booleans(), max_size=40))
def test_hysteresis_is_true_exactly_after_hold_consecutive_trues(hold, xs):
    h = Hysteresis(hold)
    run = 0
    for x in xs:
        run = run + 1 if x else 0
        assert h.update(x) == (run >= hold)


def test_should_revert():
    # One layer is 7 pages; 40 KV pages in use with reserve 0.25 -> 10 pages must stay free.
    assert should_revert(17, 7, 40, 0.25)
    assert not should_revert(16, 7, 40, 0.25)
    assert should_revert(7, 7, 0, 0.25)  # idle: a layer's worth of pages suffices
    assert not should_revert(6, 7, 0, 0.25)
    assert should_revert(7, 7, 1000, 0.0)  # no reserve


# ---- restore priority ---------------------------------------------------------------------------
def test_restore_priority_follows_the_tenancy_order_then_mru():
    donors = [
        donor("a", active=True, last_run=1.0, missing=2),
        donor("b", last_run=7.0, missing=1),
        donor("c", active=True, last_run=3.0, missing=4),
        donor("d", last_run=9.0, missing=3),
        donor("e", last_run=10.0, missing=0),  # nothing to restore
        donor("f", active=True, last_run=11.0, missing=0),
    ]
    assert restore_priority(donors, ["c", "f", "a"]) == ["c", "a", "d", "b"]
    assert restore_priority(donors, []) == ["d", "b", "c", "a"]
    assert restore_priority([donor("x"), donor("y")], ["x"]) == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 50), st.integers(0, 3)), min_size=1, max_size=6),
    st.data(),
)
def test_restore_priority_properties(specs, data):
    donors = [DonorInfo(f"m{k}", False, t, 8, m, 7) for k, (t, m) in enumerate(specs)]
    names = [d.name for d in donors]
    next_to_run = data.draw(st.lists(st.sampled_from(names), unique=True))
    order = restore_priority(donors, next_to_run)
    with_missing = {d.name for d in donors if d.num_missing}
    assert sorted(order) == sorted(with_missing) and len(order) == len(set(order))
    head = [n for n in next_to_run if n in with_missing]
    assert order[: len(head)] == head
    tail = [next(d for d in donors if d.name == n).last_run for n in order[len(head):]]
    assert tail == sorted(tail, reverse=True)


# ---- stateful: remap and revert against KV traffic over two real models -------------------------
PAGE = 64 * 1024
SOURCES = {"llama": "random:llama-tiny", "opt": "random:opt-tiny@1"}
_RESOLVED: dict[str, object] = {}


def _source(src: str):
    if src not in _RESOLVED:
        _RESOLVED[src] = resolve(src)
    return _RESOLVED[src]


class Layers:
    """A model's parameter accounting and its bytes driven together, as planning and the executor
    do: the residency changes, the matching memory action is applied to the bytes at once."""

    def __init__(self, name: str, model, arena: PageArena, storage: DeviceArena, source) -> None:
        self.name, self.model, self.arena, self.storage = name, model, arena, storage
        self.res = make_residency(name, model, arena)
        self.res.place_all()
        self.w = ModelWeights(self.res, model, storage)
        self.w.load(source)
        self.host, self.layer_layout, self.resident_layout = (
            self.w.host, self.w.layer_layout, self.w.resident_layout
        )

    slab_pages = property(lambda self: self.res.slab_pages)
    missing_layers = property(lambda self: self.res.missing_layers)
    pages_per_layer = property(lambda self: self.res.pages_per_layer)
    resident_pages = property(lambda self: self.res.resident_pages)

    def region(self, i: int) -> torch.Tensor:
        return self.w.region(i)

    def evict_layer(self, i: int) -> list[int]:
        pages = self.res.evict(i)
        self.w.apply(EvictLayer(self.name, i, tuple(pages)))
        return pages

    def restore_layer(self, i: int) -> bool:
        pages = self.res.restore(i)
        if pages is not None:
            self.w.apply(RestoreLayer(self.name, i, tuple(pages)))
        return pages is not None

    def release(self) -> None:
        self.res.release()


def load_models(extra_pages: int):
    """Both models loaded into one arena with `extra_pages` pages left for KV; their KV pools."""
    built = {n: (build_model(_source(s).config, torch.float32, torch.device("cpu")), _source(s))
             for n, s in SOURCES.items()}
    pages = sum(weight_pages(m, PAGE) for m, _ in built.values()) + extra_pages
    arena = PageArena(pages, PAGE)
    storage = DeviceArena(pages, PAGE, torch.device("cpu"))
    weights, pools = {}, {}
    for name, (model, source) in built.items():
        weights[name] = Layers(name, model, arena, storage, source)
        c = model.cfg
        pools[name] = KVPool(name, arena, 4 * c.kv_bytes_per_token(4), 4)
    return arena, storage, weights, pools


def max_free_run(arena: PageArena) -> int:
    best = run = 0
    for p in range(arena.num_pages):
        run = run + 1 if arena.owner(p).kind is OwnerKind.FREE else 0
        best = max(best, run)
    return best


def check_layers(w: Layers, resident_bytes: torch.Tensor) -> None:
    """Every layer is resident in its own slab (pages owned by it, contiguous, holding its bytes and
    bound to the model) or listed missing (no pages, unbound)."""
    arena = w.arena
    owned_by_slabs = 0
    for i, pages in enumerate(w.slab_pages):
        owner = Owner.slab(w.name, i)
        if pages is None:
            assert i in w.missing_layers
            assert w.model.layers[i] is None, f"missing layer {i} of {w.name} is still bound"
            assert arena.pages_of(owner) == []
            continue
        assert i not in w.missing_layers
        assert len(pages) == w.pages_per_layer
        assert pages == list(range(pages[0], pages[0] + len(pages))), "a slab must be contiguous"
        assert arena.pages_of(owner) == pages
        owned_by_slabs += len(pages)
        region = w.region(i)
        assert same_bytes(region, w.host[i]), f"slab of layer {i} of {w.name} lost its bytes"
        views = w.model.layers[i]
        assert views is not None
        first = w.layer_layout.entries[0].name
        assert views[first].data_ptr() == region.data_ptr(), "the model reads another slab"
    assert w.missing_layers == [i for i, p in enumerate(w.slab_pages) if p is None]
    assert arena.usage_by_kind().get(f"{w.name}/slab", 0) == owned_by_slabs
    res = w.storage.region(w.resident_pages[0], w.resident_layout.nbytes)
    assert same_bytes(res, resident_bytes), f"resident tensors of {w.name} were overwritten"


class RemapMachine(RuleBasedStateMachine):
    """Remap (evict) and revert (restore) layers of two models while their KV pools grow, shrink and
    lose requests. KV pages are scribbled on after every change, the way KV writes would land, so a
    page that is both a slab and KV shows up as a slab with the wrong bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.arena, self.storage, self.weights, self.pools = load_models(extra_pages=5)
        self.resident = {
            n: w.storage.region(w.resident_pages[0], w.resident_layout.nbytes).clone()
            for n, w in self.weights.items()
        }
        self.requests: dict[str, list[list[int]]] = {n: [] for n in self.weights}
        self.scribble = 0

    names = st.sampled_from(sorted(SOURCES))

    def _scribble_kv(self) -> None:
        self.scribble = (self.scribble + 37) % 256
        pages = self.storage.buffer.view(self.arena.num_pages, PAGE)
        for pool in self.pools.values():
            for p in pool._pages:
                pages[p].fill_(self.scribble)

    @rule(name=names, data=st.data())
    def remap(self, name, data):
        w = self.weights[name]
        resident = [i for i, p in enumerate(w.slab_pages) if p is not None]
        assume(resident)
        layer = data.draw(st.sampled_from(resident))
        free_before = self.arena.num_free
        pages = w.evict_layer(layer)
        assert len(pages) == w.pages_per_layer
        assert self.arena.num_free == free_before + len(pages)
        assert all(self.arena.owner(p).kind is OwnerKind.FREE for p in pages)
        with pytest.raises(ValueError):
            w.evict_layer(layer)  # twice is a bug

    @rule(name=names, data=st.data())
    def remap_the_next_layer(self, name, data):
        """What the controller does: the next layer to remap, and its pages into the KV pool."""
        w = self.weights[name]
        nxt = next_to_evict(w.model.cfg.num_layers, w.missing_layers)
        assume(nxt is not None)
        w.evict_layer(nxt)
        other = data.draw(self.names)
        pool = self.pools[other]
        blocks = pool.allocate(w.pages_per_layer * pool.blocks_per_page)
        assert blocks is not None, "the freed slab pages are there for KV"
        self.requests[other].append(blocks)
        self._scribble_kv()

    @rule(name=names, data=st.data())
    def revert(self, name, data):
        w = self.weights[name]
        missing = w.missing_layers
        assume(missing)
        layer = data.draw(st.sampled_from(missing))
        run = max_free_run(self.arena)
        free_before = self.arena.num_free
        ok = w.restore_layer(layer)
        assert ok == (run >= w.pages_per_layer)
        if ok:
            assert self.arena.num_free == free_before - w.pages_per_layer
        else:
            assert self.arena.num_free == free_before and layer in w.missing_layers

    @rule(name=names, n=st.integers(1, 40))
    def kv_allocate(self, name, n):
        pool = self.pools[name]
        can = pool.can_allocate(n)
        free_before = self.arena.num_free
        blocks = pool.allocate(n)
        assert (blocks is not None) == can
        if blocks is None:
            assert self.arena.num_free == free_before
            return
        self.requests[name].append(blocks)
        self._scribble_kv()

    @rule(name=names, data=st.data())
    def kv_free(self, name, data):
        reqs = self.requests[name]
        assume(reqs)
        k = data.draw(st.integers(0, len(reqs) - 1))
        self.pools[name].free(reqs.pop(k))

    @rule(name=names, max_pages=st.one_of(st.none(), st.integers(0, 6)))
    def kv_shrink(self, name, max_pages):
        pool = self.pools[name]
        idle = pool.num_idle_pages
        given_back = pool.shrink(max_pages)
        assert len(given_back) == (idle if max_pages is None else min(idle, max_pages))
        assert all(self.arena.owner(p).kind is OwnerKind.FREE for p in given_back)

    @rule(name=names)
    def preempt_all(self, name):
        """Recompute preemption of every request of a model, then its idle pages go back."""
        pool = self.pools[name]
        for blocks in self.requests[name]:
            pool.free(blocks)
        self.requests[name] = []
        pool.shrink()
        assert pool.num_pages == 0

    @precondition(lambda self: any(w.missing_layers for w in self.weights.values()))
    @rule()
    def revert_everything_possible(self):
        """Dynamic reversion after the load fell: free every KV block, shrink, restore what fits
        (most recently remapped last, as the controller does). Whether every layer fits again is
        test_fragmentation_can_strand_a_layer_with_enough_free_pages below."""
        for name in self.pools:
            self.preempt_all(name)
        for w in self.weights.values():
            for layer in reversed(w.missing_layers):
                run = max_free_run(self.arena)
                assert w.restore_layer(layer) == (run >= w.pages_per_layer)

    @invariant()
    def integrity(self):
        self.arena.check_integrity()
        for pool in self.pools.values():
            pool.check_integrity()
        for name, w in self.weights.items():
            check_layers(w, self.resident[name])
        live = [b for reqs in self.requests.values() for blocks in reqs for b in blocks]
        used = sum(p.num_used for p in self.pools.values())
        assert len(live) == used

    def teardown(self):
        for w in self.weights.values():
            w.release()
        for name in self.pools:
            self.preempt_all(name)
        assert self.arena.num_free == self.arena.num_pages, "pages leaked"


TestRemapMachine = RemapMachine.TestCase
TestRemapMachine.settings = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_every_layer_can_go_and_come_back_when_kv_is_empty():
    """Fragmentation from one full cycle does not leave a slab without a contiguous run."""
    arena, _, weights, _ = load_models(extra_pages=2)
    for w in weights.values():
        while (layer := next_to_evict(w.model.cfg.num_layers, w.missing_layers)) is not None:
            w.evict_layer(layer)
    for w in weights.values():
        while (layer := next_to_restore(w.model.cfg.num_layers, w.missing_layers)) is not None:
            assert w.restore_layer(layer)
        assert w.missing_layers == []
    arena.check_integrity()


def test_restoring_a_resident_layer_is_refused():
    arena, _, weights, _ = load_models(extra_pages=4)
    w = weights["llama"]
    free = arena.num_free
    try:
        w.restore_layer(1)
    except ValueError:
        pass
    assert arena.num_free == free, "a second slab was allocated for a resident layer"


def test_fragmentation_can_strand_a_layer_with_enough_free_pages():
    arena = PageArena(weight_pages(
        build_model(_source("random:llama-tiny").config, torch.float32, torch.device("cpu")), PAGE
    ) + 1, PAGE)
    storage = DeviceArena(arena.num_pages, PAGE, torch.device("cpu"))
    model = build_model(_source("random:llama-tiny").config, torch.float32, torch.device("cpu"))
    w = Layers("m", model, arena, storage, _source("random:llama-tiny"))
    pool = KVPool("m", arena, 4 * model.cfg.kv_bytes_per_token(4), 4)
    # Layout from the top: resident 13..17, layer 0 at 10..12, 1 at 7..9, 2 at 4..6, 3 at 1..3.
    assert [w.slab_pages[i][0] for i in range(4)] == [10, 7, 4, 1] and arena.num_free == 1
    w.evict_layer(2)  # removal order [2, 1, 3]
    w.evict_layer(1)
    blocks = pool.allocate(7 * pool.blocks_per_page)  # KV takes pages 0 and 4..9
    assert blocks is not None and sorted(pool._pages) == [0, 4, 5, 6, 7, 8, 9]
    top = [b for b in blocks if b // pool.blocks_per_page == 9]
    pool.free([b for b in blocks if b not in top])  # the burst ends, one request lives on (page 9)
    pool.shrink()
    assert w.restore_layer(1)  # reversion: restored into 6..8, one page below its old place
    pool.free(top)
    pool.shrink()  # the KV cache is empty now
    assert pool.num_pages == 0 and arena.num_free == 4 >= w.pages_per_layer
    free = [p for p in range(arena.num_pages) if arena.owner(p).kind is OwnerKind.FREE]
    assert w.restore_layer(2), f"free pages {free}"
