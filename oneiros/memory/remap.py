"""The remapping controller's decisions, each a small pure function (no tensors, no engine state).

When a model's KV cache runs out, pages are taken from parameters (layer slabs) instead of preempting:
  - which models:  inactive models first, most recently used first (a rotating scheduler needs the
    model that just ran last), then active ones (spatial sharing spreads over all of them). A
    per-model cap keeps every model partly resident.
  - how many layers of a model that still runs: the largest alpha with alpha * T_T <= T_compute,
    so that streaming its missing layers hides under its own compute.
  - which layers: spread at uniform intervals, in an order whose every prefix is itself spread out
    (so remapping one more layer, or restoring one, never moves the others).
  - when to give memory back: when enough KV memory has stayed free for a while (hysteresis).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DonorInfo:
    """What the controller needs to know about one model to take layers from it."""

    name: str
    active: bool
    last_run: float
    num_layers: int
    num_missing: int
    alpha_cap: int  # most layers this model may have non-resident right now


def removal_order(num_layers: int) -> list[int]:
    """Layers in the order they are remapped; restoring goes in reverse.

    Layer 0 is never remapped: a pass borrows the slab of an early resident layer to stream the
    missing ones. Every prefix of the order is spread out: each next layer is the midpoint of the
    widest gap between layers already chosen (bounded by layer 0 and a virtual layer n), ties going
    to the gap farthest from the previous choice so both halves of the stack fill alike."""
    order: list[int] = []
    chosen = [0, num_layers]  # sorted bounds
    while len(order) < num_layers - 1:
        best = None
        for a, b in zip(chosen, chosen[1:]):
            if b - a < 2:
                continue
            mid = (a + b) // 2
            far = abs(mid - order[-1]) if order else 0
            key = (b - a, far)
            if best is None or key > best[0]:
                best = (key, mid)
        assert best is not None
        order.append(best[1])
        chosen = sorted(chosen + [best[1]])
    return order


def uniform_layers(num_layers: int, alpha: int) -> list[int]:
    """The alpha layers that are non-resident when a model has alpha layers remapped."""
    return sorted(removal_order(num_layers)[:alpha])


def max_alpha(
    layer_copy_s: float, step_compute_s: float, num_layers: int, extra_copies: int = 0
) -> int:
    """Largest alpha with (alpha + extra_copies) * T_T <= T_compute, at most num_layers - 1 (layer
    0 stays). The paper's rule is extra_copies = 0; a pass of the transfer planner also copies the
    borrowed slabs' own layers back (prefetch distance: 1 or 2 more copies on the one copy
    stream), and the engine counts them so that the stream keeps up with the compute."""
    if layer_copy_s <= 0:
        return num_layers - 1
    fit = int(step_compute_s / layer_copy_s) - extra_copies
    return max(0, min(num_layers - 1, fit))


def alpha_cap(num_layers: int, max_remap_fraction: float) -> int:
    """A model never has more than this many layers non-resident (and always keeps layer 0)."""
    return max(0, min(num_layers - 1, int(max_remap_fraction * num_layers)))


def next_donor(donors: list[DonorInfo], sharing: str, order: str = "mru") -> str | None:
    """The model to take the next layer from, or None when every model is at its cap.

    Inactive models go first, most recently run first (MRU: a rotating scheduler needs the model that
    just ran last; `order="lru"` reverses this, for the paper's ablation). Then active models: under temporal sharing also MRU; under spatial sharing the one
    with the smallest share of its cap used, so the streaming cost is spread over all of them."""
    open_ = [d for d in donors if d.num_missing < d.alpha_cap]
    inactive = [d for d in open_ if not d.active]
    if inactive:
        if order == "lru":  # the ablation: the model idle longest gives first
            return min(inactive, key=lambda d: d.last_run).name
        return max(inactive, key=lambda d: d.last_run).name
    active = [d for d in open_ if d.active]
    if not active:
        return None
    if sharing == "spatial":
        return min(active, key=lambda d: (d.num_missing / d.alpha_cap, -d.last_run)).name
    return max(active, key=lambda d: d.last_run).name


@dataclass(slots=True)
class Hysteresis:
    """Revert only after free memory has stayed above the threshold for `hold_steps` steps."""

    hold_steps: int
    streak: int = 0

    def update(self, above: bool) -> bool:
        self.streak = self.streak + 1 if above else 0
        return self.streak >= self.hold_steps


def should_revert(free_pages: int, pages_per_layer: int, kv_pages_in_use: int, reserve: float) -> bool:
    """True when one layer can be restored and still leave `reserve` x the KV pages in use free."""
    return free_pages >= pages_per_layer + reserve * kv_pages_in_use


def restore_priority(
    donors: list[DonorInfo], next_to_run: list[str]
) -> list[str]:
    """Models with missing layers, most likely to run next first: the tenancy order of active models,
    then inactive ones most recently used first."""
    missing = {d.name: d for d in donors if d.num_missing > 0}
    first = [n for n in next_to_run if n in missing]
    rest = sorted((d for d in missing.values() if d.name not in first), key=lambda d: -d.last_run)
    return first + [d.name for d in rest]
