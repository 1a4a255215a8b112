"""SimExecutor: runs a step's plans against a cost model and a virtual clock instead of a model.

The engine around it is the real one: scheduler, KV accounting, tenancy, remapping controller. Weights
and KV live on the meta device (accounting only, no bytes). Sampled tokens are placeholders (a
benchmark forces each output to its length with ignore_eos); their timestamps are what matters.
"""

from __future__ import annotations

from oneiros.core import LAYER_COPIES, Step, StepResult
from oneiros.engine.backends import Executor
from oneiros.engine.clock import VirtualClock
from oneiros.sim.cost import (
    ModelCost,
    StepWork,
    compute_time,
    flops_bytes,
    overhead_time,
    stream_pass,
    swap_time,
)
from oneiros.sim.hardware import HardwareProfile


class SimTenant:
    """What the simulated executor reads of one model: its geometry."""

    def __init__(
        self, cost: ModelCost, layer_bytes: int, block_bytes: int, vocab_size: int
    ) -> None:
        self.cost = cost
        self.layer_bytes = layer_bytes
        self.block_bytes = block_bytes
        self.vocab_size = vocab_size


class SimExecutor(Executor):
    def __init__(
        self,
        hw: HardwareProfile,
        clock: VirtualClock,
        tenants: dict[str, SimTenant],
        prefetch_distance: int = 2,
    ) -> None:
        self.hw = hw
        self.clock = clock
        self.tenants = tenants
        self.prefetch_distance = prefetch_distance
        self._pending_s = 0.0  # layer copies of memory-only steps, charged to the next pass

    def execute(self, step: Step) -> list[StepResult]:
        hw = self.hw
        total_flops = total_bytes = 0.0
        overhead = 0.0
        # Restores and compaction moves are charged as synchronous layer copies.
        sync_s = self._pending_s + sum(
            self.tenants[op.model].layer_bytes / hw.h2d_bw
            for op in step.memory if isinstance(op, LAYER_COPIES)
        )
        self._pending_s = 0.0
        if not step.plans:
            self._pending_s = sync_s
            return []
        results: list[StepResult] = []
        for plan in step.plans:
            t = self.tenants[plan.model]
            sync_s += swap_time(
                hw, len(plan.swap_out) * t.block_bytes, len(plan.swap_in) * t.block_bytes
            )
            if not plan.seqs:
                results.append(StepResult([], [], [], elapsed=0.0))
                continue
            work = StepWork.of(plan)
            flops, nbytes = flops_bytes(t.cost, work, hw.dtype_bytes)
            total_flops += flops
            total_bytes += nbytes
            own = compute_time(hw, flops, nbytes)
            over = overhead_time(hw, t.cost.num_layers, work.tokens)
            overhead = max(overhead, over)
            stream = stream_pass(
                hw, t.cost.num_layers, plan.stream, self.prefetch_distance, t.layer_bytes,
                own / t.cost.num_layers,
            )
            ids, toks = [], []
            for s in plan.seqs:
                if s.samples:
                    r = s.request
                    ids.append(r.request_id)
                    toks.append(100 + (r.num_tokens * 7919) % max(1, t.vocab_size - 100))
            results.append(
                StepResult(
                    ids, toks, [0.0] * len(toks), None, own + over + stream.exposed_s,
                    h2d_bytes=stream.copies * t.layer_bytes, copy_s=stream.copy_s,
                    exposed_s=stream.exposed_s,
                )
            )
        # Plans of one step share the device: their work adds up in one roofline.
        exposed = max((r.exposed_s for r in results), default=0.0)
        step = sync_s + overhead + compute_time(hw, total_flops, total_bytes) + exposed
        self.clock.advance(step)
        return results
