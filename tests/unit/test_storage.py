"""SlabLayout and DeviceArena: tensor views over the arena's byte buffer (CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oneiros.memory.arena import PageArena
from oneiros.memory.kv import KVPool
from oneiros.memory.residency import ALIGN as _ALIGN
from oneiros.memory.storage import DeviceArena, SlabLayout

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _random(shape, dtype, gen):
    return torch.randn(shape, generator=gen).to(dtype)


# ---- SlabLayout ---------------------------------------------------------------------------------
def test_build_offsets_are_aligned_and_do_not_overlap():
    shapes = {"q": (3, 5), "bias": (7,), "scalar": (), "empty": (0, 4), "w": (64, 33)}
    lay = SlabLayout.build(shapes, torch.float16)
    assert [e.name for e in lay.entries] == list(shapes)
    end = 0
    for e in lay.entries:
        assert e.offset % _ALIGN == 0
        assert e.offset >= end
        assert e.nbytes == math.prod(e.shape) * 2
        end = e.offset + e.nbytes
    assert lay.nbytes >= end and lay.nbytes % _ALIGN == 0
    assert lay.entries[0].offset == 0


def test_pages():
    lay = SlabLayout.build({"w": (1024,)}, torch.float32)  # 4096 bytes
    assert lay.pages(4096) == 1
    assert lay.pages(4095) == 2
    assert lay.pages(1 << 20) == 1
    assert SlabLayout.build({}, torch.float32).pages(4096) == 1  # never zero pages


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.dictionaries(
        st.text("abcdefgh", min_size=1, max_size=4),
        st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple),
        min_size=1,
        max_size=5,
    ),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_pack_then_views_round_trip_exactly(shapes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    lay = SlabLayout.build(shapes, dtype)
    region = torch.zeros(lay.nbytes + 64, dtype=torch.uint8)
    tensors = {k: _random(s, torch.float32, gen) for k, s in shapes.items()}  # cast by pack
    lay.pack(tensors, region)
    views = lay.views(region)
    assert set(views) == set(shapes)
    for k, v in views.items():
        assert v.dtype == dtype and tuple(v.shape) == shapes[k]
        assert torch.equal(v, tensors[k].to(dtype))
    # Only the tail beyond the layout was left alone.
    assert not region[lay.nbytes :].any()


def test_views_alias_the_region():
    lay = SlabLayout.build({"a": (4, 4), "b": (10,)}, torch.float32)
    region = torch.zeros(lay.nbytes, dtype=torch.uint8)
    views = lay.views(region)
    for e in lay.entries:
        v = views[e.name]
        assert v.data_ptr() == region.data_ptr() + e.offset
        assert v.data_ptr() % 4 == 0
    views["b"].fill_(1.0)
    b = lay.entries[1]
    assert torch.equal(region[b.offset : b.offset + b.nbytes].view(torch.float32), torch.ones(10))
    # ... and writing the bytes is seen through the view.
    region[: lay.entries[0].nbytes].view(torch.float32)[5] = 3.5
    assert views["a"][1, 1] == 3.5


def test_views_inside_an_arena_page_run():
    """A slab placed at page k of a DeviceArena: views land exactly on that page's bytes."""
    lay = SlabLayout.build({"w": (300,), "b": (17,)}, torch.float32)
    dev = DeviceArena(8, 4096, CPU)
    dev.buffer.zero_()
    first = 5
    region = dev.region(first, lay.nbytes)
    assert region.data_ptr() == dev.buffer.data_ptr() + first * 4096
    lay.pack({"w": torch.arange(300.0), "b": torch.full((17,), -1.0)}, region)
    assert not dev.buffer[: first * 4096].any()
    w = dev.buffer[first * 4096 : first * 4096 + 1200].view(torch.float32)
    assert torch.equal(w, torch.arange(300.0))


def test_pack_rejects_missing_and_misshapen_tensors():
    lay = SlabLayout.build({"a": (2, 3), "b": (4,)}, torch.float32)
    region = torch.zeros(lay.nbytes, dtype=torch.uint8)
    with pytest.raises(KeyError, match="b"):
        lay.pack({"a": torch.zeros(2, 3)}, region)
    with pytest.raises(ValueError, match="shape"):
        lay.pack({"a": torch.zeros(3, 2), "b": torch.zeros(4)}, region)


