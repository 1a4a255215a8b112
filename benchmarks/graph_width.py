"""Decode graphs with block tables as wide as the model's longest context against tables bucketed
to the batch's longest context (a power of two of blocks), in one run.

The graph path runs through `EagerReplay` here (a CPU has no CUDA graphs): the same static
buffers, padding and attention calls a CUDA graph replays. The model is the tiny random Llama
with its context raised to `--max-model-len`, so that the table width, not the matmuls, is what
the two runs differ in; the reference attention backend gathers every block of the table.

    .venv/bin/python benchmarks/graph_width.py --out results/graph_width.json
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from oneiros.config import EngineConfig
from oneiros.core import SamplingParams
from oneiros.engine.engine import LLMEngine
from oneiros.engine.graphs import EagerReplay, batch_sizes

CONFIGS = Path(__file__).resolve().parent.parent / "oneiros" / "models" / "configs"


def run(config: Path, args: argparse.Namespace, full_width: bool) -> dict:
    e = LLMEngine(EngineConfig(
        models={"m": f"random:{config}"}, device="cpu", max_num_seqs=args.batch,
        memory_budget="512MiB", max_model_len=args.max_model_len, block_size=args.block_size,
    ))
    runner = e.executor.runners["m"]
    runner.use_graphs(EagerReplay(), batch_sizes(args.batch), settle_steps=0)
    graphs = runner.graphs
    if full_width:  # what every graph used before: tables as wide as max_model_len
        graphs.width_for = lambda num_blocks: graphs.max_blocks
    rng = random.Random(args.seed)
    params = SamplingParams(max_tokens=args.warmup + args.steps + 1, ignore_eos=True,
                            temperature=0.0)
    reqs = [e.add_request([rng.randrange(3, 500) for _ in range(args.context)], params, "m")
            for _ in range(args.batch)]
    while any(not r.output_token_ids for r in reqs):  # the prefill (in chunks)
        e.step()
    for _ in range(args.warmup):
        e.step()
    replays = graphs.replays
    t0 = time.perf_counter()
    for _ in range(args.steps):
        e.step()
    step_s = (time.perf_counter() - t0) / args.steps
    assert graphs.replays - replays == args.steps, "every timed step must replay a graph"
    return {"full_width": full_width, "step_ms": step_s * 1e3, "graphs": graphs.captured}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=500, help="prompt tokens per request")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="alternating pairs of runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/graph_width.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = json.loads((CONFIGS / "llama-tiny.json").read_text())
    cfg["max_position_embeddings"] = args.max_model_len
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "llama-long.json"
        config.write_text(json.dumps(cfg))
        for _ in range(args.repeats):
            full, bucketed = run(config, args, True), run(config, args, False)
            rows.append({"full": full, "bucketed": bucketed,
                         "speedup": full["step_ms"] / bucketed["step_ms"]})
            print(f"full width {full['step_ms']:8.2f} ms/step {full['graphs']}, bucketed "
                  f"{bucketed['step_ms']:7.2f} ms/step {bucketed['graphs']}: "
                  f"{rows[-1]['speedup']:.1f}x")
    speedups = sorted(r["speedup"] for r in rows)
    print(f"median speedup {speedups[len(speedups) // 2]:.1f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": rows,
                               "median_speedup": speedups[len(speedups) // 2]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
