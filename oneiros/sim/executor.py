"""SimExecutor: runs a step's plans against a cost model and a virtual clock instead of a model.

The engine around it is the real one: scheduler, KV accounting, tenancy, remapping controller. Weights
and KV live on the meta device (accounting only, no bytes). Sampled tokens are placeholders (a
benchmark forces each output to its length with ignore_eos); their timestamps are what matters.
"""

from __future__ import annotations

import random

from oneiros.core import LAYER_COPIES, MoveKV, Step, StepPlan, StepResult
from oneiros.engine.backends import Executor
from oneiros.engine.clock import VirtualClock
from oneiros.memory.passplan import HostLink, PassRun, plan_pass, replay
from oneiros.sim.cost import ModelCost, StepWork, compute_time, flops_bytes, overhead_time
from oneiros.sim.hardware import HardwareProfile


class SimTenant:
    """What the simulated executor reads of one model: its geometry."""

    def __init__(
        self, cost: ModelCost, layer_bytes: int, block_bytes: int, vocab_size: int,
        cold_bw: float | None = None, page_bytes: int = 0,
    ) -> None:
        self.cost = cost
        self.page_bytes = page_bytes  # a KV page moved by compaction copies this much
        self.layer_bytes = layer_bytes
        self.cold_bw = cold_bw  # its host copy is in the cold tier: layer copies at this rate
        self.block_bytes = block_bytes
        self.vocab_size = vocab_size


