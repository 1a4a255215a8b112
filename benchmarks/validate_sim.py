"""Validate the simulator against real runs on this CPU.

1. Calibration: run workload A for real (the built-in SmolLM2 under two tenant names; Poisson
   arrivals, an even mix) with a step trace, and fit the CPU profile's efficiencies and overheads to
   it (`oneiros.sim.calibrate`).
2. Validation: run a different workload B (bursty Gamma arrivals, another seed, a 2:1 mix) for
   real, and in the simulator with the calibrated profile (same models, arena size and scheduler
   settings).
3. Report the prediction error of P50/P99 TBT, P99 TTFT and throughput: (sim - real) / real.

    .venv/bin/python benchmarks/validate_sim.py              # results/sim_validation.json

Targets (the issue's): within 15% for throughput and P50 TBT, within 30% for the P99s.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from oneiros.bench.runner import run_engine  # noqa: E402
from oneiros.bench.workloads import workload_from_spec  # noqa: E402
from oneiros.config import EngineConfig  # noqa: E402
from oneiros.engine.engine import LLMEngine  # noqa: E402
from oneiros.models.loader import resolve  # noqa: E402
from oneiros.models.registry import build_model  # noqa: E402
from oneiros.sim.calibrate import fit, read_steps  # noqa: E402
from oneiros.sim.cost import ModelCost  # noqa: E402
from oneiros.sim.hardware import load_profile  # noqa: E402

MODELS = {"a": "smollm2", "b": "smollm2"}
CALIBRATE = "poisson:rate=1.5,n=40,lengths=sharegpt,mix=a+b,seed=1,max_len=400,max_total=1024"
VALIDATE = "gamma:rate=1,cv=2,n=30,lengths=sharegpt,mix=a:2+b:1,seed=7,max_len=400,max_total=1024"


def config(**kw) -> EngineConfig:
    base = dict(models=MODELS, memory_budget="2560MiB", policy="recompute", max_num_seqs=64,
                max_num_batched_tokens=1024)
    base.update(kw)
    return EngineConfig(**base)


def headline(summary: dict) -> dict:
    return {
        "tbt_p50_s": summary["tbt_s"]["p50"], "tbt_p99_s": summary["tbt_s"]["p99"],
        "ttft_p99_s": summary["ttft_s"]["p99"], "throughput_tok_s": summary["throughput_tok_s"],
    }


def real_run(spec: str, trace: str | None = None) -> dict:
    engine = LLMEngine(config(trace_steps=trace))
    try:
        return run_engine(engine, workload_from_spec(spec), progress=False).summary()
    finally:
        engine.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "results" / "sim_validation.json"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="oneiros-validate-"))
    steps = tmp / "calibrate_steps.jsonl"
    print("calibration run (real) ...", flush=True)
    calib_real = real_run(CALIBRATE, str(steps))
    meta = torch.device("meta")
    costs = {n: ModelCost.of(build_model(resolve(s).config, torch.float32, meta))
             for n, s in MODELS.items()}
    prof, stats = fit(load_profile("cpu"), read_steps(steps), costs, "cpu-calibrated")
    prof_path = tmp / "cpu-calibrated.json"
    prof_path.write_text(prof.to_json())
    print(f"fitted: {stats}", flush=True)
    print("validation run (real) ...", flush=True)
    real = headline(real_run(VALIDATE))
    print("validation run (simulated) ...", flush=True)
    engine = LLMEngine(config(executor="sim", hardware=str(prof_path)))
    sim = headline(run_engine(engine, workload_from_spec(VALIDATE), progress=False).summary())
    error = {k: (sim[k] - real[k]) / real[k] for k in real}
    target = {"throughput_tok_s": 0.15, "tbt_p50_s": 0.15, "tbt_p99_s": 0.30, "ttft_p99_s": 0.30}
    report = {
        "calibration_workload": CALIBRATE, "validation_workload": VALIDATE, "models": MODELS,
        "profile": json.loads(prof.to_json()), "fit": stats,
        "calibration_real": headline(calib_real), "real": real, "simulated": sim, "error": error,
        "within_target": {k: abs(error[k]) <= target[k] for k in error}, "target": target,
        "threads": args.threads, "host_loadavg": os.getloadavg(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for k in real:
        print(f"{k:18s} real {real[k]:10.4f}  sim {sim[k]:10.4f}  error {error[k]:+.1%}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
