"""Automatic prefix caching for one model's KV pool: the hash chain and the cache index.

A full KV block is named by `chain_hash(parent, tokens)`: a SHA-256 over the hash of the block
before it and the block's token ids, starting from a root that names the model. Equal hashes mean
equal token prefixes (up to a SHA-256 collision) of the same model, so equal KV bytes. Only full
blocks are named; a request's partially filled last block is always its own.

The index maps a hash to the one block holding it. Blocks no live request references stay indexed
("cached", kept in the order they were last released) until the pool reuses their memory; the
pool (memory/kv.py) owns the reference counts and decides which blocks to give up (as it would
free blocks: caching never changes which memory is used). Torch-free bookkeeping.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from oneiros.core import ensure

if TYPE_CHECKING:
    from oneiros.core import Request


def root_hash(model: str) -> bytes:
    """The parent of a model's first block: blocks of different models never share a hash."""
    return hashlib.sha256(b"oneiros/prefix/" + model.encode()).digest()


def chain_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The hash of a full block: its parent's hash and its token ids."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


@dataclass(frozen=True, slots=True)
class CachedBlock:
    """What an indexed block holds: its hash, its parent's hash and its tokens (kept so that the
    integrity check can recompute the hash)."""

    hash: bytes
    parent: bytes
    tokens: tuple[int, ...]


class PrefixCache:
    """The hash -> block index of one model, and its unreferenced blocks in release order."""

    def __init__(self, model: str, block_size: int) -> None:
        self.model = model
        self.block_size = block_size
        self.root = root_hash(model)
        self._block_of: dict[bytes, int] = {}
        self._entries: dict[int, CachedBlock] = {}
        # Indexed blocks that no request references, least recently released first.
        self._lru: OrderedDict[int, None] = OrderedDict()
        # Entries dropped because their block's memory was reused or given back, since the start
        # (a statistic of this index; the engine's counters are TenantCounters).
        self.num_evicted = 0

    # ---- hashes ----------------------------------------------------------------------------------
    def hashes(self, req: Request, n: int) -> list[bytes]:
        """The hashes of req's first n full blocks (computed once, kept on the request: its tokens
        never change)."""
        hs, bs = req.block_hashes, self.block_size
        while len(hs) < n:
            i = len(hs)
            hs.append(chain_hash(hs[-1] if hs else self.root, req.tokens(i * bs, (i + 1) * bs)))
        return hs[:n]

    def parent(self, req: Request, i: int) -> bytes:
        return req.block_hashes[i - 1] if i else self.root

    # ---- queries ---------------------------------------------------------------------------------
    @property
    def num_indexed(self) -> int:
        return len(self._entries)

    @property
    def num_unreferenced(self) -> int:
        return len(self._lru)

    def __contains__(self, block: int) -> bool:
        return block in self._entries

    def is_unreferenced(self, block: int) -> bool:
        return block in self._lru

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The blocks of the longest prefix of `hashes` that is indexed."""
        out = []
        for h in hashes:
            b = self._block_of.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def lru_order(self) -> list[int]:
        """Unreferenced blocks, least recently released first."""
        return list(self._lru)

    # ---- changes ---------------------------------------------------------------------------------
    def insert(self, block: int, h: bytes, parent: bytes, tokens: Sequence[int]) -> bool:
        """Index a referenced, just filled block. False when the block is indexed already or
        another block holds the same hash (a duplicate computed alongside it: it stays private)."""
        if block in self._entries or h in self._block_of:
            return False
        self._block_of[h] = block
        self._entries[block] = CachedBlock(h, parent, tuple(tokens))
        return True

    def park(self, block: int) -> None:
        """An indexed block lost its last reference: it is cached, released last."""
        self._lru[block] = None

    def unpark(self, block: int) -> None:
        """An unreferenced indexed block is referenced again (a cache hit)."""
        del self._lru[block]

    def evict(self, block: int) -> None:
        """Drop an unreferenced block from the index (its page is given back)."""
        del self._lru[block]
        self._drop(block)

    def renumber(self, new_of: dict[int, int]) -> None:
        """Blocks moved (their pages were compacted): old id -> new id; release order kept."""
        for old, new in new_of.items():
            entry = self._entries.pop(old, None)
            if entry is not None:
                self._entries[new] = entry
                self._block_of[entry.hash] = new
        if any(b in new_of for b in self._lru):
            self._lru = OrderedDict((new_of.get(b, b), None) for b in self._lru)

    def _drop(self, block: int) -> None:
        entry = self._entries.pop(block)
        del self._block_of[entry.hash]
        self.num_evicted += 1

    def check_integrity(self, referenced: set[int]) -> None:
        """Every indexed block is referenced or unreferenced (in the LRU), never both; the index
        is a bijection; every block's hash is its parent's and tokens' chain hash."""
        lru = set(self._lru)
        ensure(not lru & referenced, "a cached block is also referenced")
        ensure(lru <= self._entries.keys(), "an LRU block is not indexed")
        ensure(
            self._entries.keys() <= lru | referenced,
            "an indexed block is neither referenced nor cached",
        )
        ensure(len(self._block_of) == len(self._entries), "hash index and entries differ in size")
        for block, e in self._entries.items():
            ensure(self._block_of.get(e.hash) == block, f"block {block}'s hash maps elsewhere")
            ensure(len(e.tokens) == self.block_size, f"cached block {block} is not full")
            ensure(
                chain_hash(e.parent, e.tokens) == e.hash,
                f"cached block {block}'s tokens do not match its hash",
            )
