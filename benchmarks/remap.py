"""Parameter remapping on real models: swap vs pie vs oneiros on one bursty multi-model workload.

Workload (the same for every policy, fixed seed): each tenant receives requests as an independent
Gamma renewal process (shape --gamma-shape < 1 makes it bursty: coefficient of variation
1/sqrt(shape)), at --rate requests/s per tenant on average, for --duration seconds of arrivals, so
that one tenant's burst meets the others' idle periods. Prompts are random token ids
(`runner.random_prompt`: request k gets the same prompt under every policy) of
--min-prompt..--max-prompt tokens; outputs are forced to --min-output..--max-output tokens (greedy,
EOS ignored), each token reported with its top-2 log-probabilities. `bench.runner.run_engine`
replays the workload in real time (TTFT counts from the scheduled arrival) and `bench.metrics`
computes the latencies: TTFT, TBT pooled over all gaps, TPOT (each request's mean gap) and each
request's worst gap.

The memory budget is the weights plus --kv-pages pages of KV cache (or --memory-budget), tight on
purpose: under swap and pie a burst preempts requests; under oneiros the slabs of tenants out of
their turn (and, within what compute hides, of running ones) become KV pages first, and come back
when the load falls. A comparison in which no policy preempted or remapped proves nothing: the
benchmark then prints a warning (`runner.pressure_warnings`) and exits with status 3, as `oneiros
bench` does. After the workload, idle reversion and then up to --cooldown one-token requests let
the remapped layers come back (not part of the latency numbers). --repeats N runs every policy N
times and shows the spread of the ratios.

Outputs: every request is compared, by its index in the workload, with the first policy's run.
Where the tokens differ, the report gives the first diverging position and the top-2 margin there
(log-probability of the chosen token minus the runner-up's) in the first policy's run and in this
one: a margin below --near-tie (1e-3 in float32) is a numerical near-tie that a different batch
shape may flip; a larger one is suspicious (a bug until explained).

    .venv/bin/python benchmarks/remap.py                                  # 3 x SmolLM2, CPU
    .venv/bin/python benchmarks/remap.py --models a=random:llama-tiny,b=random:opt-tiny@1 \\
        --page-bytes 65536 --block-size 4 --kv-pages 4 --duration 0.3 --rate 30 \\
        --max-prompt 40 --max-output 24                                   # seconds: smoke
    .venv/bin/python benchmarks/remap.py --device cuda --duration 60 --rate 2

Output: a table (ratios against the first policy, from `runner.compare`), the output comparison
and a JSON file (--out) with, per policy, the run's summary (`RunResult.summary`), engine counters,
the cool-down, its CPU time and the load average at its end (the machine's other work stretches
wall time), every request's record and tokens, the output comparison and a compact page-owner
timeline (pages per model and kind: slab pages of an idle tenant turning into KV pages and back);
later repeats under "repeats", and under "spread" (`runner.spread`) every headline metric's
values and ratios over the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
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

from oneiros.bench.commands import EXIT_NO_PRESSURE  # noqa: E402
from oneiros.bench.metrics import lookup  # noqa: E402
from oneiros.bench.runner import (  # noqa: E402
    RequestTokens,
    RunResult,
    compare,
    pressure_warnings,
    run_engine,
    spread,
)
from oneiros.bench.workloads import WorkItem, workload_summary  # noqa: E402
from oneiros.config import EngineConfig, parse_bytes  # noqa: E402
from oneiros.core import SamplingParams  # noqa: E402
from oneiros.engine.engine import LLMEngine  # noqa: E402
from oneiros.memory.weights import weight_pages  # noqa: E402
from oneiros.models.loader import resolve  # noqa: E402
from oneiros.models.registry import build_model  # noqa: E402

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOP_LOGPROBS = 2  # the chosen token and its runner-up: enough for the margin at a divergence
# Margins below this are numerical near-ties: float32 logits of differently shaped batches differ
# by ~1e-5; 16-bit ones by ~1e-2.
NEAR_TIE = {torch.float32: 1e-3, torch.float16: 0.1, torch.bfloat16: 0.1}


# ---- workload -----------------------------------------------------------------------------------
def parse_models(spec: str) -> dict[str, str]:
    models = {}
    for part in spec.split(","):
        name, _, source = part.partition("=")
        if not source:
            name, source = f"m{len(models)}", name
        models[name.strip()] = source.strip()
    return models


def make_workload(args: argparse.Namespace, models: Sequence[str]) -> list[WorkItem]:
    """Every tenant's Gamma arrivals over --duration seconds, merged in time order. A workload
    index is a request's position in this list (its key when outputs are compared)."""
    rng = np.random.default_rng(args.seed)
    mean_gap = 1.0 / args.rate
    scale = mean_gap / args.gamma_shape
    work = []
    for name in models:
        clock = float(rng.gamma(args.gamma_shape, scale))
        while clock < args.duration:
            plen = int(rng.integers(args.min_prompt, args.max_prompt + 1))
            olen = int(rng.integers(args.min_output, args.max_output + 1))
            work.append(WorkItem(clock, name, plen, olen))
            clock += float(rng.gamma(args.gamma_shape, scale))
    work.sort(key=lambda w: w.arrival_s)
    return work


