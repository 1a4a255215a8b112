"""Where one model's parameters live: resident pages, one slab of pages per decoder layer, and a
host master copy of every slab (pinned on CUDA). Parameters never change, so the host copy is always
exact: a slab's pages can be taken away without write-back and the layer restored by one copy."""

from __future__ import annotations

from collections.abc import Callable

import torch

from oneiros.core import ConfigError
from oneiros.memory.arena import FREE, Owner, PageArena
from oneiros.memory.storage import DeviceArena, SlabLayout, host_buffer
from oneiros.models.base import DecoderModel
from oneiros.models.loader import ModelSource


class ModelWeights:
    def __init__(
        self, name: str, model: DecoderModel, arena: PageArena, storage: DeviceArena
    ) -> None:
        self.name = name
        self.model = model
        self.arena = arena
        self.storage = storage
        self.layer_layout = SlabLayout.build(model.layer_shapes(), model.dtype)
        self.resident_layout = SlabLayout.build(model.resident_shapes(), model.dtype)
        self.host: list[torch.Tensor] = []  # master copy of each layer slab
        self.slab_pages: list[list[int] | None] = [None] * model.cfg.num_layers
        self.resident_pages: list[int] = []
        # How a layer's master copy reaches its slab after loading: (layer, device region). The
        # executor installs its copy stream here (restores overlap compute); default synchronous.
        self.copier: Callable[[int, torch.Tensor], None] | None = None

    @property
    def pages_per_layer(self) -> int:
        return self.layer_layout.pages(self.arena.page_bytes)

    @property
    def total_pages(self) -> int:
        return weight_pages(self.model, self.arena.page_bytes)

    def load(self, source: ModelSource | None) -> None:
        """Read every tensor from the source into host master copies and the arena. With no source
        (the simulator, on the meta device) only pages are assigned and views bound."""
        m, page = self.model, self.arena.page_bytes
        pages = self.arena.alloc_run(self.resident_layout.pages(page), Owner.resident(self.name))
        if pages is None:
            raise self._too_small()
        self.resident_pages = pages
        region = self.storage.region(pages[0], self.resident_layout.nbytes)
        if source is not None:
            res = {k: source.tensor(hf) for k, hf in m.resident_names.items()}
            self.resident_layout.pack(res, region)
        m.bind_resident(self.resident_layout.views(region))
        for i in range(m.cfg.num_layers):
            prefix = m.layer_prefix.format(i=i)
            host = host_buffer(self.layer_layout.nbytes, self.storage.device)
            if source is not None:
                tensors = {k: source.tensor(prefix + k) for k in m.layer_shapes()}
                self.layer_layout.pack(tensors, host)
            self.host.append(host)
            if not self.restore_layer(i):
                raise self._too_small()

    def restore_layer(self, i: int) -> bool:
        """Give layer i a slab again and copy it from the host master copy. False if no room."""
        if self.slab_pages[i] is not None:
            raise ValueError(f"layer {i} of {self.name!r} is already resident")
        pages = self.arena.alloc_run(self.pages_per_layer, Owner.slab(self.name, i))
        if pages is None:
            return False
        self._place(i, pages)
        return True

    def move_layer(self, i: int, dest: list[int]) -> None:
        """Move resident layer i's slab to `dest`, pages that are free or its own (compaction). The
        data comes again from the exact host copy, so old and new places may overlap."""
        old = self.slab_pages[i]
        if old is None:
            raise ValueError(f"layer {i} of {self.name!r} is not resident")
        owner = Owner.slab(self.name, i)
        self.arena.free(old, owner)
        self.arena.transfer(dest, FREE, owner)
        self._place(i, dest)

    def _place(self, i: int, pages: list[int]) -> None:
        region = self.storage.region(pages[0], self.layer_layout.nbytes)
        if self.copier is not None:
            self.copier(i, region)
        else:
            region.copy_(self.host[i])
        self.slab_pages[i] = pages
        self.model.bind_layer(i, self.layer_layout.views(region))

    def signature(self) -> tuple:
        """Where every weight lives now (first page of the resident run and of each layer slab,
        None for a missing layer): what a captured graph bakes in."""
        first = [None if p is None else p[0] for p in self.slab_pages]
        return (self.resident_pages[0] if self.resident_pages else None, *first)

    @property
    def missing_layers(self) -> list[int]:
        return [i for i, pages in enumerate(self.slab_pages) if pages is None]

    def evict_layer(self, i: int) -> list[int]:
        """Remap: layer i's slab pages go back to the arena (no write-back: the host copy is exact)."""
        pages = self.slab_pages[i]
        if pages is None:
            raise ValueError(f"layer {i} of {self.name!r} is not resident")
        self.arena.free(pages, Owner.slab(self.name, i))
        self.slab_pages[i] = None
        self.model.bind_layer(i, None)
        return pages

    def region(self, slab: int) -> torch.Tensor:
        """The device bytes of resident layer `slab`'s slab."""
        pages = self.slab_pages[slab]
        assert pages is not None, f"layer {slab} of {self.name!r} has no slab"
        return self.storage.region(pages[0], self.layer_layout.nbytes)

    def bind(self, layer: int, slab: int | None) -> None:
        """Point layer's weights at the slab of resident layer `slab` (None: no weights)."""
        views = None if slab is None else self.layer_layout.views(self.region(slab))
        self.model.bind_layer(layer, views)

    def release(self) -> None:
        """Return every page of this model to the arena (the model is being unloaded)."""
        for i, pages in enumerate(self.slab_pages):
            if pages is not None:
                self.arena.free(pages, Owner.slab(self.name, i))
                self.slab_pages[i] = None
                self.model.bind_layer(i, None)
        if self.resident_pages:
            self.arena.free(self.resident_pages, Owner.resident(self.name))
            self.resident_pages = []

    def _too_small(self) -> ConfigError:
        need = self.total_pages * self.arena.page_bytes
        return ConfigError(
            f"memory budget too small for the weights of model {self.name!r}: they need "
            f"{need / 2**20:.0f} MiB in {self.arena.page_bytes // 2**20 or 1} MiB pages, "
            f"{self.arena.num_free * self.arena.page_bytes / 2**20:.0f} MiB were free"
        )


def weight_pages(model: DecoderModel, page_bytes: int) -> int:
    """Pages a model's parameters take: its resident run plus one slab per layer."""
    layer = SlabLayout.build(model.layer_shapes(), model.dtype).pages(page_bytes)
    resident = SlabLayout.build(model.resident_shapes(), model.dtype).pages(page_bytes)
    return resident + model.cfg.num_layers * layer
