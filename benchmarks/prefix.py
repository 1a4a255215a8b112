"""Automatic prefix caching: the same workloads with caching off and on, in one run.

Two scenarios, each replayed in process by the bench runner (oneiros/bench/runner.py) on a fresh
engine per setting, caching off first (the baseline), then on, --repeats times (alternating):

  system   --requests requests sharing one --system-tokens system prompt (random token ids, the
           same for every request), each followed by its own question of --min-question ..
           --max-question tokens; Poisson arrivals at --rate requests/s; --output tokens each.
  sessions the Azure conversation trace (--trace) replayed as multi-turn conversations: --sessions
           conversations of --turns turns from consecutive rows (from --trace-start seconds into
           the trace, arrivals divided by --time-scale); a turn's new message has the row's
           context tokens divided by --message-divisor (at most --max-message), its output the
           row's generated tokens (at most --max-output); a later turn is sent once the turn
           before it finished, its prompt that turn's prompt and output, then the new message.

Prompts are random token ids (ids below 100, the special tokens, excluded), outputs forced
(greedy, EOS ignored). Per scenario and setting the JSON report (--out) has the bench runner's
report (summaries, ratios against caching off, the spread over repeats, every run of the first
repeat) and a headline: prefix cache hit rate (hit / queried prompt tokens), P50/P99 TTFT,
P50/P99 TPOT and TBT, output throughput, each as mean and range over repeats, and the TTFT P50
ratio (on / off) of every repeat.

    .venv/bin/python benchmarks/prefix.py                       # SmolLM2 on this CPU
    .venv/bin/python benchmarks/prefix.py --model random:llama-tiny --requests 4 --sessions 2 \\
        --system-tokens 64 --output 4 --repeats 1               # seconds: the smoke test

One warm-up request runs on each engine before the clock starts (a prompt that shares nothing).
OMP_WAIT_POLICY=PASSIVE is set before torch loads unless already set (see benchmarks/remap.py).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from oneiros.bench.metrics import lookup  # noqa: E402
from oneiros.bench.report import report_dict  # noqa: E402
from oneiros.bench.runner import (  # noqa: E402
    RunResult,
    compare,
    random_prompt,
    run_engine,
    spread,
)
from oneiros.bench.workloads import (  # noqa: E402
    WorkItem,
    as_sessions,
    poisson_arrivals,
    read_azure_trace,
)
from oneiros.config import EngineConfig  # noqa: E402
from oneiros.core import SamplingParams  # noqa: E402
from oneiros.engine.engine import LLMEngine  # noqa: E402

SETTINGS = {"off": False, "on": True}  # the first is the baseline of every ratio
TRACE = ROOT.parent / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"
HEADLINE = {
    "ttft_p50_s": ("ttft_s", "p50"),
    "ttft_p99_s": ("ttft_s", "p99"),
    "tpot_p50_s": ("tpot_s", "p50"),
    "tpot_p99_s": ("tpot_s", "p99"),
    "tbt_p50_s": ("tbt_s", "p50"),
    "tbt_p99_s": ("tbt_s", "p99"),
    "throughput_tok_s": ("throughput_tok_s",),
}


# ---- workloads -----------------------------------------------------------------------------------
def system_workload(args: argparse.Namespace) -> list[WorkItem]:
    rng = np.random.default_rng(args.seed)
    arrivals = poisson_arrivals(args.rate, args.requests, args.seed)
    questions = rng.integers(args.min_question, args.max_question + 1, args.requests)
    return [WorkItem(t, "m", args.system_tokens + int(q), args.output)
            for t, q in zip(arrivals, questions, strict=True)]


def session_workload(args: argparse.Namespace) -> list[WorkItem]:
    rows = read_azure_trace(args.trace, time_scale=args.time_scale,
                            max_requests=args.sessions * args.turns, start_s=args.trace_start)
    if len(rows) < args.sessions * args.turns:
        raise SystemExit(f"--trace {args.trace}: {len(rows)} rows from --trace-start on, "
                         f"{args.sessions * args.turns} needed")
    items = [
        WorkItem(r.arrival_s, "m",
                 max(1, min(args.max_message, r.prompt_len // args.message_divisor)),
                 max(1, min(args.max_output, r.output_len)))
        for r in rows
    ]
    return as_sessions(items, args.turns)


def prompts(args: argparse.Namespace, vocab: int, system: bool) -> Any:
    """The prompt factory: the shared system prompt then the request's own tokens (system), or the
    new message alone (sessions: the runner puts the history before it)."""
    shared = random_prompt(0, args.system_tokens, args.seed + 1, high=vocab) if system else []

    def make(k: int, item: WorkItem) -> list[int]:
        return shared + random_prompt(k, item.prompt_len - len(shared), args.seed, high=vocab)

    return make


# ---- runs ----------------------------------------------------------------------------------------
def build_engine(args: argparse.Namespace, caching: bool) -> LLMEngine:
    return LLMEngine(EngineConfig(
        models={"m": args.model}, device="cpu", memory_budget=args.memory_budget,
        block_size=args.block_size, prefix_caching=caching, seed=args.seed,
        max_num_batched_tokens=args.max_num_batched_tokens,
    ))


def warm_up(engine: LLMEngine) -> None:
    """Kernels warm and step times measured, on a prompt nothing else shares."""
    engine.add_request(list(range(200, 240)), SamplingParams(max_tokens=3, ignore_eos=True), "m")
    while engine.has_unfinished():
        engine.step()


def run_once(args: argparse.Namespace, scenario: str, workload: list[WorkItem]) -> dict:
    results: dict[str, RunResult] = {}
    for name, caching in SETTINGS.items():
        engine = build_engine(args, caching)
        try:
            warm_up(engine)
            vocab = engine.tenants["m"].model.cfg.vocab_size
            results[name] = run_engine(engine, workload, make_prompt=prompts(
                args, vocab, scenario == "system"), progress=False, policy=name)
            engine.check_integrity()
        finally:
            engine.close()
            del engine
            gc.collect()
    return results


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    out = {key: lookup(summary, path) for key, path in HEADLINE.items()}
    e = summary["engine"] or {}
    queries = e.get("prefix_cache_queries", 0)
    out["hit_rate"] = e.get("prefix_cache_hits", 0) / queries if queries else 0.0
    out["prefill_tokens"] = e.get("prefill_tokens")
    return out


def aggregate(heads: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, min and max over repeats of every headline value."""
    out: dict[str, Any] = {}
    for key in heads[0]:
        values = [h[key] for h in heads if h[key] is not None]
        out[key] = {"mean": sum(values) / len(values) if values else None,
                    "min": min(values, default=None), "max": max(values, default=None),
                    "values": [h[key] for h in heads]}
    return out


