"""Where pooled TBT's tail comes from under temporal sharing: one row of the paper's grid, every
token gap classified by the other models' turns it spans.

Runs one grid setting (`benchmarks/paper.py`'s configuration: simulator, full-size random-weight
models, temporal turns) under each policy and seed with a step trace, then splits each request's
token gaps by how many other models ran a step between its two tokens. With three models holding
requests, a request waits for both others' turns: those two-turn gaps are the longest regular gaps,
and once they pass 1% of a run's gaps they set its pooled P99. Per run it prints the pooled TBT
P99, the share of two-turn gaps, their median, the P99 of the other gaps, and the P90 of turn
lengths (seconds) and of batch sizes (sequences per step).

    .venv/bin/python benchmarks/turn_gaps.py --hardware a100-80g --rate 16  # results/turn_gaps.json
    .venv/bin/python benchmarks/turn_gaps.py --hardware gh200 --mix c2 --rate 2 --seeds 0
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.paper import config, gamma  # noqa: E402
from oneiros.bench.metrics import percentile  # noqa: E402
from oneiros.bench.report import format_plain_table  # noqa: E402
from oneiros.bench.runner import RunResult, run_engine  # noqa: E402
from oneiros.bench.workloads import MIXES, workload_from_spec  # noqa: E402
from oneiros.engine.engine import LLMEngine  # noqa: E402

POLICIES = ("oneiros", "pie", "swap", "recompute")


def read_steps(path: Path) -> list[tuple[float, float, list[str], int]]:
    """(start, end, models that ran, sequences) of each executed step of a step trace."""
    steps = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        ran = [p for p in rec["plans"] if p["executed"]]
        if ran:
            steps.append((rec["t"], rec["t"] + rec["dt"], [p["model"] for p in ran],
                          sum(p["batch"] for p in ran)))
    return steps


def classify(result: RunResult, steps: list[tuple[float, float, list[str], int]]) -> dict:
    """Split token gaps by the number of other models that ran between the two tokens."""
    ends = [s[1] for s in steps]
    spans: list[tuple[float, int]] = []
    for rec in result.records:
        times = rec.token_times
        for a, b in zip(times, times[1:], strict=False):
            i, j = bisect.bisect_right(ends, a + 1e-9), bisect.bisect_right(ends, b + 1e-9)
            others = {m for k in range(i, j) for m in steps[k][2] if m != rec.model}
            spans.append((b - a, len(others)))
    two = [g for g, n in spans if n >= 2]
    rest = [g for g, n in spans if n < 2]
    turns: list[float] = []  # temporal: runs of consecutive steps of one model
    first = 0
    for k in range(1, len(steps) + 1):
        if k == len(steps) or steps[k][2] != steps[first][2]:
            turns.append(steps[k - 1][1] - steps[first][0])
            first = k
    return {
        "gaps": len(spans),
        "two_turn_share": len(two) / len(spans) if spans else None,
        "two_turn_median_s": percentile(two, 0.5),
        "other_gaps_p99_s": percentile(rest, 0.99),
        "turn_p90_s": percentile(turns, 0.9),
        "batch_p90": percentile([s[3] for s in steps], 0.9),
    }


def run_one(args: argparse.Namespace, policy: str, seed: int) -> dict[str, Any]:
    spec = gamma(args.mix, args.lengths, args.rate, args.requests, seed)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "steps.jsonl"
        engine = LLMEngine(config(args.hardware, args.mix, policy=policy, trace_steps=str(trace)))
        try:
            result = run_engine(engine, workload_from_spec(spec), progress=False)
        finally:
            engine.close()
        row = {"policy": policy, "seed": seed, "tbt_p99_s": result.summary()["tbt_s"]["p99"]}
        row.update(classify(result, read_steps(trace)))
    return row


def fmt(v: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hardware", default="a100-80g")
    ap.add_argument("--mix", default="c1", choices=sorted(MIXES))
    ap.add_argument("--lengths", default="sharegpt", choices=("sharegpt", "alpaca"))
    ap.add_argument("--rate", type=float, default=8.0, help="mean arrivals per second")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated (the grid's: 0,1,2)")
    ap.add_argument("--policies", default="oneiros,pie,swap")
    ap.add_argument("--out", default=str(ROOT / "results" / "turn_gaps.json"))
    args = ap.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        ap.error(f"--policies: choose from {', '.join(POLICIES)} (got {args.policies!r})")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if args.requests < 1 or args.rate <= 0:
        ap.error("--requests must be at least 1 and --rate positive")

    runs = [run_one(args, p, s) for s in seeds for p in policies]
    headers = ["seed", "policy", "TBT P99 (s)", "two-turn gaps (%)", "their median (s)",
               "other gaps P99 (s)", "turn P90 (s)", "batch P90"]
    print(format_plain_table(headers, [
        [str(r["seed"]), r["policy"], fmt(r["tbt_p99_s"]), fmt(r["two_turn_share"], 100, 2),
         fmt(r["two_turn_median_s"]), fmt(r["other_gaps_p99_s"]), fmt(r["turn_p90_s"]),
         fmt(r["batch_p90"], digits=0)]
        for r in runs
    ]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