class SimExecutor(Executor):
    """Prices each step on the hardware profile and advances the virtual clock.

    One host link carries every copy (`HostLink`: two FIFO directions, the mixed bandwidth while
    both are busy), across steps: layer restores and compaction moves go on it asynchronously (the
    engine issues them on the copy stream) and the layer's next use waits for its copy; streamed
    layers are replayed from the pass plan (`replay`), and the copies that give borrowed slabs their
    own layers back after a pass are restores its model's next pass waits for; KV swaps are
    blocking (vLLM), except that a policy with `async_swap_in` issues swap-ins a step ahead and
    only the step that uses those requests waits for them. Plans of one step share the device:
    their work adds up in one roofline. On a profile without async copies every copy is blocking.
    KV pages moved by compaction (`MoveKV`) are device copies at memory bandwidth before the step.

    `noise` > 0 multiplies each step's compute and overheads by a log-normal factor (median 1,
    sigma `noise`) drawn from `seed`: a real machine's step-to-step variation, so that repeated
    simulations show how far a metric moves with it (a P99 over few bursty requests can move
    severalfold). Copies are not perturbed."""

    def __init__(
        self,
        hw: HardwareProfile,
        clock: VirtualClock,
        tenants: dict[str, SimTenant],
        prefetch_distance: int = 2,
        async_swap_in: bool = False,
        noise: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.hw = hw
        self.clock = clock
        self.tenants = tenants
        self.prefetch_distance = prefetch_distance
        self.async_swap_in = async_swap_in
        self.link = HostLink(hw.h2d_bw, hw.d2h_bw, hw.mixed_bw, clock.now())
        self._layer_ready: dict[tuple[str, int], float] = {}  # restores still in flight
        self._swap_ready = 0.0  # when the swap-ins issued a step ahead have landed
        self.noise = noise
        self._rng = random.Random(seed)

    def execute(self, step: Step) -> list[StepResult]:
        hw, t0 = self.hw, self.clock.now()
        blocking = t0  # compute starts once the step's blocking copies are done
        moved = sum(  # KV compaction: device-to-device page copies ahead of everything else
            len(op.pages) * self.tenants[op.model].page_bytes
            for op in step.memory if isinstance(op, MoveKV)
        )
        if moved:
            blocking += 2 * moved / (hw.mem_bw * hw.mem_eff)  # each byte read and written
        for op in step.memory:
            if isinstance(op, LAYER_COPIES):
                end = self.link.copy("h2d", self._link_bytes(self.tenants[op.model]), t0)
                self._layer_ready[op.model, op.layer] = end
                if not hw.async_copies:
                    blocking = max(blocking, end)
        landing = self._swap_ready
        for plan in step.plans:
            t = self.tenants[plan.model]
            if plan.swap_out:
                out = self.link.copy("d2h", len(plan.swap_out) * t.block_bytes, t0)
                blocking = max(blocking, out)
            if plan.swap_in:
                end = self.link.copy("h2d", len(plan.swap_in) * t.block_bytes, t0)
                if self.async_swap_in and hw.async_copies:
                    self._swap_ready = max(self._swap_ready, end)  # used next step
                else:
                    blocking = max(blocking, end)
        runs = [p for p in step.plans if p.seqs]
        if not runs:
            self.clock.advance(blocking - t0)
            return [StepResult([], [], [], elapsed=0.0) for _ in step.plans]
        blocking = max(blocking, landing)
        total_flops = total_bytes = overhead = 0.0
        works = {}
        for plan in runs:
            t = self.tenants[plan.model]
            work = StepWork.of(plan)
            flops, nbytes = flops_bytes(t.cost, work, hw.dtype_bytes)
            total_flops += flops
            total_bytes += nbytes
            overhead = max(overhead, overhead_time(hw, t.cost.num_layers, work))
            works[id(plan)] = work
        compute = compute_time(hw, total_flops, total_bytes)
        if self.noise:
            factor = self._rng.lognormvariate(0.0, self.noise)
            compute *= factor
            overhead *= factor
        passes = [self._pass(plan, compute, blocking) for plan in runs]
        if hw.async_copies:
            replay(passes, self.link, blocking)
            for plan, r in zip(runs, passes, strict=True):
                for layer, ready in r.restores.items():  # the model's next pass waits for them
                    self._layer_ready[plan.model, layer] = ready
        else:  # every copy waits for the one before and the compute waits for all of them
            for r in passes:
                copies = r.plan.num_copies if r.plan is not None else 0
                r.copies = copies
                r.exposed_s = copies * r.layer_bytes / hw.h2d_bw
                r.end = blocking + compute + r.exposed_s
        end = max(r.end for r in passes) + overhead
        self.clock.advance(end - t0)
        by_plan = {id(p): r for p, r in zip(runs, passes, strict=True)}
        return [self._result(p, by_plan.get(id(p)), overhead - blocking) for p in step.plans]

    def _pass(self, plan: StepPlan, compute: float, start: float) -> PassRun:
        t = self.tenants[plan.model]
        n = t.cost.num_layers
        wait = {}
        for layer in range(n):
            ready = self._layer_ready.get((plan.model, layer))
            if ready is not None:
                if ready > start:
                    wait[layer] = ready
                else:
                    del self._layer_ready[plan.model, layer]
        stream = plan_pass(n, plan.stream, self.prefetch_distance) if plan.stream else None
        return PassRun(n, compute / n, self._link_bytes(t), stream, wait)

    def _link_bytes(self, t: SimTenant) -> float:
        """A layer copy as bytes on the host link: from the cold tier it takes the link as long
        as the slower read does (staged through a pinned buffer, one layer at a time)."""
        if t.cold_bw is None or t.cold_bw >= self.hw.h2d_bw:
            return t.layer_bytes
        return t.layer_bytes * self.hw.h2d_bw / t.cold_bw

    def _result(self, plan: StepPlan, run: PassRun | None, offset: float) -> StepResult:
        """`elapsed`: the plan's pass (from the end of the blocking copies) plus the overheads."""
        if run is None:
            return StepResult([], [], [], elapsed=0.0)
        t = self.tenants[plan.model]
        ids, toks = [], []
        for s in plan.seqs:
            if s.samples:
                r = s.request
                ids.append(r.request_id)
                toks.append(100 + (r.num_tokens * 7919) % max(1, t.vocab_size - 100))
        return StepResult(
            ids, toks, [0.0] * len(toks), None, run.end + offset,
            h2d_bytes=run.copies * t.layer_bytes,
            copy_s=run.copies * t.layer_bytes / self.hw.h2d_bw, exposed_s=run.exposed_s,
        )
