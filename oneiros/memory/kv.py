"""Per-model KV block accounting on top of the page arena.

A KV block holds `block_size` tokens of every layer of one model (K and V). A page owned by the model's
KV pool holds `blocks_per_page` blocks; block id = page * blocks_per_page + slot, so a block id names
its storage directly and pages need not be contiguous. The pool grows a page at a time from the arena's
free pages when it runs out of blocks, and gives back pages whose blocks are all free (`shrink`), which
is how KV memory returns to other models or to parameters.
"""

from __future__ import annotations

import heapq

from oneiros.core import ConfigError, ResizeKV, ensure
from oneiros.memory.arena import Owner, PageArena


class KVPool:
    def __init__(self, model: str, arena: PageArena, block_bytes: int, block_size: int) -> None:
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
        # A min-heap: the lowest block (so the lowest page) goes first. Live blocks gather in low
        # pages and high pages fall idle, so shrinking leaves long free runs at the top of the arena,
        # where layer slabs are placed when parameters come back.
        self._free_blocks: list[int] = []
        self._used: set[int] = set()
        self._resizes: list[ResizeKV] = []  # since the last drain_resizes()

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        return len(self._pages)

    @property
    def num_used(self) -> int:
        return len(self._used)

    @property
    def num_busy_pages(self) -> int:
        """Pages holding at least one live block."""
        return len({b // self.blocks_per_page for b in self._used})

    @property
    def num_idle_pages(self) -> int:
        """Pages with no live block: `shrink` can give them back at once."""
        return len(self._pages) - self.num_busy_pages

    @property
    def num_free_blocks(self) -> int:
        """Free blocks in pages the pool already owns (not counting free arena pages)."""
        return len(self._free_blocks)

    def can_allocate(self, n: int) -> bool:
        missing = n - len(self._free_blocks)
        return missing <= 0 or self.pages_needed(missing) <= self.arena.num_free

    def pages_needed(self, blocks: int) -> int:
        return -(-blocks // self.blocks_per_page)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def page_slot(self, block: int) -> tuple[int, int]:
        return divmod(block, self.blocks_per_page)

    # ---- allocation ----------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int] | None:
        """n blocks, growing the pool from free arena pages if needed; None (and no change) if not."""
        if n <= 0:
            return []
        missing = n - len(self._free_blocks)
        if missing > 0 and not self.grow(self.pages_needed(missing)):
            return None
        blocks = [heapq.heappop(self._free_blocks) for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Return blocks to the pool. All or nothing: a bad list changes nothing."""
        if len(set(blocks)) != len(blocks):
            raise ValueError(f"duplicate blocks in {blocks}")
        for b in blocks:
            if b not in self._used:
                raise ValueError(f"block {b} of {self.model!r} is not allocated")
        self._used.difference_update(blocks)
        for b in blocks:
            heapq.heappush(self._free_blocks, b)

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
            # Reverse so that pop() hands out the lowest slot of the page first.
            for b in range(base, base + self.blocks_per_page):
                heapq.heappush(self._free_blocks, b)

    def shrink(self, max_pages: int | None = None) -> list[int]:
        """Give back to the arena every page (up to max_pages) with no live block; returns them."""
        if max_pages is not None and max_pages <= 0:
            return []
        busy = {b // self.blocks_per_page for b in self._used}
        idle = sorted(self._pages - busy, reverse=True)[:max_pages]
        if not idle:
            return []
        idle_set = set(idle)
        self._free_blocks = [b for b in self._free_blocks if b // self.blocks_per_page not in idle_set]
        heapq.heapify(self._free_blocks)
        self._pages -= idle_set
        self.arena.free(idle, self.owner)
        self._resizes.append(ResizeKV(self.model, tuple(idle), grow=False))
        return idle

    def drain_resizes(self) -> list[ResizeKV]:
        """The pages taken and given back since the last call, as memory actions of the step."""
        out, self._resizes = self._resizes, []
        return out

    def check_integrity(self) -> None:
        ensure(set(self.arena.pages_of(self.owner)) == self._pages, "pool pages != arena's view")
        free = set(self._free_blocks)
        ensure(len(free) == len(self._free_blocks), "a block is on the free list twice")
        ensure(not free & self._used, "a block is both free and used")
        every = {p * self.blocks_per_page + s for p in self._pages for s in range(self.blocks_per_page)}
        ensure(free | self._used == every, "blocks lost or invented")
