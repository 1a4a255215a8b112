"""The async transfer engine: run a model's n layers in the memory of n - alpha layer slabs.

Planner (pure). The missing layers stream, in layer order, through `distance` borrowed slabs: the
slabs of the first resident layers. A borrowed slab may be overwritten only after its own layer ran in
this pass; a missing layer is copied into the slab that frees up earliest, as soon as it frees up;
once the last missing layer using a borrowed slab has run, the slab's own layer is copied back for
the next pass. So a pass makes alpha + (borrowed slabs used) copies: alpha+1 with distance 1, alpha+2
with distance 2 (double buffering: each copy has the compute of about two intervals to hide under).

Streamer (tensors). Runs a pass plan around the model's layers: on CUDA every copy goes to one copy
stream from pinned host memory, ordered after an event that marks the end of the layer that frees
its slab, and the compute stream waits on a layer's copy event just before that layer. On CPU the
same plan runs synchronously, copies in order. Restores and compaction moves (`copy_in`) take the
same path: no host wait, the layer's next use waits on its event. A pass can be captured into a CUDA
graph (`timing=False`, then `join`): its copies and waits become graph nodes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, slots=True)
class Copy:
    layer: int  # whose weights are copied (from the host master copy)
    slab: int  # whose slab they go into (a borrowed resident layer's)
    after: int  # start once this layer has run in the pass (-1: before the pass)
    restore: bool  # True: the slab's own layer coming back for the next pass


@dataclass(frozen=True)
class PassPlan:
    num_layers: int
    missing: tuple[int, ...]
    copies: tuple[Copy, ...]
    slab_of: dict[int, int] = field(default_factory=dict)  # missing layer -> slab it runs from

    @property
    def num_copies(self) -> int:
        return len(self.copies)

    def starting_after(self, layer: int) -> list[Copy]:
        return [c for c in self.copies if c.after == layer]


def plan_pass(num_layers: int, missing: list[int] | tuple[int, ...], distance: int) -> PassPlan:
    """Which copy starts when, and into which slab, for one forward pass."""
    missing = tuple(sorted(missing))
    if not missing:
        return PassPlan(num_layers, (), ())
    if distance not in (1, 2):
        raise ValueError(f"prefetch distance must be 1 or 2, not {distance}")
    resident = [i for i in range(num_layers) if i not in set(missing)]
    if not resident or resident[0] > missing[0]:
        raise ValueError("the first missing layer needs a resident layer before it to borrow from")
    borrowed = [r for r in resident if r < missing[-1]][:distance]
    # free_after[s]: the layer whose run frees slab s in this pass (its own layer at first).
    free_after = {s: s for s in borrowed}
    copies: list[Copy] = []
    slab_of: dict[int, int] = {}
    for m in missing:
        # The slab that frees earliest among those already free before m runs.
        usable = [s for s in borrowed if free_after[s] < m]
        s = min(usable, key=lambda s: free_after[s])
        copies.append(Copy(m, s, free_after[s], restore=False))
        slab_of[m] = s
        free_after[s] = m
    for s in borrowed:
        if free_after[s] != s:  # used: bring its own layer back once the last user ran
            copies.append(Copy(s, s, free_after[s], restore=True))
    return PassPlan(num_layers, missing, tuple(copies), slab_of)


def check_plan(plan: PassPlan) -> None:
    """Replay the plan: every layer runs with its own weights, nothing still to run is overwritten,
    and every slab ends the pass holding its own layer."""
    holds: dict[int, int] = {s: s for s in range(plan.num_layers) if s not in plan.missing}
    ran: set[int] = set()

    def start(after: int) -> None:
        for c in plan.starting_after(after):
            occupant = holds.get(c.slab)
            assert occupant is not None, f"copy of {c.layer} into slab {c.slab}, which has no slab"
            assert occupant in ran, f"copy of {c.layer} overwrites layer {occupant} before it runs"
            assert c.restore == (c.layer == c.slab), f"copy of {c.layer} into {c.slab} mislabelled"
            holds[c.slab] = c.layer

    start(-1)
    for i in range(plan.num_layers):
        slab = plan.slab_of.get(i, i)
        assert holds.get(slab) == i, f"layer {i} would run with the weights of {holds.get(slab)}"
        ran.add(i)
        start(i)
    for s in holds:
        assert holds[s] == s, f"slab {s} ends the pass holding layer {holds[s]}"


@dataclass(slots=True)
class StreamStats:
    copies: int = 0
    bytes: int = 0
    exposed_s: float = 0.0  # time compute waited for copies (all copy time on CPU)
    copy_s: float = 0.0  # time spent copying (measured on CPU; from events on CUDA)


class LayerStreamer:
    """Executes pass plans for one model: copies host master copies into borrowed slabs."""

    def __init__(
        self,
        host: list[torch.Tensor],
        region: Callable[[int], torch.Tensor],
        bind: Callable[[int, int | None], None],
        device: torch.device,
    ) -> None:
        self.host = host  # layer -> (pinned) uint8 master copy
        self.region = region  # slab (a resident layer's index) -> its uint8 device region
        self.bind = bind  # (layer, slab) points the model's views at the slab; (layer, None) drops
        self.device = device
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.stats = StreamStats()
        self._occupant: dict[int, int] = {}  # borrowed slab -> layer whose weights it holds
        self._ready: dict[int, torch.cuda.Event] = {}  # layer -> its copy is done
        self._timings: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def hooks(
        self, plan: PassPlan, timing: bool = True
    ) -> tuple[Callable[[int], None], Callable[[int], None]]:
        """(before_layer, after_layer) callbacks for DecoderModel.forward. `timing=False` while a
        graph is captured: no timing events (the copies and waits themselves are captured)."""

        def before(i: int) -> None:
            ev = self._ready.pop(i, None)
            if ev is not None:  # CUDA: the compute stream waits for this layer's copy only
                stream = torch.cuda.current_stream(self.device)
                if timing:
                    t0 = torch.cuda.Event(enable_timing=True)
                    t1 = torch.cuda.Event(enable_timing=True)
                    t0.record(stream)
                    stream.wait_event(ev)
                    t1.record(stream)
                    self._timings.append(("exposed", t0, t1))
                else:
                    stream.wait_event(ev)
            if i in plan.slab_of:
                self.bind(i, plan.slab_of[i])

        def after(i: int) -> None:
            for c in plan.starting_after(i):
                self._start(c, timing)

        return before, after

    def _start(self, c: Copy, timing: bool = True) -> None:
        old = self._occupant.get(c.slab, c.slab)
        if old != c.layer:
            self.bind(old, None)  # its weights are about to be overwritten
        dst, src = self.region(c.slab), self.host[c.layer]
        self.stats.copies += 1
        self.stats.bytes += src.numel()
        if not self.cuda:
            t0 = time.perf_counter()
            dst.copy_(src)
            dt = time.perf_counter() - t0
            self.stats.copy_s += dt
            self.stats.exposed_s += dt  # synchronous: nothing is hidden on CPU
        else:
            self._ready[c.layer] = self._copy_async(dst, src, timing)
        self._occupant[c.slab] = c.layer
        if c.restore:
            self.bind(c.slab, c.slab)  # on CUDA, its next use waits on the copy event

    def _copy_async(self, dst: torch.Tensor, src: torch.Tensor, timing: bool) -> torch.cuda.Event:
        """On the copy stream, after everything the compute stream has queued so far (what last
        used dst); returns the event the copy's first reader waits on."""
        assert self.copy_stream is not None
        freed = torch.cuda.Event()
        freed.record(torch.cuda.current_stream(self.device))
        self.copy_stream.wait_event(freed)
        t0 = torch.cuda.Event(enable_timing=timing)
        t1 = torch.cuda.Event(enable_timing=timing)
        with torch.cuda.stream(self.copy_stream):
            t0.record()
            dst.copy_(src, non_blocking=True)
            t1.record()
        if timing:
            self._timings.append(("copy", t0, t1))
        return t1

    def copy_in(self, layer: int, dst: torch.Tensor) -> None:
        """Copy layer's master copy into dst, its new slab (a restore or a compaction move). On
        CUDA the copy runs on the copy stream with no host wait; the layer's next use waits for it
        (the forward pass's hooks), so it overlaps the compute of the layers before it."""
        if not self.cuda:
            dst.copy_(self.host[layer])
            return
        self._ready[layer] = self._copy_async(dst, self.host[layer], timing=True)

    @property
    def pending(self) -> bool:
        """Copies whose readers have not waited for them yet."""
        return bool(self._ready)

    def settle(self) -> None:
        """The compute stream waits for every copy queued so far (no host wait)."""
        if self._ready and self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        self._ready.clear()

    def join(self) -> None:
        """End of a captured pass: the copy stream's work joins the compute stream (a capture may
        not end with work forked onto another stream)."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        self._ready.clear()

    def finish_pass(self) -> None:
        """After the step has synchronised: fold CUDA timings into the stats."""
        for kind, t0, t1 in self._timings:
            dt = t0.elapsed_time(t1) / 1e3
            if kind == "copy":
                self.stats.copy_s += dt
            else:
                self.stats.exposed_s += dt
        self._timings.clear()

    def reset(self) -> None:
        """The residency is about to change (pages may change hands): the compute stream waits
        for every copy in flight, and plans start afresh."""
        self.settle()
        self._occupant.clear()
