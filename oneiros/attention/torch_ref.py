"""Paged attention in plain PyTorch: the reference backend, runs on any device.

KV layout of one layer, as `DeviceArena.kv_view` gives it after selecting the layer:
    kv: [num_pages, blocks_per_page, 2, block_size, num_kv_heads, head_dim]   (2 = K, V)
A token's K/V live at (page, slot, :, offset). A step's tokens are laid out decode-first:
    tokens [0, num_decode)            one new token per decoding sequence, attended in one batched call
    tokens [num_decode, T)            prefill chunks, attended one sequence at a time
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillSeq:
    token_start: int  # first row of this sequence in the step's flat token batch
    q_len: int  # new tokens this step
    ctx_len: int  # tokens visible after this step (cached + new)
    pages: torch.Tensor  # [num_blocks] page of each block of the sequence
    slots: torch.Tensor  # [num_blocks] slot of each block in its page


@dataclass
class AttentionMetadata:
    # Where each new token's K/V is written: [T] each.
    write_pages: torch.Tensor
    write_slots: torch.Tensor
    write_offsets: torch.Tensor
    # Decoding sequences (one token each), padded block tables: [B, max_blocks]; lengths [B].
    num_decode: int
    decode_pages: torch.Tensor | None
    decode_slots: torch.Tensor | None
    decode_ctx_lens: torch.Tensor | None
    decode_mask: torch.Tensor | None  # [B, 1, 1, max_blocks * block_size] True = attend
    prefills: list[PrefillSeq]


def write_kv(kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    """Store this step's keys and values. k, v: [T, Hkv, D]."""
    kv[meta.write_pages, meta.write_slots, 0, meta.write_offsets] = k
    kv[meta.write_pages, meta.write_slots, 1, meta.write_offsets] = v


def _gather(kv: torch.Tensor, pages: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """[..., nb] block ids -> [..., 2, nb * block_size, Hkv, D] contiguous K/V."""
    blocks = kv[pages, slots]  # [..., nb, 2, bs, H, D]
    blocks = blocks.movedim(-4, -5)  # [..., 2, nb, bs, H, D]
    return blocks.flatten(-4, -3)


def attend(
    q: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata, scale: float | None = None
) -> torch.Tensor:
    """q: [T, Hq, D] -> [T, Hq, D], reading K/V (including this step's) through block tables."""
    out = torch.empty_like(q)
    nd = meta.num_decode
    if nd:
        kvd = _gather(kv, meta.decode_pages, meta.decode_slots)  # [B, 2, S, Hkv, D]
        k = kvd[:, 0].transpose(1, 2)  # [B, Hkv, S, D]
        v = kvd[:, 1].transpose(1, 2)
        qd = q[:nd].unsqueeze(2)  # [B, Hq, 1, D]
        o = F.scaled_dot_product_attention(
            qd, k, v, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True
        )
        out[:nd] = o.squeeze(2)
    for p in meta.prefills:
        kvp = _gather(kv, p.pages, p.slots)[:, : p.ctx_len]  # [2, ctx, Hkv, D]
        k = kvp[0].transpose(0, 1).unsqueeze(0)  # [1, Hkv, ctx, D]
        v = kvp[1].transpose(0, 1).unsqueeze(0)
        rows = slice(p.token_start, p.token_start + p.q_len)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, Hq, q_len, D]
        if p.q_len == p.ctx_len:
            o = F.scaled_dot_product_attention(qp, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            # Chunk after a cached prefix: query i sees keys [0, ctx - q_len + i].
            mask = torch.ones(p.q_len, p.ctx_len, dtype=torch.bool, device=q.device).tril(
                p.ctx_len - p.q_len
            )
            o = F.scaled_dot_product_attention(
                qp, k, v, attn_mask=mask, scale=scale, enable_gqa=True
            )
        out[rows] = o.squeeze(0).transpose(0, 1)
    return out
