"""Where steps run: a registry of backends, each giving the engine a device, a clock, a default dtype
and an executor. The engine asks its backend, never "is this the simulator?".

    torch  the models run in PyTorch on cpu or cuda (`engine/executor.py`)
    sim    a cost model of a hardware profile advances a virtual clock; weights and KV live on
           PyTorch's meta device, accounting only (`sim/backend.py`)

Implementations are imported lazily: this module and the `Executor` interface are torch-free, so
the simulator's executor and the planning code import without torch.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from oneiros.core import ConfigError, Step, StepResult

if TYPE_CHECKING:
    from oneiros.config import EngineConfig
    from oneiros.engine.clock import Clock
    from oneiros.engine.policies import MemoryPolicy
    from oneiros.engine.tenant import Tenant


class Executor(ABC):
    @abstractmethod
    def execute(self, step: Step) -> list[StepResult]:
        """Apply the step's memory actions (swap-outs, then `step.memory` in order, then
        swap-ins), then run each plan's forward pass (one per model; passes of different models
        may overlap) and sample one token per sequence that reaches its end. One result per plan
        of `step.plans`, in order."""

    def release(self, request_id: str) -> None:  # noqa: B027 (optional: most keep none)
        """Forget per-request state (e.g. a seeded generator) of a finished request."""


class Backend(ABC):
    """What differs between running the models and simulating them."""

    config: EngineConfig
    device: Any  # torch.device
    clock: Clock

    @abstractmethod
    def default_dtype(self) -> str:
        """The dtype name `dtype="auto"` means here."""

    @abstractmethod
    def device_memory(self) -> int:
        """Device bytes a fractional memory budget is a fraction of."""

    @abstractmethod
    def h2d_bytes_per_s(self) -> float:
        """Host-to-device copy bandwidth (the remapping controller's T_T)."""

    def host_memory_bytes(self) -> int | None:
        """Host bytes for pinned weight copies (None: no limit); beyond them, the cold tier."""
        return self.config.host_memory_budget  # type: ignore[return-value]  # an int once parsed

    def cold_bytes_per_s(self) -> float:
        """Bandwidth of a layer copy from the cold tier (memory-mapped file) to the device."""
        return self.config.cold_bytes_per_s or self.h2d_bytes_per_s()

    @abstractmethod
    def prepare_models(self, models: dict[str, Any]) -> None:
        """Attach what the models need to run (the attention backend), if they run."""

    @abstractmethod
    def loads_weights(self) -> bool:
        """True when weights are read from their sources (False: accounting only)."""

    @abstractmethod
    def executor(
        self, tenants: dict[str, Tenant], weights: dict[str, Any], policy: MemoryPolicy
    ) -> Executor:
        """The executor over these tenants and their ModelWeights, for this memory policy."""


BACKENDS = {
    "torch": "oneiros.engine.executor:TorchBackend",
    "sim": "oneiros.sim.backend:SimBackend",
}


def create_backend(config: EngineConfig) -> Backend:
    try:
        path = BACKENDS[config.executor]
    except KeyError:
        raise ConfigError(
            f"executor must be one of {', '.join(BACKENDS)}, not {config.executor!r}"
        ) from None
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)(config)
