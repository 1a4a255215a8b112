"""The `oneiros` command: generate, serve, bench, simulate, calibrate."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from oneiros.config import EngineConfig
from oneiros.core import OneirosError

DEFAULT_SERVE_MODELS = {"smollm2-a": "smollm2", "smollm2-b": "smollm2"}


def _model_arg(value: str) -> tuple[str, str]:
    """NAME=SOURCE, or SOURCE alone (the tenant is then named after the source)."""
    name, sep, source = value.partition("=")
    if not sep:
        from oneiros.engine.llm import _tenant_name

        return _tenant_name(value), value
    if not name or not source:
        raise argparse.ArgumentTypeError(f"expected NAME=SOURCE, got {value!r}")
    return name, source


def _add_engine_args(p: argparse.ArgumentParser, default_policy: str) -> None:
    p.add_argument(
        "--model",
        action="append",
        type=_model_arg,
        metavar="[NAME=]SOURCE",
        help="a model to serve: built-in name (smollm2), HF directory, .gguf file or "
        "random:CONFIG[@SEED]; repeat for several tenants",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument(
        "--memory-budget",
        default=None,
        help="arena size: bytes (4GiB, 512MiB) or a fraction of free device memory (0.9)",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="do not share or keep KV blocks of equal prompt prefixes (on by default)")
    p.add_argument("--page-bytes", type=int, default=None,
                   help="arena page size (default: 2 MiB, or larger for big KV blocks)")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument(
        "--policy",
        default=default_policy,
        choices=["recompute", "swap", "static", "oneiros"],
        help="what to do when KV cache runs out (oneiros: remap parameter memory first)",
    )
    p.add_argument("--sharing", default="temporal", choices=["temporal", "spatial"])
    p.add_argument("--attention", default="auto", choices=["auto", "torch", "triton"],
                   help="attention backend (auto: Triton on CUDA when installed)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="run decode steps eagerly on CUDA (graphs are captured by default)")
    p.add_argument("--swap-space", default="1GiB", help="host memory for swapped KV (swap policy)")
    p.add_argument("--max-remap-fraction", type=float, default=0.9)
    p.add_argument("--remap-fallback", default="recompute", choices=["recompute", "swap"],
                   help="policy oneiros: what to do when remapping cannot cover a shortage")
    p.add_argument("--prefetch-distance", type=int, default=2, choices=[1, 2])
    p.add_argument("--trace-steps", default=None, metavar="PATH", help="record every step (JSONL)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all)")


def _config(args: argparse.Namespace, default_models: dict[str, str]) -> EngineConfig:
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise OneirosError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    models = dict(args.model) if args.model else dict(default_models)
    if args.model and len(models) != len(args.model):
        raise OneirosError("two --model arguments use the same name")
    return EngineConfig(
        models=models,
        device=args.device,
        dtype=args.dtype,
        memory_budget=args.memory_budget,
        block_size=args.block_size,
        prefix_caching=args.prefix_caching,
        page_bytes=args.page_bytes,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        policy=args.policy,
        sharing=args.sharing,
        attention=args.attention,
        cuda_graphs=args.cuda_graphs,
        swap_space=args.swap_space,
        max_remap_fraction=args.max_remap_fraction,
        remap_fallback=args.remap_fallback,
        prefetch_distance=args.prefetch_distance,
        trace_steps=args.trace_steps,
    )


def _generate(args: argparse.Namespace) -> int:
    from oneiros.core import SamplingParams
    from oneiros.engine.engine import LLMEngine

    engine = LLMEngine(_config(args, {"smollm2": "smollm2"}))
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
    model = args.model[0][0] if args.model else None
    if args.chat:
        req = engine.add_request(
            None, params, model, messages=[{"role": "user", "content": args.prompt}]
        )
    else:
        req = engine.add_request(args.prompt, params, model)
    while True:
        for out in engine.step():
            if out.request_id == req.request_id and out.finished:
                print(out.text)
                return 0


def _serve(args: argparse.Namespace) -> int:
    from oneiros.server.app import serve

    serve(
        _config(args, DEFAULT_SERVE_MODELS),
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_queue=args.max_queue,
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    from oneiros.bench.commands import run_bench

    return run_bench(args, None if args.url else _config(args, {}))


def _simulate(args: argparse.Namespace) -> int:
    from oneiros.bench.commands import run_simulate, sim_models

    args.model = list(sim_models(args.model, args.models).items())
    if args.mix is None and args.models:
        args.mix = args.models
    return run_simulate(args, _config(args, {}))


def _calibrate(args: argparse.Namespace) -> int:
    from oneiros.bench.commands import run_calibrate

    return run_calibrate(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oneiros", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one prompt and print the text")
    _add_engine_args(g, "recompute")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.set_defaults(func=_generate)

    s = sub.add_parser("serve", help="run the OpenAI-compatible server")
    _add_engine_args(s, "oneiros")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None)
    s.add_argument("--max-queue", type=int, default=256, help="requests in flight before 429")
    s.set_defaults(func=_serve)

    from oneiros.bench.commands import add_report_args

    b = sub.add_parser("bench", help="run one workload against several policies; report ratios")
    _add_engine_args(b, "recompute")
    b.add_argument("--workload", required=True,
                   help="e.g. poisson:rate=2,n=100,lengths=sharegpt,mix=a+b,seed=0 "
                   "(see docs/workloads.md)")
    b.add_argument("--url", default=None, help="an OpenAI-compatible server to measure instead")
    b.add_argument("--api-key", default=None)
    add_report_args(b)
    b.set_defaults(func=_bench)

    m = sub.add_parser("simulate", help="the same report from the simulator on a hardware profile")
    _add_engine_args(m, "oneiros")
    m.set_defaults(memory_budget="0.9")
    m.add_argument("--hardware", required=True, help="gh200, h100-sxm, h100-pcie, a100-80g, cpu "
                   "or a profile .json from `oneiros calibrate`")
    m.add_argument("--models", default=None, help="a paper mix (c1, c2); or use --model")
    m.add_argument("--trace", default=None, help="an Azure LLM inference trace CSV to replay")
    m.add_argument("--time-scale", type=float, default=1.0, help="trace time divided by this")
    m.add_argument("--max-requests", type=int, default=None)
    m.add_argument("--mix", default=None, help="model mix for the trace (default: --models)")
    m.add_argument("--workload", default=None, help="a workload spec instead of --trace")
    add_report_args(m)
    m.set_defaults(func=_simulate, policies=["swap", "oneiros"])

    c = sub.add_parser("calibrate", help="fit a hardware profile to a measured step trace")
    c.add_argument("--trace", required=True, help="a JSONL step trace (--trace-steps of a run)")
    c.add_argument("--model", action="append", type=_model_arg, metavar="NAME=SOURCE",
                   help="the traced models (geometry only)")
    c.add_argument("--base", default="cpu", help="the profile whose peaks are kept")
    c.add_argument("--name", default=None)
    c.add_argument("--out", default="results/profile.json")
    c.set_defaults(func=_calibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except OneirosError as e:
        print(f"oneiros: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
