"""The transfer planner (`plan_pass`, `check_plan`) and the LayerStreamer on CPU with real bytes.

A pass runs a model's n layers with alpha of them non-resident: the missing layers stream, in layer
order, through `distance` borrowed slabs (the slabs of the first resident layers). Every plan here
is checked twice: by the module's own `check_plan` and by `replay` below, an independent and
stricter model of the pass (a copy takes its slab the moment it is issued, so a prefetch that lands
on a slab whose layer has not run yet is caught).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oneiros.memory.remap import even_layers
from oneiros.memory.storage import DeviceArena
from oneiros.memory.passplan import Copy, PassPlan, check_plan, plan_pass
from oneiros.memory.streamer import LayerStreamer
from tests.helpers import same_bytes


# ---- an independent replay of a pass plan -------------------------------------------------------
def replay(plan: PassPlan) -> dict[int, int]:
    """Walk the pass layer by layer; copies take effect when they are issued (the most pessimistic
    view: on CUDA a copy may land at any time after it is issued). Returns slab -> layer at the end.

    Checks: every layer runs from the slab the plan names and that slab holds its own weights; every
    missing layer is copied exactly once, into the slab it runs from, before it runs; a copy only
    overwrites a slab whose current layer has already run in this pass; restores bring a slab's own
    layer back; every slab holds its own layer when the pass ends."""
    n, missing = plan.num_layers, set(plan.missing)
    resident = [i for i in range(n) if i not in missing]
    holds = {s: s for s in resident}
    ran: set[int] = set()
    fetches = [c for c in plan.copies if not c.restore]
    restores = [c for c in plan.copies if c.restore]
    assert sorted(c.layer for c in fetches) == sorted(missing), "each missing layer copied once"
    assert set(plan.slab_of) == missing, "every missing layer needs a slab to run from"
    for c in plan.copies:
        assert c.slab in holds, f"copy into slab {c.slab}, which is not a resident layer's"
        assert -1 <= c.after < n
    for c in fetches:
        assert c.slab == plan.slab_of[c.layer], f"layer {c.layer} copied into another slab"
        assert c.after < c.layer, f"layer {c.layer} is copied only after it should have run"
    for c in restores:
        assert c.layer == c.slab, "a restore copies a slab's own layer back"

    def issue(c: Copy) -> None:
        occupant = holds[c.slab]
        assert occupant in ran or occupant == c.layer, (
            f"copy of layer {c.layer} into slab {c.slab} overwrites layer {occupant}, "
            "which has not run yet in this pass"
        )
        holds[c.slab] = c.layer

    for c in plan.starting_after(-1):
        issue(c)
    for i in range(n):
        slab = plan.slab_of.get(i, i)
        assert holds.get(slab) == i, f"layer {i} runs from slab {slab} holding {holds.get(slab)}"
        ran.add(i)
        for c in plan.starting_after(i):
            issue(c)
    assert ran == set(range(n))
    assert all(holds[s] == s for s in resident), f"slabs end the pass holding {holds}"
    return holds


def expected_copies(n: int, missing: tuple[int, ...], distance: int) -> int:
    """alpha + the borrowed slabs the pass uses. The first borrowed slab always carries the first
    missing layer. The second (distance 2) is used as soon as two missing layers come after it: the
    planner puts each layer into the slab that frees up earliest, which is the first one until the
    second has run."""
    alpha = len(missing)
    if not alpha:
        return 0
    if distance == 1:
        return alpha + 1
    resident = [r for r in range(n) if r not in missing and r < missing[-1]]
    second = resident[1] if len(resident) >= 2 else None
    uses_second = second is not None and sum(m > second for m in missing) >= 2
    return alpha + 1 + uses_second


def missing_sets(max_layers: int = 40):
    """(n, missing) with layer 0 resident and at least one layer missing."""
    return st.integers(2, max_layers).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.sets(st.integers(1, n - 1), min_size=1, max_size=n - 1).map(
                lambda s: tuple(sorted(s))
            ),
        )
    )


# ---- planner: exhaustive and property-based -----------------------------------------------------
def test_every_missing_set_of_small_models_is_planned_correctly():
    """All 2^(n-1) - 1 missing sets for n <= 10, both distances."""
    count = 0
    for n in range(2, 11):
        for k in range(1, n):
            for missing in itertools.combinations(range(1, n), k):
                for distance in (1, 2):
                    plan = plan_pass(n, missing, distance)
                    check_plan(plan)
                    replay(plan)
                    assert plan.missing == missing
                    assert plan.num_copies == expected_copies(n, missing, distance)
                    count += 1
    assert count == 2 * sum(2 ** (n - 1) - 1 for n in range(2, 11))


@settings(max_examples=400, deadline=None)
@given(missing_sets(), st.sampled_from([1, 2]))
def test_arbitrary_missing_sets(case, distance):
    n, missing = case
    plan = plan_pass(n, list(reversed(missing)), distance)  # order of the input does not matter
    check_plan(plan)
    replay(plan)
    assert plan.num_copies == expected_copies(n, missing, distance)
    resident = [r for r in range(n) if r not in missing]
    borrowed = [r for r in resident if r < missing[-1]][:distance]
    used = {c.slab for c in plan.copies}
    # Only the first `distance` resident layers before the last missing one lend their slabs.
    assert used <= set(borrowed) and borrowed[0] in used
    # Each used slab is restored exactly once, after its last borrower ran.
    for s in used:
        (r,) = [c for c in plan.copies if c.restore and c.slab == s]
        last_user = max(m for m, slab in plan.slab_of.items() if slab == s)
        assert r.after == last_user
    if distance == 1:
        assert plan.num_copies == len(missing) + 1
        # Single buffering: each missing layer is copied once the slab's previous user ran.
        prev = [borrowed[0], *missing[:-1]]
        assert [c.after for c in plan.copies if not c.restore] == prev
    elif len(borrowed) == 2 and sum(m > borrowed[1] for m in missing) >= 2:
        assert plan.num_copies == len(missing) + 2


@pytest.mark.parametrize("n", [4, 5, 8, 12, 16, 30, 32, 40, 80])
@pytest.mark.parametrize("distance", [1, 2])
def test_even_layouts_copy_alpha_plus_distance(n, distance):
    """The controller's layouts: alpha + 1 copies with distance 1; up to alpha + 2 with distance 2
    (one layer needs one slab)."""
    for alpha in range(1, n):
        missing = tuple(even_layers(n, alpha))
        plan = plan_pass(n, missing, distance)
        check_plan(plan)
        replay(plan)
        assert plan.num_copies == expected_copies(n, missing, distance)
        if distance == 1 or alpha == 1:
            assert plan.num_copies == alpha + 1, (n, alpha, missing)
        else:  # the second borrowed slab joins once two missing layers come close
            assert alpha + 1 <= plan.num_copies <= alpha + 2, (n, alpha, missing)


def test_double_buffering_alternates_slabs():
    """Spread-out missing layers with distance 2: copies alternate between the two borrowed slabs,
    so each copy starts two intervals before its layer runs."""
    plan = plan_pass(10, [2, 4, 6, 8], 2)
    assert plan.slab_of == {2: 0, 4: 1, 6: 0, 8: 1}
    fetch = [(c.layer, c.slab, c.after) for c in plan.copies if not c.restore]
    assert fetch == [(2, 0, 0), (4, 1, 1), (6, 0, 2), (8, 1, 4)]
    restore = sorted((c.slab, c.after) for c in plan.copies if c.restore)
    assert restore == [(0, 6), (1, 8)]
    assert plan.num_copies == 4 + 2
    # Distance 1 on the same set: one slab, each copy right after the previous borrower.
    plan1 = plan_pass(10, [2, 4, 6, 8], 1)
    assert [(c.layer, c.slab, c.after) for c in plan1.copies] == [
        (2, 0, 0), (4, 0, 2), (6, 0, 4), (8, 0, 6), (0, 0, 8)
    ]


def test_the_earliest_free_slab_wins_even_with_distance_two():
    """missing {1, 3} of 4: slab 0 frees after layer 1, slab 2 only after layer 2, so both missing
    layers go through slab 0 (alpha + 1 copies): the copy of 3 starts a layer earlier that way."""
    plan = plan_pass(4, [1, 3], 2)
    assert plan.slab_of == {1: 0, 3: 0}
    assert plan.num_copies == 3
    replay(plan)


def test_nothing_missing_is_an_empty_plan():
    for distance in (1, 2, 3):  # distance is not even looked at
        plan = plan_pass(6, [], distance)
        assert plan.copies == () and plan.num_copies == 0 and plan.slab_of == {}
        check_plan(plan)
        replay(plan)


@pytest.mark.parametrize("distance", [0, 3, -1])
def test_bad_distance(distance):
    with pytest.raises(ValueError, match="distance"):
        plan_pass(6, [2], distance)


@pytest.mark.parametrize("missing", [[0], [0, 3], [0, 1, 2, 3]])
def test_layer_zero_must_be_resident(missing):
    with pytest.raises(ValueError, match="resident layer before"):
        plan_pass(4, missing, 1)


def test_starting_after_groups_copies_by_their_trigger():
    plan = plan_pass(12, even_layers(12, 5), 2)
    seen = []
    for i in range(-1, 12):
        group = plan.starting_after(i)
        assert all(c.after == i for c in group)
        seen += group
    assert sorted(seen, key=plan.copies.index) == list(plan.copies)


# ---- check_plan must reject bad plans -----------------------------------------------------------
def _good() -> PassPlan:
    plan = plan_pass(6, [2, 4], 1)  # 2 -> slab 0 after 0; 4 -> slab 0 after 2; restore 0 after 4
    assert [(c.layer, c.slab, c.after, c.restore) for c in plan.copies] == [
        (2, 0, 0, False), (4, 0, 2, False), (0, 0, 4, True)
    ]
    return plan


def _bad_plans() -> dict[str, PassPlan]:
    good = _good()
    return {
        "no restore": PassPlan(6, (2, 4), good.copies[:2], dict(good.slab_of)),
        "runs from a slab holding another layer": PassPlan(
            6, (2, 4), good.copies, {2: 0, 4: 1}
        ),
        # Slab 1 still holds layer 1 when layer 2 is copied into it after layer 0.
        "overwrites a resident layer before it runs": PassPlan(
            6, (2, 4), (Copy(2, 1, 0, False), Copy(4, 1, 2, False), Copy(1, 1, 4, True)),
            {2: 1, 4: 1},
        ),
    }


@pytest.mark.parametrize("name", list(_bad_plans()))
def test_check_plan_rejects(name):
    plan = _bad_plans()[name]
    with pytest.raises(AssertionError):
        check_plan(plan)
    with pytest.raises(AssertionError):
        replay(plan)


_SLIPS_THROUGH = {
    # Layer 2 is copied into slab 0 after layer 0, then layer 3 into slab 0 after layer 1: layer 2's
    # weights are overwritten before it runs, so layer 2 would run with layer 3's weights.
    "prefetch overwritten before it runs": PassPlan(
        4, (2, 3), (Copy(2, 0, 0, False), Copy(3, 0, 1, False), Copy(0, 0, 3, True)), {2: 0, 3: 0}
    ),
    # A copy issued before the pass (after=-1, documented on Copy) into slab 0: layer 0 would run
    # with layer 2's weights. check_plan never looks at copies with after == -1.
    "copy before the pass overwrites layer 0": PassPlan(
        6, (2, 4), (Copy(2, 0, -1, False), *_good().copies[1:]), {2: 0, 4: 0}
    ),
}


@pytest.mark.parametrize("name", list(_SLIPS_THROUGH))
def test_check_plan_rejects_overwrites_it_does_not_replay(name):
    plan = _SLIPS_THROUGH[name]
    with pytest.raises(AssertionError):
        replay(plan)  # the independent replay sees it
    with pytest.raises(AssertionError):
        check_plan(plan)


# ---- LayerStreamer on CPU with real bytes -------------------------------------------------------
class FakeModel:
    """n layers whose weights are distinct byte patterns in slabs of a DeviceArena. `bound[i]` is
    the region layer i reads its weights from (None: unbound), which is what DecoderModel.bind_layer
    does with views. Pages of non-resident layers are handed to 'KV', which scribbles on them."""

    def __init__(self, n: int, layer_bytes: int = 3000, page_bytes: int = 1024) -> None:
        self.n = n
        self.layer_bytes = layer_bytes
        self.pages_per_layer = -(-layer_bytes // page_bytes)
        self.storage = DeviceArena(n * self.pages_per_layer, page_bytes, torch.device("cpu"))
        self.host = [self.pattern(i) for i in range(n)]
        self.first_page: dict[int, int | None] = {}
        self.bound: dict[int, torch.Tensor | None] = {}
        for i in range(n):
            self.first_page[i] = i * self.pages_per_layer
            self.region(i).copy_(self.host[i])
            self.bound[i] = self.region(i)
        self.kv_pages: list[int] = []
        self.copies = 0  # copies the streamer made (each asks for its destination region once)

    def pattern(self, i: int) -> torch.Tensor:
        x = torch.arange(self.layer_bytes, dtype=torch.int64)
        return ((x * (2 * i + 1) + 17 * i + 3) % 251).to(torch.uint8)

    def region(self, slab: int) -> torch.Tensor:
        page = self.first_page[slab]
        assert page is not None, f"layer {slab} has no slab"
        return self.storage.region(page, self.layer_bytes)

    def bind(self, layer: int, slab: int | None) -> None:
        self.bound[layer] = None if slab is None else self.region(slab)

    def evict(self, layer: int) -> None:
        page = self.first_page[layer]
        self.first_page[layer] = None
        self.bound[layer] = None
        self.kv_pages += range(page, page + self.pages_per_layer)

    def scribble_kv(self, value: int) -> None:
        pages = self.storage.buffer.view(self.storage.num_pages, self.storage.page_bytes)
        for p in self.kv_pages:
            pages[p].fill_(value)

    def copy_destination(self, slab: int) -> torch.Tensor:
        self.copies += 1
        return self.region(slab)

    def streamer(self) -> LayerStreamer:
        return LayerStreamer(self.host, self.copy_destination, self.bind, torch.device("cpu"))

    def run_pass(self, streamer: LayerStreamer, plan: PassPlan, step: int) -> list[int]:
        """One forward pass; each 'layer' checks the bytes it would read. Returns the layers run."""
        before, after = streamer.hooks(plan)
        seen = []
        for i in range(self.n):
            before(i)
            w = self.bound[i]
            assert w is not None, f"layer {i} has no weights bound in pass {step}"
            assert same_bytes(w, self.host[i]), f"layer {i} read other bytes in pass {step}"
            self.scribble_kv((step * 7 + i) % 256)  # KV writes land on the evicted pages
            seen.append(i)
            after(i)
        streamer.finish_pass()
        return seen

    def check_end_of_pass(self, missing: tuple[int, ...]) -> None:
        for i in range(self.n):
            if i in missing:
                assert self.bound[i] is None, f"missing layer {i} still bound after the pass"
            else:
                assert same_bytes(self.region(i), self.host[i]), f"slab {i} lost its layer"
                b = self.bound[i]
                assert b is not None and b.data_ptr() == self.region(i).data_ptr()


@pytest.mark.parametrize("n", [4, 7, 12])
@pytest.mark.parametrize("distance", [1, 2])
def test_streamer_runs_every_layer_with_its_own_bytes(n, distance):
    for alpha in range(1, n):
        m = FakeModel(n)
        missing = tuple(even_layers(n, alpha))
        for layer in missing:
            m.evict(layer)
        streamer = m.streamer()
        plan = plan_pass(n, missing, distance)
        for step in range(3):
            assert m.run_pass(streamer, plan, step) == list(range(n))
            m.check_end_of_pass(missing)
            assert m.copies == (step + 1) * plan.num_copies
        assert streamer.stats.exposed_s == pytest.approx(streamer.stats.copy_s)  # CPU: all exposed
        assert streamer.stats.copy_s >= 0


@settings(max_examples=60, deadline=None)
@given(missing_sets(14), st.sampled_from([1, 2]), st.integers(1, 3))
def test_streamer_arbitrary_missing_sets(case, distance, passes):
    n, missing = case
    m = FakeModel(n, layer_bytes=704, page_bytes=512)
    for layer in missing:
        m.evict(layer)
    streamer = m.streamer()
    plan = plan_pass(n, missing, distance)
    for step in range(passes):
        m.run_pass(streamer, plan, step)
        m.check_end_of_pass(missing)
    assert m.copies == passes * plan.num_copies


def test_streamer_follows_residency_changes():
    """More layers go, then some come back: after reset() each new plan runs correctly, and the
    copy count follows each plan."""
    n = 12
    m = FakeModel(n)
    streamer = m.streamer()
    total = 0
    # Restoring a layer here = giving it its own pages back (from 'KV') and copying its bytes.
    for step, alpha in enumerate([2, 5, 9, 4, 1, 0, 3]):
        target = set(even_layers(n, alpha))
        current = {i for i in range(n) if m.first_page[i] is None}
        streamer.reset()
        for layer in sorted(target - current):
            m.evict(layer)
        for layer in sorted(current - target):
            page = layer * m.pages_per_layer
            for p in range(page, page + m.pages_per_layer):
                m.kv_pages.remove(p)
            m.first_page[layer] = page
            m.region(layer).copy_(m.host[layer])
            m.bind(layer, layer)
        missing = tuple(sorted(target))
        plan = plan_pass(n, missing, 2)
        m.run_pass(streamer, plan, step)
        m.check_end_of_pass(missing)
        total += plan.num_copies
        assert m.copies == total


def test_streamer_without_hooks_for_a_fully_resident_model():
    m = FakeModel(5)
    streamer = m.streamer()
    plan = plan_pass(5, [], 2)
    m.run_pass(streamer, plan, 0)
    m.check_end_of_pass(())
    assert m.copies == 0 and streamer.stats.copy_s == 0
