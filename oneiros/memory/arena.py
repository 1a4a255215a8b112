"""Page accounting for the one arena every model shares.

The arena is cut into fixed pages. Each page has exactly one owner at any time: free, a model's
always-resident tensors, one decoder layer's slab, or a model's KV pool. This module is bookkeeping only
(no tensors), so the scheduler, the remapping controller and the simulator all use it unchanged; the real
executor attaches a byte buffer of the same geometry (`memory/storage.py`).
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass

from oneiros.core import ensure


class OwnerKind(enum.Enum):
    FREE = "free"
    RESIDENT = "resident"  # embeddings, final norm, lm_head: never remapped
    SLAB = "slab"  # one decoder layer's parameters
    KV = "kv"  # a model's KV pool


# Pages slabs never move across (compaction packs slabs between them).
_WALLS = (OwnerKind.KV, OwnerKind.RESIDENT)


@dataclass(frozen=True, slots=True)
class Owner:
    kind: OwnerKind
    model: str | None = None
    layer: int | None = None

    def __str__(self) -> str:
        if self.kind is OwnerKind.FREE:
            return "free"
        if self.kind is OwnerKind.SLAB:
            return f"{self.model}/slab{self.layer}"
        return f"{self.model}/{self.kind.value}"

    @staticmethod
    def resident(model: str) -> Owner:
        return Owner(OwnerKind.RESIDENT, model)

    @staticmethod
    def slab(model: str, layer: int) -> Owner:
        return Owner(OwnerKind.SLAB, model, layer)

    @staticmethod
    def kv(model: str) -> Owner:
        return Owner(OwnerKind.KV, model)


FREE = Owner(OwnerKind.FREE)


def _kind_label(o: Owner) -> str:
    return "free" if o.kind is OwnerKind.FREE else f"{o.model}/{o.kind.value}"


class PageArena:
    """Owner of every page. Allocation returns page indices or None on shortage; never raises for it."""

    def __init__(self, num_pages: int, page_bytes: int) -> None:
        if num_pages <= 0 or page_bytes <= 0:
            raise ValueError("an arena needs at least one page of at least one byte")
        self.num_pages = num_pages
        self.page_bytes = page_bytes
        self._owner: list[Owner] = [FREE] * num_pages
        self._free: set[int] = set(range(num_pages))
        self._kind_counts: Counter[str] = Counter({"free": num_pages})  # kept for cheap metrics

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def owner(self, page: int) -> Owner:
        return self._owner[page]

    def pages_of(self, owner: Owner) -> list[int]:
        return [p for p, o in enumerate(self._owner) if o == owner]

    def usage(self) -> Counter[str]:
        """Pages per owner label, e.g. {'free': 10, 'a/kv': 4, 'a/slab0': 2}."""
        return Counter(str(o) for o in self._owner)

    def usage_by_kind(self) -> dict[str, int]:
        """Pages per (model, kind), the coarse view the metrics and the page-owner plots use."""
        return {k: v for k, v in self._kind_counts.items() if v}

    def _set_owner(self, page: int, owner: Owner) -> None:
        self._kind_counts[_kind_label(self._owner[page])] -= 1
        self._kind_counts[_kind_label(owner)] += 1
        self._owner[page] = owner

    # ---- allocation ----------------------------------------------------------------------------
    def alloc(self, n: int, owner: Owner) -> list[int] | None:
        """Any n free pages (lowest first, to keep the top of the arena open for contiguous runs)."""
        self._check_request(n, owner)
        if n > len(self._free):
            return None
        pages = sorted(self._free)[:n]
        self._assign(pages, owner)
        return pages

    def alloc_run(self, n: int, owner: Owner) -> list[int] | None:
        """n contiguous free pages (a layer slab must be contiguous for its tensor views).

        The highest free run that fits is taken, since KV pages take the lowest free pages. Inside
        the run the slab is placed against a parameter neighbour (or the arena's end), so that what
        is left of the run touches KV pages and merges with them when they are freed."""
        self._check_request(n, owner)
        if n == 0:
            return []
        for bottom, length in reversed(self.runs()):
            if length >= n:
                top = bottom + length - 1
                start = top - n + 1
                if self._is_kv(top + 1) and bottom > 0 and self._is_param(bottom - 1):
                    start = bottom
                pages = list(range(start, start + n))
                self._assign(pages, owner)
                return pages
        return None

    def _is_kv(self, page: int) -> bool:
        return 0 <= page < self.num_pages and self._owner[page].kind is OwnerKind.KV

    def _is_param(self, page: int) -> bool:
        return self._owner[page].kind in (OwnerKind.SLAB, OwnerKind.RESIDENT)

    def runs(self) -> list[tuple[int, int]]:
        """Maximal free runs as (first page, length), lowest first."""
        out: list[tuple[int, int]] = []
        for p in sorted(self._free):
            if out and out[-1][0] + out[-1][1] == p:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((p, 1))
        return out

    def plan_compaction(self, n: int) -> list[tuple[Owner, list[int], list[int]]] | None:
        """How to make a run of n free pages by moving layer slabs, when enough pages are free but
        no run is long enough. Slabs move only within a segment (pages between KV or resident
        pages): packed against the segment's top in order, which gathers its free pages at the
        bottom. The segment with enough free pages that moves the fewest pages wins. Returns
        (slab owner, its pages, its new pages) in an order where each move lands on pages that are
        free or its own by then; None when no segment has n free pages."""
        best: list[tuple[Owner, list[int], list[int]]] | None = None
        best_cost = None
        walls = [-1, *(p for p, o in enumerate(self._owner) if o.kind in _WALLS), self.num_pages]
        for i in range(len(walls) - 2, -1, -1):  # segments from the top down
            bottom, top = walls[i] + 1, walls[i + 1] - 1
            if top - bottom + 1 < n or sum(q in self._free for q in range(bottom, top + 1)) < n:
                continue
            moves = self._pack(bottom, top)
            cost = sum(len(old) for _, old, _ in moves)
            if moves and (best_cost is None or cost < best_cost):
                best, best_cost = moves, cost
        return best

    def plan_kv_moves(self, n: int) -> list[tuple[Owner, int, int]] | None:
        """How to make a run of n free pages by moving KV pages, when slab compaction cannot: the
        window of n pages holding no parameter page with the fewest KV pages (the highest of
        those, where slabs go) is emptied, each of its KV pages moving to the lowest free page
        outside it (where KV pages go). Returns (KV owner, old page, new page) in page order;
        [] when a run exists already; None when no window is free of parameters or fewer than
        n pages are free (a window's KV pages fit outside it exactly when n pages are free)."""
        if n <= 0 or len(self._free) < n:
            return None if n > 0 else []
        best = best_cost = None
        walls = kv = 0  # parameter and KV pages in the window ending at page p
        for p in range(self.num_pages):
            walls += self._is_param(p)
            kv += self._is_kv(p)
            if p >= n:
                walls -= self._is_param(p - n)
                kv -= self._is_kv(p - n)
            if p >= n - 1 and not walls and (best_cost is None or kv <= best_cost):
                best, best_cost = p - n + 1, kv
        if best is None:
            return None
        window = range(best, best + n)
        dests = iter(sorted(q for q in self._free if q not in window))
        return [(self._owner[q], q, next(dests)) for q in window if self._is_kv(q)]

    def _pack(self, bottom: int, top: int) -> list[tuple[Owner, list[int], list[int]]]:
        """Moves that pack the slabs of pages bottom..top against `top`, topmost slab first."""
        slabs: list[tuple[Owner, list[int]]] = []
        for q in range(top, bottom - 1, -1):
            o = self._owner[q]
            if o.kind is OwnerKind.SLAB:
                if slabs and (slabs[-1][0] is o or slabs[-1][0] == o):
                    slabs[-1][1].insert(0, q)
                else:
                    slabs.append((o, [q]))
        moves = []
        edge = top + 1
        for o, pages in slabs:
            dest = list(range(edge - len(pages), edge))
            if dest != pages:
                moves.append((o, pages, dest))
            edge -= len(pages)
        return moves

    def free(self, pages: list[int], owner: Owner) -> None:
        """Give pages back. Every page must belong to `owner`: freeing another's page is a bug."""
        self._check_owned(pages, owner)
        for p in pages:
            self._set_owner(p, FREE)
            self._free.add(p)

    def transfer(self, pages: list[int], old: Owner, new: Owner) -> None:
        """Change the owner of pages in one step (remapping a slab into a KV pool is this)."""
        self._check_owned(pages, old)
        if new.kind is OwnerKind.FREE:
            self.free(pages, old)
            return
        if old.kind is OwnerKind.FREE:
            # Claiming specific free pages: they must leave the free set too.
            self._assign(pages, new)
            return
        for p in pages:
            self._set_owner(p, new)

    @staticmethod
    def _check_request(n: int, owner: Owner) -> None:
        if owner.kind is OwnerKind.FREE:
            raise ValueError("cannot allocate pages to FREE")
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")

    def _assign(self, pages: list[int], owner: Owner) -> None:
        for p in pages:
            self._free.remove(p)
            self._set_owner(p, owner)

    def _check_owned(self, pages: list[int], owner: Owner) -> None:
        if len(set(pages)) != len(pages):
            raise ValueError(f"duplicate pages in {pages}")
        for p in pages:
            if not 0 <= p < self.num_pages:
                raise ValueError(f"page {p} is outside the arena (0..{self.num_pages - 1})")
            if self._owner[p] != owner:
                raise ValueError(f"page {p} belongs to {self._owner[p]}, not {owner}")

    def check_integrity(self) -> None:
        """Every page has one owner and the free set is exactly the pages owned by FREE."""
        ensure(len(self._owner) == self.num_pages, "owner table size drifted")
        free = {p for p, o in enumerate(self._owner) if o.kind is OwnerKind.FREE}
        ensure(free == self._free, f"free set drifted: {sorted(free ^ self._free)}")
        counts = Counter(_kind_label(o) for o in self._owner)
        ensure(+self._kind_counts == counts, "page counts by kind drifted")

