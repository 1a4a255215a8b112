"""Memory policies: what happens when a model's KV cache runs out. One registry entry per policy;
the engine asks the entry, never "which policy is this?".

    recompute  preempt the youngest request, prefill it again later (vLLM's default)
    swap       copy the preempted request's KV blocks to host memory and back, blocking the step
               (vLLM v0 swap)
    pie        swap too, but a swapped-out request comes back a step ahead: its swap-in runs on
               the copy stream overlapped with the step before the one it runs in (Pie-like)
    static     fixed, equal KV shares per model, nothing moves between models
    oneiros    remap parameter memory into KV cache first, then fall back to recompute, swap or pie
(The MIG-like baseline, memory and compute split between models, is not a policy of one engine but
one engine per model on a slice of the device: `bench.partition`, simulator only.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from oneiros.core import ConfigError

if TYPE_CHECKING:
    from oneiros.config import EngineConfig


@dataclass(frozen=True)
class MemoryPolicy:
    name: str
    preemption: str  # recompute | swap: what a preempted request loses
    shares_memory: bool  # idle KV pages (and parameter pages) move between models
    remaps: bool  # parameter pages become KV pages (a RemapController)
    partitions_kv: bool  # every free page is split between the models at start
    async_swap_in: bool = False  # swap-ins issued a step ahead, overlapped with that step


def _recompute(cfg: EngineConfig) -> MemoryPolicy:
    return MemoryPolicy("recompute", "recompute", True, False, False)


def _swap(cfg: EngineConfig) -> MemoryPolicy:
    return MemoryPolicy("swap", "swap", True, False, False)


def _pie(cfg: EngineConfig) -> MemoryPolicy:
    return MemoryPolicy("pie", "swap", True, False, False, async_swap_in=True)


def _static(cfg: EngineConfig) -> MemoryPolicy:
    return MemoryPolicy("static", "recompute", False, False, True)


def _oneiros(cfg: EngineConfig) -> MemoryPolicy:
    # The fallback is one of the preemption policies above: pie swaps like swap, a step ahead.
    preemption = "swap" if cfg.remap_fallback == "pie" else cfg.remap_fallback
    return MemoryPolicy("oneiros", preemption, True, True, False,
                        async_swap_in=cfg.remap_fallback == "pie")


POLICIES = {
    "recompute": _recompute, "swap": _swap, "pie": _pie, "static": _static, "oneiros": _oneiros,
}


def memory_policy(cfg: EngineConfig) -> MemoryPolicy:
    try:
        return POLICIES[cfg.policy](cfg)
    except KeyError:
        raise ConfigError(
            f"policy must be one of {', '.join(POLICIES)}, not {cfg.policy!r}"
        ) from None
