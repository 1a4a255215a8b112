"""Where one model's parameters live, as page accounting (no tensors): the always-resident run of
pages (embeddings, final norm, lm_head) and one slab of contiguous pages per decoder layer, or none
for a layer that is non-resident (remapped). Planning changes residency here and records the matching
memory action; the torch side (`memory/weights.py`) moves the bytes when the executor applies it."""

from __future__ import annotations

import math

from oneiros.core import ConfigError, ensure
from oneiros.memory.arena import FREE, Owner, PageArena

ALIGN = 256  # bytes; every tensor of a slab starts aligned for vectorised kernels


def packed_offsets(
    shapes: dict[str, tuple[int, ...]], itemsize: int
) -> tuple[list[tuple[str, tuple[int, ...], int, int]], int]:
    """Tensors packed one after another, each aligned: [(name, shape, offset, nbytes)], total."""
    entries, offset = [], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        entries.append((name, tuple(shape), offset, nbytes))
        offset += -(-nbytes // ALIGN) * ALIGN
    return entries, offset


def pages_for(nbytes: int, page_bytes: int) -> int:
    """Pages a packed region of nbytes takes (at least one)."""
    return max(1, -(-nbytes // page_bytes))


class LayerResidency:
    """Page ownership of one model's parameters. Every call keeps the arena's owners exact."""

    def __init__(
        self, model: str, arena: PageArena, num_layers: int, layer_bytes: int, resident_bytes: int
    ) -> None:
        self.model = model
        self.arena = arena
        self.num_layers = num_layers
        self.layer_bytes = layer_bytes  # bytes one layer's copy moves
        self.resident_bytes = resident_bytes
        self.slab_pages: list[list[int] | None] = [None] * num_layers
        self.resident_pages: list[int] = []

    @property
    def pages_per_layer(self) -> int:
        return pages_for(self.layer_bytes, self.arena.page_bytes)

    @property
    def total_pages(self) -> int:
        """Pages every parameter takes when the model is fully resident."""
        return pages_for(self.resident_bytes, self.arena.page_bytes) + (
            self.num_layers * self.pages_per_layer
        )

    @property
    def missing_layers(self) -> list[int]:
        return [i for i, pages in enumerate(self.slab_pages) if pages is None]

    def is_resident(self, layer: int) -> bool:
        return self.slab_pages[layer] is not None

    # ---- changes ---------------------------------------------------------------------------------
    def place_all(self) -> None:
        """At start-up: the resident run, then every layer's slab; ConfigError if they do not fit."""
        self.place_resident()
        self.place_layers()

    def place_resident(self) -> None:
        """At start-up: the always-resident run; ConfigError if it does not fit."""
        pages = self.arena.alloc_run(
            pages_for(self.resident_bytes, self.arena.page_bytes), Owner.resident(self.model)
        )
        if pages is None:
            raise self.too_small()
        self.resident_pages = pages

    def place_layers(self) -> None:
        """At start-up: every layer's slab; ConfigError if they do not fit. Without this call
        (an oversubscribed arena) the model starts with every layer off the GPU."""
        for i in range(self.num_layers):
            if self.restore(i) is None:
                raise self.too_small()

    def restore(self, layer: int) -> list[int] | None:
        """Give `layer` a slab again (a contiguous run of free pages); None if there is no room."""
        if self.slab_pages[layer] is not None:
            raise ValueError(f"layer {layer} of {self.model!r} is already resident")
        pages = self.arena.alloc_run(self.pages_per_layer, Owner.slab(self.model, layer))
        if pages is not None:
            self.slab_pages[layer] = pages
        return pages

    def evict(self, layer: int) -> list[int]:
        """Remap: the layer's slab pages go free (no write-back: the host copy is exact)."""
        pages = self.slab_pages[layer]
        if pages is None:
            raise ValueError(f"layer {layer} of {self.model!r} is not resident")
        self.arena.free(pages, Owner.slab(self.model, layer))
        self.slab_pages[layer] = None
        return pages

    def move(self, layer: int, dest: list[int]) -> list[int]:
        """Move a resident slab onto `dest`, pages that are free or its own (compaction); returns
        the old pages."""
        old = self.slab_pages[layer]
        if old is None:
            raise ValueError(f"layer {layer} of {self.model!r} is not resident")
        owner = Owner.slab(self.model, layer)
        self.arena.free(old, owner)
        self.arena.transfer(dest, FREE, owner)
        self.slab_pages[layer] = dest
        return old

    def release(self) -> None:
        """Every page of this model back to the arena (the model is unloaded)."""
        for i, pages in enumerate(self.slab_pages):
            if pages is not None:
                self.arena.free(pages, Owner.slab(self.model, i))
                self.slab_pages[i] = None
        if self.resident_pages:
            self.arena.free(self.resident_pages, Owner.resident(self.model))
            self.resident_pages = []

    # ---- queries ---------------------------------------------------------------------------------
    def signature(self) -> tuple:
        """Where every weight lives now (first page of the resident run and of each layer slab,
        None for a missing layer): what a captured graph bakes in."""
        first = [None if p is None else p[0] for p in self.slab_pages]
        return (self.resident_pages[0] if self.resident_pages else None, *first)

    def too_small(self) -> ConfigError:
        need = self.total_pages * self.arena.page_bytes
        return ConfigError(
            f"memory budget too small for the weights of model {self.model!r}: they need "
            f"{need / 2**20:.0f} MiB in {self.arena.page_bytes // 2**20 or 1} MiB pages, "
            f"{self.arena.num_free * self.arena.page_bytes / 2**20:.0f} MiB were free"
        )

    def check_integrity(self) -> None:
        for i, pages in enumerate(self.slab_pages):
            if pages is None:
                continue
            ensure(len(pages) == self.pages_per_layer, f"layer {i} slab has {len(pages)} pages")
            ensure(pages == list(range(pages[0], pages[0] + len(pages))), f"slab {i} not contiguous")
            owner = Owner.slab(self.model, i)
            ensure(all(self.arena.owner(p) == owner for p in pages), f"slab {i} pages not owned")
