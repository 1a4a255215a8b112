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