def scenario_report(args: argparse.Namespace, scenario: str, workload: list[WorkItem]) -> dict:
    runs = []
    for r in range(args.repeats):
        t = time.perf_counter()
        runs.append(run_once(args, scenario, workload))
        print(f"{scenario}: repeat {r + 1}/{args.repeats} in {time.perf_counter() - t:.0f} s",
              flush=True)
    comparisons = [compare(res) for res in runs]
    report = report_dict(runs[0], vars(args) | {"scenario": scenario},
                         repeats=spread(comparisons) if len(runs) > 1 else None)
    heads = {name: [headline(c["summaries"][name]) for c in comparisons] for name in SETTINGS}
    report["headline"] = {name: aggregate(h) for name, h in heads.items()}
    report["headline"]["ttft_p50_ratio"] = [
        on["ttft_p50_s"] / off["ttft_p50_s"] if off["ttft_p50_s"] else None
        for on, off in zip(heads["on"], heads["off"], strict=True)
    ]
    report["workload"] = {"requests": len(workload),
                          "follow_ups": sum(w.follows is not None for w in workload)}
    return report


def print_headline(scenario: str, h: dict[str, Any]) -> None:
    def cell(v: dict) -> str:
        if v["mean"] is None:
            return "-"
        return f"{v['mean']:.4g} [{v['min']:.4g}, {v['max']:.4g}]"

    print(f"\n{scenario}: mean [min, max] over repeats")
    keys = ["hit_rate", *HEADLINE]
    print(f"  {'':18}" + "".join(f"{n:>34}" for n in SETTINGS))
    for k in keys:
        print(f"  {k:18}" + "".join(f"{cell(h[n][k]):>34}" for n in SETTINGS))
    ratios = ", ".join(f"{r:.3f}" if r is not None else "-" for r in h["ttft_p50_ratio"])
    print(f"  TTFT P50 on/off per repeat: {ratios}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--memory-budget", default=None, help="default: the weights plus 1 GiB")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scenarios", default="system,sessions")
    p.add_argument("--requests", type=int, default=16, help="system: requests")
    p.add_argument("--rate", type=float, default=0.5, help="system: requests per second")
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--min-question", type=int, default=20)
    p.add_argument("--max-question", type=int, default=80)
    p.add_argument("--output", type=int, default=16, help="system: output tokens per request")
    p.add_argument("--trace", default=str(TRACE))
    p.add_argument("--trace-start", type=float, default=0.0, help="seconds into the trace")
    p.add_argument("--time-scale", type=float, default=0.25,
                   help="sessions: trace arrivals divided by this (below 1: slower)")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--message-divisor", type=int, default=4)
    p.add_argument("--max-message", type=int, default=300)
    p.add_argument("--max-output", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "results" / "prefix.json"))
    args = p.parse_args(argv)
    if args.repeats < 1 or args.requests < 1 or args.sessions < 1 or args.turns < 1:
        p.error("--repeats, --requests, --sessions and --turns must be at least 1")
    if not 1 <= args.min_question <= args.max_question:
        p.error("need 1 <= --min-question <= --max-question")
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not scenarios or set(scenarios) - {"system", "sessions"}:
        p.error("--scenarios: a list of system, sessions")
    if "sessions" in scenarios and not Path(args.trace).is_file():
        p.error(f"--trace {args.trace}: no such file")
    torch.set_num_threads(args.threads)

    report: dict[str, Any] = {
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(),
                 "torch": torch.__version__, "threads": args.threads},
        "args": vars(args),
    }
    for scenario in scenarios:
        workload = system_workload(args) if scenario == "system" else session_workload(args)
        report[scenario] = scenario_report(args, scenario, workload)
        print_headline(scenario, report[scenario]["headline"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
