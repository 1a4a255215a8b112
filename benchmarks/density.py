"""Density: how many models of the Llama-3-8B class one GPU serves inside an SLO, per policy.

Arrivals and token counts come from the Azure LLM inference trace (conversation service), each
request sent to one of N models drawn by a Zipf popularity (rank k has weight 1 / k^s). Every run
is the real engine (scheduler, KV accounting, arbiter, tenancy, remapping controller) on the
simulator's cost model of one GPU (`--hardware`, default h200), models at full geometry with random
weights. For each policy the largest N whose run meets the SLO (P99 TTFT and P99 TPOT over all
requests, none rejected) is reported, with the GPUs 32 such models need at that density
(ceil(32 / N)):

    static        one model per GPU (N = 1 by definition; the run checks the SLO holds for it)
    all-resident  every model's weights resident, one KV pool shared elastically (kvcached-like;
                  policy recompute): N stops where the weights no longer fit the memory budget
    offload       idle models leave the device whole and a model is loaded whole before it runs,
                  KV shared as above (vLLM sleep mode level 1-like; policy offload)
    oneiros       idle models give layers (coldest, then MRU), and with turn reloads (--turn-reload,
                  on here) so do models waiting for a later turn: the next model is copied back
                  during the turn before its own, so only the running and the next model's weights
                  need the device and the rest is KV cache (policy oneiros)

--model-set mixed assigns 8B, 3B and 1B geometries (Llama-3 / Llama-3.2) by popularity rank.

    .venv/bin/python benchmarks/density.py --time-scale 1    # writes results/density.json
    .venv/bin/python benchmarks/density.py --requests 40 --max-models 3 --out /tmp/d.json  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from oneiros.bench.runner import run_engine  # noqa: E402
from oneiros.bench.workloads import WorkItem, fit_context, read_azure_trace  # noqa: E402
from oneiros.config import EngineConfig  # noqa: E402
from oneiros.core import ConfigError  # noqa: E402
from oneiros.engine.engine import LLMEngine  # noqa: E402
from oneiros.sim.hardware import load_profile  # noqa: E402

TRACE = ROOT.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"
POLICIES = {"static": "static", "all-resident": "recompute", "offload": "offload",
            "oneiros": "oneiros"}
FLEET = 32  # models whose GPU count the table reports
# Shipped geometries of each model set, assigned in popularity order (m0, m1, ...) cyclically.
MODEL_SETS = {
    "8b": ("llama-3-8b",),
    "mixed": ("llama-3-8b", "llama-3.2-3b", "llama-3.2-1b"),  # 16, 6.4 and 2.5 GB in bf16
}


def zipf_weights(n: int, s: float) -> np.ndarray:
    """Popularity of ranks 1..n: 1 / k^s, normalised."""
    w = 1.0 / np.arange(1, n + 1, dtype=float) ** s
    return w / w.sum()


def workload(rows: list, n: int, s: float, seed: int, max_total: int) -> list[WorkItem]:
    """The trace's requests, each sent to one of n models (m0 the most popular) by Zipf(s)."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(n, size=len(rows), p=zipf_weights(n, s))
    items = []
    for row, k in zip(rows, picks.tolist(), strict=True):
        p, o = fit_context(row.prompt_len, row.output_len, max_total)
        items.append(WorkItem(row.arrival_s, f"m{k}", p, o))
    return items


def config(policy: str, n: int, args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        models={f"m{k}": f"random:{model_of(args, k)}" for k in range(n)}, executor="sim",
        hardware=args.hardware, memory_budget=args.memory_fraction, policy=POLICIES[policy],
        max_num_seqs=256, max_num_batched_tokens=4096, max_model_len=args.max_total,
        sharing="temporal", turn_steps=args.turn_steps, page_bytes=args.page_mib << 20,
        turn_reload=args.turn_reload,
    )


def model_of(args: argparse.Namespace, k: int) -> str:
    """The geometry of model m<k>: --model, or the k-th of --model-set (cyclically)."""
    if args.model_set is None:
        return args.model
    models = MODEL_SETS[args.model_set]
    return models[k % len(models)]


def run_one(policy: str, n: int, rows: list, args: argparse.Namespace) -> dict[str, Any]:
    """One run: the summary the table needs, or why it could not run (weights do not fit)."""
    wall = time.perf_counter()
    try:
        engine = LLMEngine(config(policy, n, args))
    except ConfigError as e:
        return {"models": n, "fits": False, "meets_slo": False, "why": str(e)}
    wl = workload(rows, n, args.zipf, args.seed, args.max_total)
    res = run_engine(engine, wl, progress=False, policy=policy, max_steps=args.max_steps)
    engine.check_integrity()
    s = res.summary()
    ttft, tpot = s["ttft_s"].get("p99"), s["tpot_s"].get("p99")
    totals = res.engine_totals()
    ok = (
        s["rejected"] == 0 and s["completed"] == len(wl) and ttft is not None
        and ttft <= args.slo_ttft and (tpot is None or tpot <= args.slo_tpot)
    )
    return {
        "models": n, "fits": True, "meets_slo": bool(ok), "oversubscribed": engine.oversubscribed,
        "requests": len(wl), "completed": s["completed"], "rejected": s["rejected"],
        "ttft_p50_s": s["ttft_s"].get("p50"), "ttft_p99_s": ttft,
        "tpot_p50_s": s["tpot_s"].get("p50"), "tpot_p99_s": tpot,
        "throughput_tok_s": s["throughput_tok_s"], "preemptions": totals.get("preemptions", 0),
        "restored_layers": totals.get("restored_layers", 0),
        "remapped_layers": totals.get("remapped_layers", 0),
        "h2d_gb": totals.get("h2d_bytes", 0) / 1e9, "sim_s": res.clock_s,
        "wall_s": time.perf_counter() - wall,
    }


