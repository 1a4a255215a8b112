"""The simulator as an engine backend: the real engine's accounting on PyTorch's meta device (no
bytes anywhere), a virtual clock, and `SimExecutor` pricing each step on a hardware profile."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from oneiros.config import EngineConfig
from oneiros.engine.backends import Backend, Executor
from oneiros.engine.clock import VirtualClock
from oneiros.sim.cost import ModelCost
from oneiros.sim.executor import SimExecutor, SimTenant
from oneiros.sim.hardware import load_profile

if TYPE_CHECKING:
    from oneiros.engine.policies import MemoryPolicy
    from oneiros.engine.tenant import Tenant


class SimBackend(Backend):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.hardware = load_profile(config.hardware or "")
        self.device = torch.device("meta")
        self.clock = VirtualClock()

    def default_dtype(self) -> str:
        return "float32" if self.hardware.dtype_bytes == 4 else "bfloat16"

    def device_memory(self) -> int:
        return self.hardware.memory_bytes

    def h2d_bytes_per_s(self) -> float:
        return self.config.h2d_bytes_per_s or self.hardware.h2d_bw

    def host_memory_bytes(self) -> int | None:
        if self.config.host_memory_budget is not None:
            return self.config.host_memory_budget
        return self.hardware.host_memory_bytes or None

    def cold_bytes_per_s(self) -> float:
        bw = self.config.cold_bytes_per_s or self.hardware.cold_bw or self.h2d_bytes_per_s()
        return min(bw, self.h2d_bytes_per_s())

    def prepare_models(self, models: dict[str, Any]) -> None:
        """Nothing runs: the cost model reads only the models' geometry."""

    def loads_weights(self) -> bool:
        return False

    def executor(
        self, tenants: dict[str, Tenant], weights: dict[str, Any], policy: MemoryPolicy
    ) -> Executor:
        sims = {
            n: SimTenant(
                ModelCost.of(t.model), t.residency.layer_bytes, t.pool.block_bytes, t.vocab_size,
                self.cold_bytes_per_s() if t.cold else None, t.pool.arena.page_bytes,
            )
            for n, t in tenants.items()
        }
        return SimExecutor(
            self.hardware, self.clock, sims, self.config.prefetch_distance, policy.async_swap_in,
            noise=self.config.sim_noise, seed=self.config.seed,
        )
