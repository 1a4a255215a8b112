"""The MIG-like baseline: every model on a slice of the device of its own, memory and compute split
in proportion to its share of the traffic, one engine per slice (strict isolation: nothing moves
between slices, a slice's idle compute helps no one). Simulator only: a CPU cannot be sliced, and a
real GPU would be partitioned by MIG itself.

    run_partitioned(config, workload, shares)  ->  one RunResult over all slices
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from oneiros.bench.runner import RunResult, run_engine
from oneiros.bench.workloads import WorkItem
from oneiros.config import EngineConfig
from oneiros.core import ConfigError
from oneiros.engine.engine import LLMEngine
from oneiros.sim.hardware import load_profile


def shares_of(workload: Sequence[WorkItem], models: Sequence[str]) -> dict[str, float]:
    """Each model's share of the workload's requests (the mix a deployment is sized for)."""
    counts = {m: sum(1 for w in workload if w.model == m) for m in models}
    total = sum(counts.values()) or 1
    return {m: c / total for m, c in counts.items()}


def run_partitioned(
    config: EngineConfig,
    workload: Sequence[WorkItem],
    shares: dict[str, float] | None = None,
    policy: str = "swap",
    **run_kwargs: Any,
) -> RunResult:
    """Run each model's requests on its own engine over a slice of `config.hardware` (shares: model
    -> fraction of the device; the traffic mix by default), under `policy` inside each slice, and
    merge the runs into one result (records on one clock: every slice starts at the same time)."""
    if config.executor != "sim":
        raise ConfigError("the MIG-like partition runs in the simulator only (executor='sim')")
    hw = load_profile(config.hardware)
    shares = shares or shares_of(workload, list(config.models))
    if set(shares) != set(config.models) or not all(v > 0 for v in shares.values()):
        raise ConfigError(
            f"partition shares {shares} must give every served model a positive share"
        )
    total = sum(shares.values())
    budget = config.memory_budget if config.memory_budget is not None else 0.9
    if not isinstance(budget, float):
        budget = budget / hw.memory_bytes  # bytes: the same fraction of every slice
    merged = RunResult(records=[], policy="mig")
    for model, share in shares.items():
        part = hw.slice(share / total, f"{hw.name}/{model}")
        cfg = replace(
            config, models={model: config.models[model]}, hardware=part, memory_budget=budget,
            policy=policy,
        )
        engine = LLMEngine(cfg)
        try:
            sub = [w for w in workload if w.model == model]
            run = run_engine(engine, sub, policy="mig", **run_kwargs)
        finally:
            engine.close()
        merged.records += run.records
        merged.counters.update(run.counters)
        for kind, n in run.rejected.items():
            merged.rejected[kind] = merged.rejected.get(kind, 0) + n
        merged.rejected_examples.update(run.rejected_examples)
        merged.wall_s += run.wall_s
        merged.clock_s = max(merged.clock_s, run.clock_s)
    return merged
