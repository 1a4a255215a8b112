"""Decode steps replayed from captured graphs (CUDA graphs on a GPU).

A decode step launches a few kernels per layer for a handful of tokens; on a GPU the launches, not
the math, set its time at small batches. `DecodeGraphs` captures the decoder stack of one model for
a set of batch sizes and replays it: a batch is padded up to the nearest captured size.

What a graph bakes in, and why it stays valid while the arena remaps:
  - inputs live in one static buffer, rewritten before each replay with one host-to-device copy:
    token ids, positions, where each new token's K/V go, context lengths, and block tables. The KV
    view spans the whole arena, whose address never moves, so KV pages changing hands (parameter
    pages remapped into KV and back) need no new capture.
  - the block-table width: a graph is captured per (batch size, width), the width being the power
    of two of blocks (from MIN_WIDTH, at most the model's longest context) that holds the batch's
    longest context. Attention then reads tables about as wide as the contexts, not as wide as the
    model's longest one: the reference backend gathers that width, the Triton kernel sizes its
    split-K grid by it, and each step sends that much table to the device.
  - weight addresses: a layer's slab may move (restored elsewhere, compacted) or go missing
    (streamed through borrowed slabs, copies included in the graph). Graphs are keyed by the
    model's residency signature; when it changes they are dropped and captured again once it has
    held for `settle_steps` decode steps (eager until then).
  - copies inside a replay are not timed, so a step that streams reports itself untimed and the
    remapping controller does not read its elapsed time as compute; one streaming step in
    TIMED_EVERY runs eagerly, timed, to keep the controller's estimates current.
Padding rows repeat the batch's first row (same token, position and block table): they compute
and write exactly what that row does, so no KV slot outside the batch is touched.

The capture mechanism is pluggable: `CudaGraphCapture` on a GPU; `EagerReplay` (runs the captured
function at every replay) exercises the same buffers and padding on a CPU (the tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from oneiros.attention.torch_ref import AttentionMetadata, DecodeGroup
from oneiros.core import ScheduledSeq

if TYPE_CHECKING:
    from oneiros.engine.executor import ModelRunner

Replay = Callable[[], torch.Tensor]

# Columns of a graph's input rows; block ids follow from column NUM_FIELDS on.
IDS, POS, W_PAGE, W_SLOT, W_OFF, LEN, NUM_FIELDS = range(7)
MIN_WIDTH = 8  # blocks: the narrowest block table a graph is captured with
# A model that streams layers runs one decode step in this many eagerly (timed: copies inside a
# replayed graph are not), paying the eager launch overhead on that step.
TIMED_EVERY = 16


class GraphCapture(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> Replay:
        """Record fn (which reads only static buffers) and return a replay giving its output."""
        ...


class CudaGraphCapture:
    """CUDA graphs, all of one model in one memory pool (replays of one model never overlap)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)

    def capture(self, fn: Callable[[], torch.Tensor]) -> Replay:
        current = torch.cuda.current_stream(self.device)
        # Warm up outside the capture: Triton compiles, cuBLAS picks its kernels and workspace.
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            fn()
        current.wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            out = fn()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay


class EagerReplay:
    """Runs the function at every replay: the graph runner's plumbing, anywhere (tests, CPU)."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> Replay:
        return fn


def batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then multiples of 8, up to the first that holds max_num_seqs: padding wastes at
    most 7 rows past 8."""
    ladder = [1, 2, 4, *range(8, max_num_seqs + 8, 8)]
    return [s for s in ladder if s < max_num_seqs] + [next(s for s in ladder if s >= max_num_seqs)]


