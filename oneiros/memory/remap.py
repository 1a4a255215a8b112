"""The remapping controller's decisions, each a small pure function (no tensors, no engine state).

When a model's KV cache runs out, pages are taken from parameters (layer slabs) instead of preempting:
  - which models:  models not running now first, most recently run first (a rotating scheduler needs
    the model that just ran last), then running ones (spatial sharing spreads over all of them). A
    per-model cap keeps every model partly resident.
  - how many layers of a model that still runs: the largest alpha whose pass, replayed with the
    transfer planner over the measured step time and the copy time (`passplan.exposed_fraction`),
    exposes at most a small fraction of the step. Stricter than the paper's aggregate rule
    alpha * T_T <= T_compute, which ignores when each copy can start.
  - which layers: spread exactly evenly for the current alpha (`even_layers`); one more layer goes
    where it moves the layout toward the even one for alpha + 1, one comes back where it moves it
    toward alpha - 1, and a misplaced layer is moved only when the exposure it saves pays for its copy.
  - when to give memory back: when enough KV memory has stayed free for a while (hysteresis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from oneiros.memory.passplan import exposed_fraction


@dataclass(frozen=True, slots=True)
class DonorInfo:
    """What the controller needs to know about one model to take layers from it."""

    name: str
    active: bool
    last_run: float
    num_layers: int
    num_missing: int
    alpha_cap: int  # most layers this model may have non-resident right now
    popularity: float = 0.0  # recent request rate (decayed arrivals): hot models give last


def even_layers(num_layers: int, alpha: int) -> list[int]:
    """The alpha non-resident layers spread exactly evenly: round(k * n / (alpha + 1)) for
    k = 1..alpha. Layer 0 always stays (a pass borrows an early resident slab to stream into);
    the spacing n / (alpha + 1) >= 1 keeps the rounded layers distinct."""
    alpha = max(0, min(alpha, num_layers - 1))
    return [math.floor(k * num_layers / (alpha + 1) + 0.5) for k in range(1, alpha + 1)]


def _spread(layer: int, others: list[int], num_layers: int) -> int:
    """How far `layer` is from its nearest neighbour among `others` and the bounds (layer 0 and a
    virtual layer n): larger is better spread."""
    return min([layer, num_layers - layer] + [abs(layer - o) for o in others if o != layer])


def next_to_evict(num_layers: int, missing: list[int], keep_first: bool = True) -> int | None:
    """The resident layer to remap next: one of the even layout for alpha + 1 that is not missing
    yet, the best spread from what is missing (lowest on ties); when only layer 0 is left, None,
    or layer 0 itself when `keep_first` is False (an idle model going fully off the GPU)."""
    resident = [i for i in range(1, num_layers) if i not in missing]
    if not resident:
        return None if keep_first or 0 in missing else 0
    target = [i for i in even_layers(num_layers, len(missing) + 1) if i not in missing]
    pool = target or resident
    return max(pool, key=lambda i: (_spread(i, missing, num_layers), -i))


def next_to_restore(num_layers: int, missing: list[int]) -> int | None:
    """The missing layer to bring back next: one outside the even layout for alpha - 1, the most
    crowded (closest to a neighbour; highest on ties)."""
    if not missing:
        return None
    target = set(even_layers(num_layers, len(missing) - 1))
    pool = [i for i in missing if i not in target] or missing
    return min(pool, key=lambda i: (_spread(i, missing, num_layers), -i))


def rebalance(
    num_layers: int, missing: list[int], distance: int, step_s: float, copy_s: float,
    horizon_passes: int,
) -> tuple[int, int] | None:
    """(layer to restore, layer to remap) that moves a misplaced layer into the even layout for
    the same alpha, when the exposure it saves over `horizon_passes` passes exceeds the one copy
    the move costs; None otherwise."""
    alpha = len(missing)
    target = even_layers(num_layers, alpha)
    if alpha == 0 or sorted(missing) == target or step_s <= 0 or copy_s <= 0:
        return None
    out = next_to_restore(num_layers, missing)
    rest = [i for i in missing if i != out]
    into = next_to_evict(num_layers, rest)
    if out is None or into is None or into == out:
        return None
    before = exposed_fraction(num_layers, tuple(sorted(missing)), distance, step_s, copy_s)
    after = exposed_fraction(num_layers, tuple(sorted(rest + [into])), distance, step_s, copy_s)
    if (before - after) * step_s * horizon_passes > copy_s:
        return out, into
    return None


def max_alpha(
    num_layers: int, distance: int, step_s: float, copy_s: float, max_exposed: float
) -> int:
    """The largest alpha whose evenly spread layout, replayed over a pass of `step_s` with `copy_s`
    per layer copy, leaves at most `max_exposed` of the pass waiting for copies (0 until a step
    time is known; n - 1 when copies are free)."""
    if copy_s <= 0:
        return max(0, num_layers - 1)
    if step_s <= 0 or num_layers < 2:
        return 0
    # Exposure depends on step_s / copy_s only: quantised down (the safe side) to 1% steps, so
    # that the search is cached.
    ratio = math.floor(math.log(step_s / copy_s) * 100)
    return _max_alpha(num_layers, distance, ratio, max_exposed)


@lru_cache(maxsize=4096)
def _max_alpha(num_layers: int, distance: int, ratio: int, max_exposed: float) -> int:
    step_s = math.exp(ratio / 100)
    best = 0
    for alpha in range(1, num_layers):
        missing = tuple(even_layers(num_layers, alpha))
        if exposed_fraction(num_layers, missing, distance, step_s, 1.0) > max_exposed:
            break
        best = alpha
    return best


def heat(popularity: float) -> int:
    """Popularity in coarse steps (doublings of the decayed arrival count), so that models of
    about the same rate fall back to the MRU order among them."""
    return int(math.log2(1.0 + max(0.0, popularity)))


def decay(popularity: float, elapsed_s: float, half_life_s: float) -> float:
    """A decayed arrival count `elapsed_s` later."""
    if half_life_s <= 0:
        return 0.0
    return popularity * 0.5 ** (max(0.0, elapsed_s) / half_life_s)


def alpha_cap(num_layers: int, max_remap_fraction: float) -> int:
    """A model never has more than this many layers non-resident (and always keeps layer 0)."""
    return max(0, min(num_layers - 1, int(max_remap_fraction * num_layers)))


def next_donor(donors: list[DonorInfo], sharing: str, order: str = "mru") -> str | None:
    """The model to take the next layer from, or None when every model is at its cap.

    Inactive models go first, the coldest (least popular, see `heat`) first, then most recently run
    first (MRU: a rotating scheduler needs the model that just ran last; `order="lru"` reverses
    this, for the paper's ablation): a hot model is not emptied for a cold one while a colder one
    still has layers. Then active models: under temporal sharing also MRU; under spatial sharing
    the one with the smallest share of its cap used, so the streaming cost is spread over all."""
    open_ = [d for d in donors if d.num_missing < d.alpha_cap]
    inactive = [d for d in open_ if not d.active]
    if inactive:
        coldest = min(heat(d.popularity) for d in inactive)
        inactive = [d for d in inactive if heat(d.popularity) == coldest]
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


def revert_shortfall(
    free_pages: int, pages_per_layer: int, kv_pages_in_use: int, reserve: float
) -> int:
    """Pages missing to restore one layer and still leave `reserve` x the KV pages in use free
    (<= 0: none)."""
    return math.ceil(pages_per_layer + reserve * kv_pages_in_use - free_pages)


def should_revert(free_pages: int, pages_per_layer: int, kv_pages_in_use: int, reserve: float) -> bool:
    """True when one layer can be restored and still leave `reserve` x the KV pages in use free."""
    return revert_shortfall(free_pages, pages_per_layer, kv_pages_in_use, reserve) <= 0


def restore_priority(
    donors: list[DonorInfo], next_to_run: list[str]
) -> list[str]:
    """Models with missing layers, most likely to run next first: the tenancy order of active models,
    then inactive ones most recently used first."""
    missing = {d.name: d for d in donors if d.num_missing > 0}
    first = [n for n in next_to_run if n in missing]
    rest = sorted((d for d in missing.values() if d.name not in first), key=lambda d: -d.last_run)
    return first + [d.name for d in rest]
