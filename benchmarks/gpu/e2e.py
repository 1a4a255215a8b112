"""End-to-end offline throughput: oneiros against Hugging Face transformers `generate`, on the same
random-weight model and the same workload, in one run.

Workload (seeded): `--num-prompts` prompts of random token ids (EOS/BOS excluded), lengths uniform
in [--min-prompt, --max-prompt], each output forced to its own length, uniform in
[--min-output, --max-output] (greedy, EOS ignored).

  oneiros       `oneiros.engine.llm.LLM` (one engine), every request submitted at once.
  transformers  `LlamaForCausalLM` (AutoModelForCausalLM.from_config) holding the very same weights
                (the tensors oneiros packed, same dtype), `generate` in batches of `--hf-batch` in
                workload order, left padding, greedy, `cache_implementation="static"`,
                `max_new_tokens` = the longest output in the batch. Only each request's own output
                length counts as useful output. `--hf-compile` lets transformers compile the
                forward (its automatic compilation with a static cache, or torch.compile on older
                versions); a failure falls back to eager and the report says which one ran.

Reported: useful tokens/s of each, the ratio oneiros/transformers (target >= 3x: printed, not
asserted), and how far greedy outputs of the first `--compare` requests agree.

    python benchmarks/gpu/e2e.py --out results/gpu/e2e.json
    python benchmarks/gpu/e2e.py --tiny --device cpu
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402

NAME = "e2e"
TARGET_RATIO = 3.0


def parse_args(argv: list[str] | None = None):
    p = common.base_parser(NAME, __doc__.split("\n\n")[0])
    common.add_engine_args(p)
    p.add_argument("--num-prompts", type=int, default=None, help="default 256 (tiny: 8)")
    p.add_argument("--min-prompt", type=int, default=None, help="default 128 (tiny: 8)")
    p.add_argument("--max-prompt", type=int, default=None, help="default 1024 (tiny: 32)")
    p.add_argument("--min-output", type=int, default=None, help="default 128 (tiny: 4)")
    p.add_argument("--max-output", type=int, default=None, help="default 512 (tiny: 12)")
    p.add_argument("--hf-batch", type=int, default=None, help="default 32 (tiny: 4)")
    p.add_argument("--hf-compile", action="store_true",
                   help="let transformers compile its forward (falls back to eager on failure)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--compare", type=int, default=4, help="requests whose outputs are compared")
    p.add_argument("--max-num-seqs", type=int, default=None, help="EngineConfig.max_num_seqs")
    p.add_argument("--attention", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false")
    a = p.parse_args(argv)
    tiny = a.tiny
    a.model = common.tiny_model(a, "random:llama-3-8b")

    def pick(v, small, large):
        return v if v is not None else (small if tiny else large)

    a.num_prompts = pick(a.num_prompts, 8, 256)
    a.min_prompt = pick(a.min_prompt, 8, 128)
    a.max_prompt = pick(a.max_prompt, 32, 1024)
    a.min_output = pick(a.min_output, 4, 128)
    a.max_output = pick(a.max_output, 12, 512)
    a.hf_batch = pick(a.hf_batch, 4, 32)
    if not (0 < a.min_prompt <= a.max_prompt and 0 < a.min_output <= a.max_output):
        p.error("need 0 < min <= max for prompt and output lengths")
    if a.num_prompts <= 0 or a.hf_batch <= 0:
        p.error("--num-prompts and --hf-batch must be positive")
    return a


def make_workload(args, cfg) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(args.seed)
    avoid = set(cfg.eos_token_ids) | ({cfg.bos_token_id} - {None})
    work = []
    for _ in range(args.num_prompts):
        plen = int(torch.randint(args.min_prompt, args.max_prompt + 1, (), generator=gen))
        olen = int(torch.randint(args.min_output, args.max_output + 1, (), generator=gen))
        work.append({"prompt": common.random_prompt(gen, plen, cfg.vocab_size, avoid),
                     "output_len": olen})
    return work


# ---- oneiros ------------------------------------------------------------------------------------
def run_oneiros(args, device: torch.device, work: list[dict[str, Any]]) -> dict[str, Any]:
    from oneiros.core import SamplingParams
    from oneiros.engine.llm import LLM

    kw = common.engine_kwargs(args, device, attention=args.attention,
                              cuda_graphs=args.cuda_graphs, max_num_seqs=args.max_num_seqs)
    t0 = time.perf_counter()
    llm = LLM(**kw)
    load_s = time.perf_counter() - t0
    print(f"[oneiros] loaded in {load_s:.1f}s; warming up", file=sys.stderr, flush=True)

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    warm = work[: min(len(work), 8)]
    llm.generate([w["prompt"][:32] for w in warm], [params(8) for _ in warm], "m")
    common.sync(device)
    t0 = time.perf_counter()
    outs = llm.generate([w["prompt"] for w in work], [params(w["output_len"]) for w in work], "m")
    common.sync(device)
    wall = time.perf_counter() - t0
    useful = sum(len(o.token_ids) for o in outs)
    expected = sum(w["output_len"] for w in work)
    engine = llm.engine
    result = {
        "load_s": load_s,
        "wall_s": wall,
        "generated_tokens": useful,
        "expected_tokens": expected,
        "tokens_per_s": useful / wall,
        "attention": engine.backend.attention,
        "cuda_graphs": args.cuda_graphs,
        "dtype": str(engine.dtype),
        "preemptions": sum(o.num_preemptions for o in outs),
        "_token_ids": [list(o.token_ids) for o in outs],
    }
    engine.close()
    del llm, engine, outs
    common.free_engine(device)
    return result


# ---- transformers -------------------------------------------------------------------------------
def hf_model(source, dtype: torch.dtype, device: torch.device):
    """A transformers model with the weights of `source` (the cached, already cast tensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from oneiros.models.loader import hf_shapes

    cfg = AutoConfig.for_model(**source.config.raw)
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    state = source.state_dict(hf_shapes(source.config))
    missing, unexpected = model.load_state_dict(state, strict=False)
    del state
    if unexpected or (missing and missing != ["lm_head.weight"]):
        raise RuntimeError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    if missing:  # tied embeddings
        model.tie_weights()
    return model.to(device=device, dtype=dtype).eval()


def run_hf(args, device: torch.device, work: list[dict[str, Any]], source, dtype) -> dict[str, Any]:
    from transformers import GenerationConfig

    t0 = time.perf_counter()
    model = hf_model(source, dtype, device)
    load_s = time.perf_counter() - t0
    pad = 0
    model.generation_config.eos_token_id = None  # generate() fills unset fields from here
    model.generation_config.pad_token_id = pad
    has_auto_compile = hasattr(GenerationConfig(), "disable_compile")
    fixed_cache = hasattr(GenerationConfig(), "max_cache_len")
    if args.hf_compile:
        import torch._dynamo as dynamo

        # Each batch size (and, without max_cache_len, each cache length) is a new graph: past
        # dynamo's default limit of 8 it would silently run eager.
        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
    eager_forward = model.forward

    def generate(batch: list[dict[str, Any]], max_new: int, compiled: bool) -> torch.Tensor:
        n = max(len(w["prompt"]) for w in batch)
        ids = torch.full((len(batch), n), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for r, w in enumerate(batch):  # left padding
            ids[r, n - len(w["prompt"]):] = torch.tensor(w["prompt"])
            mask[r, n - len(w["prompt"]):] = 1
        gc_kw: dict[str, Any] = dict(
            do_sample=False, max_new_tokens=max_new, pad_token_id=pad,
            eos_token_id=None, cache_implementation="static",
        )
        if has_auto_compile:
            gc_kw["disable_compile"] = not compiled
        if compiled and fixed_cache:
            # One static cache size for every batch: the compiled decode step keeps its shapes
            # (without it every batch's prompt and output lengths make a new graph).
            gc_kw["max_cache_len"] = args.max_prompt + args.max_output
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                generation_config=GenerationConfig(**gc_kw),
            )
        common.sync(device)
        return out[:, n:].cpu()

    def run(compiled: bool) -> dict[str, Any]:
        if compiled and not has_auto_compile:
            model.forward = torch.compile(eager_forward, mode="reduce-overhead", fullgraph=True)
        else:
            model.forward = eager_forward
        warm = work[: min(len(work), args.hf_batch)]
        generate([{"prompt": w["prompt"][:32]} for w in warm], 8, compiled)
        chunks = [work[i:i + args.hf_batch] for i in range(0, len(work), args.hf_batch)]
        token_ids: list[list[int]] = []
        batches = []
        padded = 0
        t0 = time.perf_counter()
        for batch in chunks:
            max_new = max(w["output_len"] for w in batch)
            tb = time.perf_counter()
            gen = generate(batch, max_new, compiled)
            dt = time.perf_counter() - tb
            if gen.shape[1] != max_new:
                raise RuntimeError(f"transformers generated {gen.shape[1]} tokens, not {max_new}")
            token_ids += [gen[r, : w["output_len"]].tolist() for r, w in enumerate(batch)]
            padded += len(batch) * max_new
            useful_b = sum(w["output_len"] for w in batch)
            batches.append({"size": len(batch), "max_new_tokens": max_new,
                            "useful_tokens": useful_b, "wall_s": dt})
            print(f"[transformers] batch of {len(batch)}: {useful_b} tokens in {dt:.1f}s",
                  file=sys.stderr, flush=True)
        wall = time.perf_counter() - t0
        useful = sum(w["output_len"] for w in work)
        return {
            "wall_s": wall, "generated_tokens": useful, "tokens_per_s": useful / wall,
            "generated_tokens_incl_padding": padded, "padded_tokens_per_s": padded / wall,
            "batches": batches, "_token_ids": token_ids,
        }

    result: dict[str, Any] = {
        "load_s": load_s, "batch_size": args.hf_batch, "cache_implementation": "static",
        "compile_requested": args.hf_compile,
        "compile_mechanism": None if not args.hf_compile else (
            "generate auto-compile (static cache)" if has_auto_compile
            else "torch.compile(model.forward, mode='reduce-overhead')"),
        "fixed_static_cache_len": (args.max_prompt + args.max_output)
        if args.hf_compile and fixed_cache else None,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "dtype": str(dtype),
    }
    print(f"[transformers] loaded in {load_s:.1f}s", file=sys.stderr, flush=True)
    modes = [True, False] if args.hf_compile else [False]
    for compiled in modes:
        try:
            result.update(run(compiled))
            # transformers compiles by itself only on accelerators (not on a CPU).
            result["compiled"] = compiled and (not has_auto_compile or device.type != "cpu")
            break
        except Exception as e:  # noqa: BLE001 - a compile failure falls back to eager
            if not compiled:
                raise
            result["compile_error"] = f"{type(e).__name__}: {e}"[:2000]
            traceback.print_exc()
            print("[transformers] compiled run failed: falling back to eager", file=sys.stderr)
            import torch._dynamo as dynamo

            dynamo.reset()
    model.forward = eager_forward
    return result


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    prefix, same, first = [], 0, 0
    for x, y in zip(a, b, strict=True):
        pairs = enumerate(zip(x, y, strict=False))
        n = next((i for i, (u, v) in pairs if u != v), min(len(x), len(y)))
        prefix.append(n / max(1, min(len(x), len(y))))
        same += x == y
        first += bool(x) and bool(y) and x[0] == y[0]
    k = max(1, len(a))
    return {
        "requests": len(a),
        "identical_fraction": same / k,
        "first_token_match": first / k,
        "mean_common_prefix_fraction": sum(prefix) / k,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = common.device_of(args)
    report = common.header(NAME, args, device)
    dtype = common.engine_dtype(device, args.dtype)
    cache = common.cache_random_weights(dtype)
    from oneiros.models.loader import resolve

    cfg = resolve(args.model).config
    work = make_workload(args, cfg)
    report["model"] = args.model
    report["workload"] = {
        "num_prompts": len(work),
        "prompt_tokens": sum(len(w["prompt"]) for w in work),
        "output_tokens": sum(w["output_len"] for w in work),
        "prompt_len": [args.min_prompt, args.max_prompt],
        "output_len": [args.min_output, args.max_output],
    }
    print(f"workload: {len(work)} prompts, {report['workload']['prompt_tokens']} prompt tokens, "
          f"{report['workload']['output_tokens']} output tokens", file=sys.stderr, flush=True)
    one = run_oneiros(args, device, work)
    report["oneiros"] = {k: v for k, v in one.items() if not k.startswith("_")}
    hf = None
    if not args.skip_hf:
        source = cache.get(args.model) or resolve(args.model)  # the weights oneiros packed
        hf = run_hf(args, device, work, source, dtype)
        common.free_engine(device)
        report["transformers"] = {k: v for k, v in hf.items() if not k.startswith("_")}
        report["ratio"] = one["tokens_per_s"] / hf["tokens_per_s"]
        n = min(args.compare, len(work))
        report["greedy_agreement"] = agreement(one["_token_ids"][:n], hf["_token_ids"][:n])
        report["target"] = {"ratio": TARGET_RATIO, "met": report["ratio"] >= TARGET_RATIO}
    rows = [{"system": "oneiros", **report["oneiros"]}]
    if hf is not None:
        rows.append({"system": "transformers" + (" (compiled)" if hf.get("compiled") else ""),
                     **report["transformers"]})
    print(f"\n{args.model} on {report['device_name']}: {len(work)} prompts")
    common.print_table(rows, [
        ("system", "system", ""), ("generated_tokens", "tokens", "d"), ("wall_s", "wall s", ".2f"),
        ("tokens_per_s", "tok/s", ".1f"), ("load_s", "load s", ".1f"),
    ])
    if hf is not None:
        ag = report["greedy_agreement"]
        print(f"ratio oneiros/transformers = {report['ratio']:.2f}x: target >= {TARGET_RATIO:.0f}x "
              f"{'MET' if report['target']['met'] else 'NOT MET'}")
        print(f"greedy outputs of the first {ag['requests']} requests: "
              f"{ag['identical_fraction']:.0%} identical, first token {ag['first_token_match']:.0%}"
              f", common prefix {ag['mean_common_prefix_fraction']:.0%}")
    sys.stdout.flush()
    common.write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
