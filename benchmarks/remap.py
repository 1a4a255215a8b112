"""Parameter remapping under a bursty multi-model workload: recompute vs swap vs oneiros, one run.

Workload (the same for every policy, fixed seed): each tenant receives requests as an independent
Gamma renewal process (shape --gamma-shape < 1 makes it bursty: coefficient of variation
1/sqrt(shape)), at --rate requests/s per tenant on average, for --duration seconds of arrivals.
Prompts are random token ids (special tokens excluded) of --min-prompt..--max-prompt tokens,
outputs are forced to --min-output..--max-output tokens (greedy, EOS ignored). Requests are
submitted in real time: the driver adds each request when the wall clock passes its arrival time
and steps the engine whenever it has work. TTFT and TBT are measured from the scheduled arrival
time, so time a request waits because the engine is busy counts.

The memory budget is tight on purpose: the weights plus --kv-pages pages of KV cache (or
--memory-budget). Under recompute and swap a burst preempts requests; under oneiros the slabs of
tenants without work (and, within alpha_max, of running ones) become KV pages first, and come back
when the load falls (dynamic reversion). After the workload drains, --cooldown one-token requests
keep the engine stepping so that reversion can finish; they are not part of the latency numbers.

    .venv/bin/python benchmarks/remap.py                                  # 2 x SmolLM2, CPU
    .venv/bin/python benchmarks/remap.py --models a=random:llama-tiny,b=random:opt-tiny@1 \\
        --page-bytes 65536 --block-size 4 --kv-pages 6                   # seconds, for a smoke test
    .venv/bin/python benchmarks/remap.py --device cuda --duration 60 --rate 2

Output: a table (ratios against the first policy) and a JSON file (--out) with, per policy,
P50/P99 TTFT and TBT, throughput, preemptions, remapped/restored layers, host-to-device bytes,
exposed copy time, whether outputs match the first policy's, and a compact page-owner timeline
sampled from engine.store.page_history (pages per model and kind: slab pages of an idle tenant
turning into KV pages and back).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any


def _early_omp_policy(argv: list[str]) -> None:
    """OMP_WAIT_POLICY=PASSIVE before torch loads (see benchmarks/throughput.py): spinning OpenMP
    threads make decode steps many times slower on a shared, oversubscribed CPU."""
    if "--omp-active" not in argv:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


if __name__ == "__main__":
    _early_omp_policy(sys.argv[1:])

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from oneiros.config import EngineConfig, parse_bytes  # noqa: E402
from oneiros.core import SamplingParams  # noqa: E402
from oneiros.engine.engine import LLMEngine  # noqa: E402
from oneiros.memory.weights import weight_pages  # noqa: E402
from oneiros.models.loader import resolve  # noqa: E402
from oneiros.models.registry import build_model  # noqa: E402

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COUNTERS = (
    "preemptions", "recomputed_tokens", "swap_out_bytes", "swap_in_bytes", "remapped_layers",
    "restored_layers", "restore_failures", "h2d_bytes", "stream_copy_s", "stream_exposed_s",
    "reactivations_streamed", "reactivations_restored", "steps",
)


# ---- workload -----------------------------------------------------------------------------------
def parse_models(spec: str) -> dict[str, str]:
    models = {}
    for part in spec.split(","):
        name, _, source = part.partition("=")
        if not source:
            name, source = f"m{len(models)}", name
        models[name.strip()] = source.strip()
    return models


def excluded_ids(engine: LLMEngine, name: str) -> set[int]:
    t = engine.tenants[name]
    ids = set(t.eos_token_ids)
    if t.tokenizer is not None:
        hf = t.tokenizer.hf
        ids |= set(hf.all_special_ids or [])
        ids |= set(getattr(hf, "added_tokens_decoder", {}) or {})
    return ids


def make_workload(args: argparse.Namespace, engine: LLMEngine) -> list[dict[str, Any]]:
    """Arrivals of every tenant merged in time order: {t, model, prompt, max_tokens}."""
    rng = np.random.default_rng(args.seed)
    work = []
    for name, t in engine.tenants.items():
        vocab = t.model.cfg.vocab_size
        allowed = np.array(sorted(set(range(vocab)) - excluded_ids(engine, name)), dtype=np.int64)
        mean_gap = 1.0 / args.rate
        clock = float(rng.gamma(args.gamma_shape, mean_gap / args.gamma_shape))
        while clock < args.duration:
            plen = int(rng.integers(args.min_prompt, args.max_prompt + 1))
            olen = int(rng.integers(args.min_output, args.max_output + 1))
            prompt = rng.choice(allowed, size=plen).tolist()
            work.append({"t": clock, "model": name, "prompt": [int(x) for x in prompt],
                         "max_tokens": olen})
            clock += float(rng.gamma(args.gamma_shape, mean_gap / args.gamma_shape))
    work.sort(key=lambda w: w["t"])
    return work


# ---- one policy ---------------------------------------------------------------------------------
def build_engine(args: argparse.Namespace, models: dict[str, str], policy: str) -> LLMEngine:
    kw: dict[str, Any] = dict(
        models=models, device=args.device, dtype=args.dtype, page_bytes=args.page_bytes,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, policy=policy,
        sharing=args.sharing, seed=args.seed, swap_space=args.swap_space,
        prefetch_distance=args.prefetch_distance, revert_hold_steps=args.revert_hold_steps,
        max_remap_fraction=args.max_remap_fraction,
    )
    kw["memory_budget"] = args.memory_budget if args.memory_budget else args.budget_bytes
    engine = LLMEngine(EngineConfig(**kw))
    return engine


def counters(engine: LLMEngine) -> dict[str, dict[str, float]]:
    return {
        n: {k: getattr(s.counters, k) for k in COUNTERS} for n, s in engine.store.states.items()
    }


def diff(after: dict, before: dict) -> dict[str, dict[str, float]]:
    return {n: {k: after[n][k] - before[n][k] for k in COUNTERS} for n in after}


def drain(engine: LLMEngine) -> None:
    while engine.has_unfinished():
        engine.step()


def warm_up(engine: LLMEngine) -> None:
    """One short request per tenant (not measured): kernels warm, step times measured."""
    for name in engine.tenants:
        engine.add_request([5, 6, 7, 8], SamplingParams(max_tokens=3, ignore_eos=True), name)
    drain(engine)


def percentiles(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50": None, "p99": None, "mean": None}
    a = np.asarray(xs, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean())}


def timeline(engine: LLMEngine, start_index: int, t0: float, points: int) -> dict[str, Any]:
    """page_history from start_index, sampled to at most `points` snapshots (always keeping the
    snapshots where some tenant's slab pages were at their lowest), as columns of pages."""
    hist = list(engine.store.page_history)[start_index:]
    if not hist:
        return {}
    labels = sorted({k for _, snap in hist for k in snap})
    keep = set(np.linspace(0, len(hist) - 1, min(points, len(hist))).round().astype(int).tolist())
    for name in engine.tenants:
        key = f"{name}/slab"
        k = min(range(len(hist)), key=lambda i: (hist[i][1].get(key, 0), i))
        keep.add(k)
    idx = sorted(keep)
    return {
        "t": [round(hist[i][0] - t0, 3) for i in idx],
        "pages": {lab: [hist[i][1].get(lab, 0) for i in idx] for lab in labels},
    }


def slab_summary(engine: LLMEngine, start_index: int) -> dict[str, dict[str, int]]:
    hist = list(engine.store.page_history)[start_index:]
    out = {}
    for name in engine.tenants:
        slab = [snap.get(f"{name}/slab", 0) for _, snap in hist]
        kv = [snap.get(f"{name}/kv", 0) for _, snap in hist]
        out[name] = {
            "slab_pages_start": slab[0], "slab_pages_min": min(slab), "slab_pages_end": slab[-1],
            "kv_pages_max": max(kv),
        }
    return out


def run_policy(args: argparse.Namespace, models: dict[str, str], policy: str,
               work: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[tuple, list[int]]]:
    t_build = time.perf_counter()
    engine = build_engine(args, models, policy)
    warm_up(engine)
    build_s = time.perf_counter() - t_build
    c0 = counters(engine)
    hist0 = len(engine.store.page_history)
    pending = list(work)
    sched: dict[str, dict[str, Any]] = {}
    outputs: dict[str, Any] = {}
    steps = idle_s = 0.0
    t0 = time.perf_counter()
    k = 0
    last_print = t0
    while k < len(pending) or engine.has_unfinished():
        now = time.perf_counter()
        while k < len(pending) and t0 + pending[k]["t"] <= now:
            w = pending[k]
            req = engine.add_request(
                w["prompt"], SamplingParams(temperature=0.0, max_tokens=w["max_tokens"],
                                            ignore_eos=True), w["model"],
            )
            sched[req.request_id] = w
            k += 1
        if engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out
            steps += 1
            if args.check:
                engine.check_integrity()
        elif k < len(pending):
            wait = t0 + pending[k]["t"] - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
                idle_s += wait
        if args.progress and time.perf_counter() - last_print > 10:
            last_print = time.perf_counter()
            print(f"  [{policy}] t={last_print - t0:5.1f}s arrived {k}/{len(pending)} "
                  f"finished {len(outputs)}", file=sys.stderr, flush=True)
    t_end = time.perf_counter()
    c1 = counters(engine)
    # Cool-down: the load has fallen; keep the engine stepping so that reversion can finish.
    cool_start = time.perf_counter()
    cool_name = next(iter(engine.tenants))
    for _ in range(args.cooldown):
        engine.add_request([5, 6, 7], SamplingParams(max_tokens=1, ignore_eos=True), cool_name)
        drain(engine)
        if not any(t.residency.missing_layers for t in engine.tenants.values()):
            break
    cool_s = time.perf_counter() - cool_start
    engine.check_integrity()

    ttft, tbt, tokens, per_model_tokens = [], [], 0, {n: 0 for n in models}
    first_arrival = t0 + work[0]["t"] if work else t0
    last_finish = t0
    for rid, out in outputs.items():
        arrival = t0 + sched[rid]["t"]
        ttft.append(out.token_times[0] - arrival)
        tbt += [b - a for a, b in zip(out.token_times, out.token_times[1:], strict=False)]
        tokens += len(out.token_ids)
        per_model_tokens[out.model] += len(out.token_ids)
        last_finish = max(last_finish, out.token_times[-1])
    makespan = last_finish - first_arrival
    during = diff(c1, c0)
    total = {k: sum(during[n][k] for n in during) for k in COUNTERS}
    after_cool = diff(counters(engine), c1)
    res = {
        "policy": policy,
        "requests": len(outputs),
        "output_tokens": tokens,
        "output_tokens_per_model": per_model_tokens,
        "makespan_s": makespan,
        "throughput_tok_s": tokens / makespan if makespan > 0 else None,
        "ttft_s": percentiles(ttft),
        "tbt_s": percentiles(tbt),
        "preemptions": total["preemptions"],
        "recomputed_tokens": total["recomputed_tokens"],
        "swap_bytes": total["swap_out_bytes"] + total["swap_in_bytes"],
        "remapped_layers": total["remapped_layers"],
        "restored_layers": total["restored_layers"],
        "restored_layers_in_cooldown": sum(after_cool[n]["restored_layers"] for n in after_cool),
        "restore_failures": total["restore_failures"],
        "h2d_bytes": total["h2d_bytes"],
        "stream_copy_s": total["stream_copy_s"],
        "copy_exposed_s": total["stream_exposed_s"],
        "engine_steps": int(steps),
        "driver_idle_s": idle_s,
        "wall_s": t_end - t0,
        "build_and_warmup_s": build_s,
        "cooldown_s": cool_s,
        "layers_missing_at_end": {n: t.residency.missing_layers for n, t in engine.tenants.items()},
        "per_model_counters": during,
        "slab_summary": slab_summary(engine, hist0),
        "page_timeline": timeline(engine, hist0, t0, args.timeline_points),
        "arena_pages": engine.arena.num_pages,
        "page_bytes": engine.arena.page_bytes,
    }
    by_prompt = {
        (sched[rid]["model"], round(sched[rid]["t"], 6)): list(out.token_ids)
        for rid, out in outputs.items()
    }
    engine.close()
    del engine
    return res, by_prompt


# ---- report -------------------------------------------------------------------------------------
ROWS = [
    ("TTFT p50 (s)", lambda r: r["ttft_s"]["p50"]),
    ("TTFT p99 (s)", lambda r: r["ttft_s"]["p99"]),
    ("TBT p50 (s)", lambda r: r["tbt_s"]["p50"]),
    ("TBT p99 (s)", lambda r: r["tbt_s"]["p99"]),
    ("throughput (tok/s)", lambda r: r["throughput_tok_s"]),
    ("preemptions", lambda r: r["preemptions"]),
    ("recomputed tokens", lambda r: r["recomputed_tokens"]),
    ("remapped layers", lambda r: r["remapped_layers"]),
    ("restored layers", lambda r: r["restored_layers"] + r["restored_layers_in_cooldown"]),
    ("h2d MiB", lambda r: r["h2d_bytes"] / 2**20),
    ("copy exposed (s)", lambda r: r["copy_exposed_s"]),
    ("outputs = first", lambda r: r.get("outputs_match_first")),
]


def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    return f"{x:.4g}"


def table(results: list[dict[str, Any]]) -> str:
    names = [r["policy"] for r in results]
    head = f"{'':22}" + "".join(f"{n:>14}" for n in names) + "".join(
        f"{n + '/' + names[0]:>18}" for n in names[1:]
    )
    lines = [head, "-" * len(head)]
    for label, get in ROWS:
        vals = [get(r) for r in results]
        line = f"{label:22}" + "".join(f"{fmt(v):>14}" for v in vals)
        for v in vals[1:]:
            base = vals[0]
            ok = isinstance(v, (int, float)) and isinstance(base, (int, float))
            ok = ok and not isinstance(v, bool) and base not in (0, None)
            line += f"{(f'{v / base:.3g}x' if ok else '-'):>18}"
        lines.append(line)
    return "\n".join(lines)


def timeline_text(res: dict[str, Any], width: int = 16) -> str:
    """The slab and KV pages of each tenant at a few points of the run."""
    tl = res["page_timeline"]
    if not tl:
        return ""
    idx = np.linspace(0, len(tl["t"]) - 1, min(width, len(tl["t"]))).round().astype(int)
    cols = [lab for lab in tl["pages"] if lab.endswith("/slab") or lab.endswith("/kv")]
    out = [f"  {'t (s)':>14}" + "".join(f"{tl['t'][i]:>7.1f}" for i in idx)]
    for lab in cols + ["free"]:
        if lab in tl["pages"]:
            out.append(f"  {lab:>14}" + "".join(f"{tl['pages'][lab][i]:>7}" for i in idx))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="smol-a=smollm2,smol-b=smollm2",
                   help="NAME=SOURCE,... (default: two SmolLM2 tenants)")
    p.add_argument("--policies", default="recompute,swap,oneiros",
                   help="run in this order; ratios are against the first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--page-bytes", type=int, default=2 * 2**20)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-pages", type=int, default=10,
                   help="KV pages beyond the weights (ignored with --memory-budget)")
    p.add_argument("--memory-budget", default=None,
                   help="bytes, e.g. 1200MiB (overrides --kv-pages)")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--sharing", default="temporal", choices=["temporal", "spatial"])
    p.add_argument("--swap-space", default="512MiB")
    p.add_argument("--prefetch-distance", type=int, default=2, choices=[1, 2])
    p.add_argument("--revert-hold-steps", type=int, default=8)
    p.add_argument("--max-remap-fraction", type=float, default=0.9)
    p.add_argument("--duration", type=float, default=24.0, help="seconds of arrivals")
    p.add_argument("--rate", type=float, default=0.4, help="mean requests/s per tenant")
    p.add_argument("--gamma-shape", type=float, default=0.2,
                   help="Gamma shape of inter-arrival times (< 1: bursty; CV = 1/sqrt(shape))")
    p.add_argument("--min-prompt", type=int, default=32)
    p.add_argument("--max-prompt", type=int, default=128)
    p.add_argument("--min-output", type=int, default=16)
    p.add_argument("--max-output", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cooldown", type=int, default=60,
                   help="most one-token requests after the workload, to let layers come back")
    p.add_argument("--timeline-points", type=int, default=80)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--check", action="store_true", help="engine.check_integrity() every step")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--omp-active", action="store_true", help="leave OMP_WAIT_POLICY alone")
    p.add_argument("--out", default="results/remap.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_budget is not None:
        args.memory_budget = parse_bytes(args.memory_budget)

    models = parse_models(args.models)
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    dtype = _DTYPES.get(args.dtype) or (
        torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    )
    weights = sum(
        weight_pages(build_model(resolve(s).config, dtype, torch.device(args.device)),
                     args.page_bytes)
        for s in models.values()
    )
    args.budget_bytes = (weights + args.kv_pages) * args.page_bytes

    # The workload needs the tenants' vocabularies and special tokens: a probe engine.
    probe = build_engine(args, models, policies[0])
    work = make_workload(args, probe)
    del probe
    print(f"{len(work)} requests over {args.duration:.0f}s for {', '.join(models)} "
          f"({weights} weight pages + {args.kv_pages} KV pages of {args.page_bytes // 1024} KiB); "
          f"threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
          flush=True)

    results, first_outputs = [], None
    for policy in policies:
        t = time.perf_counter()
        res, outs = run_policy(args, models, policy, work)
        if first_outputs is None:
            first_outputs = outs
        res["outputs_match_first"] = outs == first_outputs
        res["outputs_matching_first"] = sum(first_outputs.get(k) == v for k, v in outs.items())
        results.append(res)
        print(f"{policy}: {res['requests']} requests, {res['wall_s']:.1f}s "
              f"(+{res['build_and_warmup_s']:.1f}s build, {res['cooldown_s']:.1f}s cool-down, "
              f"{time.perf_counter() - t:.0f}s in all)", flush=True)

    print()
    print(table(results))
    for r in results:
        if r["remapped_layers"]:
            print(f"\npages over time under {r['policy']} (slab and KV pages per tenant):")
            print(timeline_text(r))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "remap",
        "argv": sys.argv[1:] if argv is None else argv,
        "config": {k: v for k, v in vars(args).items()},
        "models": models,
        "num_requests": len(work),
        "host": {"platform": platform.platform(), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "loadavg": list(os.getloadavg())},
        "results": {r["policy"]: r for r in results},
        "ratios_vs_first": {
            r["policy"]: {
                label: (get(r) / get(results[0]))
                if isinstance(get(r), (int, float)) and not isinstance(get(r), bool)
                and get(results[0]) not in (0, None) else None
                for label, get in ROWS
            }
            for r in results[1:]
        },
    }
    out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
