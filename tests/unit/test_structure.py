"""Planning is torch-free: the plain types, the scheduler, the arbiter, the remapping controller, the
accounting, the transfer planner and the simulator's pricing import and run with torch made
unimportable (a fresh interpreter whose import system refuses `torch`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TORCH_FREE = [
    "oneiros.core",
    "oneiros.config",
    "oneiros.engine.arbiter",
    "oneiros.engine.backends",
    "oneiros.engine.clock",
    "oneiros.engine.planner",
    "oneiros.engine.policies",
    "oneiros.engine.remapping",
    "oneiros.engine.scheduler",
    "oneiros.engine.tenancy",
    "oneiros.engine.tenant",
    "oneiros.memory.arena",
    "oneiros.memory.kv",
    "oneiros.memory.passplan",
    "oneiros.memory.prefix",
    "oneiros.memory.remap",
    "oneiros.memory.residency",
    "oneiros.memory.swap",
    "oneiros.sim",
    "oneiros.sim.calibrate",
    "oneiros.sim.cost",
    "oneiros.sim.executor",
    "oneiros.sim.hardware",
]

SCRIPT = """
import importlib, importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked: planning must not need torch")
        return None

sys.meta_path.insert(0, NoTorch())
for name in MODULES:
    importlib.import_module(name)
"""

# Plan and price steps of two 13B-like models: accounting, schedulers, arbiter, remapping
# controller, planner, and the simulator's executor on a virtual clock.
RUN = """
from oneiros.core import Request, RequestStatus, SamplingParams
from oneiros.engine.clock import VirtualClock
from oneiros.memory.arena import PageArena
from oneiros.sim.cost import ModelCost
from oneiros.sim.executor import SimExecutor, SimTenant
from oneiros.sim.hardware import load_profile
from tests.factories import make_planning, make_tenants

MiB = 1 << 20
arena = PageArena(2 * (1 + 40 * 160) + 64, MiB)  # two 13B-like models (320 MiB layers) + 64 MiB
tenants = make_tenants(arena, {"a": 40, "b": 40}, layer_pages=160, block_bytes=MiB // 2,
                       block_size=16, max_model_len=4096)
_, _, controller, planner = make_planning(tenants, h2d_bytes_per_s=427e9)
cost = ModelCost(40, 320 * MiB // 2, 5120 * 32000, 40, 128, 40 * 2 * 40 * 128)
clock = VirtualClock()
sim = SimExecutor(load_profile("gh200"), clock,
                  {n: SimTenant(cost, 160 * MiB, MiB // 2, 32000) for n in tenants}, 2)
for k in range(12):
    name = "ab"[k % 2]
    r = Request([7] * 900, SamplingParams(max_tokens=40, ignore_eos=True), name)
    r.arrival_time = 0.0
    tenants[name].scheduler.add(r)
steps = remapped = 0
while any(t.scheduler.has_work for t in tenants.values()):
    step = planner.plan(clock.now())
    results = sim.execute(step)
    for plan, res in zip(step.plans, results):
        for s in plan.seqs:
            s.request.num_computed_tokens += s.num_new_tokens
            if s.samples:
                s.request.output_token_ids.append(1)
                if len(s.request.output_token_ids) >= 40:
                    tenants[plan.model].scheduler.finish(s.request, RequestStatus.FINISHED_LENGTH)
    remapped += sum(type(op).__name__ == "EvictLayer" for op in step.memory)
    planner.observe(step, results)
    steps += 1
    assert steps < 5000
assert "torch" not in sys.modules
print("ok", steps, remapped, round(clock.now(), 3))
"""


def test_planning_and_pricing_run_without_torch():
    code = f"MODULES = {TORCH_FREE!r}\n" + textwrap.dedent(SCRIPT) + textwrap.dedent(RUN)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    word, steps, remapped, clock = out.stdout.split()
    assert word == "ok" and int(steps) > 40 and int(remapped) > 0 and float(clock) > 0
