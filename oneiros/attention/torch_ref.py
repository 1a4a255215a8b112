"""Paged attention in plain PyTorch: the reference backend, runs on any device.

KV layout of one layer, as `DeviceArena.kv_view` gives it after selecting the layer:
    kv: [num_pages, blocks_per_page, 2, block_size, num_kv_heads, head_dim]   (2 = K, V)
A token's K/V live at (page, slot, :, offset). A step's tokens are laid out decode-first:
    tokens [0, num_decode)            one new token per decoding sequence, sorted by context length
                                      and attended in a few batched calls (groups of similar length,
                                      so little padding is gathered)
    tokens [num_decode, T)            prefill chunks, attended one sequence at a time; a chunk with
                                      no cached prefix attends to its own new K/V, read nothing back

Unwritten KV slots (the tail of a sequence's last block, padding blocks) are masked out; they must
hold finite values, which the arena ensures by starting zeroed (see `DeviceArena`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DECODE_MASK = True  # decode attention needs DecodeGroup.mask (built from lens when it is None)


@dataclass
class PrefillSeq:
    token_start: int  # first row of this sequence in the step's flat token batch
    q_len: int  # new tokens this step
    ctx_len: int  # tokens visible after this step (cached + new)
    pages: torch.Tensor  # [num_blocks] page of each block of the sequence
    slots: torch.Tensor  # [num_blocks] slot of each block in its page


@dataclass
class DecodeGroup:
    """Decoding sequences of similar length, attended in one call over a padded block table."""

    row_start: int  # first row of the group in the step's flat token batch
    pages: torch.Tensor  # [G, nb] page of each block (padding: any valid page)
    slots: torch.Tensor  # [G, nb]
    mask: torch.Tensor | None  # [G, 1, 1, nb * block_size] True = attend; None: attend to all
    lens: torch.Tensor | None = None  # [G] context lengths (the Triton backend reads these)


@dataclass
class AttentionMetadata:
    # Where each new token's K/V is written: [T] each.
    write_pages: torch.Tensor
    write_slots: torch.Tensor
    write_offsets: torch.Tensor
    num_decode: int
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillSeq]


def write_kv(kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    """Store this step's keys and values. k, v: [T, Hkv, D]."""
    kv[meta.write_pages, meta.write_slots, 0, meta.write_offsets] = k
    kv[meta.write_pages, meta.write_slots, 1, meta.write_offsets] = v


def _gather(kv: torch.Tensor, pages: torch.Tensor, slots: torch.Tensor, which: int) -> torch.Tensor:
    """[..., nb] block ids -> [..., nb * block_size, Hkv, D] keys (which=0) or values (1); the
    gather is the only copy (its result is contiguous, so the reshape is a view)."""
    blocks = kv[pages, slots, which]  # [..., nb, bs, H, D]
    return blocks.flatten(-4, -3)


def attend(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    kv: torch.Tensor,
    meta: AttentionMetadata,
    scale: float | None = None,
) -> torch.Tensor:
    """q: [T, Hq, D] -> [T, Hq, D], reading K/V (this step's included) through block tables.
    k_new, v_new: [T, Hkv, D], this step's keys and values (already written to kv)."""
    out = torch.empty_like(q)
    for g in meta.decode_groups:
        rows = slice(g.row_start, g.row_start + g.pages.shape[0])
        k = _gather(kv, g.pages, g.slots, 0).transpose(1, 2)  # [G, Hkv, S, D]
        v = _gather(kv, g.pages, g.slots, 1).transpose(1, 2)
        qd = q[rows].unsqueeze(2)  # [G, Hq, 1, D]
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=g.mask, scale=scale, enable_gqa=True)
        out[rows] = o.squeeze(2)
    for p in meta.prefills:
        rows = slice(p.token_start, p.token_start + p.q_len)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, Hq, q_len, D]
        if p.q_len == p.ctx_len:  # no cached prefix: the chunk's own K/V are all it sees
            k = k_new[rows].transpose(0, 1).unsqueeze(0)  # [1, Hkv, q_len, D]
            v = v_new[rows].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qp, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            # Chunk after a cached prefix: query i sees keys [0, ctx - q_len + i].
            k = _gather(kv, p.pages, p.slots, 0)[: p.ctx_len].transpose(0, 1).unsqueeze(0)
            v = _gather(kv, p.pages, p.slots, 1)[: p.ctx_len].transpose(0, 1).unsqueeze(0)
            mask = torch.ones(p.q_len, p.ctx_len, dtype=torch.bool, device=q.device).tril(
                p.ctx_len - p.q_len
            )
            o = F.scaled_dot_product_attention(
                qp, k, v, attn_mask=mask, scale=scale, enable_gqa=True
            )
        out[rows] = o.squeeze(0).transpose(0, 1)
    return out


def group_decodes(num_blocks: list[int], max_waste: float = 0.25) -> list[tuple[int, int]]:
    """Split decoding sequences, sorted by block count ascending, into (start, end) groups: a
    group grows while its padded size (count x its largest block count) stays within
    (1 + max_waste) of the blocks it really reads."""
    groups: list[tuple[int, int]] = []
    start, total = 0, 0
    for i, nb in enumerate(num_blocks):
        if i > start and (i - start + 1) * nb > (1 + max_waste) * (total + nb):
            groups.append((start, i))
            start, total = i, 0
        total += nb
    if num_blocks:
        groups.append((start, len(num_blocks)))
    return groups