class DecodeGraphs:
    def __init__(
        self,
        runner: ModelRunner,
        sizes: list[int],
        max_blocks: int,
        capture: GraphCapture,
        settle_steps: int = 2,
    ) -> None:
        if not sizes or sorted(sizes) != sizes or sizes[0] < 1:
            raise ValueError(f"graph batch sizes must ascend from >= 1, got {sizes}")
        self.runner = runner
        self.sizes = sizes
        self.max_blocks = max_blocks
        self.capturer = capture
        self.settle_steps = settle_steps
        dev = runner.device
        # One flat buffer: the graph of (size, width) reads its first size * (NUM_FIELDS + width)
        # values as rows, so each step's inputs go over in one contiguous copy. Graphs of one
        # model replay one at a time, each after its own fill, so they can share it.
        self.inputs = torch.zeros(sizes[-1] * (NUM_FIELDS + max_blocks), dtype=torch.long,
                                  device=dev)
        self._pin = dev.type == "cuda"
        self._graphs: dict[tuple[int, int], Replay] = {}
        self._signature: tuple | None = None
        self._stable = 0  # decode steps seen with the current signature
        self._untimed = 0  # replays in a row that streamed layers (their copies are not timed)
        self.captures = 0
        self.replays = 0
        self.timed_steps = 0  # streaming decode steps run eagerly to measure them

    # ---- when --------------------------------------------------------------------------------
    def invalidate(self) -> None:
        """The model's residency is changing: graphs that baked the old weight addresses go."""
        self._graphs.clear()
        self._signature = None
        self._stable = 0

    @property
    def captured(self) -> list[tuple[int, int]]:
        """(batch size, table width) of the graphs held now."""
        return sorted(self._graphs)

    def width_for(self, num_blocks: int) -> int:
        """The captured table width (in blocks) for a batch whose longest context has num_blocks."""
        w = MIN_WIDTH
        while w < num_blocks:
            w *= 2
        return min(w, self.max_blocks)

    def key_for(self, seqs: list[ScheduledSeq]) -> tuple[int, int] | None:
        """(padded batch size, table width) of the graph that runs this step, or None when it
        must run eagerly."""
        if not seqs or len(seqs) > self.sizes[-1]:
            return None
        bs = self.runner.block_size
        longest = 0
        for s in seqs:
            if s.num_new_tokens != 1:
                return None
            longest = max(longest, s.context_len)
        need = -(-longest // bs)
        if need > self.max_blocks:
            return None
        sig = self.runner.residency.signature()
        if sig != self._signature:
            self.invalidate()
            self._signature = sig
        self._stable += 1
        if self._stable <= self.settle_steps:
            return None
        if self.runner.stream_layers:
            # A replayed pass does not time its copies: every TIMED_EVERY-th step that streams
            # runs eagerly, so the remapping controller keeps measuring compute and exposure.
            self._untimed += 1
            if self._untimed >= TIMED_EVERY:
                self._untimed = 0
                self.timed_steps += 1
                return None
        return next(s for s in self.sizes if s >= len(seqs)), self.width_for(need)

    # ---- how ---------------------------------------------------------------------------------
    def run(self, seqs: list[ScheduledSeq], key: tuple[int, int]) -> torch.Tensor:
        """Hidden states [len(seqs), hidden] of a decode batch (rows in the order of seqs)."""
        self._fill(seqs, *key)
        streamer = self.runner.streamer
        streamer.settle()  # a restore still in flight must land before the replay reads the slab
        replay = self._graphs.get(key) or self._capture(*key)
        out = replay()
        self.replays += 1
        return out[: len(seqs)]

    def _rows(self, size: int, width: int) -> torch.Tensor:
        return self.inputs[: size * (NUM_FIELDS + width)].view(size, NUM_FIELDS + width)

    def _fill(self, seqs: list[ScheduledSeq], size: int, width: int) -> None:
        r = self.runner
        bs, bpp = r.block_size, r.pool.blocks_per_page
        values: list[int] = []
        first: list[int] = []
        for s in seqs:
            req = s.request
            p = s.context_len - 1
            blocks = req.block_ids[: -(-s.context_len // bs)]
            b = blocks[p // bs]
            row = [req.token(p), p, b // bpp, b % bpp, p % bs, s.context_len, *blocks]
            row += [blocks[0]] * (NUM_FIELDS + width - len(row))
            values += row
            first = first or row
        values += first * (size - len(seqs))
        host = torch.tensor(values, dtype=torch.long)
        if self._pin:
            host = host.pin_memory()
        self.inputs[: len(values)].copy_(host, non_blocking=self._pin)

    def _capture(self, size: int, width: int) -> Replay:
        r = self.runner
        model, x = r.model, self._rows(size, width)
        bs, bpp = r.block_size, r.pool.blocks_per_page
        keys_len = width * bs
        wants_mask = getattr(model.attention, "DECODE_MASK", True)  # Triton reads lens instead
        before, after = r.stream_hooks(capturing=True)

        def step() -> torch.Tensor:
            blocks = x[:, NUM_FIELDS:]
            lens = x[:, LEN]
            mask = None
            if wants_mask:
                keys = torch.arange(keys_len, device=x.device)
                mask = (keys[None, :] < lens[:, None])[:, None, None, :]
            meta = AttentionMetadata(
                write_pages=x[:, W_PAGE],
                write_slots=x[:, W_SLOT],
                write_offsets=x[:, W_OFF],
                num_decode=size,
                decode_groups=[DecodeGroup(0, blocks // bpp, blocks % bpp, mask, lens)],
                prefills=[],
            )
            h = model.forward(x[:, IDS], x[:, POS], r.kv_layer, meta, before, after)
            r.streamer.join()  # the pass's last copies (slab restores) end inside the graph
            return h

        replay = self.capturer.capture(step)
        self._graphs[size, width] = replay
        self.captures += 1
        return replay
