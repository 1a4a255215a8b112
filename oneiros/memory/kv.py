"""Per-model KV block accounting on top of the page arena.

A KV block holds `block_size` tokens of every layer of one model (K and V). A page owned by the model's
KV pool holds `blocks_per_page` blocks; block id = page * blocks_per_page + slot, so a block id names
its storage directly and pages need not be contiguous.

Every block of the pool is in exactly one state:
  - free: on the free list;
  - held: referenced by live requests (a reference count; a block shared through the prefix cache
    has several);
  - cached (prefix caching on): full, indexed by its hash in `self.cache`, referenced by no request;
    its content is kept until its memory is reused.
A cached block is a free block that remembers its content: `allocate` hands out free and cached
blocks together, lowest id first (evicting a cached one it hands out), and grows the pool from free
arena pages only when both are used up; `shrink` gives back pages holding no referenced block,
highest first, whether they hold cached blocks or not (their entries are evicted). So caching
changes which tokens are computed (a hit skips them) and never which memory is used: with no hit,
every block and page decision is the one the pool makes with caching off (the simulator's results,
and the paper grid, stay the same). Only `shrink(evict=False)`, when the server goes idle, keeps
the pages of cached blocks.
"""

from __future__ import annotations

import heapq
from collections import Counter

from oneiros.core import ConfigError, ResizeKV, ensure
from oneiros.memory.arena import FREE, Owner, PageArena
from oneiros.memory.prefix import PrefixCache


