"""The transfer planner (pure): run a model's n layers in the memory of n - alpha layer slabs.

The missing layers stream, in layer order, through `distance` borrowed slabs: the slabs of the first
resident layers. A borrowed slab may be overwritten only after its own layer ran in
this pass; a missing layer is copied into the slab that frees up earliest, as soon as it frees up;
once the last missing layer using a borrowed slab has run, the slab's own layer is copied back for
the next pass. So a pass makes alpha + (borrowed slabs used) copies: alpha+1 with distance 1, alpha+2
with distance 2 (double buffering: each copy has the compute of about two intervals to hide under).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from oneiros.core import ensure


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
    """Which copy starts when, and into which slab, for one forward pass (plans are immutable and
    shared: the same residency gives the same plan every pass)."""
    return _plan_pass(num_layers, tuple(sorted(missing)), distance)


@lru_cache(maxsize=1024)
def _plan_pass(num_layers: int, missing: tuple[int, ...], distance: int) -> PassPlan:
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
            ensure(occupant is not None, f"copy of {c.layer} into slab {c.slab}, which has no slab")
            ensure(occupant in ran, f"copy of {c.layer} overwrites layer {occupant} before it runs")
            ensure(c.restore == (c.layer == c.slab), f"copy of {c.layer} into {c.slab} mislabelled")
            holds[c.slab] = c.layer

    start(-1)
    for i in range(plan.num_layers):
        slab = plan.slab_of.get(i, i)
        ensure(holds.get(slab) == i, f"layer {i} would run with the weights of {holds.get(slab)}")
        ran.add(i)
        start(i)
    for s in holds:
        ensure(holds[s] == s, f"slab {s} ends the pass holding layer {holds[s]}")




# ---- timing: passes and copies on one host link --------------------------------------------------
class HostLink:
    """The host-device link as two FIFO directions. A copy starts when its direction is free (and
    not before `earliest`); while the other direction is busy it moves at the mixed bandwidth
    (reads and writes contend: ~366 against ~427 GB/s on GH200). Times are seconds on any clock."""

    def __init__(self, h2d_bw: float, d2h_bw: float | None = None, mixed_bw: float | None = None,
                 start: float = 0.0) -> None:
        self.bw = {"h2d": h2d_bw, "d2h": d2h_bw or h2d_bw}
        self.mixed_bw = mixed_bw or min(self.bw.values())
        self.free_at = {"h2d": start, "d2h": start}
        self.busy_s = {"h2d": 0.0, "d2h": 0.0}

    def copy(self, direction: str, nbytes: float, earliest: float) -> float:
        """Queue a copy; returns the time it completes."""
        start = max(earliest, self.free_at[direction])
        other = "d2h" if direction == "h2d" else "h2d"
        bw = self.mixed_bw if self.free_at[other] > start else self.bw[direction]
        end = start + nbytes / bw
        self.free_at[direction] = end
        self.busy_s[direction] += end - start
        return end


@dataclass
class PassRun:
    """One model's forward pass to replay: its layers run in order, `layer_s` each; its streamed
    copies (`plan`, None when nothing streams) go over the link; a layer in `wait` (a restore still
    in flight) may not start before its time."""

    num_layers: int
    layer_s: float
    layer_bytes: float
    plan: PassPlan | None = None
    wait: dict[int, float] = field(default_factory=dict)
    end: float = 0.0  # results: when its last layer is done
    exposed_s: float = 0.0  # time its layers waited for copies
    copies: int = 0
    # borrowed slabs' own layers -> when their copy back lands: on the copy stream after the pass,
    # waited for by this model's next pass when it reaches them (not by other models' steps)
    restores: dict[int, float] = field(default_factory=dict)

    def steady_end(self) -> float:
        """When the same pass could start again without waiting for its slabs' own layers: the
        period of back-to-back passes, which is what a model streaming every step runs at."""
        return max([self.end] + [t - s * self.layer_s for s, t in self.restores.items()])


def replay(runs: list[PassRun], link: HostLink, start: float) -> None:
    """Replay passes that run at the same time from `start` (each on its own stream, sharing the
    link): a copy starts once the layer freeing its slab ran and the link is free; a layer waits for
    its weights. The copies that bring borrowed slabs' own layers back end up in each run's
    `restores` (the next pass waits for them, as the engine's does). Copies are served in the order
    they are asked for (events in time order)."""
    import heapq

    ready: list[dict[int, float]] = [dict(r.wait) for r in runs]
    heap: list[tuple[float, int, int]] = []
    for k, r in enumerate(runs):
        r.exposed_s, r.copies = 0.0, 0
        if r.plan is not None:
            for c in r.plan.starting_after(-1):
                ready[k][c.layer] = link.copy("h2d", r.layer_bytes, start)
                r.copies += 1
        heapq.heappush(heap, (start, k, 0))
    while heap:
        t, k, i = heapq.heappop(heap)
        r = runs[k]
        if i == r.num_layers:
            r.end = t
            if r.plan is not None:  # a borrowed slab is needed again at its own layer next pass
                r.restores = {s: ready[k][s] for s in set(r.plan.slab_of.values())}
            continue
        begin = max(t, ready[k].get(i, t))
        r.exposed_s += begin - t
        done = begin + r.layer_s
        if r.plan is not None:
            for c in r.plan.starting_after(i):
                ready[k][c.layer] = link.copy("h2d", r.layer_bytes, done)
                r.copies += 1
        heapq.heappush(heap, (done, k, i + 1))


def exposed_fraction(
    num_layers: int, missing: tuple[int, ...], distance: int, step_s: float, copy_s: float
) -> float:
    """Share of a pass of `step_s` spent waiting for its streamed copies (idle link, one model)."""
    if not missing:
        return 0.0
    run = PassRun(num_layers, step_s / num_layers, 1.0, plan_pass(num_layers, missing, distance))
    replay([run], HostLink(1.0 / copy_s), 0.0)
    return (run.steady_end() - step_s) / step_s
