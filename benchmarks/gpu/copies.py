"""Host <-> device copies: raw bandwidth, and how much layer streaming hides under compute.

(a) Pinned host-to-device and device-to-host bandwidth for copies of 1 MiB .. 1 GiB (`--tiny`:
    up to 16 MiB), median of repeats, against the figures of the engine's start-up probe
    (`oneiros.memory.bandwidth.probe`, best of 5 copies of 64 MiB).

(b) Layer streaming under decode. An engine with `random:llama-3-8b` (`--tiny`: llama-tiny) runs a
    batch of decoding requests (as model_step.py does). Decode steps are timed with every layer
    resident (T0); then alpha layers, taken one at a time as the controller does (`oneiros.memory.remap.next_to_evict`), are made
    non-resident (`engine.evict_layers`) and the steps are timed
    again (T_alpha): each forward pass now streams them in through borrowed slabs. The copy time
    per step is

        copies per pass (oneiros.memory.passplan.plan_pass) x layer bytes / probe h2d bandwidth

    and the hidden fraction is 1 - max(0, T_alpha - T0) / copy time, clipped to [0, 1]. The
    engine's own per-step figures (bytes copied, copy time from CUDA events, time the compute
    waited) come from its per-model counters; `--trace-steps` also writes its JSONL step trace.
    Alpha layers are added in removal order (every prefix is the engine's own choice for that
    alpha); all layers are restored before the next batch size. On a CPU copies are synchronous,
    so nothing is hidden there: `--tiny --device cpu` is a smoke test.

CUDA graphs are off by default here (`--cuda-graphs` turns them on): T0 and T_alpha should differ by
the streaming alone.

    python benchmarks/gpu/copies.py --out results/gpu/copies.json
    python benchmarks/gpu/copies.py --tiny --device cpu
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402

NAME = "copies"


def parse_args(argv: list[str] | None = None):
    p = common.base_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--sizes-mib", type=common.int_list, default=None,
                   help="copy sizes in MiB (default 1,2,4,...,1024; tiny: 1,2,4,8,16)")
    p.add_argument("--copy-repeats", type=int, default=None, help="default 10 (tiny: 3)")
    p.add_argument("--skip-bandwidth", action="store_true", help="skip part (a)")
    p.add_argument("--skip-streaming", action="store_true", help="skip part (b)")
    common.add_engine_args(p)
    p.add_argument("--alphas", type=common.int_list, default=None, help="default 1,2,4,8 (tiny: 1)")
    p.add_argument("--batches", type=common.int_list, default=None, help="default 8,32 (tiny: 2)")
    p.add_argument("--context", type=int, default=None, help="prompt tokens (default 512)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="untimed decode steps (default 3)")
    p.add_argument("--prefetch-distance", type=int, default=2, choices=[1, 2])
    p.add_argument("--cuda-graphs", action="store_true", help="EngineConfig.cuda_graphs=True")
    p.add_argument("--attention", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--trace-steps", default=None, help="EngineConfig.trace_steps (JSONL path)")
    a = p.parse_args(argv)
    tiny = a.tiny
    a.model = common.tiny_model(a, "random:llama-3-8b")
    a.sizes_mib = a.sizes_mib or ([1, 2, 4, 8, 16] if tiny else [1 << k for k in range(11)])
    a.copy_repeats = a.copy_repeats or (3 if tiny else 10)
    a.alphas = sorted(set(a.alphas or ([1] if tiny else [1, 2, 4, 8])))
    a.batches = a.batches or ([2] if tiny else [8, 32])
    a.context = a.context or (16 if tiny else 512)
    a.steps = a.steps or (3 if tiny else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if tiny else 3)
    return a


# ---- (a) raw copies -----------------------------------------------------------------------------
def copy_bandwidth(args, device: torch.device, probe) -> list[dict[str, Any]]:
    pin = device.type == "cuda"
    rows = []
    for mib in args.sizes_mib:
        n = mib * common.MiB
        host_src = torch.ones(n, dtype=torch.uint8, pin_memory=pin)
        host_dst = torch.empty(n, dtype=torch.uint8, pin_memory=pin)
        dev = torch.ones(n, dtype=torch.uint8, device=device)
        h2d = common.time_calls(
            lambda d=dev, h=host_src: d.copy_(h, non_blocking=pin), device, 1, args.copy_repeats
        )
        d2h = common.time_calls(
            lambda d=dev, h=host_dst: h.copy_(d, non_blocking=pin), device, 1, args.copy_repeats
        )
        row = {"mib": mib, "bytes": n, "pinned": pin,
               "h2d_s": common.median(h2d), "d2h_s": common.median(d2h),
               "h2d_times_s": h2d, "d2h_times_s": d2h}
        row["h2d_bw"] = n / row["h2d_s"]
        row["d2h_bw"] = n / row["d2h_s"]
        row["h2d_vs_probe"] = row["h2d_bw"] / probe.h2d
        row["d2h_vs_probe"] = row["d2h_bw"] / probe.d2h
        rows.append(row)
    return rows


# ---- (b) layer streaming ------------------------------------------------------------------------
def build_engine(args, device: torch.device, max_batch: int):
    return common.build_engine(
        args, device, max_num_seqs=max_batch, cuda_graphs=args.cuda_graphs,
        attention=args.attention, prefetch_distance=args.prefetch_distance,
        trace_steps=args.trace_steps or None,
        # recompute: the engine itself never remaps here; only this script evicts layers.
        policy="recompute",
    )


def counters_of(t) -> tuple[int, float, float]:
    c = t.state.counters
    return c.h2d_bytes, c.stream_copy_s, c.stream_exposed_s


def timed_steps(engine, t, reqs, args, timer, kv_per_token) -> dict[str, Any]:
    common.decode_steps(engine, reqs, args.warmup, timer, kv_per_token)
    c0 = counters_of(t)
    res = common.decode_steps(engine, reqs, args.steps, timer, kv_per_token)
    c1 = counters_of(t)
    n = max(1, args.steps)
    res["engine_h2d_bytes_per_step"] = (c1[0] - c0[0]) / n
    res["engine_copy_s_per_step"] = (c1[1] - c0[1]) / n
    res["engine_exposed_s_per_step"] = (c1[2] - c0[2]) / n
    return res


def streaming(args, device: torch.device, probe) -> dict[str, Any]:
    from oneiros.memory.remap import next_to_evict
    from oneiros.memory.passplan import plan_pass

    t0 = time.perf_counter()
    engine = build_engine(args, device, max(args.batches))
    load_s = time.perf_counter() - t0
    t = engine.tenants["m"]
    residency = t.residency
    num_layers = t.num_layers
    alphas = [a for a in args.alphas if a <= num_layers - 1]
    if alphas != args.alphas:
        print(f"alphas above {num_layers - 1} skipped (layer 0 always stays)", file=sys.stderr)
    order: list[int] = []  # the controller's nested layout, one layer at a time
    while (nxt := next_to_evict(num_layers, order)) is not None:
        order.append(nxt)
    itemsize = torch.empty((), dtype=t.model.dtype).element_size()
    kv_per_token = t.model.cfg.kv_bytes_per_token(itemsize)
    layer_bytes = residency.layer_bytes
    timer = common.StepTimer(device)
    print(f"[streaming] engine built in {load_s:.1f}s; layer slab {layer_bytes / common.MiB:.1f} "
          f"MiB", file=sys.stderr, flush=True)
    rows = []
    for batch in args.batches:
        max_tokens = (len(alphas) + 2) * (args.warmup + args.steps) + 4
        reqs = common.start_decoding(
            engine, "m", batch, args.context, max_tokens, args.seed + batch
        )
        base = timed_steps(engine, t, reqs, args, timer, kv_per_token)
        evicted: list[int] = []
        for alpha in alphas:
            engine.evict_layers("m", order[len(evicted):alpha])
            evicted += order[len(evicted):alpha]
            plan = plan_pass(num_layers, residency.missing_layers, args.prefetch_distance)
            copy_bytes = plan.num_copies * layer_bytes
            copy_s = copy_bytes / probe.h2d
            res = timed_steps(engine, t, reqs, args, timer, kv_per_token)
            extra = max(0.0, res["step_s"] - base["step_s"])
            hidden = min(1.0, max(0.0, 1.0 - extra / copy_s)) if copy_s > 0 else None
            eng_copy, eng_exp = res["engine_copy_s_per_step"], res["engine_exposed_s_per_step"]
            rows.append({
                "batch": batch, "alpha": alpha, "missing_layers": list(residency.missing_layers),
                "copies_per_step": plan.num_copies, "copy_bytes_per_step": copy_bytes,
                "copy_s_per_step": copy_s, "t0_s": base["step_s"], "t_alpha_s": res["step_s"],
                "extra_s": extra, "hidden_fraction": hidden,
                "engine_hidden_fraction": (
                    min(1.0, max(0.0, 1.0 - eng_exp / eng_copy)) if eng_copy > 0 else None
                ),
                "engine_bytes_match": res["engine_h2d_bytes_per_step"] == copy_bytes,
                "t0_times_s": base["step_times_s"], "pure_decode": res["pure_decode"],
                **{k: v for k, v in res.items() if k.startswith("engine_")},
                "t_alpha_times_s": res["step_times_s"],
            })
            print(f"[streaming] batch {batch} alpha {alpha}: T0 {base['step_s'] * 1e3:.3f} ms, "
                  f"T_alpha {res['step_s'] * 1e3:.3f} ms, copies {copy_s * 1e3:.3f} ms "
                  f"-> hidden {hidden if hidden is None else round(hidden, 3)}",
                  file=sys.stderr, flush=True)
        if not engine.restore_layers("m", list(reversed(evicted))):
            raise RuntimeError("the evicted layers could not be restored (arena full)")
        after = timed_steps(engine, t, reqs, args, timer, kv_per_token)
        for r in rows:
            if r["batch"] == batch:
                r["t0_after_s"] = after["step_s"]  # drift check: all resident again, longer ctx
        common.release(engine, reqs)
    out = {"load_s": load_s, "num_layers": num_layers, "layer_bytes": layer_bytes,
           "removal_order": order, "prefetch_distance": args.prefetch_distance,
           "cuda_graphs": args.cuda_graphs, "attention": engine.backend.attention, "rows": rows}
    engine.check_integrity()
    engine.close()
    del engine, t, residency
    common.free_engine(device)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from dataclasses import asdict

    from oneiros.memory.bandwidth import probe as bandwidth_probe

    args = parse_args(argv)
    device = common.device_of(args)
    report = common.header(NAME, args, device)
    probe = bandwidth_probe(device, nbytes=(16 if args.tiny else 64) * common.MiB)
    report["probe"] = asdict(probe)
    print(f"probe: {probe.describe()}", file=sys.stderr, flush=True)
    if not args.skip_bandwidth:
        rows = copy_bandwidth(args, device, probe)
        report["bandwidth"] = rows
        print(f"\n(a) copies on {report['device_name']} (pinned: {device.type == 'cuda'}); probe "
              f"h2d {probe.h2d / 1e9:.1f} GB/s, d2h {probe.d2h / 1e9:.1f} GB/s")
        common.print_table(
            [{**r, "h2d_gbs": r["h2d_bw"] / 1e9, "d2h_gbs": r["d2h_bw"] / 1e9} for r in rows],
            [("mib", "MiB", ""), ("h2d_gbs", "h2d GB/s", ".2f"), ("h2d_vs_probe", "/probe", ".2f"),
             ("d2h_gbs", "d2h GB/s", ".2f"), ("d2h_vs_probe", "/probe", ".2f")],
        )
    if not args.skip_streaming:
        common.cache_random_weights(common.engine_dtype(device, args.dtype))
        st = streaming(args, device, probe)
        report["model"] = args.model
        report["streaming"] = st
        print(f"\n(b) {args.model}: {st['num_layers']} layers of "
              f"{st['layer_bytes'] / common.MiB:.1f} MiB, prefetch distance "
              f"{st['prefetch_distance']}, copy time from probe h2d {probe.h2d / 1e9:.1f} GB/s")
        common.print_table(
            [{**r, "t0_ms": r["t0_s"] * 1e3, "ta_ms": r["t_alpha_s"] * 1e3,
              "copy_ms": r["copy_s_per_step"] * 1e3,
              "eng_copy_ms": r["engine_copy_s_per_step"] * 1e3,
              "eng_exp_ms": r["engine_exposed_s_per_step"] * 1e3} for r in st["rows"]],
            [("batch", "B", ""), ("alpha", "alpha", ""), ("copies_per_step", "copies", ""),
             ("t0_ms", "T0 ms", ".3f"), ("ta_ms", "T_alpha ms", ".3f"),
             ("copy_ms", "copy ms", ".3f"), ("hidden_fraction", "hidden", ".1%"),
             ("eng_copy_ms", "eng copy ms", ".3f"), ("eng_exp_ms", "eng exposed ms", ".3f"),
             ("engine_hidden_fraction", "eng hidden", ".1%")],
        )
    sys.stdout.flush()
    common.write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