def traced_params(k: int, item: WorkItem) -> SamplingParams:
    """Forced length, greedy, EOS ignored, with the top-2 log-probabilities of every token."""
    return SamplingParams(max_tokens=item.output_len, temperature=0.0, ignore_eos=True,
                          logprobs=TOP_LOGPROBS)


# ---- one policy ---------------------------------------------------------------------------------
def build_engine(args: argparse.Namespace, models: dict[str, str], policy: str) -> LLMEngine:
    kw: dict[str, Any] = dict(
        models=models, device=args.device, dtype=args.dtype, page_bytes=args.page_bytes,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, policy=policy,
        sharing=args.sharing, seed=args.seed, swap_space=args.swap_space,
        prefetch_distance=args.prefetch_distance, remap_fallback=args.remap_fallback,
        memory_budget=args.memory_budget or args.budget_bytes,
    )
    # Left unset, these follow the engine's defaults.
    for key in ("turn_steps", "revert_hold_steps", "max_remap_fraction"):
        if getattr(args, key) is not None:
            kw[key] = getattr(args, key)
    return LLMEngine(EngineConfig(**kw))


def drain(engine: LLMEngine) -> None:
    while engine.has_unfinished():
        engine.step()


def warm_up(engine: LLMEngine) -> None:
    """One short request per tenant (not measured): kernels warm, step times measured."""
    for name in engine.tenants:
        engine.add_request([105, 106, 107, 108], SamplingParams(max_tokens=3, ignore_eos=True),
                           name)
    drain(engine)


def missing_layers(engine: LLMEngine) -> dict[str, list[int]]:
    return {n: t.residency.missing_layers for n, t in engine.tenants.items()}


def restored_total(engine: LLMEngine) -> int:
    return sum(s.counters.restored_layers for s in engine.store.states.values())


def cool_down(engine: LLMEngine, most: int) -> dict[str, Any]:
    """The load has fallen: idle reversion, then (should layers still be missing) up to `most`
    one-token requests that keep the engine stepping so that dynamic reversion can finish."""
    start, restored = time.perf_counter(), restored_total(engine)
    engine.revert_idle()
    requests = 0
    name = next(iter(engine.tenants))
    while any(missing_layers(engine).values()) and requests < most:
        engine.add_request([105, 106, 107], SamplingParams(max_tokens=1, ignore_eos=True), name)
        drain(engine)
        engine.revert_idle()
        requests += 1
    return {
        "seconds": time.perf_counter() - start,
        "requests": requests,
        "restored_layers": restored_total(engine) - restored,
        "layers_missing_at_end": missing_layers(engine),
    }


History = Sequence[tuple[float, Mapping[str, int]]]


def timeline(history: History, tenants: Sequence[str], points: int) -> dict[str, Any]:
    """The run's page history sampled to at most `points` snapshots (always keeping the snapshot
    where each tenant's slab pages were at their lowest), as columns of pages."""
    if not history:
        return {}
    labels = sorted({k for _, snap in history for k in snap})
    keep = set(np.linspace(0, len(history) - 1, min(points, len(history))).round().astype(int))
    for name in tenants:
        key = f"{name}/slab"
        keep.add(min(range(len(history)), key=lambda i: (history[i][1].get(key, 0), i)))
    idx = sorted(int(i) for i in keep)
    return {
        "t": [round(history[i][0], 3) for i in idx],
        "pages": {lab: [history[i][1].get(lab, 0) for i in idx] for lab in labels},
    }


