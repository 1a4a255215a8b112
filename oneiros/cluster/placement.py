"""Placement: which models each engine replica holds, decided from bytes and rates alone.

    place(models, replicas, rate_per_replica) -> Placement   (pure; PlacementError when impossible)

A model needs its weight bytes plus its KV headroom on every replica that holds it. A model gets
as many copies as the largest of: its `copies`, its pins, and its expected rate over the rate one
replica sustains for it (`rate_per_replica`); never more than there are replicas. Pinned copies
are placed first, then the rest, biggest first, each onto the replica (not already holding the
model, with room) that carries the least expected rate, then has the most free bytes: hot models
spread out, and memory stays balanced. No replica is ever planned over its memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from oneiros.core import ConfigError

MiB = 1 << 20


class PlacementError(ConfigError):
    """The models cannot be placed on these replicas; the message names the model and says why."""


@dataclass(frozen=True)
class ModelDemand:
    """A model as placement sees it."""

    name: str
    weight_bytes: int
    kv_bytes: int  # KV cache room it needs beside its weights on each replica holding it
    rate: float = 0.0  # expected requests/s over the whole cluster
    copies: int = 1  # at least this many replicas hold it
    pins: tuple[str, ...] = ()  # replicas that must hold it

    def __post_init__(self) -> None:
        object.__setattr__(self, "pins", tuple(dict.fromkeys(self.pins)))

    @property
    def need(self) -> int:
        return self.weight_bytes + self.kv_bytes


@dataclass(frozen=True)
class ReplicaCapacity:
    name: str
    memory_bytes: int  # the replica's arena (its engine's memory budget)


@dataclass
class ReplicaPlan:
    name: str
    memory_bytes: int
    models: list[str] = field(default_factory=list)
    weight_bytes: int = 0
    kv_bytes: int = 0  # KV headroom the placement reserved
    rate: float = 0.0  # expected requests/s routed here (a model's rate split over its copies)

    @property
    def used_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    @property
    def free_bytes(self) -> int:
        return self.memory_bytes - self.used_bytes


@dataclass
class Placement:
    replicas: list[ReplicaPlan]
    copies: dict[str, int]  # model -> replicas holding it

    def holders(self, model: str) -> list[str]:
        return [r.name for r in self.replicas if model in r.models]

    def check(self, models: list[ModelDemand]) -> None:
        """The invariants: every model on its number of distinct replicas, pins honoured, no
        replica over its memory."""
        for r in self.replicas:
            assert r.used_bytes <= r.memory_bytes, f"replica {r.name} is over its memory"
            assert len(set(r.models)) == len(r.models), f"a model twice on {r.name}"
        for m in models:
            held = self.holders(m.name)
            assert len(held) == self.copies[m.name] >= 1, f"{m.name}: {held}"
            assert set(m.pins) <= set(held), f"{m.name}: pins {m.pins} not honoured ({held})"


def copies_wanted(m: ModelDemand, rate_per_replica: float | None, num_replicas: int) -> int:
    by_rate = math.ceil(m.rate / rate_per_replica) if rate_per_replica and m.rate > 0 else 1
    return min(max(m.copies, len(m.pins), by_rate, 1), num_replicas)


def place(
    models: list[ModelDemand],
    replicas: list[ReplicaCapacity],
    rate_per_replica: float | None = None,
) -> Placement:
    """Place every model (see the module docstring); raise PlacementError naming a model that
    does not fit."""
    if not replicas:
        raise PlacementError("the cluster has no replicas")
    plans = {r.name: ReplicaPlan(r.name, r.memory_bytes) for r in replicas}
    copies = {m.name: copies_wanted(m, rate_per_replica, len(replicas)) for m in models}
    for m in models:
        unknown = [p for p in m.pins if p not in plans]
        if unknown:
            raise PlacementError(
                f"model {m.name!r} is pinned to {', '.join(unknown)}, which is not a replica "
                f"(replicas: {', '.join(plans)})"
            )
    for m in models:  # pins first: they leave no choice
        for p in m.pins:
            r = plans[p]
            if r.free_bytes < m.need:
                raise PlacementError(
                    f"model {m.name!r} is pinned to replica {p} but does not fit there: it needs "
                    f"{_mib(m.need)} ({_mib(m.weight_bytes)} weights + {_mib(m.kv_bytes)} KV) "
                    f"and {p} has {_mib(r.free_bytes)} free of {_mib(r.memory_bytes)}"
                )
            _put(r, m, copies[m.name])
    for m in sorted(models, key=lambda m: (-m.need, m.name)):
        for _ in range(copies[m.name] - len(m.pins)):
            fits = [r for r in plans.values() if m.name not in r.models and r.free_bytes >= m.need]
            if not fits:
                raise _no_room(m, list(plans.values()))
            best = min(fits, key=lambda r: (r.rate, -r.free_bytes, r.name))
            _put(best, m, copies[m.name])
    order = [r.name for r in replicas]
    for r in plans.values():  # a replica lists its models in the config's order
        rank = {m.name: k for k, m in enumerate(models)}
        r.models.sort(key=rank.__getitem__)
    return Placement([plans[n] for n in order], copies)


def _put(r: ReplicaPlan, m: ModelDemand, copies: int) -> None:
    r.models.append(m.name)
    r.weight_bytes += m.weight_bytes
    r.kv_bytes += m.kv_bytes
    r.rate += m.rate / copies


def _no_room(m: ModelDemand, plans: list[ReplicaPlan]) -> PlacementError:
    largest = max(p.memory_bytes for p in plans)
    if m.need > largest:
        return PlacementError(
            f"model {m.name!r} does not fit on any replica: it needs {_mib(m.need)} "
            f"({_mib(m.weight_bytes)} weights + {_mib(m.kv_bytes)} KV headroom) and the largest "
            f"replica has {_mib(largest)}; give replicas more memory or the model less KV headroom"
        )
    free = max((p.free_bytes for p in plans if m.name not in p.models), default=0)
    return PlacementError(
        f"model {m.name!r} does not fit: it needs {_mib(m.need)} ({_mib(m.weight_bytes)} weights "
        f"+ {_mib(m.kv_bytes)} KV headroom) on each of its replicas, and after the other models "
        f"the most free on a replica without it is {_mib(free)}; add replicas or memory, or lower "
        "its copies or rate"
    )


def _mib(b: int) -> str:
    return f"{b / MiB:.1f} MiB"
