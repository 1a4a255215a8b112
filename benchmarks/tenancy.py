"""Multi-tenancy baselines: one bursty two-model workload under recompute, swap and static shares.

Two tenants (default: SmolLM2-135M-Instruct under two names) share one page arena whose KV part
(--kv-pages pages) is too small for the bursts. Each tenant gets its own Gamma arrival process
(mean rate --rate requests/s, coefficient of variation --cv: CV > 1 is bursty); prompts are random
token ids (special tokens excluded) with lengths uniform in [--min-prompt, --max-prompt], outputs
uniform in [--min-output, --max-output] tokens, greedy with EOS ignored. Everything comes from
--seed, so every policy serves exactly the same requests at the same offsets.

The policies run one after another in ONE invocation, each in a fresh engine. A run replays arrivals
in real time: a request is added to the engine once its arrival time has passed; the engine steps
whenever it has work and sleeps until the next arrival when it has none. Per policy:

  TTFT   first token time - arrival time (the scheduled arrival, so the wait for a running step to
         end counts), P50/P99 over requests;
  TBT    gaps between consecutive tokens of a request, P50/P99 over every gap of every request;
  throughput  output tokens / (last token time - first arrival);
  preemptions, recomputed tokens (recompute), swap-out/in bytes (swap), per tenant and in total.

    .venv/bin/python benchmarks/tenancy.py                          # defaults, results/tenancy.json
    .venv/bin/python benchmarks/tenancy.py --num-requests 16 --policies recompute,swap

One warm-up request per tenant runs before the clock starts (its counters are subtracted).
OMP_WAIT_POLICY=PASSIVE is set before torch loads unless already set: on a shared CPU OpenMP's
spin-waiting makes every step many times slower.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
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

from oneiros.bench.metrics import distribution  # noqa: E402
from oneiros.config import EngineConfig, MiB  # noqa: E402
from oneiros.core import InvalidRequestError, SamplingParams  # noqa: E402
from oneiros.engine.engine import LLMEngine  # noqa: E402
from oneiros.memory.weights import weight_pages  # noqa: E402
from oneiros.models.loader import resolve  # noqa: E402
from oneiros.models.registry import build_model  # noqa: E402

POLICIES = ("recompute", "swap", "static")


# ---- workload ------------------------------------------------------------------------------------
def parse_models(spec: str) -> dict[str, str]:
    """'a=smollm2,b=smollm2' -> {'a': 'smollm2', 'b': 'smollm2'}."""
    out = {}
    for part in spec.split(","):
        name, _, source = part.partition("=")
        if not source:
            raise SystemExit(f"--models: expected NAME=SOURCE, got {part!r}")
        out[name.strip()] = source.strip()
    return out


def excluded_ids(source: str) -> set[int]:
    src = resolve(source)
    ids = set(src.config.eos_token_ids)
    if src.tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src.tokenizer_dir)
        ids |= set(tok.all_special_ids or [])
        ids |= set(getattr(tok, "added_tokens_decoder", {}) or {})
    return ids


def gamma_arrivals(rng: np.random.Generator, n: int, rate: float, cv: float) -> np.ndarray:
    """n arrival offsets (s) of a Gamma renewal process: mean gap 1/rate, gap CV `cv`."""
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n)
    return np.cumsum(gaps) - gaps[0]  # the first request arrives at 0


def make_workload(args: argparse.Namespace, models: dict[str, str]) -> list[dict[str, Any]]:
    rng = np.random.default_rng(args.seed)
    work: list[dict[str, Any]] = []
    for name, source in models.items():
        vocab = resolve(source).config.vocab_size
        allowed = np.array(sorted(set(range(vocab)) - excluded_ids(source)), dtype=np.int64)
        arrivals = gamma_arrivals(rng, args.num_requests, args.rate, args.cv)
        for k, t in enumerate(arrivals):
            plen = int(rng.integers(args.min_prompt, args.max_prompt + 1))
            olen = int(rng.integers(args.min_output, args.max_output + 1))
            work.append({
                "id": f"{name}-{k}",
                "model": name,
                "arrival": float(t),
                "prompt": [int(x) for x in rng.choice(allowed, size=plen)],
                "output_len": olen,
            })
    work.sort(key=lambda w: (w["arrival"], w["id"]))
    return work


# ---- one policy ----------------------------------------------------------------------------------
def counters_of(engine: LLMEngine) -> dict[str, dict[str, Any]]:
    return {n: dataclasses.asdict(t.state.counters) for n, t in engine.tenants.items()}


def delta(after: dict, before: dict) -> dict[str, dict[str, Any]]:
    return {n: {k: v - before[n][k] for k, v in c.items()} for n, c in after.items()}


def warm_up(engine: LLMEngine) -> None:
    for name in engine.tenants:
        engine.add_request([5, 6, 7, 8], SamplingParams(max_tokens=2, temperature=0.0), name)
    while engine.has_unfinished():
        engine.step()


def run_policy(
    policy: str, args: argparse.Namespace, models: dict[str, str], budget: int,
    work: list[dict[str, Any]],
) -> dict[str, Any]:
    t_load = time.perf_counter()
    engine = LLMEngine(
        EngineConfig(
            models=dict(models),
            policy=policy,
            sharing=args.sharing,
            memory_budget=budget,
            page_bytes=args.page_bytes,
            swap_space=args.swap_space,
            max_num_seqs=args.max_num_seqs,
            seed=args.seed,
        )
    )
    load_s = time.perf_counter() - t_load
    kv_pages = {n: t.pool.num_pages for n, t in engine.tenants.items()}
    print(f"[{policy}] loaded in {load_s:.1f} s; KV pages: {engine.arena.num_free} free, "
          f"per tenant {kv_pages}", file=sys.stderr, flush=True)
    warm_up(engine)
    before = counters_of(engine)

    pending = list(work)
    arrival: dict[str, float] = {}  # request id -> absolute scheduled arrival (perf_counter)
    by_rid: dict[str, dict[str, Any]] = {}
    finals: dict[str, Any] = {}
    rejected: list[str] = []
    steps = 0
    max_running = {n: 0 for n in models}
    t0 = time.perf_counter()
    last_report = t0
    while pending or engine.has_unfinished():
        now = time.perf_counter()
        while pending and t0 + pending[0]["arrival"] <= now:
            w = pending.pop(0)
            params = SamplingParams(max_tokens=w["output_len"], temperature=0.0, ignore_eos=True)
            try:
                req = engine.add_request(w["prompt"], params, w["model"], request_id=w["id"])
            except InvalidRequestError as e:
                rejected.append(f"{w['id']}: {e}")
                continue
            arrival[req.request_id] = t0 + w["arrival"]
            by_rid[req.request_id] = w
        if not engine.has_unfinished():
            if pending:
                time.sleep(max(0.0, t0 + pending[0]["arrival"] - time.perf_counter()))
            continue
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        steps += 1
        for n, t in engine.tenants.items():
            max_running[n] = max(max_running[n], len(t.scheduler.running))
        if time.perf_counter() - last_report > 10:
            last_report = time.perf_counter()
            print(f"[{policy}] {last_report - t0:5.0f} s: {len(finals)}/{len(work)} done, "
                  f"{len(pending)} not arrived", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    engine.check_integrity()
    counters = delta(counters_of(engine), before)
    engine.close()
    del engine
    gc.collect()

    ttft, tbt, ttft_by_model = [], [], {n: [] for n in models}
    out_tokens = 0
    last_token = t0
    for rid, out in finals.items():
        assert len(out.token_ids) == by_rid[rid]["output_len"], rid
        first = out.token_times[0] - arrival[rid]
        ttft.append(first)
        ttft_by_model[by_rid[rid]["model"]].append(first)
        tbt += out.tbt
        out_tokens += len(out.token_ids)
        last_token = max(last_token, out.token_times[-1])
    span = last_token - t0
    total = {k: sum(c[k] for c in counters.values()) for k in next(iter(counters.values()))}
    return {
        "policy": policy,
        "load_s": load_s,
        "kv_pages_at_start": kv_pages,
        "requests": len(finals),
        "rejected": rejected,
        "steps": steps,
        "wall_s": wall,
        "output_tokens": out_tokens,
        "throughput_tok_s": out_tokens / span if span > 0 else None,
        "ttft_s": distribution(ttft),
        "ttft_s_by_model": {n: distribution(v) for n, v in ttft_by_model.items()},
        "tbt_s": distribution(tbt),
        "preemptions": total["preemptions"],
        "recomputed_tokens": total["recomputed_tokens"],
        "swap_out_bytes": total["swap_out_bytes"],
        "swap_in_bytes": total["swap_in_bytes"],
        "prefill_tokens": total["prefill_tokens"],
        "decode_tokens": total["decode_tokens"],
        "max_running": max_running,
        "counters": counters,
    }


# ---- report --------------------------------------------------------------------------------------
def table(results: list[dict[str, Any]]) -> str:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{1000 * x:.0f}"

    head = (f"{'policy':<10} {'TTFT p50':>9} {'TTFT p99':>9} {'TBT p50':>8} {'TBT p99':>8} "
            f"{'tok/s':>7} {'preempt':>8} {'recomp tok':>10} {'swap out MiB':>12} "
            f"{'swap in MiB':>11} {'wall s':>7}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r['policy']:<10} {ms(r['ttft_s']['p50']):>9} {ms(r['ttft_s']['p99']):>9} "
            f"{ms(r['tbt_s']['p50']):>8} {ms(r['tbt_s']['p99']):>8} "
            f"{r['throughput_tok_s'] or 0:>7.1f} {r['preemptions']:>8} "
            f"{r['recomputed_tokens']:>10} {r['swap_out_bytes'] / MiB:>12.1f} "
            f"{r['swap_in_bytes'] / MiB:>11.1f} {r['wall_s']:>7.1f}"
        )
    lines.append("(TTFT and TBT in ms)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="a=smollm2,b=smollm2", help="NAME=SOURCE,NAME=SOURCE")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--sharing", default="temporal", choices=["temporal", "spatial"])
    p.add_argument("--num-requests", type=int, default=12, help="per tenant")
    p.add_argument("--rate", type=float, default=0.2, help="mean requests/s per tenant")
    p.add_argument("--cv", type=float, default=3.0, help="coefficient of variation of the gaps")
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=96)
    p.add_argument("--min-output", type=int, default=16)
    p.add_argument("--max-output", type=int, default=48)
    p.add_argument("--kv-pages", type=int, default=12, help="arena pages beyond the weights")
    p.add_argument("--page-bytes", type=int, default=2 * MiB)
    p.add_argument("--swap-space", type=int, default=256 * MiB)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "results" / "tenancy.json"))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    models = parse_models(args.models)
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    for pol in policies:
        if pol not in POLICIES:
            raise SystemExit(f"--policies: {pol!r} is not one of {', '.join(POLICIES)}")
    weights = sum(
        weight_pages(build_model(resolve(s).config, torch.float32, torch.device("cpu")),
                     args.page_bytes)
        for s in models.values()
    )
    budget = (weights + args.kv_pages) * args.page_bytes
    work = make_workload(args, models)
    demand = sum(len(w["prompt"]) + w["output_len"] for w in work)
    print(f"{len(work)} requests over {work[-1]['arrival']:.1f} s, {demand} tokens in all; "
          f"arena {weights} weight pages + {args.kv_pages} KV pages", file=sys.stderr)

    results = []
    t_all = time.perf_counter()
    for pol in policies:
        results.append(run_policy(pol, args, models, budget, work))
    total_s = time.perf_counter() - t_all

    report = {
        "benchmark": "tenancy",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "models": models,
        "arena": {"weight_pages": weights, "kv_pages": args.kv_pages,
                  "page_bytes": args.page_bytes, "budget_bytes": budget},
        "workload": {
            "requests": len(work),
            "span_s": work[-1]["arrival"],
            "prompt_tokens": sum(len(w["prompt"]) for w in work),
            "output_tokens": sum(w["output_len"] for w in work),
            "arrivals": [(w["id"], round(w["arrival"], 4)) for w in work],
        },
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(),
                 "torch_threads": torch.get_num_threads(), "loadavg": list(os.getloadavg()),
                 "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
        "total_s": total_s,
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(table(results))
    print(f"wrote {out} ({total_s:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
