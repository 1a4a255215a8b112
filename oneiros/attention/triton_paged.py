"""Paged attention in Triton, reading K/V in the arena's block layout (the same metadata as the
PyTorch reference, `torch_ref.AttentionMetadata`).

Decode: one program per (sequence, KV head, split of its blocks) when query heads share KV heads
(GQA: the group's queries meet each K/V block once, as one tile of tensor-core dot products), else
per query head; each walks its blocks through the block table with an online softmax; with several
splits (long contexts) the partial results are merged afterwards (split-K). Prefill: one program per (tile of queries, query head) of a sequence,
causal, over the paged K/V of its whole visible context (a cached prefix included).

On a GPU the kernels compile; on a CPU they run under Triton's interpreter (TRITON_INTERPRET=1),
which is how the tests check them against the reference without a GPU.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from oneiros.attention.torch_ref import AttentionMetadata, write_kv  # noqa: F401 (re-exported)

DECODE_MASK = False  # the decode kernel masks by DecodeGroup.lens


@triton.jit
def _load_block(
    kv_ptr, table_pages, table_slots, blk, kvh, tok, d, valid, dmask,
    s_page, s_slot, s_kv, s_tok, s_head,
):
    """K and V of block `blk` of a block table (pointers to its pages and slots), one KV head:
    two [BS, BLOCK_D] tiles in the cache's dtype, zero where `valid` (keys) or `dmask` are off."""
    page = tl.load(table_pages + blk)
    slot = tl.load(table_slots + blk)
    base = kv_ptr + page * s_page + slot * s_slot + kvh * s_head
    offs = tok[:, None] * s_tok + d[None, :]
    lmask = valid[:, None] & dmask[None, :]
    k = tl.load(base + offs, mask=lmask, other=0.0)
    v = tl.load(base + s_kv + offs, mask=lmask, other=0.0)
    return k, v


