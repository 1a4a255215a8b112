"""The Triton paged-attention kernels against the PyTorch reference.

Without a GPU they run under Triton's interpreter (TRITON_INTERPRET=1, set here before Triton is
imported); on a GPU the same tests compile them. Shapes are small: the interpreter is slow."""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from oneiros.attention import choose, load  # noqa: E402
from oneiros.attention.torch_ref import (  # noqa: E402
    AttentionMetadata,
    DecodeGroup,
    PrefillSeq,
    attend,
)
from oneiros.core import ConfigError  # noqa: E402

tp = load("triton")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def arena_kv(pages=8, bpp=2, bs=16, hkv=2, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A view with a page stride larger than its blocks (pages keep tail padding), as kv_view makes.
    raw = torch.randn(pages, bpp * 2 * bs * hkv * d + 37, generator=g)
    kv = raw[:, : bpp * 2 * bs * hkv * d].view(pages, bpp, 2, bs, hkv, d)
    return kv.to(DEV)


def tables(b, nb, pages, bpp, seed):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(pages * bpp, generator=g)[: b * nb].view(b, nb)
    return (perm // bpp).to(DEV), (perm % bpp).to(DEV)


@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 64), (3, 3, 32), (8, 1, 48)])
@pytest.mark.parametrize("split", [1, 2, 64])
@pytest.mark.parametrize("grouped", [False, True])
def test_decode_matches_the_reference(hq, hkv, d, split, grouped):
    kv = arena_kv(hkv=hkv, d=d, seed=hq + d)
    bs, nb = kv.shape[3], 4
    lens = torch.tensor([1, 17, 40, 64], device=DEV)
    pages, slots = tables(4, nb, 8, 2, seed=d)
    q = torch.randn(4, hq, d, device=DEV)
    scale = 1 / math.sqrt(d)
    out = tp.decode(q, kv, pages, slots, lens, scale, max_blocks_per_split=split, grouped=grouped)
    mask = (torch.arange(nb * bs, device=DEV)[None, :] < lens[:, None])[:, None, None, :]
    meta = AttentionMetadata(None, None, None, 4, [DecodeGroup(0, pages, slots, mask, lens)], [])
    ref = attend(q, None, None, kv, meta)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("q_len,ctx", [(1, 1), (20, 20), (37, 64), (5, 50), (16, 33)])
def test_prefill_matches_the_reference_with_and_without_a_cached_prefix(q_len, ctx):
    kv = arena_kv(seed=q_len)
    nb = -(-ctx // kv.shape[3])
    pages, slots = tables(1, nb, 8, 2, seed=ctx)
    q = torch.randn(q_len, 4, 64, device=DEV)
    out = tp.prefill(q, kv, pages[0], slots[0], ctx, 1 / math.sqrt(64))
    meta = AttentionMetadata(None, None, None, 0, [], [PrefillSeq(0, q_len, ctx, pages[0], slots[0])])
    k_new = kv[pages[0], slots[0], 0].flatten(0, 1)[ctx - q_len : ctx]
    v_new = kv[pages[0], slots[0], 1].flatten(0, 1)[ctx - q_len : ctx]
    ref = attend(q, k_new, v_new, kv, meta)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_kernels_stay_within_their_error_of_fp32(dtype):
    """16-bit K/V go to the dot products as they are (tensor cores on a GPU), softmax in fp32
    (the interpreter computes bfloat16 in fp32: numpy has no bfloat16)."""
    kv = arena_kv(seed=5)
    ctx, q_len = 50, 20
    nb = -(-ctx // kv.shape[3])
    pages, slots = tables(1, nb, 8, 2, seed=9)
    q = torch.randn(q_len, 4, 64, device=DEV)
    scale = 1 / math.sqrt(64)
    ref = tp.prefill(q, kv, pages[0], slots[0], ctx, scale)
    low = tp.prefill(q.to(dtype), kv.to(dtype), pages[0], slots[0], ctx, scale)
    assert low.dtype == dtype
    torch.testing.assert_close(low.float(), ref, atol=3e-2, rtol=3e-2)
    lens = torch.tensor([ctx], device=DEV)
    ref = tp.decode(q[:1], kv, pages, slots, lens, scale)
    for grouped in (False, True):
        low = tp.decode(q[:1].to(dtype), kv.to(dtype), pages, slots, lens, scale, grouped=grouped)
        torch.testing.assert_close(low.float(), ref, atol=3e-2, rtol=3e-2)


def test_backend_choice_and_errors():
    assert choose("auto", "cpu", 16, [64]) == "torch"
    assert choose("auto", "cuda", 4, [64]) == "torch"  # tiles too small for the kernels
    assert choose("auto", "cuda", 16, [64]) == "triton"
    assert choose("torch", "cuda", 16, [64]) == "torch"
    with pytest.raises(ConfigError, match="unknown attention backend"):
        load("flash")


def test_engine_with_triton_attention_gives_the_reference_tokens():
    """A whole model through the Triton backend: greedy tokens equal the reference backend's."""
    from oneiros import LLM, SamplingParams

    prompts = [[5, 9, 13, 200, 7], list(range(3, 40))]
    params = SamplingParams(max_tokens=4, temperature=0)
    outs = {}
    for backend in ("torch", "triton"):
        llm = LLM(model="random:llama-tiny", attention=backend, block_size=16,
                  device=str(DEV), memory_budget="64MiB", page_bytes=256 * 1024)
        outs[backend] = [o.token_ids for o in llm.generate(prompts, params)]
    assert outs["triton"] == outs["torch"]
