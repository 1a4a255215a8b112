"""Tensor storage behind the page accounting: one byte buffer on the device, cut into pages.

`DeviceArena` owns the buffer. A `SlabLayout` says where each named tensor of a layer (or of a model's
resident set) lies inside a run of pages; `views` turns a byte region into typed tensors without a copy,
so the model reads its weights from whichever pages currently hold them. `kv_view` sees every page as
`blocks_per_page` KV blocks of one model's geometry; only pages that model's pool owns are ever indexed.
`ColdFile` holds master copies that do not fit the host budget (the cold tier).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass

import torch

from oneiros.memory.residency import packed_offsets, pages_for


@dataclass(frozen=True, slots=True)
class SlabEntry:
    name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class SlabLayout:
    """Byte layout of a set of same-dtype tensors packed one after another."""

    entries: tuple[SlabEntry, ...]
    dtype: torch.dtype
    nbytes: int

    @staticmethod
    def build(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> SlabLayout:
        packed, nbytes = packed_offsets(shapes, torch.empty((), dtype=dtype).element_size())
        return SlabLayout(tuple(SlabEntry(*e) for e in packed), dtype, nbytes)

    def pages(self, page_bytes: int) -> int:
        return pages_for(self.nbytes, page_bytes)

    def views(self, region: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views into a uint8 region of at least `nbytes` bytes."""
        return {
            e.name: region[e.offset : e.offset + e.nbytes].view(self.dtype).view(e.shape)
            for e in self.entries
        }

    def pack(self, tensors: dict[str, torch.Tensor], region: torch.Tensor) -> None:
        """Copy tensors (any dtype/device) into their places in `region`."""
        views = self.views(region)
        missing = set(views) - set(tensors)
        if missing:
            raise KeyError(f"missing weights: {sorted(missing)}")
        for name, view in views.items():
            src = tensors[name]
            if tuple(src.shape) != view.shape:
                raise ValueError(f"weight {name}: shape {tuple(src.shape)}, expected {view.shape}")
            view.copy_(src)


class DeviceArena:
    """The one byte buffer of the arena on `device`."""

    def __init__(self, num_pages: int, page_bytes: int, device: torch.device) -> None:
        self.num_pages = num_pages
        self.page_bytes = page_bytes
        self.device = device
        # Zeroed once: attention masks out KV slots never written (a block's tail, padding), and a
        # masked slot must hold a finite value (0 x NaN is NaN). Every byte is then always finite:
        # zeros, weights, or KV written by some model.
        self.buffer = torch.zeros(num_pages * page_bytes, dtype=torch.uint8, device=device)

    def region(self, first_page: int, nbytes: int) -> torch.Tensor:
        start = first_page * self.page_bytes
        return self.buffer[start : start + nbytes]

    def kv_view(
        self, block_shape: tuple[int, ...], dtype: torch.dtype, blocks_per_page: int
    ) -> torch.Tensor:
        """[num_pages, blocks_per_page, *block_shape] over the whole buffer (no copy).

        Pages keep their tail padding (page_bytes need not be a multiple of the block size), so the
        page dimension has its own stride and (page, slot) index a block."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        block_elems = math.prod(block_shape)
        pages = self.buffer.view(self.num_pages, self.page_bytes)
        used = pages[:, : blocks_per_page * block_elems * itemsize]
        return used.view(dtype).view(self.num_pages, blocks_per_page, *block_shape)


def host_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """A zeroed host byte buffer for master copies, pinned when the device is CUDA (async copies).
    Zeroed because a slab's alignment padding is copied with it and, once the slab is remapped,
    lands in KV pages: every arena byte must stay finite (see DeviceArena)."""
    if device.type == "meta":  # the simulator: accounting only, no bytes anywhere
        return torch.empty(nbytes, dtype=torch.uint8, device="meta")
    pin = device.type == "cuda" and torch.cuda.is_available()
    return torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin)


class ColdFile:
    """The cold tier of master copies: byte buffers appended to an unnamed temporary file (in
    $ONEIROS_COLD_DIR, else the system's temporary directory) and read back as views of one
    memory map. The file is unlinked once mapped: the mapping keeps its pages until the process
    ends, and nothing is left behind. Reads go through the page cache, so a layer copied in from
    here costs a disk read when the OS has dropped its pages."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(
            prefix="oneiros-cold-", dir=os.environ.get("ONEIROS_COLD_DIR") or None
        )
        self._file = os.fdopen(fd, "wb")
        self.nbytes = 0

    def write(self, buf: torch.Tensor) -> None:
        self._file.write(memoryview(buf.numpy()))
        self.nbytes += buf.numel()

    def map(self, sizes: list[int]) -> list[torch.Tensor]:
        """Views of the file, one per buffer written (`sizes`, in order)."""
        self._file.close()
        try:
            mapped = torch.from_file(self.path, shared=True, size=self.nbytes, dtype=torch.uint8)
        finally:
            os.unlink(self.path)
        out, offset = [], 0
        for n in sizes:
            out.append(mapped[offset:offset + n])
            offset += n
        return out
