"""`oneiros bench`, `oneiros simulate` and `oneiros calibrate`: the harness behind the CLI.

bench     the same workload against several policies, in-process (real engine) or over HTTP
          (`--url`, any OpenAI-compatible server); JSON (ours and `vllm bench serve`'s field
          names), PNG and a table of ratios against the first policy; `--repeats` shows spread.
simulate  the same report from the simulator: the real engine on the meta device with a hardware
          profile's cost model and a virtual clock (`--hardware gh200`, `--models c1`).
calibrate fit a profile's efficiencies and overheads to a step trace (`--trace-steps` of a real
          run).

A comparison in which every request failed exits with status 4; one in which no policy ever came
under memory pressure (so the ratios are noise) warns and exits with status 3.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from oneiros.config import EngineConfig
from oneiros.core import OneirosError
from oneiros.engine.policies import POLICIES


SIM_ONLY = ("mig",)  # baselines that are not one engine: the simulator runs them (bench.partition)


def policies_arg(value: str) -> list[str]:
    names = [p.strip() for p in value.split(",") if p.strip()]
    known = (*POLICIES, *SIM_ONLY)
    bad = [p for p in names if p not in known]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"policies must be a comma list of {', '.join(known)}; got {value!r}"
        )
    return names


def add_report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policies", type=policies_arg, default=list(POLICIES),
                   help="comma list, the first is the baseline of the ratios")
    p.add_argument("--out", default="results/bench.json", help="JSON report")
    p.add_argument("--plot", default=None, help="PNG (default: the JSON path with .png)")
    p.add_argument("--slo-ttft", type=float, default=None, help="goodput SLO on TTFT, seconds")
    p.add_argument("--slo-tbt", type=float, default=None, help="goodput SLO on P99 TBT, seconds")
    p.add_argument("--overlong", choices=("clip", "reject"), default="clip",
                   help="a request longer than its model's context: shorten it to fit, or refuse "
                        "it (either way the report says how many)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every policy this many times; the table shows mean and spread")
    p.add_argument("--no-progress", action="store_true")


def _workload(args: argparse.Namespace, flag: str = "--workload") -> list:
    """The workload of the spec; an error names the flag the user gave."""
    from oneiros.bench.workloads import workload_from_spec

    try:
        return workload_from_spec(args.workload)
    except (ValueError, OSError) as e:
        raise OneirosError(f"{flag}: {e}") from None


EXIT_NO_PRESSURE = 3  # a comparison that compared nothing: see pressure_warnings
EXIT_ALL_FAILED = 4


def _report(
    args: argparse.Namespace, runs: list[dict], config: dict[str, Any]
) -> int:
    """Report the first repeat's runs in full, the spread over all repeats; warn (and exit
    non-zero) when every request failed or nothing came under memory pressure."""
    import sys

    from oneiros.bench.report import print_table, write_report
    from oneiros.bench.runner import compare, pressure_warnings, spread

    results = runs[0]
    comparisons = [compare(r, args.slo_ttft, args.slo_tbt) for r in runs]
    repeats = spread(comparisons) if len(runs) > 1 else None
    png = args.plot or str(Path(args.out).with_suffix(".png"))
    report = write_report(results, args.out, png, config, args.slo_ttft, args.slo_tbt, repeats)
    print_table(report["comparison"], repeats=repeats)
    print(f"wrote {args.out} and {png}")
    warnings = [w for c in comparisons for w in pressure_warnings(c)]
    for w in dict.fromkeys(warnings):
        print(f"oneiros: warning: {w}", file=sys.stderr)
    if any(w.startswith("every request failed") for w in warnings):
        return EXIT_ALL_FAILED
    if warnings:
        return EXIT_NO_PRESSURE
    return 0


def _repeat(args: argparse.Namespace, run: Any) -> list[dict]:
    """`run(i)` for each repeat i."""
    if args.repeats < 1:
        raise OneirosError(f"--repeats must be at least 1, got {args.repeats}")
    return [run(i) for i in range(args.repeats)]


def run_bench(args: argparse.Namespace, base: EngineConfig | None) -> int:
    from oneiros.bench.runner import run_http, run_policies

    workload = _workload(args)
    progress = not args.no_progress
    config = {"workload": args.workload, "policies": args.policies}
    if args.url:
        runs = _repeat(args, lambda _: {
            args.url: run_http(args.url, workload, api_key=args.api_key, progress=progress)})
        return _report(args, runs, {**config, "url": args.url})
    assert base is not None
    if any(p in SIM_ONLY for p in args.policies):
        raise OneirosError(
            f"{', '.join(SIM_ONLY)} runs in the simulator only: use `oneiros simulate`"
        )
    served = set(base.models)
    missing = sorted({w.model for w in workload} - served)
    if missing:
        raise OneirosError(
            f"the workload names models {missing} that are not served ({sorted(served)}); pass "
            "--model NAME=SOURCE for each, or a mix of served names (mix=a+b in the workload)"
        )
    runs = _repeat(args, lambda _: run_policies(
        lambda p: _engine(replace(base, policy=p)), args.policies, workload, progress=progress,
        overlong=args.overlong,
    ))
    return _report(args, runs, {**config, "engine": base.__dict__})


def _engine(config: EngineConfig):
    from oneiros.engine.engine import LLMEngine

    return LLMEngine(config)


def sim_models(value: list[tuple[str, str]] | None, mix: str | None) -> dict[str, str]:
    """--models c1 (a paper mix: its models at full geometry, random weights) or NAME=SOURCE."""
    from oneiros.bench.workloads import MIXES

    if value:
        return dict(value)
    if mix is None or mix not in MIXES:
        raise OneirosError(f"--models takes {', '.join(MIXES)} or NAME=SOURCE entries")
    return {name: f"random:{name}" for name in MIXES[mix]}


def run_simulate(args: argparse.Namespace, base: EngineConfig) -> int:
    from oneiros.bench.runner import run_policies

    from_trace = not args.workload
    if from_trace:
        if not args.trace:
            raise OneirosError("give --trace (an Azure LLM trace CSV) or --workload SPEC")
        if not Path(args.trace).is_file():
            raise OneirosError(
                f"--trace: no such file {args.trace!r} (an Azure LLM inference trace CSV: "
                "TIMESTAMP,ContextTokens,GeneratedTokens; docs/workloads.md)"
            )
        spec = f"azure:path={args.trace},scale={args.time_scale},mix={args.mix or 'c1'}"
        if args.max_requests:
            spec += f",n={args.max_requests}"
        args.workload = spec
    from oneiros.bench.partition import run_partitioned

    workload = _workload(args, "--trace" if from_trace else "--workload")
    base = replace(base, executor="sim", hardware=args.hardware, sim_noise=args.noise)

    def once(i: int) -> dict:
        """Repeat i: with --noise, its step noise is drawn from seed i."""
        cfg = replace(base, seed=i)
        results = {}
        for p in args.policies:
            kw = {"progress": not args.no_progress, "overlong": args.overlong}
            if p == "mig":
                results[p] = run_partitioned(cfg, workload, policy=cfg.remap_fallback, **kw)
            else:
                results.update(run_policies(
                    lambda p: _engine(replace(cfg, policy=p)), [p], workload, **kw
                ))
        return results

    runs = _repeat(args, once)
    config = {
        "workload": args.workload, "policies": args.policies, "hardware": args.hardware,
        "engine": base.__dict__,
    }
    return _report(args, runs, config)


def run_calibrate(args: argparse.Namespace) -> int:
    import torch

    from oneiros.models.loader import resolve
    from oneiros.models.registry import build_model
    from oneiros.sim.calibrate import fit, read_steps
    from oneiros.sim.cost import ModelCost
    from oneiros.sim.hardware import load_profile

    if not args.model:
        raise OneirosError("pass the traced models with --model NAME=SOURCE")
    base = load_profile(args.base)
    meta = torch.device("meta")
    costs = {
        name: ModelCost.of(build_model(resolve(src).config, torch.float32, meta))
        for name, src in args.model
    }
    try:
        steps = read_steps(args.trace)
    except OSError as e:
        raise OneirosError(f"cannot read the step trace: {e}") from None
    prof, stats = fit(base, steps, costs, args.name)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(prof.to_json() + "\n")
    print(
        f"{prof.name}: compute_eff={prof.compute_eff:.3f} mem_eff={prof.mem_eff:.3f} "
        f"overlap={prof.overlap} step_overhead={prof.step_overhead_s * 1e3:.2f} ms "
        f"per_token={prof.token_overhead_s * 1e6:.1f} us "
        f"per_sequence={prof.seq_overhead_s * 1e6:.1f} us "
        f"multi_token={prof.multi_token_overhead_s * 1e3:.2f} ms; {stats['steps']} steps, "
        f"rms relative error {stats['rms_relative_error']:.1%}{_noise(stats)}; wrote {args.out}"
    )
    return 0


def _noise(stats: dict) -> str:
    """The trace's own noise floor (`step_noise`), when it has repeated step shapes."""
    if stats.get("noise_rms_relative") is None:
        return ""
    return (f" (noise floor: repeated step shapes deviate {stats['noise_rms_relative']:.1%} rms "
            f"over {stats['noise_steps']} steps)")