def slab_summary(
    history: History, tenants: Sequence[str], end: Mapping[str, int]
) -> dict[str, dict[str, int]]:
    """Per tenant: slab pages at the start, lowest during the run and after the cool-down (`end`),
    and the most KV pages it held."""
    out = {}
    for name in tenants:
        slab = [snap.get(f"{name}/slab", 0) for _, snap in history] or [0]
        kv = [snap.get(f"{name}/kv", 0) for _, snap in history] or [0]
        out[name] = {
            "slab_pages_start": slab[0], "slab_pages_min": min(slab),
            "slab_pages_end": end.get(f"{name}/slab", 0), "kv_pages_max": max(kv),
        }
    return out


def run_policy(
    args: argparse.Namespace, models: dict[str, str], policy: str, work: list[WorkItem]
) -> tuple[dict[str, Any], RunResult]:
    t_build = time.perf_counter()
    engine = build_engine(args, models, policy)
    warm_up(engine)
    build_s = time.perf_counter() - t_build
    try:
        cpu = time.process_time()
        result = run_engine(
            engine, work, prompt_seed=args.seed, make_params=traced_params, keep_tokens=True,
            progress=args.progress, policy=policy,
        )
        cpu = time.process_time() - cpu
        cool = cool_down(engine, args.cooldown)
        engine.check_integrity()
        names = list(engine.tenants)
        res = {
            "policy": policy,
            "summary": result.summary(),
            "counters_per_model": result.counters,
            "cooldown": cool,
            "wall_s": result.wall_s,
            # On a shared CPU other processes stretch wall time (and with it every latency) by
            # different amounts in different runs; this process's CPU time and the load average
            # at the end of the run say how much.
            "cpu_s": cpu,
            "loadavg": list(os.getloadavg()),
            "build_and_warmup_s": build_s,
            "slab_summary": slab_summary(result.page_history, names, engine.arena.usage_by_kind()),
            "page_timeline": timeline(result.page_history, names, args.timeline_points),
            "arena_pages": engine.arena.num_pages,
            "page_bytes": engine.arena.page_bytes,
            "records": [r.to_dict() for r in result.records],
            "outputs": {str(k): o.to_dict() for k, o in result.outputs.items()},
        }
    finally:
        engine.close()
        del engine
    return res, result


# ---- outputs against the first policy -----------------------------------------------------------
def margin(tokens: RequestTokens, pos: int) -> float | None:
    """Log-probability of the token chosen at `pos` minus the best other one's (from the top
    log-probabilities); None when the run has no such position or no alternative there."""
    if pos >= len(tokens.token_ids) or pos >= len(tokens.top_logprobs):
        return None
    chosen = tokens.token_ids[pos]
    others = [lp for t, lp in tokens.top_logprobs[pos].items() if t != chosen]
    return tokens.logprobs[pos] - max(others) if others else None


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first position where the token lists differ (a length difference counts), or None."""
    pos = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if pos is None and len(a) != len(b):
        pos = min(len(a), len(b))
    return pos


def compare_outputs(
    ref: Mapping[int, RequestTokens], run: Mapping[int, RequestTokens], near_tie: float
) -> dict[str, Any]:
    """Each request of `run` against the same workload index in `ref`. `logprob_max_abs_diff` is
    the largest difference between the two runs' log-probabilities of the same token at the same
    position (before any divergence): the numerical noise the near-tie threshold must exceed."""
    both = sorted(set(ref) & set(run))
    differences, noise = [], 0.0
    for k in both:
        a, b = ref[k], run[k]
        pos = first_difference(a.token_ids, b.token_ids)
        same = len(a.token_ids) if pos is None else pos
        if same:
            noise = max(noise, float(np.max(np.abs(
                np.asarray(a.logprobs[:same]) - np.asarray(b.logprobs[:same])))))
        if pos is None:
            continue
        m = margin(a, pos)
        differences.append({
            "request": k,
            "position": pos,
            "reference_token": a.token_ids[pos] if pos < len(a.token_ids) else None,
            "token": b.token_ids[pos] if pos < len(b.token_ids) else None,
            "margin": m,
            "margin_in_this_run": margin(b, pos),
            "verdict": "near-tie" if m is not None and m < near_tie else "suspicious",
        })
    return {
        "requests": len(ref),
        "compared": len(both),
        "identical": len(both) - len(differences),
        "only_in_reference": sorted(set(ref) - set(run)),
        "only_in_this_run": sorted(set(run) - set(ref)),
        "near_tie_threshold": near_tie,
        "logprob_max_abs_diff": noise,
        "differences": differences,
        "suspicious": sum(d["verdict"] == "suspicious" for d in differences),
    }


def outputs_text(policy: str, reference: str, c: dict[str, Any]) -> str:
    lines = [f"{policy} vs {reference}: {c['identical']} of {c['requests']} requests identical"
             + (f" ({c['compared']} compared)" if c["compared"] != c["requests"] else "")
             + f"; largest logprob difference on shared tokens {c['logprob_max_abs_diff']:.2g}"]
    for d in c["differences"]:
        m, here = d["margin"], d["margin_in_this_run"]
        lines.append(
            f"  request {d['request']}: position {d['position']}, token {d['reference_token']} -> "
            f"{d['token']}, margin {'-' if m is None else f'{m:.3g}'} (this run "
            f"{'-' if here is None else f'{here:.3g}'}): {d['verdict']}"
        )
    for key, what in (("only_in_reference", "finished only in"), ("only_in_this_run", "only in")):
        if c[key]:
            where = reference if key == "only_in_reference" else policy
            lines.append(f"  requests {what} {where}: {c[key]}")
    return "\n".join(lines)


# ---- memory pressure ----------------------------------------------------------------------------
def pressure(res: dict[str, Any]) -> dict[str, int]:
    """What shows that a run came under memory pressure: preemptions, KV bytes swapped out and
    layers remapped."""
    engine = res["summary"]["engine"] or {}
    return {key: int(engine.get(key, 0))
            for key in ("preemptions", "swap_out_bytes", "remapped_layers")}


# ---- report -------------------------------------------------------------------------------------
def _get(*path: str, scale: float = 1.0) -> Callable[[dict[str, Any]], Any]:
    """A policy's value at `path` in its result (`metrics.lookup`), times `scale`."""
    def get(r: dict[str, Any]) -> Any:
        value = lookup(r, path)
        return None if value is None else value * scale
    return get


