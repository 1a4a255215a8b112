"""The layer streamer: runs pass plans (`memory/passplan.py`) around a model's layers.

On CUDA every copy goes to one copy stream from pinned host memory, ordered after an event that marks
the end of the layer that frees its slab, and the compute stream waits on a layer's copy event just
before that layer. On CPU the same plan runs synchronously, copies in order. Restores and compaction
moves (`copy_in`) take the same path: no host wait, the layer's next use waits on its event. A pass
can be captured into a CUDA graph (`timing=False`, then `join`): its copies and waits become graph
nodes. The streamer owns the copy timings (copy_s, exposed_s); bytes follow from the plan.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from oneiros.engine import faults
from oneiros.memory.passplan import Copy, PassPlan


@dataclass(slots=True)
class StreamStats:
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
        faults.maybe("copy")  # fault injection (tests, drills): a failed layer copy
        old = self._occupant.get(c.slab, c.slab)
        if old != c.layer:
            self.bind(old, None)  # its weights are about to be overwritten
        dst, src = self.region(c.slab), self.host[c.layer]
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
        if self._ready:
            self.order_after_copies()
        self._ready.clear()

    def order_after_copies(self) -> None:
        """What the compute stream does next comes after every copy queued so far (no host
        wait; the copies' readers keep their events)."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)

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
