"""Decode steps replayed from captured graphs (CUDA graphs on a GPU).

A decode step launches a few kernels per layer for a handful of tokens; on a GPU the launches, not
the math, set its time at small batches. `DecodeGraphs` captures the decoder stack of one model for
a set of batch sizes and replays it: a batch is padded up to the nearest captured size.

What a graph bakes in, and why it stays valid while the arena remaps:
  - inputs live in one static buffer, rewritten before each replay with one host-to-device copy:
    token ids, positions, where each new token's K/V go, context lengths, and block tables padded to
    the model's longest context. The KV view spans the whole arena, whose address never moves, so KV
    pages changing hands (parameter pages remapped into KV and back) need no new capture.
  - weight addresses: a layer's slab may move (restored elsewhere, compacted) or go missing
    (streamed through borrowed slabs, copies included in the graph). Graphs are keyed by the
    model's residency signature; when it changes they are dropped and captured again once it has
    held for `settle_steps` decode steps (eager until then).
Padding rows repeat the batch's first row (same token, position and block table): they compute
and write exactly what that row does, so no KV slot outside the batch is touched.

The capture mechanism is pluggable: `CudaGraphCapture` on a GPU; `EagerReplay` (runs the captured
function at every replay) exercises the same buffers and padding on a CPU (the tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

import torch

from oneiros.attention.torch_ref import AttentionMetadata, DecodeGroup
from oneiros.core import ScheduledSeq

if TYPE_CHECKING:
    from oneiros.engine.executor import ModelRunner

Replay = Callable[[], torch.Tensor]

# Columns of the static input buffer; block ids follow from column NUM_FIELDS on.
IDS, POS, W_PAGE, W_SLOT, W_OFF, LEN, NUM_FIELDS = range(7)


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
        self.inputs = torch.zeros(sizes[-1], NUM_FIELDS + max_blocks, dtype=torch.long, device=dev)
        self._pin = dev.type == "cuda"
        self._graphs: dict[int, Replay] = {}
        self._streamed = (0, 0)  # (copies, bytes) a replay streams: one residency, one plan
        self._signature: tuple | None = None
        self._stable = 0  # decode steps seen with the current signature
        self.captures = 0
        self.replays = 0

    # ---- when --------------------------------------------------------------------------------
    def invalidate(self) -> None:
        """The model's residency is changing: graphs that baked the old weight addresses go."""
        self._graphs.clear()
        self._signature = None
        self._stable = 0

    def size_for(self, seqs: list[ScheduledSeq]) -> int | None:
        """The captured size this step pads to, or None when it must run eagerly."""
        if not seqs or len(seqs) > self.sizes[-1]:
            return None
        bs = self.runner.block_size
        for s in seqs:
            if s.num_new_tokens != 1 or -(-s.context_len // bs) > self.max_blocks:
                return None
        sig = self.runner.weights.signature()
        if sig != self._signature:
            self.invalidate()
            self._signature = sig
        self._stable += 1
        if self._stable <= self.settle_steps:
            return None
        return next(s for s in self.sizes if s >= len(seqs))

    # ---- how ---------------------------------------------------------------------------------
    def run(self, seqs: list[ScheduledSeq], size: int) -> torch.Tensor:
        """Hidden states [len(seqs), hidden] of a decode batch (rows in the order of seqs)."""
        self._fill(seqs, size)
        streamer = self.runner.streamer
        streamer.settle()  # a restore still in flight must land before the replay reads the slab
        replay = self._graphs.get(size) or self._capture(size)
        out = replay()
        if not isinstance(self.capturer, EagerReplay):  # an eager replay streams and counts
            copies, nbytes = self._streamed
            streamer.stats.copies += copies
            streamer.stats.bytes += nbytes
        self.replays += 1
        return out[: len(seqs)]

    def _fill(self, seqs: list[ScheduledSeq], size: int) -> None:
        r = self.runner
        bs, bpp = r.block_size, r.pool.blocks_per_page
        host = torch.empty(size, NUM_FIELDS + self.max_blocks, dtype=torch.long,
                           pin_memory=self._pin)
        rows = []
        for s in seqs:
            req = s.request
            p = s.context_len - 1
            blocks = req.block_ids[: -(-s.context_len // bs)]
            b = blocks[p // bs]
            pad = [blocks[0]] * (self.max_blocks - len(blocks))
            rows.append([req.all_token_ids[p], p, b // bpp, b % bpp, p % bs, s.context_len,
                         *blocks, *pad])
        rows += [rows[0]] * (size - len(seqs))
        host.copy_(torch.tensor(rows, dtype=torch.long))
        self.inputs[:size].copy_(host, non_blocking=self._pin)

    def _capture(self, size: int) -> Replay:
        r = self.runner
        model, x = r.model, self.inputs[:size]
        bs, bpp = r.block_size, r.pool.blocks_per_page
        width = self.max_blocks * bs
        wants_mask = getattr(model.attention, "DECODE_MASK", True)  # Triton reads lens instead
        before, after, plan = r.stream_hooks(capturing=True)

        def step() -> torch.Tensor:
            blocks = x[:, NUM_FIELDS:]
            lens = x[:, LEN]
            mask = None
            if wants_mask:
                keys = torch.arange(width, device=x.device)
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

        counted = replace(r.streamer.stats)
        replay = self.capturer.capture(step)
        r.streamer.stats = counted  # warm-up and capture copies are not the step's
        self._graphs[size] = replay
        nbytes = sum(r.weights.host[c.layer].numel() for c in plan.copies) if plan else 0
        self._streamed = (plan.num_copies if plan else 0, nbytes)
        self.captures += 1
        return replay
