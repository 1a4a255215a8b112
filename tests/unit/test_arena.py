"""PageArena: page ownership bookkeeping (no tensors)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from oneiros.memory.arena import FREE, Owner, OwnerKind, PageArena

A_RES = Owner.resident("a")
A_SLAB0 = Owner.slab("a", 0)
A_SLAB1 = Owner.slab("a", 1)
B_SLAB0 = Owner.slab("b", 0)
A_KV = Owner.kv("a")
B_KV = Owner.kv("b")


# ---- plain unit tests ---------------------------------------------------------------------------
def test_new_arena_is_all_free():
    a = PageArena(8, 4096)
    assert a.num_free == 8
    assert all(a.owner(p) == FREE for p in range(8))
    assert a.usage() == {"free": 8}
    assert a.usage_by_kind() == {"free": 8}
    a.check_integrity()


@pytest.mark.parametrize("num_pages,page_bytes", [(0, 4096), (4, 0), (-1, 10)])
def test_arena_needs_a_page(num_pages, page_bytes):
    with pytest.raises(ValueError):
        PageArena(num_pages, page_bytes)


def test_alloc_takes_lowest_free_pages():
    a = PageArena(8, 4096)
    assert a.alloc(3, A_RES) == [0, 1, 2]
    a.free([1], A_RES)
    assert a.alloc(2, A_KV) == [1, 3]
    assert a.pages_of(A_RES) == [0, 2]
    assert a.pages_of(A_KV) == [1, 3]
    assert a.num_free == 4
    a.check_integrity()


def test_alloc_run_takes_highest_contiguous_run():
    a = PageArena(10, 4096)
    assert a.alloc_run(3, A_SLAB0) == [7, 8, 9]
    assert a.alloc_run(2, A_SLAB1) == [5, 6]
    a.alloc(1, A_KV)  # page 0
    a.free([5, 6], A_SLAB1)
    # Free now: 1..6; the highest run of 4 is 3..6.
    assert a.alloc_run(4, B_SLAB0) == [3, 4, 5, 6]
    a.check_integrity()


def test_alloc_run_leans_against_parameters_not_kv():
    a = PageArena(10, 4096)
    a.alloc_run(2, A_RES)  # 8, 9
    a.alloc(1, A_KV)  # 0
    a.alloc_run(2, A_SLAB0)  # 6, 7 (against the resident run)
    a.transfer([4], FREE, A_KV)
    # Free: 1..3 (KV at 0 and 4) and 5 (too short). KV on both sides: the top of the run.
    assert a.alloc_run(2, A_SLAB1) == [2, 3]
    a.free([2, 3], A_SLAB1)
    a.free([0], A_KV)
    a.alloc_run(1, A_RES)  # the top free run is 5: the resident page goes there
    # Free: 0..3, KV above it at 4, nothing below: top.
    assert a.alloc_run(2, A_SLAB1) == [2, 3]
    a.free([2, 3], A_SLAB1)
    a.free([4], A_KV)
    a.free([5], A_RES)
    a.transfer([5], FREE, A_KV)
    a.transfer([0], FREE, A_RES)
    # Free 1..4: KV above (5), a parameter below (0): the slab goes to the bottom, the rest of the
    # run stays next to the KV page and merges with it when it is freed.
    assert a.alloc_run(2, B_SLAB0) == [1, 2]
    a.check_integrity()


def test_plan_compaction_packs_slabs_inside_a_segment():
    a = PageArena(12, 4096)
    a.alloc_run(1, A_RES)  # 11
    a.alloc_run(2, A_SLAB0)  # 9, 10
    a.alloc_run(2, A_SLAB1)  # 7, 8
    a.alloc_run(2, B_SLAB0)  # 5, 6
    a.alloc(5, A_KV)  # 0..4
    a.free([0, 2], A_KV)
    a.free([9, 10], A_SLAB0)
    a.free([5, 6], B_SLAB0)
    a.transfer([5], FREE, B_SLAB0)  # B_SLAB0 now a 1-page slab at 5
    # Segment 5..10 (between KV page 4 and the resident page): slab b0 at 5, a1 at 7..8, free 6,
    # 9, 10. Free 0 and 2 lie in other segments. No run of 3 exists.
    assert a.alloc_run(3, Owner.slab("b", 1)) is None
    moves = a.plan_compaction(3)
    assert moves == [(A_SLAB1, [7, 8], [9, 10]), (B_SLAB0, [5], [8])]
    assert a.plan_compaction(4) is None  # at most 3 free pages in one segment
    for owner, old, new in moves:  # each move lands on free pages or its own
        a.free(old, owner)
        a.transfer(new, FREE, owner)
    assert a.alloc_run(3, Owner.slab("b", 1)) == [5, 6, 7]
    a.check_integrity()


def test_alloc_run_none_when_fragmented_and_nothing_changes():
    a = PageArena(6, 4096)
    a.alloc(6, A_KV)
    a.free([0, 2, 4], A_KV)  # three free pages, no two adjacent
    before = [a.owner(p) for p in range(6)]
    assert a.alloc_run(2, A_SLAB0) is None
    assert [a.owner(p) for p in range(6)] == before
    assert a.num_free == 3
    assert a.alloc_run(1, A_SLAB0) == [4]
    a.check_integrity()


def test_alloc_shortage_returns_none_and_changes_nothing():
    a = PageArena(4, 4096)
    a.alloc(3, A_RES)
    assert a.alloc(2, A_KV) is None
    assert a.alloc_run(2, A_SLAB0) is None
    assert a.num_free == 1
    assert a.pages_of(A_KV) == []
    a.check_integrity()


def test_alloc_zero_pages():
    a = PageArena(4, 4096)
    assert a.alloc(0, A_KV) == []
    assert a.alloc_run(0, A_SLAB0) == []  # was None on an all-free arena
    a.alloc(4, A_KV)
    assert a.alloc(0, A_RES) == []
    assert a.alloc_run(0, A_SLAB0) == []
    a.check_integrity()


def test_alloc_negative_is_an_error():
    # Regression: alloc(-1) used to hand out every free page but one (sorted(free)[:-1]).
    a = PageArena(4, 4096)
    with pytest.raises(ValueError):
        a.alloc(-1, A_KV)
    with pytest.raises(ValueError):
        a.alloc_run(-1, A_SLAB0)
    assert a.num_free == 4
    a.check_integrity()


def test_cannot_allocate_to_free():
    a = PageArena(4, 4096)
    with pytest.raises(ValueError):
        a.alloc(1, FREE)
    with pytest.raises(ValueError):
        a.alloc_run(1, FREE)
    assert a.num_free == 4


def test_free_checks_the_owner_and_changes_nothing_on_error():
    a = PageArena(4, 4096)
    a.alloc(2, A_RES)  # 0, 1
    a.alloc(1, A_KV)  # 2
    with pytest.raises(ValueError, match="belongs to"):
        a.free([0, 2], A_RES)
    with pytest.raises(ValueError, match="duplicate"):
        a.free([0, 0], A_RES)
    with pytest.raises(ValueError):
        a.free([3], A_RES)  # a free page
    assert a.pages_of(A_RES) == [0, 1]
    assert a.pages_of(A_KV) == [2]
    a.check_integrity()


@pytest.mark.parametrize("page", [-1, 4, 100])
def test_pages_outside_the_arena_are_rejected(page):
    # Regression: a negative page index used to wrap around to the last page and then put the
    # negative number into the free set.
    a = PageArena(4, 4096)
    a.alloc(4, A_KV)
    with pytest.raises(ValueError, match="outside"):
        a.free([page], A_KV)
    with pytest.raises(ValueError, match="outside"):
        a.transfer([page], A_KV, A_SLAB0)
    a.check_integrity()
    assert a.num_free == 0


def test_transfer_between_owners():
    a = PageArena(6, 4096)
    pages = a.alloc_run(2, A_SLAB0)
    a.transfer(pages, A_SLAB0, A_KV)
    assert a.pages_of(A_KV) == pages
    assert a.pages_of(A_SLAB0) == []
    assert a.num_free == 4
    with pytest.raises(ValueError):
        a.transfer(pages, A_SLAB0, B_KV)  # no longer A_SLAB0's
    a.transfer(pages, A_KV, FREE)
    assert a.num_free == 6
    a.check_integrity()


def test_transfer_from_free_claims_the_pages():
    # Regression: transferring FREE pages to an owner left them in the free set, so the next
    # alloc handed them out a second time.
    a = PageArena(4, 4096)
    a.transfer([1, 2], FREE, A_KV)
    a.check_integrity()
    assert a.num_free == 2
    assert a.alloc(4, A_RES) is None
    assert a.alloc(2, A_RES) == [0, 3]
    a.check_integrity()


def test_usage_views():
    a = PageArena(8, 4096)
    a.alloc(1, A_RES)
    a.alloc_run(2, A_SLAB0)
    a.alloc_run(2, A_SLAB1)
    a.alloc(1, A_KV)
    assert a.usage() == {"free": 2, "a/resident": 1, "a/slab0": 2, "a/slab1": 2, "a/kv": 1}
    assert a.usage_by_kind() == {"free": 2, "a/resident": 1, "a/slab": 4, "a/kv": 1}
    assert str(A_SLAB1) == "a/slab1" and str(FREE) == "free" and str(B_KV) == "b/kv"


# ---- stateful: random alloc / alloc_run / free / transfer --------------------------------------
OWNERS = [A_RES, A_SLAB0, A_SLAB1, B_SLAB0, A_KV, B_KV]


class ArenaMachine(RuleBasedStateMachine):
    """Mirrors the arena with a plain list of owners and compares after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.arena: PageArena | None = None
        self.mirror: list[Owner] = []

    @precondition(lambda self: self.arena is None)
    @rule(num_pages=st.integers(1, 24))
    def create(self, num_pages):
        self.arena = PageArena(num_pages, 4096)
        self.mirror = [FREE] * num_pages

    def _free_pages(self) -> list[int]:
        return [p for p, o in enumerate(self.mirror) if o == FREE]

    @precondition(lambda self: self.arena is not None)
    @rule(n=st.integers(0, 30), owner=st.sampled_from(OWNERS))
    def alloc(self, n, owner):
        free = self._free_pages()
        got = self.arena.alloc(n, owner)
        if n > len(free):
            assert got is None
            return
        assert got == free[:n]  # lowest first
        for p in got:
            self.mirror[p] = owner

    @precondition(lambda self: self.arena is not None)
    @rule(n=st.integers(1, 12), owner=st.sampled_from(OWNERS))
    def alloc_run(self, n, owner):
        free = set(self._free_pages())
        size = len(self.mirror)
        # Maximal free runs, highest first: (bottom, top).
        runs = []
        p = size - 1
        while p >= 0:
            if p in free:
                top = p
                while p - 1 in free:
                    p -= 1
                runs.append((p, top))
            p -= 1
        fits = [(b, t) for b, t in runs if t - b + 1 >= n]
        got = self.arena.alloc_run(n, owner)
        if not fits:
            assert got is None
            return
        bottom, top = fits[0]  # the highest run that fits
        above_kv = top + 1 < size and self.mirror[top + 1].kind is OwnerKind.KV
        below_param = bottom > 0 and self.mirror[bottom - 1].kind in (
            OwnerKind.SLAB, OwnerKind.RESIDENT
        )
        start = bottom if above_kv and below_param else top - n + 1
        assert got == list(range(start, start + n))
        for p in got:
            self.mirror[p] = owner

    @precondition(lambda self: self.arena is not None)
    @rule(owner=st.sampled_from(OWNERS), data=st.data())
    def free(self, owner, data):
        mine = [p for p, o in enumerate(self.mirror) if o == owner]
        pages = data.draw(st.lists(st.sampled_from(mine), unique=True) if mine else st.just([]))
        self.arena.free(pages, owner)
        for p in pages:
            self.mirror[p] = FREE

    @precondition(lambda self: self.arena is not None)
    @rule(owner=st.sampled_from(OWNERS), data=st.data())
    def free_foreign_page_fails(self, owner, data):
        foreign = [p for p, o in enumerate(self.mirror) if o != owner]
        if not foreign:
            return
        p = data.draw(st.sampled_from(foreign))
        with pytest.raises(ValueError):
            self.arena.free([p], owner)

    @precondition(lambda self: self.arena is not None)
    @rule(
        old=st.sampled_from([FREE, *OWNERS]),
        new=st.sampled_from([FREE, *OWNERS]),
        data=st.data(),
    )
    def transfer(self, old, new, data):
        mine = [p for p, o in enumerate(self.mirror) if o == old]
        pages = data.draw(st.lists(st.sampled_from(mine), unique=True) if mine else st.just([]))
        self.arena.transfer(pages, old, new)
        for p in pages:
            self.mirror[p] = new

    @precondition(lambda self: self.arena is not None)
    @rule(n=st.integers(1, 8))
    def plan_kv_moves(self, n):
        """Against brute force: the cheapest window of n pages without parameters (the highest
        of equals) is emptied onto the lowest free pages outside it; then a run of n exists."""
        size, m = len(self.mirror), self.mirror
        moves = self.arena.plan_kv_moves(n)
        free = self._free_pages()
        windows = [
            (sum(m[q].kind is OwnerKind.KV for q in range(b, b + n)), b)
            for b in range(size - n + 1)
            if all(m[q].kind in (OwnerKind.FREE, OwnerKind.KV) for q in range(b, b + n))
        ]
        if len(free) < n or not windows:
            assert moves is None
            return
        cost = min(c for c, _ in windows)
        bottom = max(b for c, b in windows if c == cost)
        window = range(bottom, bottom + n)
        assert [src for _, src, _ in moves] == [q for q in window if m[q].kind is OwnerKind.KV]
        assert [dst for _, _, dst in moves] == [q for q in free if q not in window][:cost]
        for owner, src, dst in moves:
            assert owner == m[src]
            self.arena.transfer([dst], FREE, owner)
            self.arena.free([src], owner)
            m[dst], m[src] = owner, FREE
        assert all(m[q] == FREE for q in window)
        assert any(length >= n for _, length in self.arena.runs())

    @invariant()
    def matches_mirror(self):
        if self.arena is None:
            return
        self.arena.check_integrity()
        assert [self.arena.owner(p) for p in range(self.arena.num_pages)] == self.mirror
        assert self.arena.num_free == self.mirror.count(FREE)
        assert sum(self.arena.usage().values()) == self.arena.num_pages
        for o in OWNERS:
            assert self.arena.pages_of(o) == [p for p, m in enumerate(self.mirror) if m == o]
        by_kind: dict[str, int] = {}
        for o in self.mirror:
            label = "free" if o == FREE else f"{o.model}/{o.kind.value}"
            by_kind[label] = by_kind.get(label, 0) + 1
        assert self.arena.usage_by_kind() == by_kind
        kinds = {o.kind for o in self.mirror}
        assert kinds <= set(OwnerKind)


TestArenaMachine = ArenaMachine.TestCase
TestArenaMachine.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
