"""Start-up placement of the models' parameters in the arena (torch-free): everything when it fits;
oversubscribed, every always-resident run and then whole models in config order while they fit, the
others starting with every layer off the GPU (their exact host copies bring them back when used)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from oneiros.engine.tenant import Tenant


def host_tiers(weight_bytes: dict[str, int], budget: int | None) -> set[str]:
    """The models whose host copies go to the cold tier: in config order, each model's copy is
    pinned if it still fits `budget` (None: every one fits), else memory-mapped from a file."""
    cold, used = set(), 0
    for name, nbytes in weight_bytes.items():
        if budget is not None and used + nbytes > budget:
            cold.add(name)
        else:
            used += nbytes
    return cold


def place(tenants: list[Tenant], oversubscribed: bool) -> None:
    """Start-up placement, in config order. When everything fits, each model's resident run and
    layers, model by model. Oversubscribed: every resident run first, then whole models' layers
    while they fit with a KV page to spare; the others start with every layer off the GPU (an
    idle model is a model with all its layers remapped)."""
    if not oversubscribed:
        for t in tenants:
            t.residency.place_all()
        return
    for t in tenants:
        t.residency.place_resident()
    arena = tenants[0].residency.arena
    for t in tenants:
        if arena.num_free > t.num_layers * t.residency.pages_per_layer:
            t.residency.place_layers()