# ---- DeviceArena.kv_view ------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    block_shape=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple),
    dtype=st.sampled_from(DTYPES),
    page_kib=st.integers(1, 2),
    num_pages=st.integers(1, 4),
    data=st.data(),
)
def test_kv_view_maps_page_and_slot_to_their_bytes(block_shape, dtype, page_kib, num_pages, data):
    page_bytes = page_kib * 4096
    itemsize = torch.empty((), dtype=dtype).element_size()
    block_bytes = math.prod(block_shape) * itemsize
    arena = PageArena(num_pages, page_bytes)
    pool = KVPool("m", arena, block_bytes, 16)
    bpp = pool.blocks_per_page
    dev = DeviceArena(num_pages, page_bytes, CPU)
    dev.buffer.copy_(torch.randint(0, 256, (num_pages * page_bytes,), dtype=torch.uint8))
    kv = dev.kv_view(block_shape, dtype, bpp)
    assert tuple(kv.shape) == (num_pages, bpp, *block_shape)
    assert kv.data_ptr() == dev.buffer.data_ptr()  # a view, not a copy
    page = data.draw(st.integers(0, num_pages - 1))
    slot = data.draw(st.integers(0, bpp - 1))
    start = page * page_bytes + slot * block_bytes
    expect = dev.buffer[start : start + block_bytes].view(dtype).view(block_shape)
    assert torch.equal(kv[page, slot].view(torch.uint8), expect.view(torch.uint8))
    # Writes through the view hit those bytes and nothing else (tail padding included).
    snapshot = dev.buffer.clone()
    kv[page, slot] = 0
    changed = (dev.buffer != snapshot).nonzero().flatten()
    if changed.numel():
        assert changed.min() >= start and changed.max() < start + block_bytes
    assert not dev.buffer[start : start + block_bytes].any()


def test_kv_view_with_tail_padding_and_block_ids():
    """page_bytes = 4096 is not a multiple of the 120-byte block: 34 blocks and 16 bytes of padding
    per page. Block id b of the pool is kv[b // bpp, b % bpp] and sits at page*4096 + slot*120."""
    block_shape = (2, 3, 5)  # 30 float32 = 120 bytes
    arena = PageArena(3, 4096)
    pool = KVPool("m", arena, 120, 16)
    assert pool.blocks_per_page == 34
    dev = DeviceArena(3, 4096, CPU)
    dev.buffer.fill_(0xFF)
    kv = dev.kv_view(block_shape, torch.float32, pool.blocks_per_page)
    assert kv.stride(0) == 4096 // 4  # the page stride keeps the padding
    for b in pool.allocate(3 * 34):
        page, slot = pool.page_slot(b)
        kv[page, slot] = float(b)
    for page in range(3):
        base = page * 4096
        for slot in (0, 1, 33):
            start = base + slot * 120
            got = dev.buffer[start : start + 120].view(torch.float32)
            assert torch.equal(got, torch.full((30,), float(page * 34 + slot)))
        # The 16 padding bytes at the end of every page were never written.
        assert torch.equal(dev.buffer[base + 34 * 120 : base + 4096], torch.full((16,), 0xFF, dtype=torch.uint8))


def test_region_is_a_view_of_the_buffer():
    dev = DeviceArena(4, 4096, CPU)
    r = dev.region(2, 100)
    assert r.numel() == 100 and r.data_ptr() == dev.buffer.data_ptr() + 2 * 4096
    r.fill_(7)
    assert dev.buffer[2 * 4096 : 2 * 4096 + 100].eq(7).all()


def test_a_cold_file_maps_back_what_was_written_and_leaves_no_file(tmp_path, monkeypatch):
    from oneiros.memory.storage import ColdFile

    monkeypatch.setenv("ONEIROS_COLD_DIR", str(tmp_path))
    bufs = [torch.randint(0, 256, (n,), dtype=torch.uint8) for n in (4096, 100, 8192)]
    cold = ColdFile()
    for b in bufs:
        cold.write(b)
    views = cold.map([b.numel() for b in bufs])
    assert list(tmp_path.iterdir()) == []  # unlinked once mapped
    assert all(torch.equal(v, b) for v, b in zip(views, bufs, strict=True))
