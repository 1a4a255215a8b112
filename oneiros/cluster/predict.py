"""What each replica's placement would serve, predicted by the simulator.

For a replica holding models with expected rates, a Poisson workload at its share of each model's
rate (the rate split evenly over the model's copies) runs on the same engine configuration with
the simulated executor on a hardware profile (`oneiros simulate`'s engine and cost model, no
tensors). The dry run prints P99 TTFT and TBT per replica, so an operator sees whether a placement
meets its latency targets before any GPU is used.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from oneiros.cluster.config import ClusterConfig
from oneiros.cluster.placement import ModelDemand, Placement


@dataclass(frozen=True)
class Prediction:
    rate: float  # requests/s the replica was simulated at
    requests: int
    completed: int
    p99_ttft_ms: float | None
    p99_tbt_ms: float | None
    throughput_tok_s: float | None


def predict(
    cluster: ClusterConfig,
    placement: Placement,
    demands: list[ModelDemand],
    requests: int = 200,
    lengths: str = "sharegpt",
    seed: int = 0,
) -> dict[str, Prediction]:
    """replica -> its prediction (replicas without expected traffic are left out)."""
    from oneiros.bench.metrics import vllm_fields
    from oneiros.bench.runner import run_engine
    from oneiros.bench.workloads import workload_from_spec
    from oneiros.engine.engine import LLMEngine

    by_name = {d.name: d for d in demands}
    out: dict[str, Prediction] = {}
    for r in placement.replicas:
        rates = {m: by_name[m].rate / placement.copies[m] for m in r.models if by_name[m].rate > 0}
        if not rates:
            continue
        total = sum(rates.values())
        config = dataclasses.replace(
            cluster.engine_config(r.models, r.memory_bytes), executor="sim",
            hardware=cluster.hardware,
        )
        engine = LLMEngine(config)
        try:
            window = min(t.max_model_len for t in engine.tenants.values())
            workload = workload_from_spec({
                "kind": "poisson", "rate": total, "n": requests, "mix": rates,
                "lengths": lengths, "seed": seed, "max_total": window,
            })
            result = run_engine(engine, workload, progress=False, policy=config.policy)
        finally:
            engine.close()
        v = vllm_fields(result.records, result.clock_s or None)
        out[r.name] = Prediction(total, requests, v["completed"], v["p99_ttft_ms"],
                                 v["p99_itl_ms"], v["output_throughput"])
    return out