@triton.jit
def _decode_kernel(
    q_ptr, kv_ptr, pages_ptr, slots_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr,
    s_qb, s_qh,
    s_page, s_slot, s_kv, s_tok, s_head,
    s_tb,
    scale,
    NUM_SPLITS: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr, GROUP: tl.constexpr,
    BS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    kvh = h // GROUP
    ctx = tl.load(lens_ptr + b)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(q_ptr + b * s_qb + h * s_qh + d, mask=dmask, other=0.0).to(tl.float32)
    tok = tl.arange(0, BS)
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = split * BLOCKS_PER_SPLIT
    for j in range(BLOCKS_PER_SPLIT):
        blk = first + j
        pos = blk * BS + tok
        valid = pos < ctx
        if blk * BS < ctx:
            k, v = _load_block(
                kv_ptr, pages_ptr + b * s_tb, slots_ptr + b * s_tb, blk, kvh, tok, d, valid,
                dmask, s_page, s_slot, s_kv, s_tok, s_head,
            )
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1) * scale
            s = tl.where(valid, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            p = tl.exp(s - m_new)
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m_i = m_new
    out = (b * tl.num_programs(1) + h) * NUM_SPLITS + split
    tl.store(m_ptr + out, m_i)
    tl.store(l_ptr + out, l_i)
    tl.store(acc_ptr + out * BLOCK_D + d, acc)


@triton.jit
def _decode_grouped_kernel(
    q_ptr, kv_ptr, pages_ptr, slots_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr,
    s_qb, s_qh,
    s_page, s_slot, s_kv, s_tok, s_head,
    s_tb,
    scale,
    NUM_SPLITS: tl.constexpr, BLOCKS_PER_SPLIT: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program per (sequence, KV head, split): the GROUP query heads that share a KV head
    read each K/V block once, as one [BLOCK_H, BS] tile of scores (dot products on tensor cores)."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)
    hs = tl.arange(0, BLOCK_H)
    hmask = hs < GROUP
    heads = kvh * GROUP + hs
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(
        q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :],
        mask=hmask[:, None] & dmask[None, :], other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    tok = tl.arange(0, BS)
    m_i = tl.full([BLOCK_H], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    first = split * BLOCKS_PER_SPLIT
    for j in range(BLOCKS_PER_SPLIT):
        blk = first + j
        if blk * BS < ctx:  # at least one valid key: the running maximum becomes finite
            valid = blk * BS + tok < ctx
            k, v = _load_block(
                kv_ptr, pages_ptr + b * s_tb, slots_ptr + b * s_tb, blk, kvh, tok, d, valid,
                dmask, s_page, s_slot, s_kv, s_tok, s_head,
            )
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_H, BS]
            s = tl.where(valid[None, :], s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    out = (b * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split
    tl.store(m_ptr + out, m_i, mask=hmask)
    tl.store(l_ptr + out, l_i, mask=hmask)
    tl.store(acc_ptr + out[:, None] * BLOCK_D + d[None, :], acc, mask=hmask[:, None])


@triton.jit
def _prefill_kernel(
    q_ptr, o_ptr, kv_ptr, pages_ptr, slots_ptr,
    s_qt, s_qh, s_ot, s_oh,
    s_page, s_slot, s_kv, s_tok, s_head,
    q_len, ctx_len, scale,
    GROUP: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query index inside the chunk
    rmask = rows < q_len
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(
        q_ptr + rows[:, None] * s_qt + h * s_qh + d[None, :],
        mask=rmask[:, None] & dmask[None, :], other=0.0,
    )  # the model's dtype: 16-bit inputs take the tensor cores, products accumulate in fp32
    if UPCAST:
        q = q.to(tl.float32)
    qpos = ctx_len - q_len + rows  # absolute position of each query
    tok = tl.arange(0, BS)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    last = tl.minimum(ctx_len, ctx_len - q_len + (tile + 1) * BLOCK_M)  # keys this tile may see
    for blk in range(0, tl.cdiv(last, BS)):
        kpos = blk * BS + tok
        kvalid = kpos < ctx_len
        k, v = _load_block(
            kv_ptr, pages_ptr, slots_ptr, blk, kvh, tok, d, kvalid, dmask,
            s_page, s_slot, s_kv, s_tok, s_head,
        )
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, BS] fp32
        see = (kpos[None, :] <= qpos[:, None]) & kvalid[None, :]
        s = tl.where(see, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    o = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(
        o_ptr + rows[:, None] * s_ot + h * s_oh + d[None, :], o.to(o_ptr.dtype.element_ty),
        mask=rmask[:, None] & dmask[None, :],
    )


def _upcast(q: torch.Tensor) -> bool:
    """Triton's CPU interpreter has no bfloat16 dot (numpy has no bfloat16): compute in fp32."""
    return q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _kv_strides(kv: torch.Tensor) -> tuple[int, int, int, int, int]:
    """kv: [pages, blocks_per_page, 2, block_size, Hkv, D] with the last dim contiguous."""
    assert kv.stride(-1) == 1, "head_dim must be contiguous"
    return kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3), kv.stride(4)


def decode(
    q: torch.Tensor, kv: torch.Tensor, pages: torch.Tensor, slots: torch.Tensor,
    lens: torch.Tensor, scale: float, max_blocks_per_split: int = 64, grouped: bool | None = None,
) -> torch.Tensor:
    """q: [B, Hq, D]; pages, slots: [B, nb] block tables; lens: [B] context lengths -> [B, Hq, D].
    `grouped` (default: when query heads share KV heads and the tiles suit tl.dot): one program per
    KV head reads each block once for all its query heads; else one program per query head."""
    B, Hq, D = q.shape
    _, _, _, bs, hkv, _ = kv.shape
    group = Hq // hkv
    if grouped is None:
        grouped = group > 1 and bs >= 16 and D >= 16
    nb = pages.shape[1]
    splits = max(1, -(-nb // max_blocks_per_split))
    per_split = -(-nb // splits)
    block_d = max(16, triton.next_power_of_2(D)) if grouped else triton.next_power_of_2(D)
    m = torch.empty(B * Hq * splits, dtype=torch.float32, device=q.device)
    l_ = torch.empty_like(m)
    acc = torch.empty(B * Hq * splits, block_d, dtype=torch.float32, device=q.device)
    q = q.contiguous()
    args = (
        q, kv, pages.contiguous(), slots.contiguous(), lens.contiguous(), m, l_, acc,
        q.stride(0), q.stride(1), *_kv_strides(kv), pages.stride(0), scale,
    )
    if grouped:
        _decode_grouped_kernel[(B, hkv, splits)](
            *args, NUM_SPLITS=splits, BLOCKS_PER_SPLIT=per_split, GROUP=group,
            BLOCK_H=max(16, triton.next_power_of_2(group)), BS=bs, D=D, BLOCK_D=block_d,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", UPCAST=_upcast(q),
        )
    else:
        _decode_kernel[(B, Hq, splits)](
            *args, NUM_SPLITS=splits, BLOCKS_PER_SPLIT=per_split, GROUP=group, BS=bs, D=D,
            BLOCK_D=block_d,
        )
    # Merge the splits (split-K): rescale each partial to the common maximum.
    m = m.view(B, Hq, splits)
    l_ = l_.view(B, Hq, splits)
    acc = acc.view(B, Hq, splits, block_d)[..., :D]
    top = m.max(dim=-1, keepdim=True).values
    w = torch.exp(m - top)
    w = torch.where(torch.isfinite(m), w, torch.zeros_like(w))
    out = (acc * w[..., None]).sum(dim=2) / (l_ * w).sum(dim=-1, keepdim=True)
    return out.to(q.dtype)


def prefill(
    q: torch.Tensor, kv: torch.Tensor, pages: torch.Tensor, slots: torch.Tensor, ctx_len: int,
    scale: float, block_m: int = 16,
) -> torch.Tensor:
    """q: [q_len, Hq, D], the chunk's queries (its last q_len positions of ctx_len) -> [q_len, Hq, D]."""
    q_len, Hq, D = q.shape
    _, _, _, bs, hkv, _ = kv.shape
    out = torch.empty_like(q)
    block_d = max(16, triton.next_power_of_2(D))
    grid = (triton.cdiv(q_len, block_m), Hq)
    _prefill_kernel[grid](
        q, out, kv, pages.contiguous(), slots.contiguous(),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *_kv_strides(kv),
        q_len, ctx_len, scale,
        GROUP=Hq // hkv, BS=bs, D=D, BLOCK_D=block_d, BLOCK_M=block_m,
        # fp32 models get exact fp32 products (not TF32): the reference backend's precision.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=_upcast(q),
    )
    return out


def attend(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    kv: torch.Tensor,
    meta: AttentionMetadata,
    scale: float | None = None,
) -> torch.Tensor:
    """The reference backend's `attend`, with Triton kernels (this step's K/V are in kv already)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q)
    for g in meta.decode_groups:
        rows = slice(g.row_start, g.row_start + g.pages.shape[0])
        out[rows] = decode(q[rows], kv, g.pages, g.slots, g.lens, scale)
    for p in meta.prefills:
        rows = slice(p.token_start, p.token_start + p.q_len)
        out[rows] = prefill(q[rows], kv, p.pages, p.slots, p.ctx_len, scale)
    return out
