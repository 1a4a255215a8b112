"""Decode attention: the Triton paged decode kernel against SDPA on contiguous K/V.

For each batch size and context length (Llama-3-8B heads by default: 32 query heads, 8 KV heads,
head_dim 128, bf16 on CUDA, blocks of 16 tokens), one layer's K/V is laid out in the arena's paged
layout `[num_pages, blocks_per_page, 2, block_size, Hkv, D]` with block tables that are a random
permutation of the blocks (paged, not contiguous). Timed per call:

  triton  oneiros.attention.triton_paged.decode (split-K kernel plus the merge of the splits);
  sdpa    torch.nn.functional.scaled_dot_product_attention on the same K/V made contiguous,
          [B, Hkv, S, D] with enable_gqa=True: what a dense, unpaged cache costs;
  ref     oneiros.attention.torch_ref.attend with one DecodeGroup (gather + SDPA), for information.

Reported: time per call, the K/V bytes a call must read (B x ctx x 2 x Hkv x D x itemsize), the
achieved bandwidth and its fraction of the peak, the time ratio triton/sdpa, and the largest
absolute difference between the Triton and SDPA outputs. On a GPU an L2 flush runs before each
timed call. On a CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set below
before Triton is imported): `--tiny --device cpu` is a smoke test, not a measurement.

    python benchmarks/gpu/kernel.py --out results/gpu/kernel.json
    python benchmarks/gpu/kernel.py --tiny --device cpu
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402

NAME = "kernel"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv: list[str] | None = None):
    p = common.base_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--batches", type=common.int_list, default=None, help="default 1,8,32,128")
    p.add_argument("--contexts", type=common.int_list, default=None, help="default 512,2048,8192")
    p.add_argument("--q-heads", type=int, default=None, help="default 32 (tiny: 4)")
    p.add_argument("--kv-heads", type=int, default=None, help="default 8 (tiny: 2)")
    p.add_argument("--head-dim", type=int, default=None, help="default 128 (tiny: 16)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--blocks-per-page", type=int, default=1,
                   help="KV blocks per arena page (a Llama-3-8B block of all layers fills a page)")
    p.add_argument("--dtype", default=None, choices=list(_DTYPES),
                   help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--max-blocks-per-split", type=int, default=64,
                   help="the Triton decode's split-K granularity (its default: 64)")
    p.add_argument("--warmup", type=int, default=None, help="default 5 (tiny: 1)")
    p.add_argument("--repeats", type=int, default=None, help="default 20 (tiny: 2)")
    p.add_argument("--skip-ref", action="store_true", help="do not time the torch reference")
    p.add_argument("--no-flush", action="store_true", help="no L2 flush between timed calls")
    a = p.parse_args(argv)
    tiny = a.tiny
    a.batches = a.batches or ([2] if tiny else [1, 8, 32, 128])
    a.contexts = a.contexts or ([64] if tiny else [512, 2048, 8192])
    a.q_heads = a.q_heads or (4 if tiny else 32)
    a.kv_heads = a.kv_heads or (2 if tiny else 8)
    a.head_dim = a.head_dim or (16 if tiny else 128)
    a.warmup = a.warmup if a.warmup is not None else (1 if tiny else 5)
    a.repeats = a.repeats or (2 if tiny else 20)
    if a.q_heads % a.kv_heads:
        p.error("--q-heads must be a multiple of --kv-heads")
    if a.block_size & (a.block_size - 1) or a.block_size < 1:
        p.error("--block-size must be a power of two")
    return a


def make_case(
    batch: int, ctx: int, args, dtype: torch.dtype, device: torch.device, seed: int
) -> dict[str, Any]:
    """Paged K/V with randomly permuted block tables, the same K/V contiguous, and queries."""
    bs, bpp = args.block_size, args.blocks_per_page
    hkv, hq, d = args.kv_heads, args.q_heads, args.head_dim
    nb = -(-ctx // bs)  # blocks per sequence
    total = batch * nb
    num_pages = -(-total // bpp)
    g = torch.Generator().manual_seed(seed)
    kv = torch.empty(num_pages, bpp, 2, bs, hkv, d, dtype=dtype, device=device)
    kv.normal_(generator=torch.Generator(device=device).manual_seed(seed))
    perm = torch.randperm(num_pages * bpp, generator=g)[:total].view(batch, nb).to(device)
    pages, slots = perm // bpp, perm % bpp
    lens = torch.full((batch,), ctx, dtype=torch.long, device=device)
    q = torch.randn(batch, hq, d, generator=g).to(device=device, dtype=dtype)
    # The contiguous copy SDPA reads: [B, Hkv, S, D] (S = ctx; the last block's tail is dropped).
    k = kv[pages, slots, 0].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
    v = kv[pages, slots, 1].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
    return {"kv": kv, "pages": pages, "slots": slots, "lens": lens, "q": q, "k": k, "v": v}


def sdpa_fn(case: dict[str, Any], scale: float):
    """SDPA on the contiguous K/V; expands the KV heads when this torch has no enable_gqa."""
    import torch.nn.functional as F

    q4 = case["q"].unsqueeze(2)  # [B, Hq, 1, D]
    k, v = case["k"], case["v"]
    try:
        F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)
    except TypeError:
        group = q4.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

        def expanded() -> torch.Tensor:
            return F.scaled_dot_product_attention(q4, k, v, scale=scale).squeeze(2)

        return expanded, "expanded KV heads (no enable_gqa in this torch)"

    def gqa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True).squeeze(2)

    return gqa, "enable_gqa"


def run_case(
    batch: int, ctx: int, args, tp, ref, dtype, device, flush, peak_bw: float
) -> dict[str, Any]:
    case = make_case(batch, ctx, args, dtype, device, args.seed + 1000 * batch + ctx)
    scale = 1.0 / math.sqrt(args.head_dim)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = batch * ctx * 2 * args.kv_heads * args.head_dim * itemsize
    num_blocks = -(-ctx // args.block_size)

    def triton_call() -> torch.Tensor:
        return tp.decode(
            case["q"], case["kv"], case["pages"], case["slots"], case["lens"], scale,
            max_blocks_per_split=args.max_blocks_per_split,
        )

    sdpa, sdpa_mode = sdpa_fn(case, scale)
    with torch.inference_mode():
        out_t = triton_call().float()
        out_s = sdpa().float()
    err = (out_t - out_s).abs().max().item()
    row: dict[str, Any] = {
        "batch": batch, "context": ctx, "kv_bytes": nbytes, "sdpa_mode": sdpa_mode,
        "max_abs_err_triton_vs_sdpa": err,
        "triton_splits": max(1, -(-num_blocks // args.max_blocks_per_split)),
    }
    calls = {"triton": triton_call, "sdpa": sdpa}
    if args.q_heads != args.kv_heads:  # the per-query-head kernel, for the grouped one's gain
        calls["triton_per_head"] = lambda: tp.decode(
            case["q"], case["kv"], case["pages"], case["slots"], case["lens"], scale,
            max_blocks_per_split=args.max_blocks_per_split, grouped=False,
        )
    if ref is not None:
        from oneiros.attention.torch_ref import AttentionMetadata, DecodeGroup

        group = DecodeGroup(0, case["pages"], case["slots"], None, case["lens"])
        if ctx % args.block_size:
            keys = torch.arange(num_blocks * args.block_size, device=device)
            group.mask = (keys[None, :] < case["lens"][:, None])[:, None, None, :]
        meta = AttentionMetadata(None, None, None, batch, [group], [])
        calls["ref"] = lambda: ref.attend(case["q"], None, None, case["kv"], meta, scale)
    for name, fn in calls.items():
        with torch.inference_mode():
            times = common.time_calls(fn, device, args.warmup, args.repeats, before=flush)
        t = common.median(times)
        row[f"{name}_s"] = t
        row[f"{name}_times_s"] = times
        row[f"{name}_bw"] = nbytes / t
        row[f"{name}_frac_peak"] = nbytes / t / peak_bw
    row["triton_over_sdpa"] = row["triton_s"] / row["sdpa_s"]
    if "triton_per_head_s" in row:
        row["grouped_over_per_head"] = row["triton_s"] / row["triton_per_head_s"]
    if "ref_s" in row:
        row["triton_over_ref"] = row["triton_s"] / row["ref_s"]
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = common.device_of(args)
    if device.type != "cuda":
        # Triton kernels run on a CPU only under the interpreter, chosen when Triton is imported.
        if "triton" in sys.modules and not os.environ.get("TRITON_INTERPRET"):
            raise SystemExit("triton was imported before TRITON_INTERPRET=1 could be set")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from oneiros.attention import load

    tp = load("triton")
    ref = None if args.skip_ref else load("torch")
    dtype = _DTYPES[args.dtype] if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    report = common.header(NAME, args, device)
    report["shape"] = {
        "q_heads": args.q_heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
        "block_size": args.block_size, "blocks_per_page": args.blocks_per_page,
        "dtype": str(dtype), "block_tables": "random permutation of all blocks",
    }
    flush = common.L2Flush(device) if device.type == "cuda" and not args.no_flush else None
    rows = []
    for batch in args.batches:
        for ctx in args.contexts:
            row = run_case(
                batch, ctx, args, tp, ref, dtype, device, flush, report["peak"]["peak_bw"]
            )
            rows.append(row)
            print(
                f"B={batch:4d} ctx={ctx:5d}: triton {row['triton_s'] * 1e6:9.1f} us, "
                f"sdpa {row['sdpa_s'] * 1e6:9.1f} us, err {row['max_abs_err_triton_vs_sdpa']:.2e}",
                file=sys.stderr, flush=True,
            )
            common.free_engine(device)
    report["results"] = rows
    report["summary"] = {
        "max_abs_err": max(r["max_abs_err_triton_vs_sdpa"] for r in rows),
        "geomean_triton_over_sdpa": math.exp(
            sum(math.log(r["triton_over_sdpa"]) for r in rows) / len(rows)
        ),
        "best_triton_frac_peak": max(r["triton_frac_peak"] for r in rows),
    }
    peak = report["peak"]
    print(f"\n{report['device_name']}: peak {peak['peak_bw'] / 1e12:.2f} TB/s "
          f"({peak['peak_bw_source']}), {dtype}, Hq={args.q_heads} Hkv={args.kv_heads} "
          f"D={args.head_dim} block={args.block_size}")
    table = [
        {**r, "triton_us": r["triton_s"] * 1e6, "sdpa_us": r["sdpa_s"] * 1e6,
         "ref_us": r.get("ref_s", math.nan) * 1e6, "mib": r["kv_bytes"] / common.MiB,
         "triton_gbs": r["triton_bw"] / 1e9, "sdpa_gbs": r["sdpa_bw"] / 1e9}
        for r in rows
    ]
    common.print_table(table, [
        ("batch", "B", ""), ("context", "ctx", ""), ("mib", "KV MiB", ".1f"),
        ("triton_us", "triton us", ".1f"), ("triton_gbs", "GB/s", ".0f"),
        ("triton_frac_peak", "of peak", ".1%"), ("sdpa_us", "sdpa us", ".1f"),
        ("sdpa_gbs", "GB/s", ".0f"), ("sdpa_frac_peak", "of peak", ".1%"),
        ("triton_over_sdpa", "tri/sdpa", ".2f"), ("ref_us", "ref us", ".1f"),
        ("max_abs_err_triton_vs_sdpa", "max err", ".1e"),
    ])
    common.write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