class KVPool:
    def __init__(
        self,
        model: str,
        arena: PageArena,
        block_bytes: int,
        block_size: int,
        prefix_caching: bool = False,
    ) -> None:
        if block_bytes <= 0 or block_size <= 0:
            raise ConfigError(
                f"KV blocks of model {model!r} need a positive size, got {block_bytes} bytes "
                f"for {block_size} tokens"
            )
        if block_bytes > arena.page_bytes:
            raise ConfigError(
                f"one KV block of model {model!r} needs {block_bytes} bytes but a page has "
                f"{arena.page_bytes}: raise page_bytes or lower block_size"
            )
        self.model = model
        self.arena = arena
        self.owner = Owner.kv(model)
        self.block_bytes = block_bytes
        self.block_size = block_size
        self.blocks_per_page = arena.page_bytes // block_bytes
        self._pages: set[int] = set()
        # A min-heap of the free and cached blocks: the lowest block (so the lowest page) goes
        # first. Live blocks gather in low pages and high pages fall idle, so shrinking leaves long
        # free runs at the top of the arena, where layer slabs are placed when parameters come
        # back. Entries go stale (a cached block hit, a page given back) and are skipped when
        # popped; `_free` is the truth for free blocks, `self.cache` for cached ones.
        self._heap: list[int] = []
        self._free: set[int] = set()
        self._refs: dict[int, int] = {}  # held block -> live references (>= 1)
        self._held_per_page: dict[int, int] = {}  # page -> its held blocks (>= 1), kept with _refs
        self.cache = PrefixCache(model, block_size) if prefix_caching else None
        self._resizes: list[ResizeKV] = []  # since the last drain_resizes()

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return len(self._pages)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one live request."""
        return len(self._refs)

    @property
    def num_cached(self) -> int:
        """Cached blocks no request references (reclaimable, kept for prefix hits)."""
        return self.cache.num_unreferenced if self.cache is not None else 0

    @property
    def num_busy_pages(self) -> int:
        """Pages holding at least one referenced block."""
        return len(self._held_per_page)

    @property
    def num_idle_pages(self) -> int:
        """Pages with no referenced block: `shrink` can give them back at once (evicting the
        cached blocks on them)."""
        return len(self._pages) - self.num_busy_pages

    @property
    def num_empty_pages(self) -> int:
        """Pages holding neither a referenced nor a cached block: `shrink(evict=False)` gives
        them back without losing anything."""
        bpp = self.blocks_per_page
        kept = set(self._held_per_page)
        if self.cache is not None:
            kept.update(b // bpp for b in self.cache.lru_order())
        return len(self._pages) - len(kept)

    @property
    def num_free_blocks(self) -> int:
        """Free blocks in pages the pool already owns (not counting free arena pages or cached
        blocks)."""
        return len(self._free)

    @property
    def num_reusable(self) -> int:
        """Blocks `allocate` can hand out without growing: free and cached ones."""
        return len(self._free) + self.num_cached

    def refcount(self, block: int) -> int:
        return self._refs.get(block, 0)

    def references(self) -> dict[int, int]:
        """Held block -> live references (a copy)."""
        return dict(self._refs)

    def can_allocate(self, n: int) -> bool:
        missing = n - self.num_reusable
        return missing <= 0 or self.pages_needed(missing) <= self.arena.num_free

    def pages_needed(self, blocks: int) -> int:
        return -(-blocks // self.blocks_per_page)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def page_slot(self, block: int) -> tuple[int, int]:
        return divmod(block, self.blocks_per_page)

    # ---- allocation ----------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int] | None:
        """n blocks, each with one reference: free and cached blocks, lowest first (a cached one
        is evicted), growing the pool from free arena pages when they are not enough. None (and
        no change) when the arena has not the pages either."""
        if n <= 0:
            return []
        missing = n - self.num_reusable
        if missing > 0 and not self.grow(self.pages_needed(missing)):
            return None
        blocks = []
        while len(blocks) < n:
            b = heapq.heappop(self._heap)
            if b in self._free:
                self._free.remove(b)
            elif self.cache is not None and self.cache.is_unreferenced(b):
                self.cache.evict(b)
            else:
                continue  # stale: held again since, or its page was given back
            self._refs[b] = 1
            self._hold(b)
            blocks.append(b)
        return blocks

    def acquire(self, blocks: list[int]) -> None:
        """One more reference to each of these held or cached blocks (prefix cache hits)."""
        for b in blocks:
            refs = self._refs.get(b, 0)
            if not refs:
                if self.cache is None or not self.cache.is_unreferenced(b):
                    raise ValueError(f"block {b} of {self.model!r} is neither held nor cached")
                self.cache.unpark(b)  # its heap entry goes stale
                self._hold(b)
            self._refs[b] = refs + 1
        if len(self._heap) > 2 * self.num_reusable + 64:
            self._rebuild_heap()

    def _hold(self, block: int) -> None:
        page = block // self.blocks_per_page
        self._held_per_page[page] = self._held_per_page.get(page, 0) + 1

    def _unhold(self, block: int) -> None:
        page = block // self.blocks_per_page
        left = self._held_per_page.pop(page) - 1
        if left:
            self._held_per_page[page] = left

    def _rebuild_heap(self) -> None:
        """Drop stale heap entries."""
        self._heap = sorted(self._free | set(self.cache.lru_order() if self.cache else ()))

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block. A block left without references stays cached when
        the prefix cache indexes it (the first of `blocks` released last), else it is free;
        either way `allocate` may hand it out again. All or nothing: a bad list changes
        nothing."""
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"duplicate blocks in {blocks}")
        for b in blocks:
            if b not in self._refs:
                raise ValueError(f"block {b} of {self.model!r} is not allocated")
        for b in reversed(blocks):
            refs = self._refs.pop(b) - 1
            if refs:
                self._refs[b] = refs
            else:
                self._unhold(b)
                if self.cache is not None and b in self.cache:
                    self.cache.park(b)
                else:
                    self._free.add(b)
                heapq.heappush(self._heap, b)

    def cache_block(self, block: int, h: bytes, parent: bytes, tokens: list[int]) -> bool:
        """Index a held block that is full with `tokens` under its chain hash `h` (False: caching
        is off, or the block or the hash is indexed already)."""
        if self.cache is None:
            return False
        if block not in self._refs:
            raise ValueError(f"block {block} of {self.model!r} is not held")
        return self.cache.insert(block, h, parent, tokens)

    def grow(self, num_pages: int) -> bool:
        pages = self.arena.alloc(num_pages, self.owner)
        if pages is None:
            return False
        self.adopt(pages)
        return True

    def adopt(self, pages: list[int]) -> None:
        """Take pages the arena already assigned to this pool (by `grow` or by a remap)."""
        if len(set(pages)) != len(pages):
            raise ValueError(f"duplicate pages in {pages}")
        for p in pages:
            if p in self._pages:
                raise ValueError(f"page {p} already belongs to the KV pool of {self.model!r}")
            if self.arena.owner(p) != self.owner:
                raise ValueError(f"page {p} belongs to {self.arena.owner(p)}, not {self.owner}")
        self._resizes.append(ResizeKV(self.model, tuple(pages), grow=True))
        for p in pages:
            self._pages.add(p)
            base = p * self.blocks_per_page
            for b in range(base, base + self.blocks_per_page):
                self._free.add(b)
                heapq.heappush(self._heap, b)

    def shrink(self, max_pages: int | None = None, evict: bool = True) -> list[int]:
        """Give back to the arena up to max_pages pages with no referenced block, highest first;
        returns them. The cache entries on them are evicted; without `evict`, pages holding a
        cached block are kept."""
        if max_pages is not None and max_pages <= 0:
            return []
        bpp = self.blocks_per_page
        keep = set(self._held_per_page)
        cache = self.cache
        cached = cache.lru_order() if cache is not None else []
        if not evict:
            keep.update(b // bpp for b in cached)
        give = sorted(self._pages - keep, reverse=True)[:max_pages]
        if not give:
            return []
        gone = set(give)
        if cache is not None:
            for b in cached:
                if b // bpp in gone:
                    cache.evict(b)
        self._free = {b for b in self._free if b // bpp not in gone}
        self._rebuild_heap()
        self._pages -= gone
        self.arena.free(give, self.owner)
        self._resizes.append(ResizeKV(self.model, tuple(give), grow=False))
        return give

    def move_pages(self, moves: list[tuple[int, int]]) -> dict[int, int]:
        """Compaction: each (page, free page) pair moves one of this pool's pages (its bytes are
        copied by the executor, `MoveKV`). Blocks keep their slot and take the new page's ids;
        returns old block id -> new block id for the pool's users (requests' block tables)."""
        bpp = self.blocks_per_page
        srcs, dsts = [s for s, _ in moves], [d for _, d in moves]
        if len(set(srcs) | set(dsts)) != 2 * len(moves):
            raise ValueError(f"KV page moves must name distinct pages: {moves}")
        for src in srcs:
            if src not in self._pages:
                raise ValueError(f"page {src} is not in the KV pool of {self.model!r}")
        self.arena.transfer(dsts, FREE, self.owner)  # raises (and changes nothing) if one is taken
        self.arena.free(srcs, self.owner)
        new_of = {
            src * bpp + s: dst * bpp + s for src, dst in moves for s in range(bpp)
        }
        page_of = dict(moves)
        self._pages = {page_of.get(p, p) for p in self._pages}
        self._free = {new_of.get(b, b) for b in self._free}
        self._refs = {new_of.get(b, b): r for b, r in self._refs.items()}
        self._held_per_page = {page_of.get(p, p): n for p, n in self._held_per_page.items()}
        if self.cache is not None:
            self.cache.renumber(new_of)
        self._rebuild_heap()
        return new_of

    def drain_resizes(self) -> list[ResizeKV]:
        """The pages taken and given back since the last call, as memory actions of the step."""
        out, self._resizes = self._resizes, []
        return out

    def check_integrity(self) -> None:
        """Pages agree with the arena; every block is free, held or cached, exactly one of them;
        reference counts are positive; the cache index is consistent."""
        ensure(set(self.arena.pages_of(self.owner)) == self._pages, "pool pages != arena's view")
        free = self._free
        held = set(self._refs)
        cached = set(self.cache.lru_order()) if self.cache is not None else set()
        ensure((free | cached) <= set(self._heap), "a free or cached block is not on the heap")
        ensure(all(r > 0 for r in self._refs.values()), "a held block has no reference")
        per_page = Counter(b // self.blocks_per_page for b in held)
        ensure(dict(per_page) == self._held_per_page, "held blocks per page miscounted")
        ensure(not free & held, "a block is both free and held")
        ensure(not free & cached, "a block is both free and cached")
        ensure(not held & cached, "a block is both held and cached")
        bpp = self.blocks_per_page
        every = {p * bpp + s for p in self._pages for s in range(bpp)}
        ensure(free | held | cached == every, "blocks lost or invented")
        if self.cache is not None:
            self.cache.check_integrity(held)