def largest_n(policy: str, rows: list, args: argparse.Namespace) -> dict[str, Any]:
    """Scan N = 1, 2, ... up to --max-models; the largest N that meets the SLO (the scan stops
    after --patience failures in a row, or when the weights no longer fit)."""
    runs, best, misses = [], 0, 0
    top = 1 if policy == "static" else args.max_models
    for n in range(1, top + 1):
        r = run_one(policy, n, rows, args)
        runs.append(r)
        print(f"  {policy:>12} N={n:<3} " + (
            f"TTFT p99 {r['ttft_p99_s']:.3f}s  TPOT p99 {(r['tpot_p99_s'] or 0) * 1e3:.1f}ms  "
            f"{'ok' if r['meets_slo'] else 'miss'}  ({r['wall_s']:.0f}s)"
            if r["fits"] else "does not fit"
        ), flush=True)
        if r["meets_slo"]:
            best, misses = n, 0
        else:
            misses += 1
            if not r["fits"] or misses >= args.patience:
                break
    return {"largest_n": best, "gpus_for_32": math.ceil(FLEET / best) if best else None,
            "runs": runs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--requests", type=int, default=400, help="trace rows replayed")
    ap.add_argument("--start-s", type=float, default=0.0, help="skip this much of the trace")
    ap.add_argument("--time-scale", type=float, default=0.25,
                    help="2: the trace twice as fast; 0.25 (default): a quarter of its rate")
    ap.add_argument("--zipf", type=float, default=1.0, help="popularity exponent s")
    ap.add_argument("--model", default="llama-3-8b", help="shipped config of every model")
    ap.add_argument("--model-set", choices=sorted(MODEL_SETS), default=None,
                    help="instead of --model: geometries assigned by popularity rank, cyclically "
                         "(mixed: 8B, 3B, 1B, 8B, ...)")
    ap.add_argument("--hardware", default="h200")
    ap.add_argument("--memory-fraction", type=float, default=0.9)
    ap.add_argument("--max-total", type=int, default=4096, help="tokens per request at most")
    ap.add_argument("--turn-steps", type=int, default=8)
    ap.add_argument("--turn-reload", default="on", choices=("auto", "on", "off"),
                    help="oneiros: waiting models lend every layer and come back ahead of their "
                         "turn (auto: only when the weights do not all fit)")
    ap.add_argument("--page-mib", type=int, default=32,
                    help="arena page (fewer pages: faster planning; 14 pages a layer at 32)")
    ap.add_argument("--slo-ttft", type=float, default=2.0, help="P99 TTFT bound, seconds")
    ap.add_argument("--slo-tpot", type=float, default=0.1, help="P99 TPOT bound, seconds")
    ap.add_argument("--max-models", type=int, default=12)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=2_000_000)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "results" / "density.json"))
    args = ap.parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        ap.error(f"unknown policy {unknown[0]!r} (known: {', '.join(POLICIES)})")
    if not Path(args.trace).is_file():
        ap.error(f"no trace at {args.trace}")
    if args.requests < 1 or args.max_models < 1 or args.patience < 1:
        ap.error("--requests, --max-models and --patience must be at least 1")
    rows = read_azure_trace(args.trace, args.time_scale, args.requests, args.start_s)
    hw = load_profile(args.hardware)
    span = rows[-1].arrival_s if rows else 0.0
    models = args.model if args.model_set is None else "+".join(MODEL_SETS[args.model_set])
    print(f"{len(rows)} requests over {span:.0f}s ({len(rows) / max(span, 1e-9):.2f}/s) on "
          f"{hw.name}; models {models}; Zipf s={args.zipf}; SLO P99 TTFT <= {args.slo_ttft}s, P99 TPOT <= "
          f"{args.slo_tpot * 1e3:.0f}ms", flush=True)
    results = {p: largest_n(p, rows, args) for p in policies}
    print(f"\n{'policy':>12}  {'models/GPU':>10}  {'GPUs for 32':>11}")
    for p, r in results.items():
        print(f"{p:>12}  {r['largest_n']:>10}  {r['gpus_for_32'] or '-':>11}")
    out = {"args": vars(args), "hardware": hw.name, "requests": len(rows), "span_s": span,
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