def _swap_mib(r: dict[str, Any]) -> float | None:
    """KV cache swapped out and back in, MiB."""
    e = r["summary"]["engine"]
    return (e.get("swap_out_bytes", 0) + e.get("swap_in_bytes", 0)) / 2**20 if e else None


def _identical(r: dict[str, Any]) -> str | None:
    c = r.get("outputs_vs_first")
    return None if c is None else f"{c['identical']}/{c['requests']}"


# (row label, value of a policy's result, the headline metric whose ratio the row shows)
ROWS: list[tuple[str, Callable[[dict[str, Any]], Any], str | None]] = [
    ("TTFT p50 (s)", _get("summary", "ttft_s", "p50"), "ttft_p50"),
    ("TTFT p99 (s)", _get("summary", "ttft_s", "p99"), "ttft_p99"),
    ("TBT p50 (s)", _get("summary", "tbt_s", "p50"), "tbt_p50"),
    ("TBT p99 (s)", _get("summary", "tbt_s", "p99"), "tbt_p99"),
    ("TPOT p50 (s)", _get("summary", "tpot_s", "p50"), "tpot_p50"),
    ("TPOT p99 (s)", _get("summary", "tpot_s", "p99"), "tpot_p99"),
    ("worst gap p99 (s)", _get("summary", "max_gap_s", "p99"), "max_gap_p99"),
    ("throughput (tok/s)", _get("summary", "throughput_tok_s"), "throughput_tok_s"),
    ("preemptions", _get("summary", "engine", "preemptions"), None),
    ("swap MiB", _swap_mib, None),
    ("remapped layers", _get("summary", "engine", "remapped_layers"), None),
    ("restored layers", _get("summary", "engine", "restored_layers"), None),
    ("  in cool-down", _get("cooldown", "restored_layers"), None),
    ("layer buy-backs", _get("summary", "engine", "reclaims"), None),
    ("h2d MiB", _get("summary", "engine", "h2d_bytes", scale=2**-20), None),
    ("copy exposed (s)", _get("summary", "engine", "stream_exposed_s"), None),
    ("process CPU (s)", _get("cpu_s"), None),
    ("identical outputs", _identical, None),
]


def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, int) or float(x).is_integer():
        return str(int(x))
    return f"{x:.4g}"


