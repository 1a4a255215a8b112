"""Decode step time of a random-weight Llama-3-8B through the engine, against the memory roofline.

For each configuration (CUDA graphs on/off x attention backend) one engine is built with
`random:llama-3-8b` (`--tiny`: `random:llama-tiny`); for each batch size, `batch` requests of
`--context` random prompt tokens (greedy, EOS ignored) are added and the engine is stepped until
every request has its first token. From then on each `engine.step()` is a pure decode step of the
whole batch (checked: every request gains exactly one token). After `--warmup` steps (CUDA graph
capture happens there) `--steps` steps are timed; the median is reported with

  roofline time       (weight bytes read per step + KV bytes read per step) / peak bandwidth
                      (weights: every layer, the final norm, the LM head and `batch` embedding rows;
                      KV: every token of every sequence, all layers, K and V)
  fraction of roofline  roofline time / step time
  tokens/s            batch / step time

The target is >= 70% of the roofline at batch 32 on the 8B geometry; it is printed, not asserted.
Random weights are drawn once per process and reused by every engine (see common.py).

    python benchmarks/gpu/model_step.py --out results/gpu/model_step.json
    python benchmarks/gpu/model_step.py --tiny --device cpu
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402

NAME = "model_step"
TARGET_FRACTION = 0.70
TARGET_BATCH = 32


def parse_args(argv: list[str] | None = None):
    p = common.base_parser(NAME, __doc__.split("\n\n")[0])
    common.add_engine_args(p)
    p.add_argument("--batches", type=common.int_list, default=None, help="default 1,8,32,128")
    p.add_argument("--context", type=int, default=None, help="prompt tokens (default 512)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (default 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed decode steps (default 5)")
    p.add_argument("--graphs", default="both", choices=["both", "on", "off"],
                   help="EngineConfig.cuda_graphs")
    p.add_argument("--attention", type=common.str_list, default=None,
                   help="backends, comma-separated (default: triton,torch on CUDA, torch on CPU)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: the largest batch")
    p.add_argument("--trace-steps", default=None,
                   help="EngineConfig.trace_steps: a JSONL path (one file per configuration)")
    a = p.parse_args(argv)
    tiny = a.tiny
    a.model = common.tiny_model(a, "random:llama-3-8b")
    a.batches = a.batches or ([1, 2] if tiny else [1, 8, 32, 128])
    a.context = a.context or (16 if tiny else 512)
    a.steps = a.steps or (3 if tiny else 20)
    a.warmup = a.warmup if a.warmup is not None else (1 if tiny else 5)
    return a


def configurations(args, device: torch.device) -> list[dict[str, Any]]:
    graphs = {"both": [True, False], "on": [True], "off": [False]}[args.graphs]
    attention = args.attention or (["triton", "torch"] if device.type == "cuda" else ["torch"])
    return [{"cuda_graphs": g, "attention": a} for a in attention for g in graphs]


def build_engine(args, device: torch.device, conf: dict[str, Any], tag: str):
    trace = None
    if args.trace_steps:
        path = Path(args.trace_steps)
        trace = str(path.with_name(f"{path.stem}-{tag}{path.suffix or '.jsonl'}"))
    return common.build_engine(
        args, device, max_num_seqs=args.max_num_seqs or max(args.batches),
        cuda_graphs=conf["cuda_graphs"], attention=conf["attention"], trace_steps=trace,
    )


def measure(args, device: torch.device, conf: dict[str, Any], peak_bw: float) -> dict[str, Any]:
    tag = f"{conf['attention']}-graphs-{'on' if conf['cuda_graphs'] else 'off'}"
    t0 = time.perf_counter()
    engine = build_engine(args, device, conf, tag)
    load_s = time.perf_counter() - t0
    t = engine.tenants["m"]
    model = t.model
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    kv_per_token = model.cfg.kv_bytes_per_token(itemsize)
    timer = common.StepTimer(device)
    out: dict[str, Any] = {
        **conf, "tag": tag, "load_s": load_s, "engine_attention": engine.backend.attention,
        "dtype": str(model.dtype), "kv_bytes_per_token": kv_per_token, "batches": [],
    }
    print(f"[{tag}] engine built in {load_s:.1f}s", file=sys.stderr, flush=True)
    for batch in args.batches:
        tp = time.perf_counter()
        reqs = common.start_decoding(
            engine, "m", batch, args.context, args.warmup + args.steps + 4, args.seed + batch
        )
        prefill_s = time.perf_counter() - tp
        common.decode_steps(engine, reqs, args.warmup, timer, kv_per_token)
        res = common.decode_steps(engine, reqs, args.steps, timer, kv_per_token)
        common.release(engine, reqs)
        w = common.weight_bytes(model, batch)
        step = res["step_s"]
        roof = (w["read_per_step"] + res["kv_bytes_per_step"]) / peak_bw
        row = {
            "batch": batch,
            "context": args.context,
            "prefill_s": prefill_s,
            **res,
            "weight_bytes_per_step": w["read_per_step"],
            "param_bytes": w["param_bytes"],
            "bytes_per_step": w["read_per_step"] + res["kv_bytes_per_step"],
            "roofline_s": roof,
            "fraction_of_roofline": roof / step,
            "tokens_per_s": batch / step,
        }
        out["batches"].append(row)
        print(
            f"[{tag}] batch {batch:4d}: step {step * 1e3:8.3f} ms, roofline {roof * 1e3:8.3f} ms "
            f"({roof / step:.1%}), {batch / step:9.1f} tok/s"
            + ("" if res["pure_decode"] else "  (NOT pure decode steps)"),
            file=sys.stderr, flush=True,
        )
    engine.close()
    del engine, t, model
    common.free_engine(device)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = common.device_of(args)
    if device.type != "cuda" and "triton" in (args.attention or []):
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the engine imports Triton
    report = common.header(NAME, args, device)
    peak_bw = report["peak"]["peak_bw"]
    common.cache_random_weights(common.engine_dtype(device, args.dtype))
    runs = [measure(args, device, conf, peak_bw) for conf in configurations(args, device)]
    report["model"] = args.model
    report["results"] = runs
    rows = [{**r, "tag": run["tag"]} for run in runs for r in run["batches"]]
    at_target = [r for r in rows if r["batch"] == TARGET_BATCH]
    best = max(at_target, key=lambda r: r["fraction_of_roofline"], default=None)
    report["target"] = {
        "fraction_of_roofline": TARGET_FRACTION,
        "batch": TARGET_BATCH,
        "model": "random:llama-3-8b",
        "applies": args.model == "random:llama-3-8b" and best is not None,
        "best": None if best is None
        else {"tag": best["tag"], "fraction": best["fraction_of_roofline"]},
        "met": None if best is None else best["fraction_of_roofline"] >= TARGET_FRACTION,
    }
    peak = report["peak"]
    print(f"\n{args.model} on {report['device_name']}, context {args.context}, peak "
          f"{peak['peak_bw'] / 1e12:.2f} TB/s ({peak['peak_bw_source']})")
    table = [
        {**r, "step_ms": r["step_s"] * 1e3, "roof_ms": r["roofline_s"] * 1e3,
         "gb": r["bytes_per_step"] / 1e9}
        for r in rows
    ]
    common.print_table(table, [
        ("tag", "config", ""), ("batch", "B", ""), ("step_ms", "step ms", ".3f"),
        ("gb", "GB/step", ".3f"), ("roof_ms", "roofline ms", ".3f"),
        ("fraction_of_roofline", "of roofline", ".1%"), ("tokens_per_s", "tok/s", ".1f"),
        ("pure_decode", "pure", ""),
    ])
    tg = report["target"]
    if best is None:
        print(f"target: no run at batch {TARGET_BATCH}")
    else:
        verdict = "MET" if tg["met"] else "NOT MET"
        note = "" if tg["applies"] else " (the target is for random:llama-3-8b; this is not it)"
        print(f"target >= {TARGET_FRACTION:.0%} of roofline at batch {TARGET_BATCH}: {verdict}, "
              f"best {best['fraction_of_roofline']:.1%} ({best['tag']}){note}")
    common.write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
