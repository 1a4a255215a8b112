"""Host swap space accounting for the swap baseline: KV blocks of preempted requests wait in host
memory (pinned on CUDA) until the request resumes. Bookkeeping only; the executor owns the tensor."""

from __future__ import annotations

from oneiros.core import ensure


class HostBlockPool:
    """A fixed number of host KV blocks of one model's geometry."""

    def __init__(self, model: str, num_blocks: int, block_bytes: int) -> None:
        self.model = model
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        if len(set(blocks) | set(self._free)) != len(blocks) + len(self._free):
            raise ValueError(f"host blocks {blocks} of {self.model!r} freed twice")
        if any(not 0 <= b < self.num_blocks for b in blocks):
            raise ValueError(f"host blocks {blocks} outside the swap space of {self.model!r}")
        self._free.extend(blocks)

    def check_integrity(self, held: list[int]) -> None:
        """`held`: host blocks that requests hold; with the free list they must tile the space."""
        ensure(sorted(held + self._free) == list(range(self.num_blocks)), "host blocks leaked")
