"""The bytes behind a model's parameter accounting (`memory/residency.py`): a host master copy of
every layer slab (pinned on CUDA) and the model's views into whichever pages hold each layer.
Parameters never change, so the host copy is always exact: taking a slab away needs no write-back and
bringing a layer back is one copy, which the executor issues (`LayerStreamer.copy_in`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from oneiros.core import EvictLayer, MemoryOp, MoveLayer, RestoreLayer
from oneiros.engine import faults
from oneiros.memory.residency import LayerResidency
from oneiros.memory.storage import ColdFile, DeviceArena, SlabLayout, host_buffer
from oneiros.models.base import DecoderModel
from oneiros.models.loader import ModelSource


def layouts(model: DecoderModel) -> tuple[SlabLayout, SlabLayout]:
    """(one decoder layer, the resident set) byte layouts of a model."""
    return (
        SlabLayout.build(model.layer_shapes(), model.dtype),
        SlabLayout.build(model.resident_shapes(), model.dtype),
    )


def make_residency(name: str, model: DecoderModel, arena) -> LayerResidency:
    layer, resident = layouts(model)
    return LayerResidency(name, arena, model.cfg.num_layers, layer.nbytes, resident.nbytes)


def weight_pages(model: DecoderModel, page_bytes: int) -> int:
    """Pages a model's parameters take: its resident run plus one slab per layer."""
    layer, resident = layouts(model)
    return resident.pages(page_bytes) + model.cfg.num_layers * layer.pages(page_bytes)


class ModelWeights:
    def __init__(
        self, residency: LayerResidency, model: DecoderModel, storage: DeviceArena
    ) -> None:
        self.residency = residency
        self.model = model
        self.storage = storage
        self.layer_layout, self.resident_layout = layouts(model)
        self.host: list[torch.Tensor] = []  # master copy of each layer slab

    def load(self, source: ModelSource | None, cold: bool = False) -> None:
        """Read every tensor from the source into host master copies, then into the pages the
        residency placed (synchronously: start-up). With no source (the simulator, on the meta
        device) only views are bound. `cold`: the master copies go to the cold tier, a file
        read back by memory map (`ColdFile`), instead of pinned memory: one layer's bytes in RAM
        at a time while loading, none after."""
        m, res = self.model, self.residency
        spill = ColdFile() if cold and self.storage.device.type != "meta" else None
        region = self.storage.region(res.resident_pages[0], self.resident_layout.nbytes)
        if source is not None:
            tensors = {k: source.tensor(hf) for k, hf in m.resident_names.items()}
            self.resident_layout.pack(tensors, region)
        m.bind_resident(self.resident_layout.views(region))
        for i in range(m.cfg.num_layers):
            nbytes = self.layer_layout.nbytes
            host = host_buffer(nbytes, torch.device("cpu") if spill else self.storage.device)
            if source is not None:
                prefix = m.layer_prefix.format(i=i)
                tensors = {k: source.tensor(prefix + k) for k in m.layer_shapes()}
                self.layer_layout.pack(tensors, host)
            pages = res.slab_pages[i]
            if pages is not None:
                self.region_at(pages[0]).copy_(host)
                self.bind_at(i, pages[0])
            if spill is None:
                self.host.append(host)
            else:
                spill.write(host)  # and the buffer is dropped: the file holds it
        if spill is not None:
            self.host = spill.map([self.layer_layout.nbytes] * m.cfg.num_layers)

    def apply(
        self, op: MemoryOp, copy_in: Callable[[int, torch.Tensor], None] | None = None
    ) -> None:
        """The bytes of one layer action the residency already made: drop the views of an
        evicted layer; copy a restored or moved layer from its master copy (through `copy_in`,
        the streamer's copy stream, when given; else synchronously) and bind it there."""
        if isinstance(op, EvictLayer):
            self.unbind(op.layer)
        elif isinstance(op, (RestoreLayer, MoveLayer)):
            faults.maybe("restore")  # fault injection (tests, drills): a failed restore or move
            dst = self.region_at(op.pages[0])
            if copy_in is None:
                dst.copy_(self.host[op.layer])
            else:
                copy_in(op.layer, dst)
            self.bind_at(op.layer, op.pages[0])

    def region_at(self, first_page: int) -> torch.Tensor:
        """The uint8 device bytes of a layer slab starting at `first_page`."""
        return self.storage.region(first_page, self.layer_layout.nbytes)

    def bind_at(self, layer: int, first_page: int) -> None:
        """Point layer's weights at the slab starting at `first_page`."""
        self.model.bind_layer(layer, self.layer_layout.views(self.region_at(first_page)))

    def unbind(self, layer: int) -> None:
        self.model.bind_layer(layer, None)

    def region(self, slab: int) -> torch.Tensor:
        """The device bytes of resident layer `slab`'s slab."""
        pages = self.residency.slab_pages[slab]
        if pages is None:
            raise ValueError(f"layer {slab} of {self.residency.model!r} has no slab")
        return self.region_at(pages[0])

    def bind(self, layer: int, slab: int | None) -> None:
        """Point layer's weights at the slab of resident layer `slab` (None: no weights)."""
        views = None if slab is None else self.layer_layout.views(self.region(slab))
        self.model.bind_layer(layer, views)
