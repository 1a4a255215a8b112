"""Automatic prefix caching without tensors: the hash chain, the pool's free/held/cached states,
the scheduler's cache hits, siblings, preemption and swap with shared blocks, the arbiter's memory
order, and a hypothesis machine that checks every request reads the KV of its own tokens."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from oneiros.core import IntegrityError, RequestStatus, StepPlan
from oneiros.memory.arena import Owner, PageArena
from oneiros.memory.prefix import PrefixCache, chain_hash, root_hash
from oneiros.memory.swap import HostBlockPool
from tests.factories import (
    commit,
    make_planning,
    make_pool,
    make_request,
    make_scheduler,
    make_tenants,
)

BS = 4  # tokens per block in every test here (4 blocks per 4 KiB page)


def cached_pool(num_pages: int = 8, arena: PageArena | None = None):
    return make_pool(arena=arena, num_pages=num_pages, block_bytes=1024, block_size=BS,
                     prefix_caching=True)


def fill(pool, tokens: list[int]) -> list[int]:
    """Blocks for `tokens` (full blocks only), indexed as a request would leave them."""
    n = len(tokens) // BS
    blocks = pool.allocate(n)
    parent = pool.cache.root
    for i, b in enumerate(blocks):
        chunk = tokens[i * BS : (i + 1) * BS]
        h = chain_hash(parent, chunk)
        assert pool.cache_block(b, h, parent, chunk)
        parent = h
    return blocks


def hashes(pool, tokens: list[int]) -> list[bytes]:
    out, parent = [], pool.cache.root
    for i in range(len(tokens) // BS):
        parent = chain_hash(parent, tokens[i * BS : (i + 1) * BS])
        out.append(parent)
    return out


def check(*objs) -> None:
    for o in objs:
        o.check_integrity()


# ---- the hash chain ------------------------------------------------------------------------------
def test_hash_chain_names_tokens_parent_and_model():
    r = root_hash("a")
    assert chain_hash(r, [1, 2, 3, 4]) == chain_hash(root_hash("a"), [1, 2, 3, 4])
    assert chain_hash(r, [1, 2, 3, 4]) != chain_hash(r, [1, 2, 3, 5])
    assert chain_hash(r, [1, 2, 3, 4]) != chain_hash(root_hash("b"), [1, 2, 3, 4])
    h = chain_hash(r, [1, 2, 3, 4])
    assert chain_hash(h, [5, 6, 7, 8]) != chain_hash(r, [5, 6, 7, 8])  # the parent counts


def test_request_hashes_are_computed_once_and_kept():
    cache = PrefixCache("m", BS)
    req = make_request(prompt_token_ids=list(range(10)))
    hs = cache.hashes(req, 2)
    assert hs == [chain_hash(cache.root, [0, 1, 2, 3]), chain_hash(hs[0], [4, 5, 6, 7])]
    assert req.block_hashes == hs
    assert cache.hashes(req, 1) == hs[:1] and cache.parent(req, 1) == hs[0]


# ---- the pool: free, held, cached ----------------------------------------------------------------
def test_unreferenced_indexed_blocks_stay_cached_and_are_found_again():
    pool = cached_pool()
    tokens = list(range(12))
    blocks = fill(pool, tokens)
    pool.free(blocks)
    assert pool.num_cached == 3 and pool.num_used == 0 and pool.num_idle_pages == 1
    hit = pool.cache.lookup(hashes(pool, tokens[:8] + [99, 99, 99, 99]))
    assert hit == blocks[:2]  # the longest indexed prefix, stopping at the first miss
    pool.acquire(hit)
    assert pool.refcount(blocks[0]) == 1 and pool.num_cached == 1
    pool.acquire(hit[:1])
    assert pool.refcount(blocks[0]) == 2
    check(pool)
    pool.free(hit[:1])
    pool.free(hit)
    assert pool.num_cached == 3
    check(pool)


def test_blocks_without_a_hash_go_back_to_the_free_list():
    pool = cached_pool()
    blocks = pool.allocate(2)
    pool.free(blocks)
    assert pool.num_cached == 0 and pool.num_free_blocks == 4
    with pytest.raises(ValueError, match="neither held nor cached"):
        pool.acquire(blocks[:1])
    check(pool)


def test_a_duplicate_hash_stays_private():
    pool = cached_pool()
    first = fill(pool, [1, 2, 3, 4])
    dup = pool.allocate(1)
    h = chain_hash(pool.cache.root, [1, 2, 3, 4])
    assert not pool.cache_block(dup[0], h, pool.cache.root, [1, 2, 3, 4])
    pool.free(dup)
    assert pool.num_cached == 0  # the duplicate went back to the free list
    pool.free(first)
    assert pool.num_cached == 1
    check(pool)


def test_allocate_hands_out_free_and_cached_blocks_lowest_first_before_growing():
    pool = cached_pool(num_pages=2)
    a = fill(pool, list(range(8)))  # blocks 0, 1 (page 0)
    b = fill(pool, list(range(100, 108)))  # blocks 2, 3 (page 0)
    pool.free(a)
    pool.free(b)
    assert pool.num_cached == 4 and pool.num_free_blocks == 0
    assert pool.allocate(1) == [0]  # a's first block is evicted: a's prefix is gone, b's stays
    assert pool.cache.lookup(hashes(pool, list(range(8)))) == []
    assert pool.cache.lookup(hashes(pool, list(range(100, 108)))) == b
    assert pool.num_pages == 1
    got = pool.allocate(4)  # a's second block, then b's, then a page grown from the arena
    assert got == [1, 2, 3, 4] and pool.num_pages == 2 and pool.num_cached == 0
    assert pool.allocate(4) is None  # 3 free blocks, no arena page: no change
    assert pool.num_free_blocks == 3
    check(pool)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "shrink"]), st.integers(1, 6)),
                max_size=40))
def test_without_hits_caching_changes_no_memory_decision(ops):
    """Blocks indexed (full) but never hit: every allocation and shrink returns what it returns
    with caching off (the simulator's results stay the same when no prefix is shared)."""
    on, off = cached_pool(num_pages=6), make_pool(num_pages=6, block_bytes=1024, block_size=BS)
    held: list[list[int]] = []
    token = 0
    for op, k in ops:
        if op == "alloc":
            got_on, got_off = on.allocate(k), off.allocate(k)
            assert got_on == got_off
            if got_on is not None:
                for blk in got_on[: k // 2]:  # some blocks filled and indexed
                    token += 1
                    on.cache_block(blk, chain_hash(on.cache.root, [token] * BS), on.cache.root,
                                   [token] * BS)
                held.append(got_on)
        elif op == "free" and held:
            blocks = held.pop(k % len(held))
            on.free(blocks)
            off.free(blocks)
        elif op == "shrink":
            assert on.shrink(k) == off.shrink(k)
        assert on.num_pages == off.num_pages and on.arena.num_free == off.arena.num_free
        check(on, off)


def test_shrink_gives_empty_pages_first_and_evicts_cached_pages_only_when_asked():
    pool = cached_pool(num_pages=4)
    blocks = pool.allocate(12)  # pages 0, 1, 2
    keep = fill(pool, list(range(4)))  # page 3: one cached block
    pool.free(blocks)
    pool.free(keep)
    assert pool.shrink(evict=False) == [2, 1, 0]
    assert pool.num_cached == 1 and pool.num_pages == 1
    assert pool.shrink() == [3]
    assert pool.num_cached == 0 and pool.num_pages == 0
    check(pool, pool.arena)


def test_shrink_gives_the_highest_idle_pages_first_cached_or_not():
    pool = cached_pool(num_pages=2)
    low = fill(pool, list(range(16)))  # page 0
    high = fill(pool, list(range(100, 116)))  # page 1
    pool.free(high)
    pool.free(low)
    assert pool.shrink(1) == [1]  # as with caching off: the top of the arena frees first
    assert pool.cache.lookup(hashes(pool, list(range(16)))) == low
    assert pool.cache.lookup(hashes(pool, list(range(100, 116)))) == []
    check(pool, pool.arena)


def test_integrity_catches_a_block_in_two_states():
    pool = cached_pool()
    blocks = fill(pool, list(range(4)))
    pool.free(blocks)
    pool._free.add(blocks[0])  # cached and free
    with pytest.raises(IntegrityError):
        pool.check_integrity()


def test_integrity_catches_tokens_that_do_not_match_the_hash():
    pool = cached_pool()
    b = pool.allocate(1)
    pool.cache_block(b[0], chain_hash(pool.cache.root, [1, 2, 3, 4]), pool.cache.root, [1, 2, 3, 5])
    with pytest.raises(IntegrityError, match="hash"):
        pool.check_integrity()


# ---- the scheduler -------------------------------------------------------------------------------
def sched_with_cache(**kw):
    kw.setdefault("num_pages", 16)
    return make_scheduler(block_size=BS, prefix_caching=True, **kw)


def run_to_end(sched) -> None:
    while sched.has_work:
        commit(sched, sched.schedule())


def test_a_repeated_prompt_prefills_only_what_the_cache_lacks():
    sched = sched_with_cache()
    prompt = list(range(1, 15))  # 14 tokens: 3 full blocks and 2 tokens
    first = make_request(prompt_token_ids=prompt, max_tokens=2)
    sched.add(first)
    plan = sched.schedule()
    assert plan.num_prefill_tokens == 14 and plan.prefix_queries == 14 and plan.prefix_hits == 0
    full = first.block_ids[:3]
    commit(sched, plan)
    run_to_end(sched)
    again = make_request(prompt_token_ids=prompt + [77, 78], max_tokens=2)  # continues mid-block
    sched.add(again)
    plan = sched.schedule()
    assert plan.seqs[0].start == 12 and plan.num_prefill_tokens == 4
    assert plan.prefix_queries == 16 and plan.prefix_hits == 12
    assert again.block_ids[:3] == full  # the same blocks: nothing copied
    sched.check_integrity()
    sched.pool.check_integrity()
    run_to_end(sched)


def test_a_fully_cached_prompt_still_computes_its_last_token():
    sched = sched_with_cache()
    prompt = list(range(1, 13))  # exactly 3 blocks
    sched.add(make_request(prompt_token_ids=prompt, max_tokens=1))
    run_to_end(sched)
    again = make_request(prompt_token_ids=prompt, max_tokens=1)
    sched.add(again)
    plan = sched.schedule()
    # The last block is computed again (only full blocks are shared; one token at least runs).
    assert plan.seqs[0].start == 8 and plan.seqs[0].num_new_tokens == 4
    assert plan.seqs[0].samples
    commit(sched, plan)
    sched.check_integrity()


def test_siblings_admitted_in_one_step_share_the_blocks_the_first_fills():
    sched = sched_with_cache()
    prompt = list(range(1, 19))  # 4 full blocks and 2 tokens
    reqs = [make_request(prompt_token_ids=prompt, max_tokens=3) for _ in range(3)]
    for r in reqs:
        sched.add(r)
    plan = sched.schedule()
    assert [s.num_new_tokens for s in plan.seqs] == [18, 2, 2]
    assert plan.prefix_queries == 54 and plan.prefix_hits == 32
    shared = reqs[0].block_ids[:4]
    assert all(r.block_ids[:4] == shared for r in reqs)
    assert all(sched.pool.refcount(b) == 3 for b in shared)
    assert len({r.block_ids[4] for r in reqs}) == 3  # the partial last block is each one's own
    sched.check_integrity()
    commit(sched, plan)
    run_to_end(sched)
    assert sched.pool.num_used == 0 and sched.pool.num_cached >= 4
    sched.pool.check_integrity()


def test_caching_off_shares_nothing():
    sched = make_scheduler(block_size=BS, num_pages=16)
    prompt = list(range(1, 19))
    for _ in range(2):
        sched.add(make_request(prompt_token_ids=prompt, max_tokens=2))
    plan = sched.schedule()
    assert [s.num_new_tokens for s in plan.seqs] == [18, 18]
    assert plan.prefix_queries == 0 and sched.pool.num_cached == 0
    run_to_end(sched)
    assert sched.pool.num_cached == 0


def test_recompute_preemption_drops_references_and_readmission_hits_its_own_blocks():
    sched = sched_with_cache()
    shared = list(range(1, 9))
    a = make_request(prompt_token_ids=shared + [50, 51, 52, 53, 54], max_tokens=6)
    b = make_request(prompt_token_ids=shared + [60, 61, 62], max_tokens=6)
    sched.add(a)
    sched.add(b)
    commit(sched, sched.schedule())
    assert sched.pool.refcount(a.block_ids[0]) == 2
    plan = StepPlan("default")
    sched.preempt(b, plan)
    assert b.num_computed_tokens == 0 and not b.block_ids and plan.recomputed_tokens == 11
    assert sched.pool.refcount(a.block_ids[0]) == 1  # b dropped its references
    sched.check_integrity()
    plan = sched.schedule()
    seq = next(s for s in plan.seqs if s.request is b)
    assert seq.start == 8  # its prompt's shared blocks, back from the cache
    assert plan.prefix_queries == 12 and plan.prefix_hits == 8  # prompt and its one output
    commit(sched, plan)
    run_to_end(sched)
    sched.check_integrity()


def swap_sched(**kw):
    host = HostBlockPool("default", 32, 1024)
    return sched_with_cache(preemption="swap", host_pool=host, **kw), host


def test_swap_copies_only_blocks_the_request_alone_holds_and_resume_takes_the_cache():
    sched, host = swap_sched()
    shared = list(range(1, 9))  # 2 blocks
    a = make_request(prompt_token_ids=shared + [50, 51, 52, 53, 54], max_tokens=6)
    b = make_request(prompt_token_ids=shared + [60, 61, 62, 63, 64, 65], max_tokens=6)
    sched.add(a)
    sched.add(b)
    commit(sched, sched.schedule())
    assert b.num_computed_tokens == 14 and len(b.block_ids) == 4
    plan = StepPlan("default")
    sched.preempt(b, plan)
    # Blocks 0 and 1 are a's too: not copied. Blocks 2 and 3 are b's alone.
    assert b.host_block_ids[:2] == [None, None] and None not in b.host_block_ids[2:]
    assert len(plan.swap_out) == 2 and b.num_computed_tokens == 14
    sched.check_integrity()
    plan = sched.schedule()
    seq = next(s for s in plan.seqs if s.request is b)
    assert seq.start == 14
    # b's own full block 2 was cached when it was released: found there, not copied back; only
    # the partial block 3 comes back from host memory.
    assert len(plan.swap_in) == 1 and plan.swap_in[0][1] == b.block_ids[3]
    assert plan.recomputed_tokens == 0
    assert host.num_free == 32
    commit(sched, plan)
    run_to_end(sched)
    sched.check_integrity()


def test_a_shared_block_is_copied_once_when_both_holders_swap_out():
    sched, host = swap_sched()
    shared = list(range(1, 9))
    a = make_request(prompt_token_ids=shared + [50], max_tokens=6)
    b = make_request(prompt_token_ids=shared + [60], max_tokens=6)
    sched.add(a)
    sched.add(b)
    commit(sched, sched.schedule())
    shared_blocks = a.block_ids[:2]
    assert b.block_ids[:2] == shared_blocks
    plan = StepPlan("default")
    sched.preempt(b, plan)
    sched.preempt(a, plan)
    copied = [d for d, _ in plan.swap_out]
    assert sorted(copied) == sorted(set(copied))
    assert copied.count(shared_blocks[0]) == copied.count(shared_blocks[1]) == 1
    assert len(copied) == 4  # the 2 shared blocks once (by a, the last holder), 1 own block each
    assert b.host_block_ids[:2] == [None, None] and None not in a.host_block_ids
    sched.check_integrity()


def test_an_evicted_shared_block_makes_the_resumed_request_recompute_from_it():
    sched, host = swap_sched(num_pages=4)
    shared = list(range(1, 9))
    a = make_request(prompt_token_ids=shared + [50, 51, 52, 53, 54], max_tokens=2)
    b = make_request(prompt_token_ids=shared + [60, 61, 62, 63, 64, 65], max_tokens=6)
    sched.add(a)
    sched.add(b)
    commit(sched, sched.schedule())
    plan = StepPlan("default")
    sched.preempt(b, plan)
    run_to_end_without(sched, b)
    # a finished: the shared blocks are cached, unreferenced; take every cached page away.
    sched.pool.shrink()
    assert sched.pool.num_cached == 0
    plan = sched.schedule()
    seq = next(s for s in plan.seqs if s.request is b)
    assert seq.start == 0 and plan.swap_in == [] and plan.recomputed_tokens == 14
    assert host.num_free == 32
    commit(sched, plan)
    run_to_end(sched)
    sched.check_integrity()


def run_to_end_without(sched, waiting) -> None:
    """Steps until only `waiting` is left (it stays out: its admission is held back)."""
    sched.waiting.remove(waiting)
    run_to_end(sched)
    sched.waiting.append(waiting)


# ---- the arbiter's order -------------------------------------------------------------------------
PAGE = 4096


def cached_tenants(layers, pages_free):
    arena = PageArena(sum(2 * n + 1 for n in layers.values()) + pages_free, PAGE)
    tenants = make_tenants(arena, layers, block_size=BS, prefix_caching=True)
    return arena, tenants


def park(pool, first_token: int, pages: int = 1) -> list[int]:
    """`pages` pages of cached blocks in `pool`."""
    blocks = fill(pool, list(range(first_token, first_token + pages * 4 * BS)))
    pool.free(blocks)
    return blocks


def test_this_models_cache_goes_before_other_models_pages():
    arena, tenants = cached_tenants({"a": 1, "b": 1}, pages_free=2)
    a, b = tenants["a"].pool, tenants["b"].pool
    park(a, 0)
    b.grow(1)  # an idle page of b, without cached blocks
    _, arbiter, _, _ = make_planning(tenants, remap=False)
    req = make_request(prompt_token_ids=list(range(500, 516)), model="a", max_tokens=1)
    tenants["a"].scheduler.add(req)
    plan = tenants["a"].scheduler.schedule()
    assert plan.seqs and b.num_pages == 1  # b kept its page
    assert a.num_cached == 0  # a's own cache gave the 4 blocks
    check(a, b, arena)


def test_other_models_idle_pages_go_highest_first_their_cache_evicted():
    arena, tenants = cached_tenants({"a": 1, "b": 1}, pages_free=0)
    b = tenants["b"].pool
    _, arbiter, _, _ = make_planning(tenants, remap=False)
    arena.free(arena.pages_of(Owner.resident("a")), Owner.resident("a"))
    arena.free(arena.pages_of(Owner.resident("b")), Owner.resident("b"))
    park(b, 0)  # page 0: cached
    b.grow(1)  # page 1: empty
    arbiter.begin()
    req = make_request(4, model="a")
    assert arbiter.make_room("a", 4, req)
    assert b.num_cached == 4 and b.num_pages == 1 and arena.num_free == 1
    assert arbiter.make_room("a", 8, req)
    assert b.num_cached == 0 and b.num_pages == 0
    check(b, arena)


def test_cached_blocks_go_before_parameters():
    arena, tenants = cached_tenants({"a": 2, "b": 2}, pages_free=0)
    store, arbiter, controller, _ = make_planning(tenants)
    b = tenants["b"]
    arena.free(arena.pages_of(Owner.resident("b")), Owner.resident("b"))
    park(b.pool, 0)  # the freed resident page becomes b's cache
    arbiter.begin()
    req = make_request(4, model="a")
    assert arbiter.make_room("a", 4, req)
    assert b.residency.missing_layers == [] and tenants["a"].residency.missing_layers == []
    assert b.pool.num_pages == 0
    assert tenants["a"].pool.allocate(4) is not None  # the page b's cache gave
    assert arbiter.make_room("a", 4, req)  # no cache left: now a layer is remapped
    assert b.residency.missing_layers or tenants["a"].residency.missing_layers
    check(b.pool, arena)


# ---- random traffic: every request reads the KV of its own tokens --------------------------------
class PrefixMachine(RuleBasedStateMachine):
    """One model's scheduler with prefix caching and swap (a small host pool, so recompute happens
    too) on a small arena that something else takes pages from. A shadow of the KV (which token
    each slot holds) is written as an executor would: swap-outs, swap-ins, then each scheduled
    token. After every operation: integrity checks, and every running request's computed tokens
    are in its blocks; every cached block holds its tokens."""

    BASES = ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 20, 21, 22, 23], [30, 31])

    def __init__(self) -> None:
        super().__init__()
        arena = PageArena(10, 4096)
        self.host = HostBlockPool("default", 12, 1024)
        self.sched = make_scheduler(
            arena=arena, block_size=BS, prefix_caching=True, preemption="swap",
            host_pool=self.host, max_num_batched_tokens=24, max_model_len=40,
        )
        self.pool = self.sched.pool
        self.arena = arena
        self.kv: dict[int, list[int | None]] = {}
        self.host_kv: dict[int, list[int | None]] = {}
        self.other: list[int] = []  # pages another owner took

    def _execute(self, plan: StepPlan) -> None:
        for d, h in plan.swap_out:
            self.host_kv[h] = list(self.kv[d])
        for h, d in plan.swap_in:
            self.kv[d] = list(self.host_kv[h])
        for s in plan.seqs:
            r = s.request
            for pos in range(s.start, s.context_len):
                slots = self.kv.setdefault(r.block_ids[pos // BS], [None] * BS)
                slots[pos % BS] = r.token(pos)

    @rule(base=st.integers(0, 2), tail=st.lists(st.integers(40, 43), max_size=9),
          max_tokens=st.integers(1, 8))
    def add(self, base, tail, max_tokens):
        req = make_request(prompt_token_ids=list(self.BASES[base]) + tail, max_tokens=max_tokens)
        self.sched.add(req)

    @rule(token=st.integers(40, 42))
    def step(self, token):
        plan = self.sched.schedule()
        self._execute(plan)
        commit(self.sched, plan, next_token=token)

    @precondition(lambda self: self.sched.running)
    @rule(data=st.data())
    def preempt(self, data):
        req = data.draw(st.sampled_from(self.sched.running))
        plan = StepPlan("default")
        self.sched.preempt(req, plan)
        self._execute(plan)

    @precondition(lambda self: self.sched.running or self.sched.waiting)
    @rule(data=st.data())
    def abort(self, data):
        req = data.draw(st.sampled_from([*self.sched.running, *self.sched.waiting]))
        self.sched.abort(req.request_id)
        assert req.status is RequestStatus.FINISHED_ABORTED

    @rule(n=st.integers(1, 3), evict=st.booleans())
    def take_pages(self, n, evict):
        """Another owner takes idle pages (as the arbiter does for another model)."""
        got = self.pool.shrink(n, evict=evict)
        pages = self.arena.alloc(len(got), Owner.resident("other"))
        self.other += pages or []

    @precondition(lambda self: self.other)
    @rule()
    def give_pages_back(self):
        self.arena.free(self.other, Owner.resident("other"))
        self.other = []

    @invariant()
    def consistent(self):
        self.arena.check_integrity()
        self.pool.check_integrity()
        self.sched.check_integrity()
        assert all(r > 0 for r in self.pool.references().values())
        for r in self.sched.running:
            for pos in range(r.num_computed_tokens):
                assert self.kv[r.block_ids[pos // BS]][pos % BS] == r.token(pos), (r, pos)
        cache = self.pool.cache
        for b in set(cache.lru_order()) | set(self.pool.references()):
            if b in cache:
                entry = cache._entries[b]
                assert self.kv[b] == list(entry.tokens), b


TestPrefixMachine = PrefixMachine.TestCase
TestPrefixMachine.settings = settings(
    max_examples=120, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
