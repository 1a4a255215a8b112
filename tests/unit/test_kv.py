"""KVPool: per-model block accounting over the shared page arena (no tensors)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from oneiros.core import ConfigError
from oneiros.memory.arena import FREE, Owner, OwnerKind, PageArena
from oneiros.memory.kv import KVPool
from tests.factories import make_pool


# ---- plain unit tests ---------------------------------------------------------------------------
def test_geometry_with_tail_padding():
    pool = make_pool(page_bytes=4096, block_bytes=1000)
    assert pool.blocks_per_page == 4  # 96 bytes of each page unused
    assert pool.page_slot(0) == (0, 0)
    assert pool.page_slot(7) == (1, 3)
    assert pool.page_slot(9) == (2, 1)
    assert pool.blocks_needed(1) == 1
    assert pool.blocks_needed(pool.block_size) == 1
    assert pool.blocks_needed(pool.block_size + 1) == 2
    assert pool.blocks_needed(0) == 0
    assert pool.pages_needed(4) == 1 and pool.pages_needed(5) == 2


def test_block_larger_than_a_page_is_a_config_error():
    with pytest.raises(ConfigError, match="page"):
        make_pool(page_bytes=4096, block_bytes=4097)


@pytest.mark.parametrize("block_bytes,block_size", [(0, 16), (-4, 16), (1024, 0)])
def test_block_geometry_must_be_positive(block_bytes, block_size):
    with pytest.raises(ConfigError):
        make_pool(block_bytes=block_bytes, block_size=block_size)


def test_allocate_grows_a_page_at_a_time_lowest_slot_first():
    pool = make_pool(num_pages=4, page_bytes=4096, block_bytes=1024)  # 4 blocks per page
    assert pool.num_pages == 0
    assert pool.allocate(0) == []
    assert pool.num_pages == 0
    b = pool.allocate(2)
    assert b == [0, 1]  # page 0, slots 0 and 1
    assert pool.num_pages == 1 and pool.num_used == 2 and pool.num_free_blocks == 2
    b2 = pool.allocate(3)  # 2 left on page 0: exactly one more page
    assert pool.num_pages == 2 and pool.num_used == 5 and pool.num_free_blocks == 3
    assert not set(b) & set(b2) and set(b2) <= set(range(8))
    assert pool.arena.pages_of(pool.owner) == [0, 1]
    pool.check_integrity()
    pool.arena.check_integrity()


def test_allocate_shortage_returns_none_and_changes_nothing():
    arena = PageArena(3, 4096)
    pool = make_pool(arena=arena, block_bytes=1024)
    arena.alloc(1, Owner.resident("other"))
    held = pool.allocate(5)  # 2 pages
    assert arena.num_free == 0
    assert not pool.can_allocate(4)
    before = (pool.num_pages, pool.num_used, pool.num_free_blocks, arena.num_free)
    assert pool.allocate(4) is None
    assert (pool.num_pages, pool.num_used, pool.num_free_blocks, arena.num_free) == before
    assert pool.can_allocate(3)
    assert len(pool.allocate(3)) == 3
    pool.free(held)
    pool.check_integrity()


def test_recently_freed_blocks_are_reused_first():
    pool = make_pool(block_bytes=1024)
    a = pool.allocate(3)
    pool.free([a[1]])
    assert pool.allocate(1) == [a[1]]


def test_free_unknown_or_duplicate_blocks_changes_nothing():
    pool = make_pool(block_bytes=1024)
    held = pool.allocate(3)
    with pytest.raises(ValueError, match="not allocated"):
        pool.free([held[0], 99])
    assert pool.num_used == 3  # regression: held[0] used to be freed before the error
    with pytest.raises(ValueError, match="duplicate"):
        pool.free([held[1], held[1]])
    assert pool.num_used == 3
    pool.check_integrity()
    pool.free(held)
    with pytest.raises(ValueError):
        pool.free([held[0]])  # double free
    pool.check_integrity()


def test_shrink_returns_only_pages_without_live_blocks():
    pool = make_pool(num_pages=8, block_bytes=1024)  # 4 per page
    blocks = pool.allocate(12)  # pages 0, 1, 2
    keep = [b for b in blocks if b // 4 == 1][:1]  # one live block on page 1
    pool.free([b for b in blocks if b not in keep])
    assert pool.shrink(0) == []
    assert pool.shrink(1) == [2]  # highest idle page first
    assert pool.shrink() == [0]
    assert pool.arena.pages_of(pool.owner) == [1]
    assert pool.shrink() == []
    assert pool.arena.num_free == 7
    pool.check_integrity()
    pool.arena.check_integrity()
    # The live block is untouched and the page's other blocks are still usable.
    assert pool.num_used == 1 and pool.num_free_blocks == 3
    assert len(pool.allocate(3)) == 3 and pool.num_pages == 1


def test_adopt_remapped_pages():
    arena = PageArena(6, 4096)
    pool = make_pool(arena=arena, block_bytes=2048)  # 2 per page
    slab = arena.alloc_run(2, Owner.slab("a", 0))  # [4, 5]
    arena.transfer(slab, Owner.slab("a", 0), pool.owner)
    pool.adopt(slab)
    assert pool.num_pages == 2 and pool.num_free_blocks == 4
    got = pool.allocate(4)
    assert sorted(got) == [8, 9, 10, 11]  # blocks of pages 4 and 5
    assert arena.num_free == 4  # no growth needed
    pool.check_integrity()
    arena.check_integrity()


def test_adopt_rejects_pages_it_does_not_own_or_already_has():
    arena = PageArena(4, 4096)
    pool = make_pool(arena=arena, block_bytes=1024)
    other = arena.alloc(1, Owner.slab("a", 0))
    with pytest.raises(ValueError, match="belongs to"):
        pool.adopt(other)
    with pytest.raises(ValueError):
        pool.adopt([3])  # a free page
    pool.grow(1)
    with pytest.raises(ValueError, match="already"):
        pool.adopt(pool.arena.pages_of(pool.owner))
    pool.check_integrity()


def test_two_pools_share_the_arena():
    arena = PageArena(4, 4096)
    a = KVPool("a", arena, 1024, 16)
    b = KVPool("b", arena, 3000, 16)  # one block per page
    a.allocate(5)  # 2 pages
    assert b.allocate(2) is not None  # the last 2 pages
    assert a.allocate(4) is None and b.allocate(1) is None
    assert arena.usage_by_kind() == {"a/kv": 2, "b/kv": 2}
    a.check_integrity()
    b.check_integrity()


# ---- stateful: several models' pools and weight slabs on one arena -----------------------------
MODELS = {"a": 1024, "b": 1500, "c": 4096}  # block bytes: 4, 2 and 1 blocks per 4 KiB page
SLABS = [Owner.slab("a", 0), Owner.slab("b", 0), Owner.resident("c")]


class KVMachine(RuleBasedStateMachine):
    """Random KV allocate/free/grow/shrink/remap interleaved with weight slab traffic.

    `held[m]` is every block handed to model m's requests, `slabs[o]` every page a weight owner has.
    """

    def __init__(self) -> None:
        super().__init__()
        self.arena: PageArena | None = None
        self.pools: dict[str, KVPool] = {}
        self.held: dict[str, set[int]] = {}
        self.slabs: dict[Owner, set[int]] = {}

    @precondition(lambda self: self.arena is None)
    @rule(num_pages=st.integers(1, 16), num_models=st.integers(2, 3))
    def create(self, num_pages, num_models):
        self.arena = PageArena(num_pages, 4096)
        names = list(MODELS)[:num_models]
        self.pools = {m: KVPool(m, self.arena, MODELS[m], 16) for m in names}
        self.held = {m: set() for m in names}
        self.slabs = {o: set() for o in SLABS}

    def _snapshot(self):
        return (
            [self.arena.owner(p) for p in range(self.arena.num_pages)],
            {m: (set(p._pages), set(p._free), p.references())
             for m, p in self.pools.items()},
        )

    def _pool(self, data) -> KVPool:
        return self.pools[data.draw(st.sampled_from(sorted(self.pools)))]

    ready = precondition(lambda self: self.arena is not None)

    @ready
    @rule(n=st.integers(0, 20), data=st.data())
    def kv_allocate(self, n, data):
        pool = self._pool(data)
        can = pool.can_allocate(n)
        before = self._snapshot()
        got = pool.allocate(n)
        if got is None:
            assert not can
            assert self._snapshot() == before, "a failed allocate changed something"
            return
        assert can
        assert len(got) == n and len(set(got)) == n
        assert not set(got) & self.held[pool.model], "a used block was handed out twice"
        pages = set(self.arena.pages_of(pool.owner))
        assert all(pool.page_slot(b)[0] in pages for b in got)
        self.held[pool.model].update(got)

    @ready
    @rule(data=st.data())
    def kv_free(self, data):
        pool = self._pool(data)
        held = sorted(self.held[pool.model])
        blocks = data.draw(st.lists(st.sampled_from(held), unique=True) if held else st.just([]))
        pool.free(blocks)
        self.held[pool.model].difference_update(blocks)

    @ready
    @rule(data=st.data(), block=st.integers(0, 80))
    def kv_free_unallocated_fails(self, data, block):
        pool = self._pool(data)
        if block in self.held[pool.model]:
            return
        before = self._snapshot()
        with pytest.raises(ValueError):
            pool.free([*sorted(self.held[pool.model])[:1], block])
        assert self._snapshot() == before

    @ready
    @rule(n=st.integers(0, 6), data=st.data())
    def kv_grow(self, n, data):
        pool = self._pool(data)
        free = self.arena.num_free
        before = self._snapshot()
        ok = pool.grow(n)
        assert ok == (n <= free)
        if not ok:
            assert self._snapshot() == before

    @ready
    @rule(max_pages=st.one_of(st.none(), st.integers(0, 6)), data=st.data())
    def kv_shrink(self, max_pages, data):
        pool = self._pool(data)
        live = {pool.page_slot(b)[0] for b in self.held[pool.model]}
        idle_before = set(self.arena.pages_of(pool.owner)) - live
        got = pool.shrink(max_pages)
        assert len(set(got)) == len(got)
        assert not set(got) & live, "shrink gave back a page with a live block"
        assert set(got) <= idle_before
        assert all(self.arena.owner(p) == FREE for p in got)
        if max_pages is None:
            assert set(got) == idle_before
        else:
            assert len(got) == min(max_pages, len(idle_before))
        assert live <= set(self.arena.pages_of(pool.owner))

    @ready
    @rule(owner=st.sampled_from(SLABS), n=st.integers(1, 4), contiguous=st.booleans())
    def slab_alloc(self, owner, n, contiguous):
        free = self.arena.num_free
        got = self.arena.alloc_run(n, owner) if contiguous else self.arena.alloc(n, owner)
        if got is None:
            assert contiguous or n > free
            return
        assert len(got) == n
        assert not set(got) & self.slabs[owner]
        self.slabs[owner].update(got)

    @ready
    @rule(owner=st.sampled_from(SLABS), data=st.data())
    def slab_free(self, owner, data):
        mine = sorted(self.slabs[owner])
        pages = data.draw(st.lists(st.sampled_from(mine), unique=True) if mine else st.just([]))
        self.arena.free(pages, owner)
        self.slabs[owner].difference_update(pages)

    @ready
    @rule(owner=st.sampled_from(SLABS), data=st.data())
    def remap_slab_into_kv(self, owner, data):
        """A layer slab's pages become KV pages of some model (transfer + adopt)."""
        mine = sorted(self.slabs[owner])
        if not mine:
            return
        pages = data.draw(st.lists(st.sampled_from(mine), min_size=1, unique=True))
        pool = self._pool(data)
        free_before = pool.num_free_blocks
        self.arena.transfer(pages, owner, pool.owner)
        pool.adopt(pages)
        self.slabs[owner].difference_update(pages)
        assert pool.num_free_blocks == free_before + len(pages) * pool.blocks_per_page

    @ready
    @rule(owner=st.sampled_from(SLABS), n=st.integers(1, 4))
    def compact_kv_for_a_slab(self, owner, n):
        """Restore a layer where KV pages split the free ones: move them (the pools renumber
        their blocks; the requests' tables follow the returned map), then take the run."""
        moves = self.arena.plan_kv_moves(n)
        if moves is None:
            assert self.arena.num_free < n or self.arena.alloc_run(n, owner) is None
            return
        for name, pool in self.pools.items():
            pairs = [(src, dst) for o, src, dst in moves if o == pool.owner]
            if not pairs:
                continue
            before = (pool.num_pages, pool.num_free_blocks, pool.references())
            new_of = pool.move_pages(pairs)
            held = {new_of.get(b, b) for b in self.held[name]}
            assert len(held) == len(self.held[name])
            self.held[name] = held
            assert set(pool.references()) == held
            refs = before[2]
            assert pool.references() == {new_of.get(b, b): r for b, r in refs.items()}
            assert (pool.num_pages, pool.num_free_blocks) == before[:2]
        got = self.arena.alloc_run(n, owner)
        assert got is not None, "no run after the KV pages moved"
        self.slabs[owner].update(got)

    @ready
    @rule(owner=st.sampled_from(SLABS), data=st.data())
    def reclaim_kv_for_a_slab(self, owner, data):
        """Restore a layer: shrink a pool, then take a contiguous run for the slab."""
        pool = self._pool(data)
        pool.shrink()
        n = data.draw(st.integers(1, 3))
        got = self.arena.alloc_run(n, owner)
        if got is not None:
            self.slabs[owner].update(got)

    @invariant()
    def consistent(self):
        if self.arena is None:
            return
        self.arena.check_integrity()
        owned: dict[int, Owner] = {}
        for m, pool in self.pools.items():
            pool.check_integrity()
            assert pool.num_used == len(self.held[m])
            pages = set(self.arena.pages_of(pool.owner))
            assert pool.num_pages == len(pages)
            assert {pool.page_slot(b)[0] for b in self.held[m]} <= pages
            for p in pages:
                assert p not in owned, f"page {p} owned by {owned[p]} and {pool.owner}"
                owned[p] = pool.owner
        for o, pages in self.slabs.items():
            assert set(self.arena.pages_of(o)) == pages
            for p in pages:
                assert p not in owned, f"page {p} owned by {owned[p]} and {o}"
                owned[p] = o
        assert len(owned) + self.arena.num_free == self.arena.num_pages
        assert all(self.arena.owner(p).kind is not OwnerKind.FREE for p in owned)


TestKVMachine = KVMachine.TestCase
TestKVMachine.settings = settings(
    max_examples=80,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