def table(results: Sequence[dict[str, Any]], comparison: dict[str, Any]) -> str:
    """One column per policy, then each later policy's ratio to the first (`runner.compare`)."""
    names = [r["policy"] for r in results]
    heads = [f"{n}/{names[0]}" for n in names[1:]]
    width = max([12, *(len(n) + 2 for n in names)])
    rwidth = max([12, *(len(h) + 2 for h in heads)])
    head = f"{'':20}" + "".join(f"{n:>{width}}" for n in names) + "".join(
        f"{h:>{rwidth}}" for h in heads)
    lines = [head, "-" * len(head)]
    for label, get, metric in ROWS:
        line = f"{label:20}" + "".join(f"{fmt(get(r)):>{width}}" for r in results)
        for n in names[1:]:
            x = comparison["ratios"][n].get(metric) if metric else None
            line += f"{(f'{x:.3g}x' if x is not None else ''):>{rwidth}}"
        lines.append(line.rstrip())
    return "\n".join(lines)


def spread_text(repeats: dict[str, dict[str, dict[str, Any]]], first: str) -> str:
    """Each later policy's ratio to the first over the repeats (`runner.spread`): min-max."""
    names = [n for n in repeats if n != first]
    heads = [f"{n}/{first}" for n in names]
    runs = len(next(iter(repeats[first].values()))["ratios"])
    width = max([18, *(len(h) + 2 for h in heads)])
    lines = [f"{f'ratios over {runs} repeats':20}" + "".join(f"{h:>{width}}" for h in heads)]
    for label, _, metric in ROWS:
        if metric:
            cells = []
            for n in names:
                v = repeats[n][metric]
                cells.append("-" if v["ratio_min"] is None
                             else f"{v['ratio_min']:.3g}-{v['ratio_max']:.3g}x")
            lines.append(f"{label:20}" + "".join(f"{c:>{width}}" for c in cells))
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


def run_all(
    args: argparse.Namespace,
    models: dict[str, str],
    policies: Sequence[str],
    work: list[WorkItem],
    near_tie: float,
) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """Every policy, --repeats times: per repeat the policies' results (outputs compared with the
    first policy's first run) and `runner.compare` of their runs."""
    repeats, comparisons = [], []
    reference: dict[int, RequestTokens] | None = None
    for k in range(args.repeats):
        results, runs = [], {}
        for policy in policies:
            t = time.perf_counter()
            res, run = run_policy(args, models, policy, work)
            if reference is None:
                reference, res["outputs_vs_first"] = run.outputs, None
            else:
                res["outputs_vs_first"] = compare_outputs(reference, run.outputs, near_tie)
            results.append(res)
            runs[policy] = run
            s = res["summary"]
            tag = f" (repeat {k + 1})" if args.repeats > 1 else ""
            print(f"{policy}{tag}: {s['requests']} requests ({s['rejected']} rejected), "
                  f"{res['wall_s']:.1f}s (+{res['build_and_warmup_s']:.1f}s build, "
                  f"{res['cooldown']['seconds']:.1f}s cool-down, "
                  f"{time.perf_counter() - t:.0f}s in all; {res['cpu_s']:.0f} CPU s, load "
                  f"{res['loadavg'][0]:.1f})", flush=True)
        repeats.append(results)
        comparisons.append(compare(runs))
    return repeats, comparisons


# ---- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="a=smollm2,b=smollm2,c=smollm2",
                   help="NAME=SOURCE,... (default: three SmolLM2 tenants)")
    p.add_argument("--policies", default="swap,pie,oneiros",
                   help="run in this order; ratios and outputs are against the first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--page-bytes", type=int, default=2 * 2**20)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-pages", type=int, default=10,
                   help="KV pages beyond the weights (ignored with --memory-budget)")
    p.add_argument("--memory-budget", default=None,
                   help="bytes, e.g. 1700MiB (overrides --kv-pages)")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--sharing", default="temporal", choices=["temporal", "spatial"])
    p.add_argument("--turn-steps", type=int, default=None,
                   help="temporal turn length in steps (default: the engine's)")
    p.add_argument("--swap-space", default="512MiB")
    p.add_argument("--remap-fallback", default="swap", choices=["swap", "recompute"],
                   help="what oneiros does when remapping cannot cover a shortage")
    p.add_argument("--prefetch-distance", type=int, default=2, choices=[1, 2])
    p.add_argument("--revert-hold-steps", type=int, default=None)
    p.add_argument("--max-remap-fraction", type=float, default=None)
    p.add_argument("--duration", type=float, default=24.0, help="seconds of arrivals")
    p.add_argument("--rate", type=float, default=0.4, help="mean requests/s per tenant")
    p.add_argument("--gamma-shape", type=float, default=0.2,
                   help="Gamma shape of inter-arrival times (< 1: bursty; CV = 1/sqrt(shape))")
    p.add_argument("--min-prompt", type=int, default=32)
    p.add_argument("--max-prompt", type=int, default=128)
    p.add_argument("--min-output", type=int, default=16)
    p.add_argument("--max-output", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1,
                   help="run every policy this many times (ratios' spread shown; outputs of every "
                   "run compared with the first policy's first run)")
    p.add_argument("--near-tie", type=float, default=None,
                   help="margins below this are near-ties (default 1e-3 in float32, 0.1 in 16-bit)")
    p.add_argument("--cooldown", type=int, default=60,
                   help="most one-token requests after the workload, to let layers come back")
    p.add_argument("--timeline-points", type=int, default=80)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--omp-active", action="store_true", help="leave OMP_WAIT_POLICY alone")
    p.add_argument("--out", default="results/remap.json")
    args = p.parse_args(argv)
    if args.memory_budget is not None:
        args.memory_budget = parse_bytes(args.memory_budget)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = parse_models(args.models)
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    dtype = _DTYPES.get(args.dtype) or (
        torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    )
    near_tie = args.near_tie if args.near_tie is not None else NEAR_TIE[dtype]
    meta = torch.device("meta")  # sizes only, no weights
    weights = sum(
        weight_pages(build_model(resolve(s).config, dtype, meta), args.page_bytes)
        for s in models.values()
    )
    args.budget_bytes = (weights + args.kv_pages) * args.page_bytes
    work = make_workload(args, list(models))
    kv = (f"{args.kv_pages} KV pages" if args.memory_budget is None
          else f"a budget of {args.memory_budget / 2**20:.0f} MiB")
    print(f"{len(work)} requests over {args.duration:g}s for {', '.join(models)} "
          f"({weights} weight pages + {kv} of {args.page_bytes // 1024} KiB); "
          f"threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
          flush=True)

    repeats, comparisons = run_all(args, models, policies, work, near_tie)
    results, first = repeats[0], policies[0]
    print()
    print(table(results, comparisons[0]))
    over_repeats = spread(comparisons)
    if len(repeats) > 1:
        print()
        print(spread_text(over_repeats, first))
    print()
    for k, rep in enumerate(repeats):
        for r in rep:
            if r["outputs_vs_first"] is not None:
                tag = f" (repeat {k + 1})" if len(repeats) > 1 else ""
                print(outputs_text(r["policy"] + tag, first, r["outputs_vs_first"]))
    warnings = list(dict.fromkeys(w for c in comparisons for w in pressure_warnings(c)))
    for w in warnings:
        print(f"\nWARNING: {w}")
    for r in results:
        if not sum(pressure(r).values()):
            print(f"note: {r['policy']} neither preempted nor remapped")
    busiest = max(r["loadavg"][0] for rep in repeats for r in rep)
    if busiest > (os.cpu_count() or 1):
        print(f"note: load average up to {busiest:.1f} on {os.cpu_count()} CPUs: other processes "
              "stretched wall time (and every latency) by different amounts in different runs; "
              "compare the runs' process CPU time")
    for r in results:
        if r["summary"]["engine"]["remapped_layers"]:
            print(f"\npages over time under {r['policy']} (slab and KV pages per tenant):")
            print(timeline_text(r))

    compared = [r["outputs_vs_first"] for rep in repeats for r in rep if r["outputs_vs_first"]]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "remap",
        "argv": sys.argv[1:] if argv is None else argv,
        "config": dict(vars(args)),
        "models": models,
        "num_requests": len(work),
        "workload": workload_summary(work),
        "host": {"platform": platform.platform(), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                 "loadavg": list(os.getloadavg())},
        "memory_pressure": [{r["policy"]: pressure(r) for r in rep} for rep in repeats],
        "warnings": warnings,
        "outputs_identical": all(c["identical"] == c["requests"] for c in compared),
        "suspicious_differences": sum(c["suspicious"] for c in compared),
        "ratios_vs_first": [c["ratios"] for c in comparisons],
        "spread": over_repeats,
        "results": {r["policy"]: r for r in results},
        "repeats": [{r["policy"]: r for r in rep} for rep in repeats[1:]],
    }
    out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"\nwrote {out}")
    return EXIT_NO_PRESSURE if warnings else 0


if __name__ == "__main__":
    sys.exit(main())
